"""A 64-bit Raspberry Pi OS userland on an x86 machine: Debian bookworm arm64 under qemu-user-static.

64-bit Raspberry Pi OS is Debian bookworm for arm64 (Python 3.11, glibc 2.36): the same userland
debootstrap builds here. Binaries run through QEMU's user-mode emulation (binfmt_misc), so
edgetl's runtime-only wheel, numpy, pillow and onnxruntime's aarch64 wheel run exactly as pip
installs them on a Pi; only the CPU is emulated (``QEMU_CPU=cortex-a72``, the Pi 4's core, or
``cortex-a76`` for the Pi 5), about 250x slower than the real thing. Timings taken here are
labelled "emulated" and say nothing about real Pi speed.

What it needs (as root; `make test-arm64` installs the packages): debootstrap, qemu-user-static,
binfmt-support, and network access to a Debian mirror and PyPI. Facts that shaped it:

- binfmt_misc is mounted and qemu-aarch64 enabled here if it is not already (the F flag of
  Debian's registration makes the interpreter work inside the chroot).
- /proc is not mounted in the chroot: onnxruntime crashes on import under QEMU 7.2 when it
  reads the host's x86 /proc/cpuinfo. Instead the chroot gets a plain-file /proc/cpuinfo and
  /sys/devices/system/cpu/{possible,present} describing the emulated CPU (Cortex-A72, as many
  cores as this machine has), which edgetl doctor and onnxruntime's cpuinfo then read.
- Commands run with ``env -i``: the host's pip settings point at x86-only local wheel folders;
  pip inside gets only the host's CA bundle (PIP_CERT), for networks with a TLS proxy.

Usage: ``python scripts/arm64_userland.py [ROOT]`` builds (or reuses) the userland and installs
the wheel of this checkout; tests/test_arm64.py drives the same functions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("EDGETL_ARM64_ROOT", "/var/tmp/edgetl-arm64-bookworm"))
MIRROR = os.environ.get("EDGETL_DEBIAN_MIRROR", "http://deb.debian.org/debian")
QEMU_CPU = os.environ.get("EDGETL_QEMU_CPU", "cortex-a72")
CPU_PART = {
    "cortex-a72": ("0xd08", "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": (
        "0xd0b",
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    ),
}
VENV = "/opt/edgetl"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
READY = ".edgetl-base-ready"


class SetupError(RuntimeError):
    pass


def missing_requirements() -> list[str]:
    """What this machine lacks to build the userland (empty: ready)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (debootstrap, chroot and binfmt_misc need it)")
    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("qemu-aarch64-static", "qemu-user-static"),
        ("update-binfmts", "binfmt-support"),
        ("chroot", "coreutils"),
    ):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            missing.append(f"{tool} (apt install {package})")
    return missing


def _which(tool: str) -> str:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or tool


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise SetupError(
            f"{' '.join(argv[:4])} ... failed (exit {result.returncode}): {(result.stderr or result.stdout)[-2000:]}"
        )
    return result


def ensure_binfmt() -> None:
    """qemu-aarch64 registered with binfmt_misc, so arm64 binaries run here."""
    mnt = Path("/proc/sys/fs/binfmt_misc")
    if not (mnt / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(mnt)])
    entry = mnt / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        _run([_which("update-binfmts"), "--enable", "qemu-aarch64"])
    if not entry.read_text().startswith("enabled"):
        raise SetupError("qemu-aarch64 is not enabled in binfmt_misc (update-binfmts --enable qemu-aarch64)")


def _fake_cpu_files(root: Path) -> None:
    part, features = CPU_PART[QEMU_CPU]
    cores = os.cpu_count() or 1
    block = (
        "processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n\n"
    )
    proc = root / "proc"
    if os.path.ismount(proc):
        raise SetupError(f"{proc} is a mounted /proc; unmount it (onnxruntime would read the host's x86 cpuinfo)")
    proc.mkdir(exist_ok=True)
    (proc / "cpuinfo").write_text("".join(block.format(i=i, features=features, part=part) for i in range(cores)))
    cpu = root / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpu / name).write_text(f"0-{cores - 1}\n" if cores > 1 else "0\n")


def chroot_env(**extra: str) -> dict[str, str]:
    """The whole environment of a command in the userland (env -i): nothing of the host's."""
    return {
        "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "QEMU_CPU": QEMU_CPU,
        "PIP_CERT": "/etc/ssl/host-ca.crt",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "120",
        **extra,
    }


def run_in(
    root: Path, argv: list[str], *, check: bool = True, timeout: float = 1800, **env: str
) -> subprocess.CompletedProcess:
    """Run ``argv`` inside the userland (chroot, emulated CPU, clean environment)."""
    result = subprocess.run(
        [_which("chroot"), str(root), *argv], capture_output=True, text=True, env=chroot_env(**env), timeout=timeout
    )
    if check and result.returncode != 0:
        raise SetupError(
            f"in the arm64 userland, {' '.join(argv)} failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout)[-3000:]}"
        )
    return result


def ensure_base(root: Path = DEFAULT_ROOT, *, log=print) -> dict[str, float]:
    """Debian bookworm arm64 with python3-venv and a venv at /opt/edgetl; reused when already built."""
    timings: dict[str, float] = {}
    ensure_binfmt()
    if not (root / READY).exists():
        if root.exists():
            shutil.rmtree(root)  # a half-built userland from an interrupted run
        root.parent.mkdir(parents=True, exist_ok=True)
        log(f"debootstrap bookworm arm64 into {root} (a few minutes) ...")
        t = time.perf_counter()
        _run(
            [
                _which("debootstrap"),
                "--arch=arm64",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(root),
                MIRROR,
            ]
        )
        timings["debootstrap_s"] = time.perf_counter() - t
        t = time.perf_counter()
        run_in(root, ["/usr/bin/python3", "-m", "venv", VENV])
        timings["venv_s"] = time.perf_counter() - t
        (root / READY).write_text("ok\n")
    _fake_cpu_files(root)
    shutil.copyfile(HOST_CA, root / "etc" / "ssl" / "host-ca.crt")
    shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
    return timings


PROJECT = Path(__file__).resolve().parents[1]


def build_wheel(out: Path, project: Path = PROJECT) -> Path:
    """This checkout's wheel (pure Python; the same file installs on x86 and arm64)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("edgetl-*.whl"):
        old.unlink()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(project)])
    return next(out.glob("edgetl-*.whl"))


# The device extras installed with the wheel: LiteRT's and NCNN's runtimes (aarch64 wheels from PyPI).
DEVICE_EXTRAS = ("litert", "ncnn")


def install_wheel(root: Path, wheel: Path, extras: tuple[str, ...] = DEVICE_EXTRAS) -> float:
    """pip install the runtime-only wheel with its device ``extras`` (and their aarch64 dependencies
    from PyPI) into the venv."""
    dest = root / "opt" / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("edgetl-*.whl"):
        old.unlink()
    shutil.copy2(wheel, dest / wheel.name)
    t = time.perf_counter()
    run_in(root, [f"{VENV}/bin/pip", "install", "-q", "--force-reinstall", "--no-deps", f"/opt/wheels/{wheel.name}"])
    spec = f"/opt/wheels/{wheel.name}" + (f"[{','.join(extras)}]" if extras else "")
    run_in(root, [f"{VENV}/bin/pip", "install", "-q", spec])  # deps: once, then satisfied
    return time.perf_counter() - t


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT
    missing = missing_requirements()
    if missing:
        sys.exit("missing: " + "; ".join(missing))
    timings = ensure_base(root)
    wheel = build_wheel(root.parent / "edgetl-arm64-wheel")
    timings["pip_install_s"] = install_wheel(root, wheel)
    version = run_in(root, ["edgetl", "--version"]).stdout.strip()
    print(f"{root}: {version} on emulated {QEMU_CPU}; " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
