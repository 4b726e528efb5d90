"""int8 for speed: the search keeps the fastest attempt that passes, the export measures each int8
variant against its fp32 and records it, and --min-speedup is held where the CPU can be held to it.

Timings are injected (a fake timer, a fake ``interleaved_p50``): what is tested is the logic that
uses them, never how fast this machine is (benchmarks/int8_speed_accuracy.py measures that).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core import envinfo
from edgetl.core.bundle import read_manifest, validate_manifest
from edgetl.core.errors import BundleError, ConfigError, ExportError
from edgetl.device import doctor
from edgetl.device.bench import timing as bench_timing
from edgetl.device.info import bundle_info
from edgetl.workstation.export import export_bundle, resolve_options, speed
from edgetl.workstation.export.int8 import EXPLORE_AFTER_PASS, Attempt, choose, features_scorer, search_int8
from edgetl.workstation.export.speed import Timing
from tests.run_factory import shared_export, shared_run
from tests.schemas import validate_document

NAN = math.nan


# --- the search: fastest passing attempt, NaN never wins ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Cfg:
    name: str
    floats: int = 0
    method: str = "minmax"

    def describe(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        return {"method": self.method, "name": self.name}


class FakeQuantizer:
    """Remedies in a fixed order; each 'model' is its config's name, scored from ``scores``."""

    label = "fake int8"
    calibration_size = 4

    def __init__(self, configs, scores):
        self._configs, self._scores, self.saved = configs, scores, None

    def configs(self, attempts):
        yield from self._configs

    def quantize(self, config, *, max_drop):
        return config.name, tuple(f"{config.name}/n{i}" for i in range(config.floats))

    def evaluate(self, model):
        return self._scores[model]

    def save(self, model, out: Path) -> None:
        self.saved = model
        out.write_text(model)

    def runner(self, model, threads):
        raise AssertionError("the injected timer never loads a model")

    def header(self):
        return {"method": "fake"}

    def extra(self):
        return {}


def fake_timer(speedups: dict[str, float], seen: list[str] | None = None):
    """A timer giving each model the speed-up asked for (fp32 p50 1 ms), at 1 and 2 threads."""

    def timer(model):
        if seen is not None:
            seen.append(model)
        s = speedups[model]
        return Timing((1, 2), (1.0, 1.0), (1.0 / s, 1.0 / s) if s else (NAN, NAN), 100)

    return timer


def test_the_fastest_passing_attempt_wins_not_the_first(tmp_path):
    configs = [Cfg("a"), Cfg("b", 3), Cfg("c", 1), Cfg("d", 2)]
    q = FakeQuantizer(configs, {"a": 0.5, "b": 0.90, "c": 0.895, "d": 0.90})
    timed: list[str] = []
    result = search_int8(
        q,
        tmp_path / "out",
        baseline_top1=0.9,
        max_drop=1.0,
        timer=fake_timer({"b": 1.1, "c": 1.9, "d": 1.4}, timed),
    )
    assert [a.config.name for a in result.attempts] == ["a", "b", "c", "d"]
    assert timed == ["b", "c", "d"]  # only passing attempts are timed
    assert result.chosen.config.name == "c" and q.saved == "c" and (tmp_path / "out").read_text() == "c"
    record = result.manifest_record([])
    assert record["selection"] == "fastest passing" and record["chosen_attempt"] == 2
    speeds = [a["speed"] for a in record["attempts"]]
    assert speeds[0] is None and [s["speedup_vs_fp32"] for s in speeds[1:]] == [1.1, 1.9, 1.4]
    assert speeds[2]["by_threads"][0] == {"threads": 1, "fp32_p50_ms": 1.0, "int8_p50_ms": 0.5263, "speedup": 1.9}
    assert [a["val_top1"] for a in record["attempts"]] == [0.5, 0.90, 0.895, 0.90]


def test_a_nan_accuracy_or_a_nan_latency_never_wins(tmp_path):
    configs = [Cfg("nan-top1"), Cfg("nan-speed"), Cfg("slow", 2)]
    q = FakeQuantizer(configs, {"nan-top1": NAN, "nan-speed": 0.9, "slow": 0.9})
    result = search_int8(
        q, tmp_path / "o", baseline_top1=0.9, max_drop=1.0, timer=fake_timer({"nan-speed": 0, "slow": 1.01})
    )
    nan_top1, nan_speed, slow = result.attempts
    assert not nan_top1.passed and nan_top1.speed is None  # a NaN top-1 fails the bar and is not timed
    assert nan_speed.passed and math.isnan(nan_speed.speedup)
    assert result.chosen is slow  # a measured latency beats a NaN one, even a slow one with layers in float
    assert result.manifest_record([])["attempts"][1]["speed"] is None  # a NaN timing is recorded as none
    # Only NaN timings: the first attempt that passed (the accuracy bar decides).
    only = [Attempt(Cfg("x"), 0.9, 0.0, True, 0.1, (), Timing((1,), (1.0,), (NAN,), 10))]
    assert choose(only) == 0
    # Nothing passed: the best top-1, a NaN counting as the worst.
    failed = [Attempt(Cfg("n"), NAN, NAN, False, 0.1), Attempt(Cfg("m"), 0.5, 40.0, False, 0.1)]
    assert choose(failed) == 1


def test_speed_ties_go_to_accuracy_then_fewer_float_layers():
    def attempt(name, top1, floats, s):
        return Attempt(Cfg(name, floats), top1, 0.0, True, 0.1, ("n",) * floats, Timing((1,), (1.0,), (1.0 / s,), 10))

    # Within SPEED_TIE (3%) of the fastest: a tie, won by the higher top-1.
    assert choose([attempt("fast", 0.90, 0, 2.00), attempt("accurate", 0.92, 0, 1.97)]) == 1
    # Clearly faster wins over more accurate.
    assert choose([attempt("fast", 0.90, 0, 2.00), attempt("accurate", 0.92, 0, 1.80)]) == 0
    # Same speed and top-1: fewer layers in float, then the earlier one.
    assert choose([attempt("x", 0.9, 2, 1.5), attempt("y", 0.9, 1, 1.5), attempt("z", 0.9, 1, 1.5)]) == 1


def test_speed_ties_go_to_the_most_faithful_trunk_before_accuracy(tmp_path):
    """Among equally fast attempts, the trunk whose features are closest to fp32 ships (heads added
    later see it), even over one with a higher top-1 on the first head; a NaN fidelity never wins."""
    configs = [Cfg("a"), Cfg("b"), Cfg("c"), Cfg("d")]
    q = FakeQuantizer(configs, {"a": 0.92, "b": 0.90, "c": 0.91, "d": 0.5})
    fidelity = {"a": 18.0, "b": 26.0, "c": NAN, "d": 40.0}
    scored: list[str] = []

    def scorer(model):
        scored.append(model)
        return fidelity[model]

    timer = fake_timer({"a": 2.0, "b": 1.97, "c": 2.0})
    result = search_int8(q, tmp_path / "o", baseline_top1=0.9, max_drop=1.0, timer=timer, fidelity=scorer)
    assert scored == ["a", "b", "c", "d"]  # every attempt is scored, passing or not
    assert result.chosen.config.name == "b"
    record = result.manifest_record([])
    assert [a["features_sqnr_db"] for a in record["attempts"]] == [18.0, 26.0, None, 40.0]  # NaN: none
    # a clearly faster attempt still beats a more faithful one
    timer = fake_timer({"a": 2.0, "b": 1.5, "c": 2.0})
    result = search_int8(q, tmp_path / "o", baseline_top1=0.9, max_drop=1.0, timer=timer, fidelity=scorer)
    assert result.chosen.config.name == "a"


def test_features_scorer_measures_the_trunk_against_fp32():
    """The scorer runs both trunks through the quantizer's runner (ndarray or OpenVINO-style results)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 4, 4)).astype(np.float32)
    w = rng.normal(size=(48, 8)).astype(np.float32)
    noise = {None: 0.0, "quiet": 0.01, "loud": 0.1, "nan": NAN}
    loads: list = []

    def runner(model, threads):
        loads.append((model, threads))

        def run(batch):
            out = batch.reshape(len(batch), -1) @ w
            out = out + noise[model] * np.ones_like(out) * out.std()
            return out if model != "quiet" else {0: out}  # OpenVINO's compiled model returns a mapping

        return run

    score = features_scorer(runner, x)
    quiet, loud = score("quiet"), score("loud")
    assert quiet > 30 and loud < quiet - 15  # 10x the noise: 20 dB lower
    assert math.isnan(score("nan"))
    assert [m for m, _ in loads].count(None) == 1  # the fp32 reference is computed once
    assert score(None) == math.inf


def test_exploring_after_a_pass_is_bounded_and_without_a_timer_the_first_pass_wins(tmp_path):
    configs = [Cfg(f"c{i}", 1) for i in range(10)]
    scores = {c.name: 0.9 for c in configs}
    q = FakeQuantizer(configs, scores)
    timer = fake_timer(dict.fromkeys(scores, 1.0))
    result = search_int8(q, tmp_path / "o", baseline_top1=0.9, max_drop=1.0, timer=timer)
    assert len(result.attempts) == 1 + EXPLORE_AFTER_PASS
    result = search_int8(q, tmp_path / "o", baseline_top1=0.9, max_drop=1.0)
    assert len(result.attempts) == 1 and result.chosen.speed is None
    assert result.manifest_record([])["selection"] == "first passing"


def test_ort_search_looks_for_fewer_float_nodes_once_an_exclusion_set_passed(tiny_trunk, tmp_path):
    """After nodes kept in float rescued the accuracy, the ONNX Runtime quantizer tries the other
    calibrations with fewer nodes in float (fewest first), and the fastest passing one ships."""
    from edgetl.workstation.export.formats.onnx_quantize import OrtQuantizer

    trunk, calib = tiny_trunk
    quantizer = OrtQuantizer(trunk, calib, lambda p: 0.0, workdir=tmp_path / "w", whole_int8=())
    configs: list = []

    def evaluate(path):
        # min-max fails until nodes are kept in float; the other calibrations pass without.
        config = next(c for c, p in quantizer._paths.items() if p == path)
        configs.append(config)
        return 0.9 if config.method != "minmax" or config.excluded_nodes else 0.5

    quantizer.evaluate_path = evaluate

    def timer(path):
        config = configs[-1]
        s = 2.0 if not config.excluded_nodes else 1.0  # islands cost speed
        return Timing((1,), (1.0,), (1.0 / s,), 100)

    result = search_int8(quantizer, tmp_path / "int8.onnx", baseline_top1=0.9, max_drop=1.0, timer=timer)
    first_pass = next(i for i, a in enumerate(result.attempts) if a.passed)
    after = [a.config for a in result.attempts[first_pass + 1 :]]
    passing_nodes = len(result.attempts[first_pass].config.excluded_nodes)
    assert passing_nodes > 0 and after, [a.config for a in result.attempts]
    assert all(len(c.excluded_nodes) < passing_nodes and c.method in ("percentile", "entropy") for c in after)
    assert after[0].excluded_nodes == ()  # fewest first
    assert result.chosen.config.excluded_nodes == () and result.chosen.speedup == 2.0
    assert (tmp_path / "int8.onnx").is_file()


# --- timing records -----------------------------------------------------------------------------


def test_timing_is_the_lowest_speedup_over_thread_counts_and_nan_propagates():
    t = Timing((1, 2), (4.0, 3.0), (2.0, 3.0), 300)
    assert t.speedups == (2.0, 1.0) and t.speedup == 1.0 and t.finite
    assert "1.00x fp32" in t.describe() and "at 1 thread" in t.describe()
    assert t.to_dict()["by_threads"][1] == {"threads": 2, "fp32_p50_ms": 3.0, "int8_p50_ms": 3.0, "speedup": 1.0}
    for bad in (NAN, 0.0, -1.0, math.inf):
        assert not Timing((1, 2), (4.0, 3.0), (2.0, bad), 300).finite


def test_thread_counts_are_one_and_the_usable_cores(monkeypatch):
    monkeypatch.setattr(envinfo, "usable_cores", lambda: 8)
    assert speed.thread_counts() == (1, 8)
    monkeypatch.setattr(envinfo, "usable_cores", lambda: 1)
    assert speed.thread_counts() == (1,)
    monkeypatch.setattr(envinfo, "usable_cores", lambda: None)
    assert speed.thread_counts() == (1,)


def test_time_pair_interleaves_with_bench_timing(monkeypatch):
    calls = []

    def fake(fns, *, warmup, iterations, block=10):
        calls.append((len(fns), warmup, iterations))
        return [5.0, 2.5], iterations

    monkeypatch.setattr(bench_timing, "interleaved_p50", fake)
    loaded = []
    t = speed.time_pair(lambda n: loaded.append(("fp32", n)), lambda n: loaded.append(("int8", n)), threads=(1, 2))
    assert t == Timing((1, 2), (5.0, 5.0), (2.5, 2.5), speed.CALLS) and t.speedup == 2.0
    assert calls == [(2, speed.WARMUP, speed.CALLS)] * 2
    assert loaded == [("fp32", 1), ("int8", 1), ("fp32", 2), ("int8", 2)]


def test_a_speedup_under_the_floor_is_timed_again_and_the_median_counts():
    burst = Timing((1, 2), (4.0, 3.0), (2.0, 3.0), 100)  # 1.0x at 2 threads: the second core was busy
    fine = [Timing((1, 2), (4.0, 3.0), (2.0, 1.5), 100), Timing((1, 2), (4.2, 3.2), (2.1, 1.6), 100)]
    seen = iter([burst, *fine])
    calls = []

    def measure() -> Timing:
        calls.append(1)
        return next(seen)

    t = speed.confirmed(measure, 1.2)
    assert len(calls) == speed.CONFIRM_REPEATS == 3
    assert t == Timing((1, 2), (4.0, 3.0), (2.0, 1.6), 300) and t.speedup == 1.875
    # at or above the floor, or without one (no int8 dot products): one measurement
    for floor in (None, 1.0):
        calls.clear()
        assert speed.confirmed(lambda: (calls.append(1), burst)[1], floor) is burst and len(calls) == 1
    # a real miss stays a miss; a NaN is measured again too and stays NaN
    assert speed.confirmed(lambda: burst, 1.2).speedup == 1.0
    calls.clear()
    nan = Timing((1,), (NAN,), (1.0,), 100)
    assert not speed.confirmed(lambda: (calls.append(1), nan)[1], 1.2).finite and len(calls) == 3
    with pytest.raises(ValueError, match="thread counts"):
        speed.median_timing([burst, Timing((1,), (4.0,), (2.0,), 100)])


def test_a_burst_under_the_floor_does_not_warn_once_timed_again(tmp_path_factory, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(envinfo, "cpu_features", lambda *a, **k: ["avx2", "avx512_vnni"])
    pairs = iter([(3.0, 3.0)] + [(3.0, 1.5)] * 1000)  # the very first pair timed hits a burst

    def fake(fns, *, warmup, iterations, block=10):
        for fn in fns:
            fn()
        return list(next(pairs)), iterations

    monkeypatch.setattr(bench_timing, "interleaved_p50", fake)
    with caplog.at_level(logging.INFO):
        export_bundle(shared_run(tmp_path_factory), tmp_path / "b", resolve_options(formats=("onnx",)), progress=False)
    assert speed_warnings(caplog) == []
    assert any("timed 3 times, median" in r.getMessage() for r in caplog.records)
    assert read_manifest(tmp_path / "b")["variants"]["onnx-int8"]["speed"]["speedup_vs_fp32"] == 2.0


def test_interleaved_p50_times_each_call():
    counts = [0, 0]

    def a():
        counts[0] += 1

    def b():
        counts[1] += 1

    p50s, done = bench_timing.interleaved_p50([a, b], warmup=2, iterations=20, block=5)
    assert done == 20 and len(p50s) == 2 and all(p >= 0 for p in p50s)
    assert counts[0] == counts[1] >= 2 + 20  # warm-up and timed calls alike, interleaved


def test_int8_dot_product_matches_doctors_outlook():
    for arch, feature in [("x86_64", f) for f in ("amx_int8", "avx512_vnni", "avx_vnni")] + [
        ("aarch64", f) for f in ("i8mm", "asimddp")
    ]:
        assert envinfo.int8_dot_product(["avx2", feature]) == [feature]
        assert doctor.int8_outlook(arch, [feature])["expect"] in ("faster", "uncertain"), feature
    assert envinfo.int8_dot_product(["avx2", "fma"]) == []
    assert doctor.int8_outlook("x86_64", ["avx2", "fma"])["expect"] == "not-faster"
    assert doctor.int8_outlook("aarch64", ["asimd"])["expect"] == "not-faster"


# --- the export: what it measures and records ---------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return shared_export(tmp_path_factory, "default")


def test_export_records_each_int8_variants_speed(exported):
    out, doc = exported
    m = read_manifest(out)
    dot = envinfo.int8_dot_product()
    for name in ("onnx-int8", "openvino-int8"):
        var = m["variants"][name]
        s = var["speed"]
        assert var["metrics"]["speedup_vs_fp32"] == doc["variants"][name]["speedup_vs_fp32"] == s["speedup_vs_fp32"]
        assert s["speedup_vs_fp32"] == min(r["speedup"] for r in s["by_threads"]) > 0
        assert [r["threads"] for r in s["by_threads"]] == list(speed.thread_counts())
        # a first measurement under the floor (on a CPU with int8 dot products) is confirmed by two more
        assert s["calls"] in (speed.CALLS, speed.CALLS * speed.CONFIRM_REPEATS)
        assert s["calls"] == speed.CALLS or (dot and s["min_speedup"] == 1.2)
        assert s["batch_size"] == 1 and s["min_speedup"] == 1.2
        assert s["int8_dot_product"] is (None if dot is None else bool(dot)) and s["checked"] is bool(dot)
        assert s["machine"]["cpu"] == envinfo.cpu_model() and s["machine"]["isa"] == envinfo.cpu_features()
        q = var["quantization"]
        assert q["selection"] == "fastest passing" and q["attempts"][q["chosen_attempt"]]["passed"]
        for a in q["attempts"]:
            assert (a["speed"] is not None) is a["passed"]
        assert m["heads"]["default"]["metrics"][name]["speedup_vs_fp32"] == s["speedup_vs_fp32"]
    for name in ("onnx-fp32", "openvino-fp32"):
        assert "speed" not in m["variants"][name] and "speedup_vs_fp32" not in m["variants"][name]["metrics"]
    assert m["export"]["min_speedup"] == 1.2
    shown = {v["name"]: v["speedup_vs_fp32"] for v in bundle_info(out)["variants"]}
    assert shown["onnx-int8"] == m["variants"]["onnx-int8"]["metrics"]["speedup_vs_fp32"] and shown["onnx-fp32"] is None


@pytest.mark.parametrize(
    "where, value, match",
    [
        ("metric", NAN, "speedup_vs_fp32 must be"),
        ("metric", -1.0, "speedup_vs_fp32 must be"),
        ("metric", 0.0, "speedup_vs_fp32 must be"),
        ("metric", True, "speedup_vs_fp32 must be"),
        ("metric", 1e9, "speedup_vs_fp32 must be"),
        ("p50", NAN, "p50 latencies must be"),
        ("p50", -0.5, "p50 latencies must be"),
        ("p50", math.inf, "p50 latencies must be"),
        ("record", NAN, "speed record: speedup_vs_fp32"),
        ("threads", 0, "threads, a positive integer"),
        ("checked", True, "checked is true on a machine without"),
        ("dot", 1, "int8_dot_product must be"),
        ("floor", NAN, "min_speedup must be"),
        ("attempt", -2.0, "quantization attempt"),
        ("not-object", None, "speed record: not an object"),
    ],
)
def test_manifest_refuses_a_nan_or_negative_speed(exported, where, value, match):
    out, _ = exported
    m = json.loads((out / "manifest.json").read_text())
    validate_manifest(copy.deepcopy(m), out)
    var = m["variants"]["onnx-int8"]
    s = var["speed"]
    if where == "metric":
        var["metrics"]["speedup_vs_fp32"] = value
    elif where == "p50":
        s["by_threads"][0]["int8_p50_ms"] = value
    elif where == "record":
        s["speedup_vs_fp32"] = value
    elif where == "threads":
        s["by_threads"][0]["threads"] = value
    elif where == "checked":
        s["int8_dot_product"], s["checked"] = False, value
    elif where == "dot":
        s["int8_dot_product"] = value
    elif where == "floor":
        s["min_speedup"] = value
    elif where == "attempt":
        q = var["quantization"]
        q["attempts"][q["chosen_attempt"]]["speed"]["by_threads"][0]["fp32_p50_ms"] = value
    else:
        var["speed"] = value
    with pytest.raises(BundleError, match=match):
        validate_manifest(m, out)


# --- --min-speedup: bounds, and the warning where the CPU can be held to it ----------------------


@pytest.mark.parametrize("value", ["0.4", "10.5", "nan", "inf", "-1", "fast"])
def test_min_speedup_out_of_range_is_one_line_exit_2(tmp_path, value):
    args = ["export", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--min-speedup", value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--min-speedup" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_min_speedup_in_profiles_and_options(tmp_path):
    assert resolve_options().min_speedup == 1.2
    assert resolve_options(min_speedup=2).min_speedup == 2.0
    for bad in (0.49, 10.01, NAN, True, "2"):
        with pytest.raises(ConfigError, match=r"^--min-speedup must be a speed-up over fp32 in 0\.5\.\.10"):
            resolve_options(min_speedup=bad)
    profile = tmp_path / "p.yaml"
    profile.write_text("formats: [onnx]\nmin_speedup: 1.8\n")
    assert resolve_options(str(profile)).min_speedup == 1.8
    profile.write_text("formats: [onnx]\nmin_speedup: 20\n")
    with pytest.raises(ConfigError, match="--min-speedup"):
        resolve_options(str(profile))
    result = CliRunner().invoke(main, ["export", "r", "--add-to", "b", "--head", "h", "--min-speedup", "2"])
    assert result.exit_code == 2 and "--min-speedup" in result.stderr


@pytest.fixture
def machine(monkeypatch):
    """Set the CPU's features and every p50 the export measures (fp32, int8)."""

    def set_machine(isa: list[str] | None, fp32_ms: float, int8_ms: float):
        monkeypatch.setattr(envinfo, "cpu_features", lambda *a, **k: isa)

        def fake(fns, *, warmup, iterations, block=10):
            for fn in fns:
                fn()  # the loaded models run: only the clock is replaced
            return [fp32_ms, int8_ms], iterations

        monkeypatch.setattr(bench_timing, "interleaved_p50", fake)

    return set_machine


def speed_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "fp32" in r.getMessage()]


def test_a_vnni_machine_under_the_floor_warns_once_naming_the_variant(tmp_path_factory, tmp_path, machine, caplog):
    machine(["avx2", "fma", "avx512f", "avx512_vnni"], fp32_ms=3.0, int8_ms=2.9)
    with caplog.at_level(logging.WARNING):
        doc = export_bundle(
            shared_run(tmp_path_factory), tmp_path / "b", resolve_options(formats=("onnx",)), progress=False
        )
    [warning] = speed_warnings(caplog)
    assert warning.startswith("variant onnx-int8 is only 1.03x as fast as onnx-fp32 (p50 2.90 vs 3.00 ms at 1 thread")
    assert "under --min-speedup 1.2" in warning and "avx512_vnni" in warning
    assert "what cost the speed: " in warning and "kept in float" in warning  # N layers, or "no layer is kept in float"
    s = read_manifest(tmp_path / "b")["variants"]["onnx-int8"]["speed"]
    assert (s["int8_dot_product"], s["checked"], s["speedup_vs_fp32"]) == (True, True, 1.0345)
    assert doc["variants"]["onnx-int8"]["speedup_vs_fp32"] == 1.0345  # the export succeeds: a finding, not a failure
    caplog.clear()
    machine(["avx2", "avx512_vnni"], fp32_ms=3.0, int8_ms=1.5)  # 2x: above the floor, nothing to say
    with caplog.at_level(logging.WARNING):
        export_bundle(shared_run(tmp_path_factory), tmp_path / "c", resolve_options(formats=("onnx",)), progress=False)
    assert speed_warnings(caplog) == []


def test_a_machine_without_int8_dot_products_says_once_it_cannot_check(tmp_path_factory, tmp_path, machine, caplog):
    machine(["avx2", "fma"], fp32_ms=3.0, int8_ms=6.0)
    with caplog.at_level(logging.WARNING):
        export_bundle(shared_run(tmp_path_factory), tmp_path / "b", resolve_options(min_speedup=1.5), progress=False)
    [warning] = speed_warnings(caplog)  # once for both int8 variants
    assert warning.startswith("this CPU has no int8 dot-product instructions")
    assert "cannot be checked against --min-speedup 1.5 on this machine" in warning and "checked: false" in warning
    m = read_manifest(tmp_path / "b")
    for name in ("onnx-int8", "openvino-int8"):
        s = m["variants"][name]["speed"]
        assert (s["int8_dot_product"], s["checked"], s["speedup_vs_fp32"], s["min_speedup"]) == (False, False, 0.5, 1.5)
    assert "avx512_vnni" not in m["variants"]["onnx-int8"]["speed"]["machine"]["isa"]


def test_a_nan_measurement_fails_the_export_naming_the_variant(tmp_path_factory, tmp_path, machine):
    machine(["avx2"], fp32_ms=NAN, int8_ms=1.0)
    with pytest.raises(ExportError, match=r"^variant onnx-int8: its speed against onnx-fp32 could not be measured"):
        export_bundle(shared_run(tmp_path_factory), tmp_path / "b", resolve_options(formats=("onnx",)), progress=False)
    assert not (tmp_path / "b").exists()


def test_export_json_has_the_speedup_key_and_validates(tmp_path_factory, tmp_path, machine):
    machine(["avx2"], fp32_ms=2.0, int8_ms=1.6)
    run = shared_run(tmp_path_factory)
    args = ["export", str(run), "--out", str(tmp_path / "b"), "--model-format", "onnx", "--min-speedup", "1.5"]
    result = CliRunner().invoke(main, [*args, "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "export")
    by_name = {r["name"]: r for r in doc["results"]}
    assert by_name["onnx-int8"]["speedup_vs_fp32"] == 1.25 and by_name["onnx-fp32"]["speedup_vs_fp32"] is None
    assert doc["profile"]["min_speedup"] == 1.5
