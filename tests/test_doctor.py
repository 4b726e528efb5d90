"""`edgetl doctor`: this machine's CPU features and runtimes, the fitting profile, the int8 warning."""

from __future__ import annotations

import json
import platform
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.envinfo import ARM_FEATURES, X86_FEATURES
from edgetl.device import doctor as doctor_mod
from edgetl.device.doctor import diagnose, int8_outlook
from tests.bundle_factory import build_bundle
from tests.schemas import validate_document
from tests.test_no_torch import BLOCK_TORCH, run_python


@pytest.fixture(scope="module")
def report():
    return diagnose()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle") / "b")


def _proc_cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip().lower(), value.strip())
    return info


@pytest.mark.skipif(platform.system() != "Linux", reason="cross-checks /proc/cpuinfo")
def test_cpu_features_match_proc_cpuinfo(report):
    info = _proc_cpuinfo()
    flags = set((info.get("flags") or info.get("features") or "").split())
    table = X86_FEATURES if platform.machine() in ("x86_64", "AMD64") else ARM_FEATURES
    assert report.machine["isa"] == [f for f in table if f in flags]
    assert set(report.machine["isa_missing"]) == {f for f in table if f not in flags and f != "neon"}
    if "model name" in info:
        assert report.machine["cpu"] == info["model name"]
    assert report.machine["logical_cores"] == sum(
        1 for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("processor")
    )


def test_runtimes_match_the_libraries(report):
    import onnxruntime as ort

    ort_doc = report.runtimes["onnxruntime"]
    assert ort_doc["installed"] and ort_doc["version"] == ort.__version__
    assert "cpu" in ort_doc["providers"]
    assert len(ort_doc["providers"]) == len([p for p in ort.get_available_providers() if p != "AzureExecutionProvider"])
    ov_doc = report.runtimes["openvino"]
    try:
        import openvino as ov
    except ImportError:
        assert ov_doc == {"installed": False, "version": None, "devices": []}
        return
    core = ov.Core()
    assert [d["name"] for d in ov_doc["devices"]] == list(core.available_devices)
    cpu = next(d for d in ov_doc["devices"] if d["name"] == "CPU")
    assert cpu["full_name"] == core.get_property("CPU", "FULL_DEVICE_NAME") and "FP32" in cpu["capabilities"]


def test_pi_runtimes_match_the_libraries(report):
    import importlib.metadata
    import importlib.util

    lite, nc = report.runtimes["litert"], report.runtimes["ncnn"]
    if importlib.util.find_spec("ai_edge_litert") is None:
        assert lite == {"installed": False, "version": None}
    else:
        assert lite["installed"] and lite["version"] == importlib.metadata.version("ai-edge-litert")
        assert lite["delegate"] == "XNNPACK (CPU)"
    if importlib.util.find_spec("ncnn") is None:
        assert nc == {"installed": False, "version": None}
    else:
        import ncnn

        assert nc["installed"] and nc["version"] == importlib.metadata.version("ncnn")
        assert nc["cpu"]["threads"] == ncnn.get_cpu_count()
        assert nc["cpu"]["arm_fp16_arithmetic"] is bool(ncnn.cpu_support_arm_asimdhp())


def test_profile_and_outlook_are_consistent(report):
    assert report.profiles["best"] == (report.profiles["fits"][0]["profile"] if report.profiles["fits"] else None)
    assert report.int8 == int8_outlook(report.machine["arch"], report.machine["isa"])
    if report.int8["warning"]:
        assert report.int8["warning"] in report.warnings


@pytest.mark.parametrize(
    "arch, isa, expect, warns",
    [
        ("x86_64", ["avx2", "fma"], "not-faster", "no VNNI"),
        ("x86_64", ["fma"], "not-faster", "neither AVX2 nor VNNI"),
        ("x86_64", ["avx2", "avx512f", "avx512_vnni"], "uncertain", None),
        ("x86_64", ["avx2", "avx_vnni"], "uncertain", None),
        ("x86_64", ["avx2", "avx512_vnni", "amx_int8"], "faster", None),
        ("aarch64", ["asimd"], "not-faster", "no int8 dot-product"),
        ("aarch64", ["asimd", "asimddp"], "faster", None),
        ("aarch64", ["asimd", "asimddp", "i8mm"], "faster", None),
        ("armv7l", ["neon"], "not-faster", "no int8 dot-product"),
        ("x86_64", None, "unknown", None),
        ("riscv64", [], "unknown", None),
    ],
)
def test_int8_outlook_rules(arch, isa, expect, warns):
    out = int8_outlook(arch, isa)
    assert out["expect"] == expect and out["reason"]
    if warns is None:
        assert out["warning"] is None
    else:
        assert warns in out["warning"]


def test_measured_int8_slower_than_fp32_is_a_warning(bundle_dir, monkeypatch):
    rows = doctor_mod.measure_int8(bundle_dir, iterations=3, warmup=0)
    assert [r["runtime"] for r in rows] == ["onnxruntime"]
    assert rows[0]["speedup"] == pytest.approx(rows[0]["fp32_p50_ms"] / rows[0]["int8_p50_ms"])
    monkeypatch.setattr(
        doctor_mod,
        "measure_int8",
        lambda bundle: [
            {
                "runtime": "onnxruntime",
                "batch_size": 1,
                "threads": None,
                "fp32_p50_ms": 2.0,
                "int8_p50_ms": 3.0,
                "speedup": 2.0 / 3.0,
            }
        ],
    )
    rep = diagnose(bundle_dir)
    assert any("int8 is slower than fp32 (0.67x" in w for w in rep.warnings)


def test_fastest_variant_other_than_the_profiles_runtime_is_a_warning(bundle_dir, monkeypatch):
    measured = [
        {"variant": "onnxruntime-fp32", "runtime": "onnxruntime", "precision": "fp32", "p50_ms": 2.0},
        {"variant": "openvino-fp32", "runtime": "openvino", "precision": "fp32", "p50_ms": 1.0},
    ]
    monkeypatch.setattr(doctor_mod, "measure_int8", lambda bundle: [])
    monkeypatch.setattr(
        doctor_mod, "measure_fastest", lambda bundle: {**measured[1], "measured": measured, "skipped": []}
    )
    monkeypatch.setattr(doctor_mod, "profile_runtime_for", lambda profile, bundle: "onnxruntime")
    rep = diagnose(bundle_dir)
    if rep.profiles["best"] is None:
        pytest.skip("no shipped profile fits this machine")
    assert any(
        "fastest variant of the bundle is openvino-fp32 (1.00 ms p50)" in w and "pass --runtime openvino" in w
        for w in rep.warnings
    )
    monkeypatch.setattr(doctor_mod, "profile_runtime_for", lambda profile, bundle: "openvino")
    assert not any("fastest variant" in w for w in diagnose(bundle_dir).warnings)


def test_fastest_never_picks_a_nan_timing(bundle_dir, monkeypatch):
    import dataclasses

    from edgetl.device import bench as bench_pkg

    real = bench_pkg.run_bench

    def nan_fp32(*args, **kwargs):
        rep = real(*args, **kwargs)
        results = [
            dataclasses.replace(r, latency_ms={**r.latency_ms, "p50": float("nan")}) if r.precision == "fp32" else r
            for r in rep.results
        ]
        return dataclasses.replace(rep, results=results)

    monkeypatch.setattr(bench_pkg, "run_bench", nan_fp32)
    out = doctor_mod.measure_fastest(bundle_dir, iterations=3, warmup=0)
    assert out["variant"] == "onnxruntime-int8" and [m["variant"] for m in out["measured"]] == ["onnxruntime-int8"]


def test_cli_doctor_json_is_one_envelope():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "doctor")
    assert doc["bundle"] is None and len(doc["results"]) == 1
    report = doc["results"][0]
    assert set(report) == {"machine", "runtimes", "profiles", "int8", "warnings", "fastest"}
    assert report["machine"]["arch"] and set(report["runtimes"]) == {"onnxruntime", "openvino", "litert", "ncnn"}
    assert "measured" not in report["int8"] and report["fastest"] is None


def test_cli_doctor_with_bundle_json_and_lines(bundle_dir):
    result = CliRunner().invoke(main, ["doctor", str(bundle_dir), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "doctor")
    assert doc["bundle"] == str(bundle_dir)
    assert [row["runtime"] for row in doc["results"][0]["int8"]["measured"]] == ["onnxruntime"]
    lines = CliRunner().invoke(main, ["doctor", str(bundle_dir)])  # in a pipe: the same lines as on a terminal
    assert lines.exit_code == 0, lines.output
    fastest = doc["results"][0]["fastest"]
    assert {m["variant"] for m in fastest["measured"]} == {"onnxruntime-fp32", "onnxruntime-int8"}
    assert fastest["p50_ms"] == min(m["p50_ms"] for m in fastest["measured"])
    assert fastest["variant"] == next(m["variant"] for m in fastest["measured"] if m["p50_ms"] == fastest["p50_ms"])
    for word in ("machine", "CPU", "runtimes", "profile", "int8", "measured onnxruntime", "fastest   onnxruntime-"):
        assert word in lines.stdout
    assert "\t" not in lines.stdout
    help_ = CliRunner().invoke(main, ["doctor", "--help"])
    assert "Example:" in help_.output


def test_cli_doctor_lines_never_wrap_and_show_untrusted_text_escaped(monkeypatch):
    real = doctor_mod.diagnose

    def long_names(bundle=None):
        r = real(bundle)
        r.machine["cpu"] = "Vendor CPU \x1b[31mred\x1b[0m " + "x" * 200
        r.warnings.append("w" * 300)
        return r

    monkeypatch.setattr(doctor_mod, "diagnose", long_names)
    for fmt in ("table", "tsv"):
        result = CliRunner().invoke(main, ["doctor", "--format", fmt])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0] == "machine   Vendor CPU \\x1b[31mred\\x1b[0m " + "x" * 200
        assert lines[-1] == "warning   " + "w" * 300


def test_cli_doctor_bundle_errors(tmp_path):
    result = CliRunner().invoke(main, ["doctor", str(tmp_path / "missing"), "--json"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
    assert validate_document(result.stdout, "doctor")["error"]["exit_code"] == 1
    both = CliRunner().invoke(main, ["doctor", "--json", "--format", "tsv"])
    assert both.exit_code == 2 and "--json and --format tsv disagree" in both.stderr


def test_doctor_and_devices_run_with_torch_blocked():
    code = BLOCK_TORCH + textwrap.dedent(
        """
        import json
        from click.testing import CliRunner
        from edgetl.cli import main

        doctor = CliRunner().invoke(main, ["doctor", "--json"])
        assert doctor.exit_code == 0, doctor.output
        devices = CliRunner().invoke(main, ["devices", "rpi5", "--json"])
        assert devices.exit_code == 0, devices.output
        assert not [m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision")]
        print(json.dumps(json.loads(doctor.stdout)["results"][0]["machine"]["arch"]))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)
