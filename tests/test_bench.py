"""edgetl.device.bench, edgetl.core.envinfo and `edgetl bench` on tiny torch-free bundles."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.cli._bench_tables import BENCH_COLUMNS
from edgetl.cli._output import schema_version
from edgetl.core.envinfo import environment
from edgetl.core.errors import BackendError, ConfigError, DataError
from edgetl.device.bench import (
    NOISY_SPREAD,
    SCHEMA_VERSION,
    BenchReport,
    BenchResult,
    bench,
    bench_precisions,
    compare,
    interleave,
    latency_summary,
    noise_warnings,
    plot_latencies,
    read_saved,
    report,
    results_dir,
    run_bench,
    save_report,
    spread_warning,
    synthetic_image,
)
from edgetl.device.bench import coldstart as coldstart_mod
from edgetl.device.bench import results as results_mod
from edgetl.device.bench import run as run_mod
from edgetl.device.bench.timing import _Timed
from tests.bundle_factory import build_bundle
from tests.schemas import validate_document

PROJECT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((PROJECT / "devices" / "x86-server" / "results" / "examples").glob("*.json"))

# The docs/design.md contract for `edgetl bench --json`.
DESIGN_KEYS = {
    "runtime",
    "precision",
    "batch_size",
    "threads",
    "latency_ms",
    "throughput_ips",
    "cold_start_ms",
    "peak_rss_mb",
    "model_bytes",
    "env",
}
FAST = {"warmup": 1, "iterations": 5}
QUICK = {"warmup": 1, "iterations": 5, "cold_start_runs": False}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle") / "b", heads=("colour", "brightness"))


@pytest.fixture(scope="module")
def one_head_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle1") / "b")


@pytest.fixture(scope="module")
def fp32_result(bundle_dir) -> BenchResult:
    return bench(bundle_dir, batch_size=3, threads=1, **FAST)


def test_bench_result_has_design_keys_and_sane_numbers(fp32_result, bundle_dir):
    d = fp32_result.to_dict()
    assert set(d) >= DESIGN_KEYS
    json.dumps(d)  # serialisable as is
    assert "samples_ms" not in d and len(fp32_result.samples_ms) == 5
    assert (d["runtime"], d["precision"], d["batch_size"], d["threads"]) == ("onnxruntime", "fp32", 3, 1)
    lat = d["latency_ms"]
    assert set(lat) == {"p50", "p90", "p99", "mean", "min", "max"}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    assert d["throughput_ips"] == pytest.approx(3 / (lat["mean"] / 1000))
    # Cold start from a fresh process: import, load, first inference, and spawn-to-first-result.
    assert set(d["cold_start_ms"]) == {"import", "load", "first_inference", "total"}
    assert all(v > 0 for v in d["cold_start_ms"].values())
    cs = d["cold_start_ms"]
    assert cs["total"] >= cs["import"] + cs["load"] + cs["first_inference"]
    assert d["cold_start_scope"] == d["peak_rss_scope"] == "fresh-process"
    assert d["peak_rss_mb"] > 0
    assert d["preprocess_ms"] > 0
    assert d["heads"] == ["colour"] and d["variant"] == "onnx-fp32" and d["val_top1"] == pytest.approx(0.97)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    files = manifest["files"]
    assert d["model_bytes"] == files["onnx/trunk.fp32.onnx"]["bytes"] + files["onnx/head.colour.onnx"]["bytes"]
    assert {"cpu", "logical_cores", "os", "kernel", "python", "versions", "governor", "isa"} <= set(d["env"])


def test_cold_start_runs_in_a_fresh_interpreter_without_a_shell(bundle_dir, monkeypatch):
    calls = []
    real_run = subprocess.run

    def spy(args, **kwargs):
        calls.append((args, kwargs))
        return real_run(args, **kwargs)

    monkeypatch.setattr(coldstart_mod.subprocess, "run", spy)
    r = bench(bundle_dir, precisions="int8", warmup=0, iterations=2)
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args[0] == sys.executable and args[1] == "-c" and not kwargs.get("shell")
    assert json.loads(args[3])["load"]["precision"] == "int8"
    assert r.cold_start_ms["import"] > 0 and r.cold_start_scope == "fresh-process"


def test_no_cold_start_measures_in_process(bundle_dir):
    r = bench(bundle_dir, **QUICK)
    assert r.cold_start_scope == "in-process" and r.peak_rss_scope == "process"
    assert r.cold_start_ms["import"] is None and r.cold_start_ms["load"] > 0


def test_bench_all_heads_counts_every_head_file(bundle_dir, fp32_result):
    r = bench(bundle_dir, head="all", **QUICK)
    assert r.heads == ("colour", "brightness")
    assert r.model_bytes > fp32_result.model_bytes


def test_heads_cost_trunk_alone_and_each_head(bundle_dir, one_head_bundle):
    r = bench(bundle_dir, **QUICK)
    hc = r.heads_cost
    assert hc["trunk_ms"] > 0 and hc["selected_heads"] == ["colour"]
    assert [h["head"] for h in hc["heads"]] == ["colour", "brightness"]
    for h in hc["heads"]:
        assert h["head_ms"] > 0 and h["trunk_plus_head_ms"] > 0 and h["head_pct_of_trunk"] > 0
    assert hc["trunk_plus_selected_ms"] == pytest.approx(r.latency_ms["p50"])
    assert bench(one_head_bundle, **QUICK).heads_cost is None  # one head: nothing to split


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
    results = bench_precisions(bundle_dir, **QUICK)
    assert [r.precision for r in results] == ["fp32", "int8"]
    rows = compare(results)
    assert len(rows) == 1
    row = rows[0]
    assert (row["kind"], row["variant"], row["baseline"]) == ("precision", "onnx-int8", "onnx-fp32")
    assert row["speedup_p50"] > 0 and row["throughput_ratio"] > 0
    assert row["compression"] == pytest.approx(1.0)  # the factory's int8 trunk is the fp32 graph
    assert row["top1_drop_pp"] == pytest.approx(0.4)
    doc = validate_document(report(results), "bench")
    assert doc["mode"] == "local" and doc["comparison"] == rows and doc["skipped"] == []
    assert all(set(r) >= DESIGN_KEYS for r in doc["results"])
    assert (rows[0]["result"], rows[0]["baseline_result"]) == (1, 0)
    # One configuration: the same document, one result in the list.
    one = validate_document(report(results[:1]), "bench")
    assert one["results"] == [results[0].to_dict()] and one["comparison"] == []
    assert compare(results[:1]) == []
    # The library's document and the CLI's envelope agree on the version.
    assert schema_version("bench") == SCHEMA_VERSION


def test_sweep_threads_and_batch_sizes(bundle_dir):
    rep = run_bench(bundle_dir, threads=[1, 2], batch_size=[1, 2], **QUICK)
    got = [(r.precision, r.threads, r.batch_size) for r in rep.results]
    assert got == [(p, t, b) for p in ("fp32", "int8") for t in (1, 2) for b in (1, 2)]
    assert all(len(r.samples_ms) == 5 for r in rep.results)
    # int8 against fp32 at each (threads, batch), never across settings.
    assert sorted((c["threads"], c["batch_size"]) for c in rep.comparison) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    doc = validate_document(rep.to_dict(), "bench")
    assert len(doc["results"]) == 8 and all(r["profile"] is None for r in doc["results"])


def test_all_variants_and_skipped(bundle_dir, monkeypatch):
    rep = run_bench(bundle_dir, all_variants=True, **QUICK)
    assert [r.variant for r in rep.results] == ["onnx-fp32", "onnx-int8"]
    assert rep.to_dict()["results"][1]["variant"] == "onnx-int8"
    # A variant whose runtime is missing here is skipped with the reason, not fatal.
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    fake = dict(manifest["variants"]["onnx-fp32"], format="openvino")
    from edgetl.device.bundle_loading import Bundle

    real_init = Bundle.__init__

    def with_ov(self, path, m):
        m = dict(m, variants={**m["variants"], "openvino-fp32": fake})
        real_init(self, path, m)

    monkeypatch.setattr(Bundle, "__init__", with_ov)
    real_import = run_mod.import_backend

    def no_openvino(runtime):
        if runtime == "openvino":
            raise BackendError("runtime 'openvino' is not installed: pip install 'edgetl[openvino]'")
        return real_import(runtime)

    monkeypatch.setattr(run_mod, "import_backend", no_openvino)
    rep = run_bench(bundle_dir, all_variants=True, **QUICK)
    assert [r.variant for r in rep.results] == ["onnx-fp32", "onnx-int8"]
    assert rep.skipped == [
        {"variant": "openvino-fp32", "reason": "runtime 'openvino' is not installed: pip install 'edgetl[openvino]'"}
    ]
    assert rep.to_dict()["skipped"] == rep.skipped


def test_compare_openvino_against_onnxruntime(fp32_result):
    ort_int8 = dataclasses.replace(
        fp32_result, precision="int8", variant="onnx-int8", latency_ms={**fp32_result.latency_ms, "p50": 2.0}
    )
    ort_fp32 = dataclasses.replace(fp32_result, latency_ms={**fp32_result.latency_ms, "p50": 3.0})
    ov_fp32 = dataclasses.replace(
        ort_fp32, runtime="openvino", variant="openvino-fp32", latency_ms={**fp32_result.latency_ms, "p50": 1.5}
    )
    ov_int8 = dataclasses.replace(
        ort_int8, runtime="openvino", variant="openvino-int8", latency_ms={**fp32_result.latency_ms, "p50": 1.0}
    )
    other_threads = dataclasses.replace(ov_int8, threads=7)
    rows = compare([ort_fp32, ort_int8, ov_fp32, ov_int8, other_threads])
    by = {(r["kind"], r["variant"], r["threads"]): r for r in rows}
    assert by[("precision", "onnx-int8", 1)]["speedup_p50"] == pytest.approx(1.5)
    assert by[("precision", "openvino-int8", 1)]["speedup_p50"] == pytest.approx(1.5)
    assert by[("runtime", "openvino-fp32", 1)]["speedup_p50"] == pytest.approx(2.0)
    assert by[("runtime", "openvino-int8", 1)]["baseline"] == "onnx-int8"
    assert ("runtime", "openvino-int8", 7) not in by  # no ONNX Runtime result with 7 threads to compare with


def test_interleave_rotates_and_rewarms():
    log = []
    timed = [_Timed(name, (lambda n=name: log.append(n))) for name in "abc"]
    interleave(timed, warmup=2, iterations=7, block=3)
    assert [len(t.samples) for t in timed] == [7, 7, 7]
    rounds = log[9:]  # after the first call and 2 warm-ups of each
    assert log[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    # Round 0: a b c; round 1 rotated by one and reversed: a c b; round 2: c a b. One untimed call per block.
    firsts = [rounds[i] for i in (0, 4, 8, 12, 16, 20)]
    assert firsts == ["a", "b", "c", "a", "c", "b"]
    assert rounds[24:] == ["c", "c", "a", "a", "b", "b"]  # last round: 1 timed call each (7 = 3 + 3 + 1)


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
    assert {"isa", "kernel", "governor", "usable_cores", "virtualized"} <= set(env)


def test_device_profile_applies_and_options_win(bundle_dir, tmp_path):
    profile = tmp_path / "tiny-board.yaml"
    profile.write_text("description: a test board\nthreads: 1\nbatch_size: 2\nprecision: int8\n")
    rep = run_bench(bundle_dir, device_profile=str(profile), **QUICK)
    (r,) = rep.results
    assert (r.threads, r.batch_size, r.precision) == (1, 2, "int8")
    assert r.profile == {
        "name": "tiny-board",
        "path": str(profile),
        "applied": {"runtime": "onnxruntime", "threads": 1, "batch_size": 2, "precision": "int8"},
        "overridden": [],
    }
    rep = run_bench(bundle_dir, device_profile=str(profile), threads=2, **QUICK)
    assert rep.results[0].threads == 2 and rep.results[0].profile["overridden"] == ["threads"]


def test_save_report_and_results_dir(bundle_dir, tmp_path, monkeypatch):
    rep = run_bench(bundle_dir, **QUICK)
    path = save_report(rep, profile_name="x86-server", save_dir=tmp_path / "out")
    assert path.parent == tmp_path / "out" and path.suffix == ".json"
    doc = validate_document(path.read_text(), "bench")
    assert len(doc["results"]) == 2 and len(doc["results"][0]["samples_ms"]) == 5
    assert doc["profile_folder"] == "x86-server" and doc["saved_utc"] in path.name
    back = read_saved(path)
    assert [r.samples_ms for r in back.results] == [r.samples_ms for r in rep.results]
    assert {r.source for r in back.results} == {str(path)} and back.mode == "compare"
    # From this checkout: the project's devices/<profile>/results; an installed copy: under the cwd.
    project = results_mod.Path(results_mod.__file__).resolve().parents[3]
    assert results_dir("rpi5") == project / "devices" / "rpi5" / "results"
    monkeypatch.setattr(
        results_mod, "__file__", str(tmp_path / "site-packages" / "edgetl" / "device" / "bench" / "results.py")
    )
    monkeypatch.chdir(tmp_path)
    assert results_dir("rpi5") == tmp_path / "devices" / "rpi5" / "results"


def test_plot_writes_a_png(bundle_dir, tmp_path):
    pytest.importorskip("matplotlib")
    rep = run_bench(bundle_dir, **QUICK)
    path = plot_latencies(rep.results, tmp_path / "lat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- CLI ---------------------------------------------------------------------------------------------

CLI_FAST = ["--warmup", "0", "--iterations", "3", "--no-cold-start"]


def test_cli_bench_single_precision_json(bundle_dir):
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(bundle_dir),
            "--precision",
            "int8",
            "--json",
            "--warmup",
            "0",
            "--iterations",
            "3",
            "--batch-size",
            "2",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    assert doc["bundle"] == str(bundle_dir) and doc["mode"] == "local" and doc["comparison"] == []
    (r,) = doc["results"]
    assert set(r) >= DESIGN_KEYS
    assert (r["variant"], r["precision"], r["batch_size"], r["threads"]) == ("onnx-int8", "int8", 2, 1)
    assert r["cold_start_scope"] == "fresh-process" and r["target"] is None and r["remote"] is None


def test_cli_bench_all_precisions_json_and_table(bundle_dir):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--json", *CLI_FAST])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    assert [r["precision"] for r in doc["results"]] == ["fp32", "int8"]
    assert doc["comparison"][0]["variant"] == "onnx-int8"

    table = CliRunner().invoke(main, ["bench", str(bundle_dir), "--format", "table", *CLI_FAST])
    assert table.exit_code == 0, table.output
    assert "onnx-int8 vs onnx-fp32: speed-up" in table.stdout
    assert "latency p50 ms" in table.stdout and "trunk alone" in table.stdout


def test_cli_bench_all_with_thread_sweep(bundle_dir, tmp_path):
    plot = tmp_path / "p.png"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(bundle_dir),
            "--all",
            "--threads",
            "1,2",
            "--json",
            "--plot",
            str(plot),
            "--save-dir",
            str(tmp_path / "saved"),
            *CLI_FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    assert [(r["variant"], r["threads"]) for r in doc["results"]] == [
        ("onnx-fp32", 1),
        ("onnx-fp32", 2),
        ("onnx-int8", 1),
        ("onnx-int8", 2),
    ]
    assert all(set(r) >= DESIGN_KEYS for r in doc["results"])
    assert {c["threads"] for c in doc["comparison"]} == {1, 2}
    assert plot.is_file() and len(list((tmp_path / "saved").glob("*.json"))) == 1
    assert "Saved " in result.stderr
    table = CliRunner().invoke(
        main, ["bench", str(bundle_dir), "--threads", "1,2", "--batch-size", "1,2", "--format", "table", *CLI_FAST]
    )
    assert table.exit_code == 0, table.output
    assert "onnx-int8 t2 b2" in table.stdout  # a sweep prints one row per configuration
    assert "onnx-int8 vs onnx-fp32 (threads 2, batch 2): speed-up" in table.stdout


def test_cli_bench_device_profile_rpi5_is_visible_in_json(bundle_dir):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--device-profile", "rpi5", "--json", *CLI_FAST])
    assert result.exit_code == 0, result.output
    (doc,) = validate_document(result.stdout, "bench")["results"]
    # rpi5 prefers LiteRT, then NCNN, then ONNX Runtime: this bundle holds ONNX only.
    assert (doc["threads"], doc["precision"], doc["batch_size"], doc["runtime"]) == (4, "int8", 1, "onnxruntime")
    assert doc["provider"] == "cpu"
    assert doc["profile"]["name"] == "rpi5"
    assert doc["profile"]["applied"] == {
        "runtime": ["litert", "ncnn", "onnxruntime"],
        "provider": "cpu",
        "threads": 4,
        "precision": "int8",
        "batch_size": 1,
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "fp64"], "'fp64' is not one of"),
        (["--iterations", "0"], "--iterations"),
        (["--threads", "0"], "--threads"),
        (["--threads", "1,x"], "'x' is not an integer"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--runtime", "tflite"], "--runtime"),
    ],
)
def test_cli_bench_bad_options_are_usage_errors(bundle_dir, args, message):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--precision", "fp16"], "no fp16 variant", 1),  # the bundle lacks it: a failure, not a usage error
        (["--provider", "tensorrt"], "ONNX Runtime provider 'tensorrt' is not in this build", 1),
        (["--provider", "nosuch"], "unknown ONNX Runtime provider 'nosuch'", 2),
        (["--streams", "2"], "--streams applies to --runtime openvino", 2),
        (["--openvino-device", "GPU"], "--openvino-device with --runtime onnxruntime needs --provider openvino", 2),
        (["--device-profile", "nosuch-board"], "unknown device-profile 'nosuch-board'", 2),
    ],
)
def test_cli_bench_user_errors_are_one_line(bundle_dir, args, message, code):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), *args, *CLI_FAST])
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if "tensorrt" in args:
        assert "has: cpu" in result.stderr  # what is available is listed


def test_cli_bench_old_ov_device_spelling_still_works(bundle_dir):
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--ov-device", "GPU", *CLI_FAST])
    assert result.exit_code == 2
    assert "--ov-device is deprecated" in result.stderr
    assert "--openvino-device with --runtime onnxruntime" in result.stderr


# --- OpenVINO variants, merged graphs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ov_bundle(tmp_path_factory):
    pytest.importorskip("openvino")
    return build_bundle(
        tmp_path_factory.mktemp("ov") / "b", heads=("colour", "brightness"), formats=("onnx", "openvino"), merged=True
    )


def test_all_variants_with_openvino_and_ratios(ov_bundle):
    rep = run_bench(ov_bundle, all_variants=True, threads=1, **QUICK)
    assert [(r.runtime, r.variant) for r in rep.results] == [
        ("onnxruntime", "onnx-fp32"),
        ("onnxruntime", "onnx-int8"),
        ("openvino", "openvino-fp32"),
        ("openvino", "openvino-int8"),
    ]
    kinds = sorted((c["kind"], c["variant"], c["baseline"]) for c in rep.comparison)
    assert kinds == [
        ("precision", "onnx-int8", "onnx-fp32"),
        ("precision", "openvino-int8", "openvino-fp32"),
        ("runtime", "openvino-fp32", "onnx-fp32"),
        ("runtime", "openvino-int8", "onnx-int8"),
    ]
    ov = rep.results[2]
    assert ov.heads_cost is not None and ov.model_bytes > 0


def test_openvino_device_and_streams_reach_the_load(ov_bundle):
    rep = run_bench(
        ov_bundle, runtime="openvino", precisions="fp32", device="AUTO", streams=1, threads=1, warmup=1, iterations=3
    )  # cold start too: the fresh process gets the same options
    (r,) = rep.results
    assert (r.device, r.streams, r.threads, r.cold_start_scope) == ("AUTO", 1, 1, "fresh-process")
    result = CliRunner().invoke(
        main, ["bench", str(ov_bundle), "--runtime", "openvino", "--openvino-device", "NPU", *CLI_FAST]
    )
    assert result.exit_code == 1 and "OpenVINO device 'NPU' is not available here (OpenVINO has: CPU" in result.stderr


def test_merged_graphs(ov_bundle, bundle_dir):
    for runtime in ("onnxruntime", "openvino"):
        rep = run_bench(ov_bundle, runtime=runtime, precisions="fp32", merged=True, **QUICK)
        (r,) = rep.results
        variant = json.loads((ov_bundle / "manifest.json").read_text())["variants"][r.variant]
        files = json.loads((ov_bundle / "manifest.json").read_text())["files"]
        merged_rec = files[variant["merged"]["colour"]]
        assert r.merged and r.heads_cost is None and "merged" in r.label
        assert r.model_bytes == merged_rec["bytes"] + sum(
            x["bytes"] for x in (merged_rec.get("extra_files") or {}).values()
        )
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--merged", *CLI_FAST])
    assert result.exit_code == 1 and "has no merged graph for head 'colour'; export with --merged" in result.stderr


def test_configurations_with_provider_options_are_hashable():
    from edgetl.device.bench.run import Config, _hashable
    from edgetl.device.profiles import Settings

    settings = Settings(
        {
            "runtime": None,
            "provider": "tensorrt",
            "provider_options": {"trt_fp16_enable": True, "a": 1},
            "ov_device": None,
            "streams": None,
        },
        {},
    )
    options = _hashable(settings.load_options("onnxruntime", strict=True))
    c = Config("onnxruntime", "fp32", None, 1, options)
    assert {c: 1}[c] == 1
    assert c.load_options == {"provider": "tensorrt", "provider_options": {"a": 1, "trt_fp16_enable": True}}


# --- one JSON shape, TSV, the spread check, --duration, --plot/--save checked first, --compare ----------


def _synthetic(samples: list[float], **kw) -> BenchResult:
    """A result with these timed samples, as if measured (nothing runs)."""
    lat = latency_summary(samples)
    fields = {
        "bundle": "b",
        "variant": "onnx-fp32",
        "runtime": "onnxruntime",
        "precision": "fp32",
        "heads": ("default",),
        "batch_size": 1,
        "threads": 1,
        "warmup": 0,
        "iterations": len(samples),
        "latency_ms": lat,
        "throughput_ips": 1000.0 / lat["mean"],
        "cold_start_ms": {"import": None, "load": 1.0, "first_inference": 1.0, "total": None},
        "peak_rss_mb": 50.0,
        "peak_rss_scope": "process",
        "model_bytes": 100,
        "preprocess_ms": 1.0,
        "val_top1": None,
        "env": {"cpu": "test cpu", "logical_cores": 2, "os": "Linux", "python": "3", "versions": {}},
        "samples_ms": tuple(samples),
    }
    return BenchResult(**{**fields, **kw})


def test_spread_warning_on_a_noisy_machine_only():
    quiet = _synthetic([2.0 + 0.01 * (i % 10) for i in range(100)])  # p90/p50 ~1.02
    assert spread_warning(quiet) is None and noise_warnings([quiet]) == []
    # One call in five is 3x slower (a neighbour's job, a frequency change): p90 is 3x p50.
    noisy = _synthetic([6.0 if i % 5 == 0 else 2.0 for i in range(100)], variant="onnx-int8")
    assert noisy.latency_ms["p90"] / noisy.latency_ms["p50"] > NOISY_SPREAD
    warning = spread_warning(noisy)
    assert warning is not None and "looks noisy" in warning and "onnx-int8 t1 b1 3.0x" in warning
    assert "governor" in warning and "--duration" in warning and "close other programs" in warning.lower()
    (both,) = noise_warnings([quiet, noisy])  # one warning naming only the noisy configuration
    assert "onnx-int8" in both and "onnx-fp32" not in both
    # Below ten timed calls p90 says nothing: no warning however spread.
    assert spread_warning(_synthetic([1.0, 1.0, 1.0, 5.0, 5.0])) is None


def test_cli_noise_warning_on_stderr_and_in_json(bundle_dir, monkeypatch):
    monkeypatch.setattr(results_mod, "spread", lambda r: 2.5)
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--json", *CLI_FAST, "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    assert len(doc["warnings"]) == 1 and "the machine looks noisy" in doc["warnings"][0]
    assert "Warning: the machine looks noisy" in result.stderr
    monkeypatch.setattr(results_mod, "spread", lambda r: 1.1)
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--json", *CLI_FAST, "--precision", "fp32"])
    assert validate_document(result.stdout, "bench")["warnings"] == [] and "Warning" not in result.stderr


def test_interleave_for_a_duration_gives_every_entry_the_same_count():
    import time

    timed = [_Timed(n, (lambda d=d: time.sleep(d))) for n, d in (("fast", 0.001), ("slow", 0.003))]
    done = interleave(timed, warmup=0, block=4, duration_s=0.05)
    assert done % 4 == 0 and all(len(t.samples) == done for t in timed)
    total = sum(t.total_ms for t in timed)
    last_round = sum(sum(t.samples[-4:]) for t in timed)
    assert total >= 2 * 50.0 > total - last_round  # stopped in the round that reached 2 x 50 ms
    capped = [_Timed("x", lambda: None)]
    assert interleave(capped, warmup=0, block=10, duration_s=60, max_iterations=25) == 25  # bounded
    with pytest.raises(ValueError):
        interleave(capped, warmup=0, iterations=5, duration_s=1.0)


def test_cli_duration_instead_of_iterations(one_head_bundle):
    import time

    t0 = time.perf_counter()
    args = ["bench", str(one_head_bundle), "--duration", "0.3", "--warmup", "1", "--no-cold-start", "--json"]
    result = CliRunner().invoke(main, args)
    wall = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    counts = {r["iterations"] for r in doc["results"]}
    assert len(counts) == 1 and min(counts) >= 10  # interleaved: the same count for every configuration
    assert all(r["duration_s"] == 0.3 for r in doc["results"])
    assert wall < 30
    for bad, code, message in (
        (["--duration", "1", "--iterations", "5"], 2, "give --iterations or --duration, not both"),
        (["--duration", "0"], 2, "--duration"),
        (["--duration", "nan"], 2, "--duration"),
        (["--duration", "100000"], 2, "--duration"),
    ):
        result = CliRunner().invoke(main, ["bench", str(one_head_bundle), *bad])
        assert result.exit_code == code and message in result.stderr, (bad, result.output)
    with pytest.raises(ConfigError, match="--duration must be a number of seconds"):
        run_bench(one_head_bundle, duration_s=0.01, **QUICK)


@pytest.fixture
def no_timing(monkeypatch):
    """Fail the test if a benchmark starts (the pre-checks must come first)."""
    import edgetl.device.bench as bench_pkg

    def refuse(*a, **k):
        raise AssertionError("timing started")

    monkeypatch.setattr(bench_pkg, "run_bench", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plot", "{tmp}/latency.txt"], "must end in .png"),
        (["--plot", "{tmp}/no-such-folder/p.png"], "does not exist"),
        (["--plot", "{tmp}/a-file/p.png"], "a-file is not a folder"),
        (["--save-dir", "{tmp}/a-file/results"], "a-file is not a folder"),
        (["--save", "--save-dir", "{tmp}/a-file/deeper/results"], "a-file is not a folder"),
    ],
)
def test_plot_and_save_are_checked_before_timing(bundle_dir, tmp_path, no_timing, args, message):
    (tmp_path / "a-file").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), *args, "--json"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert json.loads(result.stdout)["error"]["exit_code"] == 2


def test_without_matplotlib_the_results_are_still_printed_and_saved(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as on a device
    plot, saved = tmp_path / "p.png", tmp_path / "saved"
    args = ["bench", str(bundle_dir), "--plot", str(plot), "--save-dir", str(saved), "--json", *CLI_FAST]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    assert len(doc["results"]) == 2 and not plot.exists()
    (warning,) = [w for w in doc["warnings"] if "--plot" in w]
    assert "skipped" in warning and "pip install matplotlib" in warning
    assert result.stderr.index("Warning: --plot") < result.stderr.index("Saved ")  # said before timing
    assert len(list(saved.glob("*.json"))) == 1


def test_a_plot_that_fails_after_timing_is_a_warning(bundle_dir, tmp_path, monkeypatch):
    import edgetl.device.bench as bench_pkg

    def broken(*a, **k):
        raise BackendError("matplotlib is broken here")

    monkeypatch.setattr(bench_pkg, "plot_latencies", broken)
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--plot", str(tmp_path / "p.png"), *CLI_FAST])
    assert result.exit_code == 0, result.output
    assert "Warning: --plot" in result.stderr and "matplotlib is broken here" in result.stderr
    assert result.stdout.startswith("source\tvariant")


def test_tsv_has_one_shape_whatever_the_number_of_configurations(bundle_dir):
    for extra, n in ((["--precision", "int8"], 1), (["--threads", "1,2", "--batch-size", "1,2"], 8)):
        result = CliRunner().invoke(main, ["bench", str(bundle_dir), *CLI_FAST, *extra])  # a pipe: tsv
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].split("\t") == list(BENCH_COLUMNS) and len(lines) == 1 + n
        assert all(len(line.split("\t")) == len(BENCH_COLUMNS) for line in lines)
        rows = [dict(zip(BENCH_COLUMNS, line.split("\t"), strict=True)) for line in lines[1:]]
        assert rows[0]["source"] == "local" and rows[0]["speedup_vs_first"] == "1.000"
        assert all(float(r["p50_ms"]) > 0 and r["iterations"] == "3" for r in rows)


def _save(bundle, folder, *extra):
    result = CliRunner().invoke(main, ["bench", str(bundle), "--save-dir", str(folder), *CLI_FAST, *extra])
    assert result.exit_code == 0, result.output
    return Path(result.stderr.split("Saved ", 1)[1].split("\n", 1)[0])


def test_compare_saved_results_offline(bundle_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import edgetl.device.bench as bench_pkg

    first = _save(bundle_dir, tmp_path / "s")
    second = _save(bundle_dir, tmp_path / "s", "--threads", "1")
    assert first != second  # two runs saved in the same second keep both

    def refuse(*a, **k):
        raise AssertionError("--compare must not time anything")

    monkeypatch.setattr(bench_pkg, "run_bench", refuse)
    plot = tmp_path / "cmp.png"
    result = CliRunner().invoke(main, ["bench", "--compare", str(first), str(second), "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    assert doc["mode"] == "compare" and doc["bundle"] is None and len(doc["results"]) == 4
    assert [r["source"] for r in doc["results"]] == [str(first)] * 2 + [str(second)] * 2
    kinds = [(c["kind"], c["result"], c["baseline_result"]) for c in doc["comparison"]]
    assert kinds == [("precision", 1, 0), ("precision", 3, 2), ("first", 1, 0), ("first", 2, 0), ("first", 3, 0)]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same rows as a table (the multi-device table) and as TSV lines.
    table = CliRunner().invoke(main, ["bench", "--compare", str(first), str(second), "--format", "table"])
    assert table.exit_code == 0 and "Saved results compared" in table.stdout and "1.00x" in table.stdout
    tsv = CliRunner().invoke(main, ["bench", "--compare", str(first), str(second)])
    lines = tsv.stdout.splitlines()
    assert len(lines) == 5 and lines[1].split("\t")[0] == first.stem and lines[3].split("\t")[0] == second.stem


def test_compare_reads_files_saved_by_older_edgetl():
    assert EXAMPLES, "devices/x86-server/results/examples/ holds results saved before the bench schema"
    result = CliRunner().invoke(main, ["bench", "--compare", *map(str, EXAMPLES), "--json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    old = [json.loads(p.read_text()) for p in EXAMPLES]
    assert len(doc["results"]) == sum(len(d["results"]) for d in old)
    assert doc["results"][0]["latency_ms"] == old[0]["results"][0]["latency_ms"]


def test_compare_usage_errors_and_bad_files(bundle_dir, tmp_path):
    saved = _save(bundle_dir, tmp_path / "s")
    for args, message in (
        (["--compare"], "--compare needs the result files"),
        (["--compare", str(bundle_dir)], "is a bundle: --compare reads result files"),
        (["--compare", str(saved), "--threads", "2"], "--threads"),
        (["--compare", str(saved), "--target", "pi@rpi:b"], "--target"),
        (["--compare", str(saved), "--save"], "--save"),
        ([str(bundle_dir), str(saved)], "give one BUNDLE"),
    ):
        result = CliRunner().invoke(main, ["bench", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and "Traceback" not in result.output, (args, result.stderr)
    bad = {
        "notjson.json": "{not json",
        "other.json": json.dumps({"schema": "edgetl.predict", "schema_version": 1, "edgetl": "x", "results": []}),
        "newer.json": json.dumps({"schema": "edgetl.bench", "schema_version": 99, "results": []}),
        "nokey.json": json.dumps({"results": [{"variant": "x"}]}),
        "badtype.json": json.dumps({"results": [{**json.loads(saved.read_text())["results"][0], "batch_size": "8"}]}),
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    for name in (*bad, "missing.json"):
        result = CliRunner().invoke(main, ["bench", "--compare", str(tmp_path / name)])
        assert result.exit_code == 1, (name, result.output)
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1, name
    with pytest.raises(DataError, match="schema_version 99"):
        read_saved(tmp_path / "newer.json")
    with pytest.raises(DataError, match="has no 'bundle'"):
        read_saved(tmp_path / "nokey.json")
    with pytest.raises(DataError, match="batch_size must be int"):
        read_saved(tmp_path / "badtype.json")


def test_report_reads_every_older_shape(fp32_result):
    one = fp32_result.to_dict()
    del one["label"], one["target"], one["remote"], one["source"], one["duration_s"]  # as edgetl 0.1 printed it
    for old in (one, {"results": [one, one], "comparison": []}):
        rep = BenchReport.from_dict(old)
        assert [r.latency_ms for r in rep.results] == [fp32_result.latency_ms] * len(rep.results)
    device = {"target": "ssh://pi@rpi/~/b", "where": "pi@rpi", "edgetl": "0.1.0", "fingerprint": "f" * 16}
    rep = BenchReport.from_dict({"results": [one], "comparison": [], "device": {**device, "machine": {}}})
    assert rep.results[0].target == device["target"] and rep.results[0].where == "pi@rpi"


def test_forwarded_options_for_a_device():
    """What travels to the edgetl on a device: timing options (--duration too) and -v/-q/--no-progress;
    not how the result is shown or saved here (--json, --format, --plot, --save, --compare)."""
    from edgetl.cli._common import forwarded_args
    from edgetl.cli._runtime_options import SSH_OPTIONS
    from edgetl.cli.bench_cmd import bench as bench_command
    from edgetl.device.remote_bench import LOCAL_BENCH_OPTIONS

    seen = []

    @click.pass_context
    def record(ctx, **_):
        seen.append(forwarded_args(ctx, exclude=(*SSH_OPTIONS, *LOCAL_BENCH_OPTIONS)))

    probe = click.Command("bench", params=bench_command.params, callback=record)
    args = ["pi@rpi:b", "--duration", "5", "-v", "-q", "--no-progress", "--openvino-device", "CPU", "--json"]
    args += ["--format", "json", "--plot", "x.png", "--save", "--compare", "--samples", "-i", "key"]
    result = CliRunner().invoke(probe, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    words = seen[0]
    for w in ("--duration", "5.0", "--verbose", "--quiet", "--no-progress", "--openvino-device", "CPU"):
        assert w in words, words
    for w in ("--json", "--format", "--plot", "--save", "--compare", "--samples", "--identity"):
        assert w not in words, words
