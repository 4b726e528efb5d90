"""edgetl.bench, edgetl.envinfo and `edgetl bench` on tiny torch-free bundles."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetl.bench import BenchResult, bench, bench_precisions, compare, latency_summary, report, synthetic_image
from edgetl.cli import main
from edgetl.envinfo import environment
from edgetl.errors import BackendError, ConfigError
from tests.bundle_factory import build_bundle

# The DESIGN.md contract for `edgetl bench --json`.
DESIGN_KEYS = {"runtime", "precision", "batch_size", "threads", "latency_ms", "throughput_ips", "cold_start_ms",
               "peak_rss_mb", "model_bytes", "env"}
FAST = {"warmup": 1, "iterations": 5}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle") / "b", heads=("colour", "brightness"))


@pytest.fixture(scope="module")
def fp32_result(bundle_dir) -> BenchResult:
    return bench(bundle_dir, batch_size=3, threads=1, **FAST)


def test_bench_result_has_design_keys_and_sane_numbers(fp32_result, bundle_dir):
    d = fp32_result.to_dict()
    assert DESIGN_KEYS <= set(d)
    json.dumps(d)  # serialisable as is
    assert (d["runtime"], d["precision"], d["batch_size"], d["threads"]) == ("onnxruntime", "fp32", 3, 1)
    lat = d["latency_ms"]
    assert set(lat) == {"p50", "p90", "p99", "mean", "min", "max"}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    assert d["throughput_ips"] == pytest.approx(3 / (lat["mean"] / 1000))
    assert set(d["cold_start_ms"]) == {"load", "first_inference"}
    assert all(v > 0 for v in d["cold_start_ms"].values())
    assert d["peak_rss_mb"] > 0
    assert d["preprocess_ms"] > 0
    assert d["heads"] == ["colour"] and d["variant"] == "onnx-fp32" and d["val_top1"] == pytest.approx(0.97)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    files = manifest["files"]
    assert d["model_bytes"] == files["onnx/trunk.fp32.onnx"]["bytes"] + files["onnx/head.colour.onnx"]["bytes"]
    assert {"cpu", "logical_cores", "os", "kernel", "python", "versions", "governor"} <= set(d["env"])


def test_bench_all_heads_counts_every_head_file(bundle_dir, fp32_result):
    r = bench(bundle_dir, head="all", **FAST)
    assert r.heads == ("colour", "brightness")
    assert r.model_bytes > fp32_result.model_bytes


@pytest.mark.parametrize(
    "option, message",
    [
        ({"iterations": 0}, "--iterations must be an integer >= 1"),
        ({"warmup": -1}, "--warmup must be an integer >= 0"),
        ({"batch_size": 0}, "--batch-size must be an integer >= 1"),
        ({"threads": 0}, "--threads must be an integer >= 1"),
    ],
)
def test_bench_validates_options(bundle_dir, option, message):
    with pytest.raises(ConfigError, match=message):
        bench(bundle_dir, **option)


def test_bench_openvino_absent_from_bundle(bundle_dir):
    with pytest.raises(BackendError, match="no openvino files"):
        bench_precisions(bundle_dir, runtime="openvino", **FAST)


def test_bench_precisions_and_comparison(bundle_dir):
    results = bench_precisions(bundle_dir, **FAST)
    assert [r.precision for r in results] == ["fp32", "int8"]
    rows = compare(results)
    assert len(rows) == 1
    row = rows[0]
    assert (row["variant"], row["baseline"]) == ("onnx-int8", "onnx-fp32")
    assert row["speedup_p50"] > 0 and row["throughput_ratio"] > 0
    assert row["compression"] == pytest.approx(1.0)  # the factory's int8 trunk is the fp32 graph
    assert row["top1_drop_pp"] == pytest.approx(0.4)
    doc = report(results)
    assert set(doc) == {"results", "comparison"}
    assert all(DESIGN_KEYS <= set(r) for r in doc["results"])
    assert report(results[:1]) == results[0].to_dict()
    assert compare(results[:1]) == []


def test_latency_summary():
    s = latency_summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["p50"] == 3.0 and s["min"] == 1.0 and s["max"] == 100.0 and s["mean"] == 22.0


def test_synthetic_image_is_deterministic():
    a, b = synthetic_image(), synthetic_image()
    assert a.size == (640, 480) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()


def test_environment_fingerprint():
    env = environment()
    assert env["logical_cores"] >= 1
    assert env["cpu"]
    assert env["versions"]["edgetl"] and env["versions"]["onnxruntime"] and env["versions"]["numpy"]


def test_cli_bench_single_precision_json(bundle_dir):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--precision", "int8", "--json", "--warmup", "0",
                                       "--iterations", "3", "--batch-size", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert DESIGN_KEYS <= set(doc)
    assert (doc["precision"], doc["batch_size"], doc["threads"]) == ("int8", 2, 1)


def test_cli_bench_all_precisions_json_and_table(bundle_dir):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--json", "--iterations", "3", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["precision"] for r in doc["results"]] == ["fp32", "int8"]
    assert doc["comparison"][0]["variant"] == "onnx-int8"

    table = CliRunner().invoke(main, ["bench", str(bundle_dir), "--iterations", "3", "--warmup", "0"])
    assert table.exit_code == 0, table.output
    assert "onnx-int8 vs onnx-fp32: speed-up" in table.stdout
    assert "latency p50 ms" in table.stdout and "onnxruntime" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "fp64"], "'fp64' is not one of"),
        (["--iterations", "0"], "--iterations"),
        (["--threads", "0"], "--threads"),
        (["--runtime", "tflite"], "--runtime"),
    ],
)
def test_cli_bench_bad_options_are_usage_errors(bundle_dir, args, message):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_cli_bench_missing_precision_is_one_line(bundle_dir):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--precision", "fp16", "--iterations", "1"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "no fp16 variant" in result.stderr
