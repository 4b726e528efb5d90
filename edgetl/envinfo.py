"""Environment fingerprint stored with every benchmark number: a latency means nothing without it.

Torch-free and import-free: library versions come from package metadata, so asking for the
OpenVINO version neither loads OpenVINO nor anything it might pull in.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import edgetl

_PACKAGES = ("numpy", "onnxruntime", "openvino")


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
    """x86: 'model name'; Raspberry Pi and other ARM boards: the device-tree model, then cpuinfo fields."""
    info = _cpuinfo()
    for candidate in (
        info.get("model name"),
        _read("/proc/device-tree/model"),
        info.get("model"),
        info.get("hardware"),
        platform.processor(),
    ):
        if candidate:
            return candidate
    return platform.machine() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """CPU, cores, OS, frequency governor and versions of the libraries that run the model."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    board = _read("/proc/device-tree/model")
    return {
        "cpu": cpu_model(),
        "board": board,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": usable,
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "os": platform.system(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {"edgetl": edgetl.__version__, **{p: package_version(p) for p in _PACKAGES}},
    }
