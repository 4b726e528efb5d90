"""What this machine is: the fingerprint stored with every benchmark number, and the facts `doctor` reads.

Torch-free and import-free: library versions come from package metadata, so asking for the
OpenVINO version neither loads OpenVINO nor anything it might pull in. CPU facts come from Linux's
``/proc`` and ``/sys`` (and ``sysctl`` on macOS); where a platform does not say, the answer is
``None`` ("unknown"), never a guess.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import edgetl

_PACKAGES = ("numpy", "onnxruntime", "openvino")

# CPU features that decide how fast a CNN runs, in the order doctor prints them. The keys are the
# Linux /proc/cpuinfo flag names (x86 "flags", ARM "Features").
X86_FEATURES: dict[str, str] = {
    "avx2": "AVX2 (256-bit SIMD; int8 via VPMADDUBSW)",
    "fma": "FMA (fused multiply-add, fp32)",
    "avx512f": "AVX-512 (512-bit SIMD)",
    "avx512_vnni": "AVX-512 VNNI (int8 dot products)",
    "avx_vnni": "AVX-VNNI (int8 dot products, 256-bit)",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_int8": "AMX-INT8 (int8 tile matrix multiply)",
    "amx_bf16": "AMX-BF16 (bf16 tile matrix multiply)",
}
ARM_FEATURES: dict[str, str] = {
    "neon": "NEON (32-bit kernel)",
    "asimd": "NEON / Advanced SIMD",
    "asimdhp": "NEON fp16 arithmetic",
    "asimddp": "NEON dot product (SDOT/UDOT: int8)",
    "i8mm": "int8 matrix multiply (SMMLA)",
    "bf16": "BF16 arithmetic",
    "sve": "SVE",
    "sve2": "SVE2",
}

# The features above that compute int8 dot products in hardware (what makes int8 faster than fp32, not
# only smaller): doctor's int8 outlook counts the same ones ("faster" or "uncertain", never "not-faster").
INT8_DOT_PRODUCT: tuple[str, ...] = ("amx_int8", "avx512_vnni", "avx_vnni", "i8mm", "asimddp")

# ARM Ltd. (implementer 0x41) core part numbers, as /proc/cpuinfo's "CPU part" reports them.
ARM_PARTS: dict[str, str] = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4b": "Cortex-A78C",
    "0xd4d": "Cortex-A715",
    "0xd4e": "Cortex-X3",
    "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
    "0xd82": "Cortex-X4",
}

# macOS names the same features differently (sysctl hw.optional.*); mapped to the Linux names.
_MAC_ARM_SYSCTL = {
    "hw.optional.AdvSIMD": "asimd",
    "hw.optional.arm.FEAT_FP16": "asimdhp",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
}
_MAC_X86_NAMES = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16",
}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip().rstrip("\x00") or None
    except OSError:
        return None


def _cpuinfo() -> dict[str, str]:
    """First value of each key in /proc/cpuinfo (Linux only; empty elsewhere)."""
    info: dict[str, str] = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip().lower(), value.strip())
    return info


def _cpuinfo_all(key: str) -> list[str]:
    """Every value of one /proc/cpuinfo key (one per logical CPU)."""
    out = []
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        k, sep, value = line.partition(":")
        if sep and k.strip().lower() == key:
            out.append(value.strip())
    return out


def _sysctl(name: str) -> str | None:
    try:
        proc = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs; None where /proc/cpuinfo does not say (many ARM boards)."""
    cores, phys = set(), "0"
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def cpu_model() -> str:
    """x86: 'model name'; Raspberry Pi and other ARM boards: the device-tree model, then cpuinfo
    fields, then the core types (``2x Cortex-A72``) rather than just the architecture."""
    info = _cpuinfo()
    for candidate in (
        info.get("model name"),
        _read("/proc/device-tree/model"),
        info.get("model"),
        info.get("hardware"),
        _sysctl("machdep.cpu.brand_string") if platform.system() == "Darwin" else None,
        ", ".join(cpu_cores()),
        platform.processor(),
    ):
        if candidate:
            return candidate
    return platform.machine() or "unknown"


def arch() -> str:
    """``x86_64``, ``aarch64``, ``armv7l`` ...; macOS's ``arm64`` is reported as ``aarch64``."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def is_x86(machine: str | None = None) -> bool:
    return (machine or arch()) in ("x86_64", "i386", "i686")


def is_arm(machine: str | None = None) -> bool:
    return (machine or arch()).startswith(("aarch64", "arm"))


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux names), or None when this platform does not tell us."""
    if platform.system() == "Linux":
        info = _cpuinfo()
        text = info.get("flags") or info.get("features")
        return frozenset(text.split()) if text is not None else None
    if platform.system() == "Darwin":
        if is_arm():
            return frozenset(flag for key, flag in _MAC_ARM_SYSCTL.items() if _sysctl(key) == "1")
        names = " ".join(filter(None, (_sysctl("machdep.cpu.features"), _sysctl("machdep.cpu.leaf7_features"))))
        return frozenset(_MAC_X86_NAMES[n] for n in names.lower().split() if n in _MAC_X86_NAMES)
    return None


def cpu_features(flags: frozenset[str] | None = None, machine: str | None = None) -> list[str] | None:
    """The inference-relevant features present (X86_FEATURES / ARM_FEATURES keys), None if unknown."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    table = X86_FEATURES if is_x86(machine) else ARM_FEATURES if is_arm(machine) else {}
    return [f for f in table if f in flags]


def int8_dot_product(isa: list[str] | None = None) -> list[str] | None:
    """The int8 dot-product features this CPU has (:data:`INT8_DOT_PRODUCT`, in that order): empty
    when it has none, None when this platform does not report its features. ``isa`` defaults to
    :func:`cpu_features`."""
    isa = cpu_features() if isa is None else isa
    if isa is None:
        return None
    return [f for f in INT8_DOT_PRODUCT if f in isa]


def int8_saturates(isa: list[str] | None = None, machine: str | None = None) -> bool | None:
    """Whether ONNX Runtime's int8 kernels on this CPU can saturate: True on x86 without an int8
    dot product (VNNI, AMX), where its U8S8 kernels multiply with VPMADDUBSW and add each pair of
    products in 16 bits with saturation, so a QDQ graph computes something other than what it says
    (measured on EfficientNet-Lite0: 37.6 pp lost as run, 1.4 pp as written). False on ARM (exact
    32-bit sums, with or without its dot product) and on x86 with VNNI or AMX; None when the
    platform does not report its features. ``isa`` defaults to :func:`cpu_features`."""
    isa = cpu_features(machine=machine) if isa is None else isa
    if isa is None:
        return None
    if is_arm(machine):
        return False
    if is_x86(machine):
        return not any(f in isa for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return None


def cpu_cores() -> list[str]:
    """ARM: the core types and their counts (``["4x Cortex-A76"]``; big.LITTLE boards list both)."""
    parts = _cpuinfo_all("cpu part")
    implementers = _cpuinfo_all("cpu implementer")
    names: dict[str, int] = {}
    for i, part in enumerate(parts):
        impl = implementers[i] if i < len(implementers) else "0x41"
        name = ARM_PARTS.get(part.lower()) if impl.lower() == "0x41" else None
        name = name or f"part {part} (implementer {impl})"
        names[name] = names.get(name, 0) + 1
    return [f"{n}x {name}" for name, n in names.items()]


def virtualized() -> bool | None:
    """True inside a VM (x86 ``hypervisor`` flag): timings there are noisier and CPU flags may be masked."""
    flags = cpu_flags()
    if flags is None or not is_x86():
        return None
    return "hypervisor" in flags


def memory_mb() -> float | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) / 1024.0
            except (IndexError, ValueError):
                return None
    if platform.system() == "Darwin":
        value = _sysctl("hw.memsize")
        return int(value) / 1048576.0 if value and value.isdigit() else None
    return None


def max_frequency_mhz() -> float | None:
    value = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    return int(value) / 1000.0 if value and value.isdigit() else None


def usable_cores() -> int | None:
    """CPUs this process may run on (affinity, cgroup cpusets), which is what the runtimes use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """CPU, features, cores, OS, frequency governor and versions of the libraries that run the model."""
    return {
        "cpu": cpu_model(),
        "board": _read("/proc/device-tree/model"),
        "machine": platform.machine(),
        "cpu_cores": cpu_cores(),
        "isa": cpu_features(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": usable_cores(),
        "virtualized": virtualized(),
        "memory_mb": memory_mb(),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "max_frequency_mhz": max_frequency_mhz(),
        "os": platform.system(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {"edgetl": edgetl.__version__, **{p: package_version(p) for p in _PACKAGES}},
    }
