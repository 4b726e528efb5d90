"""`edgetl doctor`: what this machine is, what it can run, which device profile fits, what to expect.

Facts first (CPU model, cores, the ISA features that decide int8 speed, the runtimes, ONNX Runtime
providers and OpenVINO devices actually present), then advice derived from them, each piece saying
what it rests on. Whether int8 beats fp32 depends on the model and the runtime as much as on the
CPU, so the ISA-based outlook is a prior; given a bundle, doctor measures it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import Any

from edgetl.core import envinfo
from edgetl.core.errors import EdgetlError
from edgetl.device.profiles import best_fit

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DoctorReport:
    machine: dict[str, Any]
    runtimes: dict[str, Any]
    profiles: dict[str, Any]  # best: name or None, fits: [{profile, score, reasons, missing}]
    int8: dict[str, Any]  # outlook from the ISA; "measured" when a bundle was given
    warnings: list[str]
    # With a bundle: every variant this machine runs, timed interleaved, and the fastest; else None.
    fastest: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def machine_facts() -> dict[str, Any]:
    env = envinfo.environment()
    isa = env["isa"]
    table = envinfo.X86_FEATURES if envinfo.is_x86() else envinfo.ARM_FEATURES
    return {
        "cpu": env["cpu"],
        "board": env["board"],
        "arch": envinfo.arch(),
        "cpu_cores": env["cpu_cores"],
        "logical_cores": env["logical_cores"],
        "physical_cores": env["physical_cores"],
        "usable_cores": env["usable_cores"],
        "isa": isa,
        "isa_missing": None if isa is None else [f for f in table if f not in isa and f != "neon"],
        "isa_meaning": {f: table[f] for f in (isa or [])},
        "virtualized": env["virtualized"],
        "memory_mb": env["memory_mb"],
        "governor": env["governor"],
        "max_frequency_mhz": env["max_frequency_mhz"],
        "os": env["os"],
        "kernel": env["kernel"],
        "python": env["python"],
    }


def runtime_facts() -> dict[str, Any]:
    """Installed runtimes with their providers/devices; each library is imported only here."""
    from edgetl.device.backends.onnxruntime import onnxruntime_providers
    from edgetl.device.backends.openvino import openvino_core

    out: dict[str, Any] = {}
    ort_version = envinfo.package_version("onnxruntime") or next(
        (
            envinfo.package_version(p)
            for p in ("onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")
            if envinfo.package_version(p)
        ),
        None,
    )
    if importlib.util.find_spec("onnxruntime") is None:
        out["onnxruntime"] = {"installed": False, "version": None, "providers": []}
    else:
        try:
            out["onnxruntime"] = {"installed": True, "version": ort_version, "providers": onnxruntime_providers()}
        except Exception as exc:  # a broken install (missing shared library) is a finding, not a crash
            out["onnxruntime"] = {"installed": True, "version": ort_version, "providers": [], "error": _first_line(exc)}
    if importlib.util.find_spec("openvino") is None:
        out["openvino"] = {"installed": False, "version": None, "devices": []}
    else:
        try:
            core = openvino_core()
            devices = []
            for name in core.available_devices:
                devices.append(
                    {
                        "name": name,
                        "full_name": _ov_property(core, name, "FULL_DEVICE_NAME"),
                        "capabilities": list(_ov_property(core, name, "OPTIMIZATION_CAPABILITIES") or []),
                    }
                )
            out["openvino"] = {"installed": True, "version": envinfo.package_version("openvino"), "devices": devices}
        except Exception as exc:
            out["openvino"] = {
                "installed": True,
                "version": envinfo.package_version("openvino"),
                "devices": [],
                "error": _first_line(exc),
            }
    out["litert"] = litert_facts()
    out["ncnn"] = ncnn_facts()
    return out


def litert_facts() -> dict[str, Any]:
    """LiteRT (``ai-edge-litert``): installed or not; its CPU kernels are XNNPACK's."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        return {"installed": False, "version": None}
    out: dict[str, Any] = {"installed": True, "version": envinfo.package_version("ai-edge-litert")}
    try:
        from ai_edge_litert import interpreter  # noqa: F401  (a broken install fails here)

        out["delegate"] = "XNNPACK (CPU)"
    except Exception as exc:
        out["error"] = _first_line(exc)
    return out


def ncnn_facts() -> dict[str, Any]:
    """NCNN: installed or not, and the CPU features its kernels pick by themselves (fp16
    arithmetic on ARMv8.2, which edgetl's fp32 variants switch off)."""
    if importlib.util.find_spec("ncnn") is None:
        return {"installed": False, "version": None}
    out: dict[str, Any] = {"installed": True, "version": envinfo.package_version("ncnn")}
    try:
        import ncnn

        out["cpu"] = {
            "threads": int(ncnn.get_cpu_count()),
            "big_cores": int(ncnn.get_big_cpu_count()),
            "arm_fp16_arithmetic": bool(ncnn.cpu_support_arm_asimdhp()),
            "x86_avx2": bool(ncnn.cpu_support_x86_avx2()),
        }
    except Exception as exc:
        out["error"] = _first_line(exc)
    return out


def _ov_property(core, device: str, name: str) -> Any:
    try:
        return core.get_property(device, name)
    except Exception:  # not every plugin reports every property
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def int8_outlook(arch: str, isa: list[str] | None) -> dict[str, Any]:
    """What the CPU's instructions say about int8 vs fp32: ``expect`` is ``faster``, ``uncertain``,
    ``not-faster`` or ``unknown``; ``warning`` is set when int8 is unlikely to beat fp32 here."""
    if isa is None:
        return {
            "hardware": "unknown",
            "expect": "unknown",
            "warning": None,
            "reason": "this platform does not report CPU features; measure with `edgetl bench BUNDLE --all`",
        }
    have = set(isa)
    if envinfo.is_x86(arch):
        if "amx_int8" in have:
            return {
                "hardware": "AMX-INT8",
                "expect": "faster",
                "warning": None,
                "reason": "AMX multiplies int8 tiles in hardware; OpenVINO (oneDNN) uses it, ONNX Runtime in part",
            }
        if have & {"avx512_vnni", "avx_vnni"}:
            which = "AVX-512 VNNI" if "avx512_vnni" in have else "AVX-VNNI"
            return {
                "hardware": which,
                "expect": "uncertain",
                "warning": None,
                "reason": f"{which} computes int8 dot products in hardware, and OpenVINO's int8 kernels use it; "
                "ONNX Runtime's static (QDQ) int8 of depthwise-heavy CNNs such as MobileNet can still "
                "be slower than fp32 at small batch: pass a bundle to measure",
            }
        if "avx2" in have:
            return {
                "hardware": "AVX2 only",
                "expect": "not-faster",
                "warning": "this CPU has no VNNI int8 dot-product instructions (AVX2 only): int8 is unlikely to "
                "beat fp32 by much and is often slower; it still shrinks the model ~3.4x",
                "reason": "without VNNI, int8 multiplies go through AVX2's VPMADDUBSW plus widening adds",
            }
        return {
            "hardware": "no AVX2",
            "expect": "not-faster",
            "warning": "this CPU has neither AVX2 nor VNNI: int8 will likely be slower than fp32",
            "reason": "int8 kernels need at least AVX2 to be competitive on x86",
        }
    if envinfo.is_arm(arch):
        if have & {"i8mm", "asimddp"}:
            which = " and ".join(
                x
                for x, f in (("int8 matrix multiply (i8mm)", "i8mm"), ("dot product (asimddp)", "asimddp"))
                if f in have
            )
            return {
                "hardware": which,
                "expect": "faster",
                "warning": None,
                "reason": f"NEON {which}: ONNX Runtime's ARM64 int8 kernels use SDOT/SMMLA",
            }
        return {
            "hardware": "NEON without dot product",
            "expect": "not-faster",
            "warning": "this ARM CPU has no int8 dot-product instructions (no asimddp, e.g. Cortex-A72/A53): "
            "int8 is unlikely to beat fp32 by much; it still shrinks the model ~3.4x",
            "reason": "without SDOT, int8 multiplies need widening NEON instructions",
        }
    return {
        "hardware": "unknown",
        "expect": "unknown",
        "warning": None,
        "reason": f"no int8 rules for architecture {arch!r}; measure with `edgetl bench BUNDLE --all`",
    }


def measure_int8(bundle: str | os.PathLike, *, iterations: int = 40, warmup: int = 5) -> list[dict[str, Any]]:
    """int8 vs fp32 of a bundle, for each runtime holding both, interleaved (no cold start)."""
    from edgetl.core.formats import RUNTIMES
    from edgetl.device.backends import import_backend
    from edgetl.device.bench import run_bench
    from edgetl.device.bundle_loading import open_bundle

    b = open_bundle(bundle)
    rows = []
    for runtime in RUNTIMES:
        try:
            have = b.runtime_precisions(runtime)
        except EdgetlError:
            continue
        if not {"fp32", "int8"} <= set(have):
            # Nothing to compare, but still open every variant: its graphs are checked against the
            # manifest (shapes, label counts), which predict would otherwise be the first to hit.
            try:
                import_backend(runtime)
            except EdgetlError:
                continue  # not installed here: the runtimes section says so
            for precision in have:
                try:
                    b.load(runtime=runtime, precision=precision, heads="all")
                except EdgetlError as exc:
                    rows.append({"runtime": runtime, "precision": precision, "error": str(exc)})
            continue
        try:
            rep = run_bench(
                bundle,
                runtime=runtime,
                precisions=["fp32", "int8"],
                iterations=iterations,
                warmup=warmup,
                cold_start_runs=False,
                block=5,
            )
        except EdgetlError as exc:
            rows.append({"runtime": runtime, "error": str(exc)})
            continue
        fp32, int8 = rep.results
        rows.append(
            {
                "runtime": runtime,
                "batch_size": fp32.batch_size,
                "threads": fp32.threads,
                "fp32_p50_ms": fp32.latency_ms["p50"],
                "int8_p50_ms": int8.latency_ms["p50"],
                "speedup": fp32.latency_ms["p50"] / int8.latency_ms["p50"],
            }
        )
    return rows


def measure_fastest(bundle: str | os.PathLike, *, iterations: int = 40, warmup: int = 5) -> dict[str, Any]:
    """Every variant of the bundle this machine can run, timed interleaved in one run (batch 1,
    the runtimes' default threads): the fastest by p50, and each variant's p50. ``variant`` is None
    when nothing could run (``error`` says why)."""
    from edgetl.device.bench import run_bench

    try:
        rep = run_bench(bundle, all_variants=True, iterations=iterations, warmup=warmup, cold_start_runs=False, block=5)
    except EdgetlError as exc:
        return {"variant": None, "error": str(exc)}
    rows = [
        {"variant": f"{r.runtime}-{r.precision}", "runtime": r.runtime, "precision": r.precision, "p50_ms": p50}
        for r in rep.results
        if (p50 := r.latency_ms.get("p50")) is not None and p50 == p50  # NaN never wins
    ]
    if not rows:
        return {"variant": None, "error": "no variant produced a timing"}
    best = min(rows, key=lambda r: r["p50_ms"])
    return {**best, "measured": rows, "skipped": rep.skipped}


def profile_runtime_for(profile_name: str, bundle: str | os.PathLike) -> str | None:
    """The runtime device profile ``profile_name`` would run ``bundle`` with here (None: it can't)."""
    from edgetl.device.bundle_loading import open_bundle
    from edgetl.device.profiles import load_profile

    try:
        return open_bundle(bundle).pick_runtime(load_profile(profile_name).runtimes)
    except EdgetlError:
        return None


def profile_facts(machine: dict[str, Any], runtimes: dict[str, Any]) -> dict[str, Any]:
    """What :func:`edgetl.device.profiles.fit` matches against: the machine plus its accelerators."""
    return {
        **machine,
        "providers": runtimes["onnxruntime"].get("providers", []),
        "ov_devices": [d["name"] for d in runtimes["openvino"].get("devices", [])],
    }


def machine_profile_name() -> str:
    """The profile that fits this machine best (as ``edgetl doctor`` says), else ``unknown-<arch>``:
    the folder ``bench --save`` writes under when no profile was applied."""
    machine = machine_facts()
    fits = best_fit(profile_facts(machine, runtime_facts()))
    return fits[0].profile if fits else f"unknown-{machine['arch']}"


def diagnose(bundle: str | os.PathLike | None = None) -> DoctorReport:
    machine = machine_facts()
    runtimes = runtime_facts()
    fits = best_fit(profile_facts(machine, runtimes))
    profiles = {"best": fits[0].profile if fits else None, "fits": [f.to_dict() for f in fits]}
    int8 = int8_outlook(machine["arch"], machine["isa"])
    warnings = []
    if int8["warning"]:
        warnings.append(int8["warning"])
    if bundle is not None:
        int8["measured"] = measure_int8(bundle)
        for row in int8["measured"]:
            # Below 1.05x int8 buys no speed worth its accuracy risk; 5% is also about the noise of a short run.
            if "speedup" in row and row["speedup"] < 1.05:
                verdict = "slower than" if row["speedup"] < 0.95 else "no faster than"
                warnings.append(
                    f"measured with {row['runtime']} on this machine: int8 is {verdict} fp32 ({row['speedup']:.2f}x; "
                    f"p50 {row['int8_p50_ms']:.2f} vs {row['fp32_p50_ms']:.2f} ms, batch {row['batch_size']}): "
                    "ship fp32 for this runtime, or try the other runtime"
                )
    fastest = None
    if bundle is not None:
        fastest = measure_fastest(bundle)
        if fastest.get("variant") and fits:
            chosen = profile_runtime_for(fits[0].profile, bundle)
            if chosen is not None and chosen != fastest["runtime"]:
                warnings.append(
                    f"measured on this machine the fastest variant of the bundle is {fastest['variant']} "
                    f"({fastest['p50_ms']:.2f} ms p50), but profile {fits[0].profile} runs {chosen}: "
                    f"pass --runtime {fastest['runtime']}"
                )
    if not any(rt["installed"] for rt in runtimes.values()):
        warnings.append("no inference runtime is installed: pip install onnxruntime (or 'edgetl[openvino]')")
    for name, rt in runtimes.items():
        if rt.get("error"):
            warnings.append(f"{name} is installed but fails to start: {rt['error']}")
    if machine["governor"] not in (None, "performance"):
        warnings.append(
            f"CPU frequency governor is {machine['governor']!r}: latencies vary with load; for benchmarks "
            "set it to performance"
        )
    if machine["virtualized"]:
        warnings.append(
            "running in a virtual machine: timings are noisier (bench interleaves variants so that "
            "noise hits all of them alike)"
        )
    if machine["usable_cores"] and machine["logical_cores"] and machine["usable_cores"] < machine["logical_cores"]:
        warnings.append(
            f"this process may use {machine['usable_cores']} of {machine['logical_cores']} cores "
            "(CPU affinity or container limits)"
        )
    if not fits:
        warnings.append(
            "no shipped device profile fits this machine; write one (see devices/*.yaml) and pass --device-profile PATH"
        )
    for f in fits[:1]:
        for missing in f.missing:
            warnings.append(f"profile {f.profile} expects {missing}, which is not available here")
    return DoctorReport(machine, runtimes, profiles, int8, warnings, fastest)
