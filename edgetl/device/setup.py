"""Install this edgetl's device runtime on a device over ssh, online or air-gapped (``edgetl device setup``).

The steps (docs/device-setup.md):

1. **Facts**, one ssh round trip: architecture, python3 and its version, glibc, free disk where the
   venv goes, whether ``python3 -m venv`` can work (Debian splits ensurepip into python3-venv), and
   what is installed at the venv path now. Unsupported devices stop here with one line naming the fix.
2. **edgetl's wheel**, built from the running installation: a source checkout is built with PyPA
   ``build`` (``python -m build --wheel``; ``pip wheel --no-deps`` when ``build`` is missing), an
   installed wheel is re-packed from its RECORD (no source needed).
3. **Offline mode**: a wheelhouse for the device's platform and Python (``pip download
   --only-binary=:all: --platform ... --python-version ...``), then resolved once more against that
   folder alone, so a missing wheel is named before anything is copied.
4. **Copy** into a temporary folder on the device, every file's sha256 checked there.
5. **Install** into a new venv at a versioned path (``<parent>/.<name>.venvs/<version>-<token>``), run
   ``edgetl doctor --json`` from it, and only then point the symlink ``<venv>`` at it (an atomic
   rename) and remove the previous version. The scripts in a venv carry their venv's absolute path
   in their shebang, so the venv itself never moves: only the symlink changes. A failed install
   removes what this run made and leaves the old venv as it was.

Re-running with the same version and extras does nothing (it says so). Nothing here imports torch.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from edgetl.core.errors import BackendError, ConfigError, RemoteError
from edgetl.device.remote import Remote, Target, envelope_record, parse_target

log = logging.getLogger(__name__)

# The extras that belong on a device (train, *-export and dev are workstation-only); serve is `edgetl serve`.
DEVICE_EXTRAS = ("openvino", "litert", "ncnn", "serve")
MIN_PYTHON = (3, 11)
MIN_GLIBC = (2, 17)  # manylinux2014; onnxruntime itself needs 2.27/2.28 (pip names it if so)
ARCH_32BIT = ("armv7l", "armv6l", "armv8l", "armhf", "arm", "i386", "i486", "i586", "i686")
SUPPORTED_ARCH = ("aarch64", "x86_64")
# The disk an install needs. Measured on x86_64, Python 3.11: 55 MB of wheels (the core
# dependencies) become a 223 MB venv, and the copied wheels stay until the install ends: about 5x
# the wheelhouse at the peak. Online, the wheels are not known in advance: the venv, pip's cache and
# its temporary files for the core set, plus an allowance per extra.
DISK_FACTOR = 5
ONLINE_NEED_BYTES = 400 * 1024 * 1024
ONLINE_EXTRA_BYTES = {"openvino": 400 * 1024 * 1024, "litert": 100 * 1024 * 1024, "ncnn": 50 * 1024 * 1024}
MARKER = "edgetl-setup.json"  # in each venv made by setup: version, extras, mode

Progress = Callable[[str], None]


# --- targets ------------------------------------------------------------------------------------------


def parse_host_target(text: str) -> Target:
    """``[user@]host``, ``ssh://[user@]host[:port]`` (no path: the venv is set with ``--venv``)."""
    forms = "expected [user@]host or ssh://user@host[:port]"
    if any(c in text for c in "\0\n\r"):
        raise ConfigError(f"target {text!r} contains control characters; {forms}")
    if text.startswith("ssh://"):
        authority = text[len("ssh://") :].rstrip("/")
        if "/" in authority or not authority:
            raise ConfigError(f"target {text!r} has a path; {forms} (the venv is set with --venv PATH)")
        probe = f"ssh://{authority}/setup"
    else:
        bare = text.rsplit("@", 1)[-1]
        if ":" in bare and not (bare.startswith("[") and bare.endswith("]")):
            raise ConfigError(
                f"target {text!r} has a path or port; {forms} (the venv is set with --venv PATH, a port with ssh://)"
            )
        probe = f"{text}:setup"
    t = parse_target(probe)
    return dataclasses.replace(t, path="")


def target_text(t: Target) -> str:
    return f"ssh://{t.destination}" + (f":{t.port}" if t.port else "")


# --- facts --------------------------------------------------------------------------------------------

_BEGIN, _END = "__edgetl_facts_begin__", "__edgetl_facts_end__"
FACTS_SCRIPT = r"""
v=$1
case $v in /*) ;; *) v=$HOME/$v ;; esac
echo __edgetl_facts_begin__
echo "arch=$(uname -m 2>/dev/null)"
echo "home=$HOME"
echo "venv=$v"
py=$(command -v python3 2>/dev/null) || py=
echo "python=$py"
if [ -n "$py" ]; then
  echo "python_version=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)"
  if "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then echo venv_ok=yes; else echo venv_ok=no; fi
fi
g=$(getconf GNU_LIBC_VERSION 2>/dev/null) || g=
[ -n "$g" ] || g=$(ldd --version 2>&1 | head -n 1)
echo "glibc=$g"
d=$(dirname -- "$v")
while [ ! -d "$d" ]; do d=$(dirname -- "$d"); done
echo "free_kb=$(df -Pk -- "$d" 2>/dev/null | awk 'NR == 2 {print $4}')"
if [ -L "$v" ]; then echo venv_state=link; echo "venv_target=$(readlink -- "$v")"
elif [ -e "$v" ]; then echo venv_state=other
else echo venv_state=absent; fi
if [ -x "$v/bin/edgetl" ]; then echo "installed=$("$v/bin/edgetl" --version 2>/dev/null | tail -n 1)"; fi
if [ -f "$v/edgetl-setup.json" ]; then echo "installed_setup=$(tr -d '\n' < "$v/edgetl-setup.json")"; fi
echo __edgetl_facts_end__
"""
_KEYS = {
    "arch",
    "home",
    "venv",
    "python",
    "python_version",
    "venv_ok",
    "glibc",
    "free_kb",
    "venv_state",
    "venv_target",
    "installed",
    "installed_setup",
}
_REQUIRED = ("arch", "home", "venv", "python", "glibc", "free_kb", "venv_state")


def parse_facts(text: str) -> dict[str, Any]:
    """The facts script's output (between its markers) as a dict; anything unexpected is an error."""
    lines = text.splitlines()
    try:
        body = lines[lines.index(_BEGIN) + 1 : lines.index(_END)]
    except ValueError:
        raise RemoteError("the device's answer to the facts script is incomplete (was the connection cut?)") from None
    raw: dict[str, str] = {}
    for line in body:
        key, eq, value = line.partition("=")
        if not eq or key not in _KEYS or key in raw:
            raise RemoteError(f"the device's facts script printed an unexpected line: {line[:120]!r}")
        raw[key] = value
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise RemoteError(f"the device's facts lack {', '.join(missing)}")
    facts: dict[str, Any] = {
        "arch": raw["arch"] or None,
        "home": raw["home"],
        "venv": raw["venv"],
        "python": raw["python"] or None,
        "python_version": raw.get("python_version") or None,
        "venv_ok": raw.get("venv_ok") == "yes",
        "glibc": None,
        "free_bytes": None,
        "venv_state": raw["venv_state"],
        "venv_target": raw.get("venv_target") or None,
        "installed": None,
        "installed_setup": None,
    }
    if facts["python_version"] and not re.fullmatch(r"\d+\.\d+\.\d+", facts["python_version"]):
        raise RemoteError(f"the device's python3 reported the version {facts['python_version']!r}")
    glibc = re.findall(r"(\d+)\.(\d+)", raw["glibc"]) if "musl" not in raw["glibc"].lower() else []
    if glibc and re.search(r"glibc|gnu|libc", raw["glibc"], re.I):
        facts["glibc"] = ".".join(glibc[-1])
    if raw["free_kb"]:
        if not raw["free_kb"].isdigit():
            raise RemoteError(f"the device's df reported {raw['free_kb']!r} free")
        facts["free_bytes"] = int(raw["free_kb"]) * 1024
    if facts["venv_state"] not in ("link", "other", "absent"):
        raise RemoteError(f"the device's facts say venv_state={facts['venv_state']!r}")
    installed = raw.get("installed", "")
    if installed:
        facts["installed"] = installed.rsplit(" ", 1)[-1]
    if raw.get("installed_setup"):
        try:
            facts["installed_setup"] = json.loads(raw["installed_setup"])
        except ValueError:
            facts["installed_setup"] = None  # a damaged marker: treated as unknown, so reinstalled
    return facts


def device_facts(remote: Remote, venv: str = "edgetl") -> dict[str, Any]:
    """What the device is, in one ssh round trip (see :data:`FACTS_SCRIPT`)."""
    command = f"sh -c {shlex.quote(FACTS_SCRIPT)} sh {shlex.quote(venv)}"
    result = remote.check(remote.run(command), "reading the device's facts")
    return parse_facts(result.stdout.decode(errors="replace"))


def check_facts(facts: dict[str, Any], *, need_bytes: int | None = None, where: str = "the device") -> None:
    """Refuse a device that cannot run this edgetl, with one line naming the fix."""
    arch = facts.get("arch") or "unknown"
    if arch in ARCH_32BIT:
        raise RemoteError(
            f"{where} runs a 32-bit system ({arch}): ONNX Runtime has no 32-bit ARM wheels: install a 64-bit OS "
            "(Raspberry Pi OS 64-bit)"
            if arch.startswith("arm")
            else f"{where} runs a 32-bit system ({arch}): ONNX Runtime has no 32-bit wheels: install a 64-bit OS"
        )
    if arch not in SUPPORTED_ARCH:
        raise RemoteError(
            f"{where} is {arch}: edgetl's runtime (ONNX Runtime) has wheels for aarch64 and x86_64 Linux only"
        )
    if not facts.get("python"):
        raise RemoteError(
            f"{where} has no python3: install Python 3.11 or newer (sudo apt install python3 python3-venv)"
        )
    version = tuple(int(x) for x in (facts.get("python_version") or "0.0.0").split("."))
    if version[:2] < MIN_PYTHON:
        raise RemoteError(
            f"{where} has Python {facts.get('python_version') or 'of unknown version'} at {facts['python']}: edgetl "
            "needs 3.11 or newer: upgrade the OS (Raspberry Pi OS bookworm has 3.11) or install a newer python3"
        )
    if not facts.get("venv_ok"):
        raise RemoteError(
            f"{where}: python3 -m venv cannot work (ensurepip is not available): sudo apt install python3-venv"
        )
    if facts.get("glibc") is None:
        raise RemoteError(
            f"{where} has no GNU C library (musl?): the runtime's wheels are manylinux: use a glibc-based OS "
            "(Debian, Raspberry Pi OS, Ubuntu)"
        )
    if tuple(int(x) for x in facts["glibc"].split(".")) < MIN_GLIBC:
        raise RemoteError(
            f"{where} has glibc {facts['glibc']}: the runtime's wheels need 2.17 or newer: upgrade the OS"
        )
    if facts.get("venv_state") == "other":
        raise RemoteError(
            f"{facts['venv']} on {where} exists and was not made by edgetl device setup (a hand-made venv?): move it "
            f"away (mv {shlex.quote(facts['venv'])} {shlex.quote(facts['venv'] + '.hand')}) or pass --venv OTHER_PATH"
        )
    free = facts.get("free_bytes")
    if need_bytes is not None and free is not None and free < need_bytes:
        raise RemoteError(
            f"{where} has {free / 1e6:.0f} MB free where the venv goes ({facts['venv']}); the install needs about "
            f"{need_bytes / 1e6:.0f} MB: free some space or pass --venv on a larger disk"
        )


def platform_tags(facts: dict[str, Any]) -> list[str]:
    """The manylinux platform tags of wheels that run on the device (its arch and glibc)."""
    arch = facts["arch"]
    major, minor = (int(x) for x in facts["glibc"].split("."))
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]
    if arch == "x86_64":
        tags += [f"manylinux_2_{m}_x86_64" for m in range(min(minor, 16), 4, -1)]
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags


def python_tag(facts: dict[str, Any]) -> tuple[str, str]:
    """(``3.11``, ``cp311``) for the device's python."""
    major, minor = facts["python_version"].split(".")[:2]
    return f"{major}.{minor}", f"cp{major}{minor}"


def pip_target_args(facts: dict[str, Any]) -> list[str]:
    version, abi = python_tag(facts)
    args = ["--only-binary=:all:"]
    for tag in platform_tags(facts):
        args += ["--platform", tag]
    return [*args, "--python-version", version, "--implementation", "cp", "--abi", abi]


# --- edgetl's wheel -----------------------------------------------------------------------------------


def source_checkout() -> Path | None:
    """The source checkout the running edgetl comes from, or None (an installed wheel)."""
    import edgetl

    root = Path(edgetl.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
    except (OSError, ValueError, KeyError):
        return None
    return root if name == "edgetl" else None


def _copy_sources(root: Path, dest: Path) -> None:
    """What the wheel is built from (pyproject's packages, their folders, README, LICENSE), nothing
    else of the checkout (no runs, bundles, venvs, build output)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    setuptools_cfg = config.get("tool", {}).get("setuptools", {})
    mapping = setuptools_cfg.get("package-dir", {})
    folders = {mapping.get(p, p.split(".")[0]).split("/")[0] for p in setuptools_cfg.get("packages", ["edgetl"])}
    folders.add("edgetl")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.tmp-*")
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE", "LICENSE.txt", "setup.cfg", "MANIFEST.in"):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    for folder in sorted(folders):
        if (root / folder).is_dir():
            shutil.copytree(root / folder, dest / folder, ignore=ignore)


def build_edgetl_wheel(out_dir: Path, *, progress: Progress | None = None) -> Path:
    """This edgetl as a wheel in ``out_dir``: built from its source checkout, or re-packed from the
    installed distribution's RECORD."""
    import importlib.util

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = source_checkout()
    if root is None:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            dist = distribution("edgetl")
        except PackageNotFoundError:
            raise ConfigError("edgetl is neither a source checkout nor an installed package here") from None
        return wheel_from_distribution(dist, out_dir)
    with tempfile.TemporaryDirectory(prefix="edgetl-wheel-") as tmp:
        src, dist_dir = Path(tmp) / "src", Path(tmp) / "dist"
        _copy_sources(root, src)
        has_setuptools = importlib.util.find_spec("setuptools") is not None
        if importlib.util.find_spec("build") is not None:
            argv = [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist_dir), str(src)]
            if has_setuptools:
                # The build backend from this environment (no index needed); pyproject also lists
                # "wheel", which setuptools >= 70.1 no longer needs: the backend says if it is too old.
                argv[4:4] = ["--no-isolation", "--skip-dependency-check"]
        else:
            log.info(
                "PyPA build is not installed here (pip install build): building the wheel with pip wheel --no-deps"
            )
            argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist_dir), str(src)]
            if has_setuptools:
                argv.insert(5, "--no-build-isolation")
        if progress:
            progress(f"building edgetl's wheel from {root}")
        proc = subprocess.run(argv, capture_output=True, text=True, env=_clean_env())
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no message"]
            raise ConfigError(f"building edgetl's wheel from {root} failed: {tail[0]}")
        (wheel,) = dist_dir.glob("edgetl-*.whl")
        final = out_dir / wheel.name
        shutil.move(str(wheel), final)
        return final


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(path: Path, files: dict[str, bytes], dist_info: str) -> Path:
    """A wheel at ``path`` holding ``files`` (archive name -> bytes) and a RECORD written here
    (sha256 and size of every file; RECORD itself without). The dist-info folder comes last."""
    record_name = f"{dist_info}/RECORD"
    names = sorted(n for n in files if not n.startswith(dist_info + "/"))
    names += sorted(n for n in files if n.startswith(dist_info + "/") and n != record_name)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for name in names:
        writer.writerow([name, _record_hash(files[name]), len(files[name])])
    writer.writerow([record_name, "", ""])
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in [*names, record_name]:
            data = buffer.getvalue().encode() if name == record_name else files[name]
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    os.replace(tmp, path)
    return path


def wheel_from_distribution(dist, out_dir: Path) -> Path:
    """Re-pack an installed (non-editable) distribution as a wheel, from the files its RECORD lists.

    Left out: byte code, files outside site-packages (the console scripts, which the installer
    writes again from entry_points.txt), and what the installer added (INSTALLER, REQUESTED,
    direct_url.json, the old RECORD). A new RECORD is written with every file's hash."""
    files = dist.files or []
    dist_infos = {f.parts[0] for f in files if f.parts and f.parts[0].endswith(".dist-info")}
    if len(dist_infos) != 1:
        raise ConfigError(f"the installed {dist.metadata['Name']} has no single .dist-info in its RECORD")
    (dist_info,) = dist_infos
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        raise ConfigError(
            "edgetl is an editable install whose source checkout was not found: reinstall it (pip install .) "
            "or run from the checkout"
        )
    payload: dict[str, bytes] = {}
    for f in files:
        name = f.as_posix()
        if name.startswith("../") or "__pycache__" in f.parts or name.endswith(".pyc"):
            continue
        if f.parts[0] == dist_info and f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
            continue
        payload[name] = Path(f.locate()).read_bytes()
    wheel_meta = payload.get(f"{dist_info}/WHEEL", b"").decode()
    tags = re.findall(r"^Tag:\s*(\S+)\s*$", wheel_meta, re.M)
    if not tags or "Root-Is-Purelib: true" not in wheel_meta:
        raise ConfigError(f"the installed {dist.metadata['Name']} is not a pure-Python wheel install")
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    tag = ".".join(sorted({t.split("-")[0] for t in tags})) + "-none-any"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_wheel(out_dir / f"{name}-{dist.version}-{tag}.whl", payload, dist_info)


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


# --- the wheelhouse -----------------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


def _isolated_pip_env() -> dict[str, str]:
    """pip reading nothing but its command line: no config files, no PIP_* settings (but the CA bundle)."""
    env = {k: v for k, v in _clean_env().items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _missing_requirement(text: str) -> str | None:
    m = re.search(r"(?:satisfies the requirement|No matching distribution found for)\s+([A-Za-z0-9_.\-]+)", text)
    return m.group(1) if m else None


def _requirement(wheel: Path, extras: Iterable[str]) -> str:
    extras = sorted(set(extras))
    return f"{wheel}[{','.join(extras)}]" if extras else str(wheel)


def build_wheelhouse(
    facts: dict[str, Any],
    extras: Iterable[str],
    out_dir: Path,
    *,
    wheel: Path | None = None,
    download: bool = True,
    progress: Progress | None = None,
) -> list[tuple[Path, str]]:
    """The exact files the device installs: ``[(file, sha256)]``, edgetl's wheel first.

    With ``download``, ``pip download`` (this machine's index and pip cache) fills ``out_dir`` with
    wheels for the device's platform and Python; then the set is resolved once more against
    ``out_dir`` alone (no index, no pip configuration), which names any package without a wheel."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extras = list(extras)
    if wheel is None:
        wheel = build_edgetl_wheel(out_dir, progress=progress)
    version, abi = python_tag(facts)
    platform = f"Python {version} ({abi}) on {facts['arch']} with glibc {facts['glibc']}"
    requirement = _requirement(wheel, extras)
    if download:
        if progress:
            progress(f"downloading the wheels for {platform} into {out_dir}")
        argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off", "-q"]
        argv += [*pip_target_args(facts), "-d", str(out_dir), requirement]
        proc = subprocess.run(argv, capture_output=True, text=True, env=_clean_env())
        if proc.returncode != 0:
            missing = _missing_requirement(proc.stderr)
            if missing:
                raise BackendError(
                    f"{missing} has no wheel for {platform} on this machine's index: leave out the extra that "
                    "needs it, or install on a device that has a wheel"
                )
            tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
            raise BackendError(f"pip download of the device's wheels failed: {tail[0]}")
    with tempfile.TemporaryDirectory(prefix="edgetl-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report"]
        argv += [str(report), "--no-index", "--find-links", str(out_dir), "--target", str(Path(tmp) / "t")]
        argv += [*pip_target_args(facts), requirement]
        proc = subprocess.run(argv, capture_output=True, text=True, env=_isolated_pip_env())
        if proc.returncode != 0:
            missing = _missing_requirement(proc.stderr)
            if missing:
                raise BackendError(
                    f"the wheelhouse {out_dir} has no wheel of {missing} for {platform}: add it (pip download "
                    f"--only-binary=:all: --platform manylinux2014_{facts['arch']} --python-version {version} "
                    f"-d {out_dir} {missing}) or build the wheelhouse again"
                )
            tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
            raise BackendError(f"resolving the device's wheels in {out_dir} failed: {tail[0]}")
        items = json.loads(report.read_text()).get("install", [])
    files: list[Path] = []
    for item in items:
        url = item.get("download_info", {}).get("url", "")
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise BackendError(f"the resolver chose {url!r}, not a file of the wheelhouse")
        files.append(Path(unquote(parsed.path)))
    files.sort(key=lambda p: (p.resolve() != wheel.resolve(), p.name))
    return [(f, sha256_of(f)) for f in files]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- on the device ------------------------------------------------------------------------------------

INSTALL_SCRIPT = r"""
set -e
py=$1 new=$2 up=$3 req=$4 offline=$5 marker=$6
"$py" -m venv -- "$new"
if [ "$offline" = 1 ]; then
  PIP_CONFIG_FILE=/dev/null "$new/bin/python" -m pip install --disable-pip-version-check --no-input \
    --progress-bar off --no-index --find-links "$up" "$req"
else
  "$new/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off "$req"
fi
printf '%s\n' "$marker" > "$new/edgetl-setup.json"
"$new/bin/edgetl" --version
"""
SWAP_SCRIPT = r"""
set -e
py=$1 link=$2 rel=$3 tmp=$4 old=$5
rm -f -- "$tmp"
ln -s -- "$rel" "$tmp"
"$py" -c 'import os, sys; os.replace(sys.argv[1], sys.argv[2])' "$tmp" "$link"
if [ -n "$old" ]; then rm -rf -- "$old"; fi
"""


def _sh(script: str, *args: str) -> str:
    return " ".join(["sh", "-c", shlex.quote(script), "sh", *(shlex.quote(a) for a in args)])


def _venv_arg(venv: str) -> str:
    """``--venv`` as the facts script takes it: absolute, or relative to the home (``~/x`` -> ``x``)."""
    if any(c in venv for c in "\0\n\r"):
        raise ConfigError(f"--venv {venv!r} contains control characters")
    text = venv[2:] if venv.startswith("~/") else venv
    text = text.rstrip("/") or text
    if text in ("", "~", "/", ".", "..") or text.startswith("-") or "/../" in f"/{text}/":
        raise ConfigError(f"--venv {venv!r}: give a folder for the venv, e.g. edgetl or /opt/edgetl")
    return text


def _doctor_summary(record: dict[str, Any]) -> dict[str, Any]:
    runtimes = record.get("runtimes", {})
    return {
        "profile": (record.get("profiles") or {}).get("best"),
        "runtimes": {name: r.get("version") for name, r in runtimes.items() if r.get("installed")},
        "arch": (record.get("machine") or {}).get("arch"),
        "python": (record.get("machine") or {}).get("python"),
        "warnings": list(record.get("warnings", [])),
    }


def setup_device(
    remote: Remote,
    *,
    venv: str = "edgetl",
    extras: Iterable[str] = (),
    offline: bool = False,
    wheelhouse: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Install this edgetl (and ``extras``) into a venv on the device; see the module docstring."""
    say = progress or (lambda message: log.info(message))
    extras = sorted(set(extras))
    unknown = [e for e in extras if e not in DEVICE_EXTRAS]
    if unknown:
        raise ConfigError(
            f"--extras {','.join(unknown)}: not a device extra; choose from {', '.join(DEVICE_EXTRAS)} "
            "(train and *-export are for the workstation)"
        )
    if wheelhouse is not None and not offline:
        raise ConfigError("--wheelhouse is for --offline installs: add --offline, or leave --wheelhouse out")
    if wheelhouse is not None and not Path(wheelhouse).is_dir():
        raise ConfigError(f"--wheelhouse {wheelhouse} is not a folder")
    where = remote.target.where
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    say(f"reading the facts of {where}")
    facts = device_facts(remote, _venv_arg(venv))
    check_facts(facts, where=where)
    seconds["facts"] = round(time.perf_counter() - start, 3)

    with tempfile.TemporaryDirectory(prefix="edgetl-setup-") as tmp:
        t = time.perf_counter()
        wheel = build_edgetl_wheel(Path(tmp) / "wheel", progress=say)
        version = wheel_version(wheel)
        installed_setup = facts.get("installed_setup") or {}
        if (
            facts["venv_state"] == "link"
            and facts.get("installed") == version
            and installed_setup.get("version") == version
            and set(extras) <= set(installed_setup.get("extras", []))
        ):
            say(f"edgetl {version} is already installed in {facts['venv']} on {where}: nothing to do")
            seconds["build"] = round(time.perf_counter() - t, 3)
            action, files, copied = "unchanged", [], 0
            venv_dir = _link_target(facts)
        else:
            if offline:
                files = build_wheelhouse(
                    facts,
                    extras,
                    Path(wheelhouse) if wheelhouse else Path(tmp) / "wheelhouse",
                    wheel=wheel,
                    download=wheelhouse is None,
                    progress=say,
                )
                need = DISK_FACTOR * sum(f.stat().st_size for f, _ in files)
            else:
                files = [(wheel, sha256_of(wheel))]
                need = ONLINE_NEED_BYTES + sum(ONLINE_EXTRA_BYTES.get(e, 0) for e in extras)
            seconds["build"] = round(time.perf_counter() - t, 3)
            check_facts(facts, need_bytes=need, where=where)
            action = "upgraded" if facts.get("installed") else "installed"
            venv_dir, copied, times, doctor = _install(remote, facts, files, version, extras, offline, say)
            seconds.update(times)

    link = facts["venv"]
    edgetl_cmd = f"{shlex.quote(link)}/bin/edgetl"
    linked = dataclasses.replace(remote, edgetl=edgetl_cmd)
    if action == "unchanged":
        t = time.perf_counter()
        say(f"running edgetl doctor on {where}")
        doctor = envelope_record(linked.json("doctor", what="edgetl doctor", echo_stderr=False), "edgetl doctor")
        seconds["doctor"] = round(time.perf_counter() - t, 3)
    else:
        # The command users will run, through the symlink: it must work after the switch.
        got = linked.version()
        if got != version:
            raise RemoteError(f"{edgetl_cmd} on {where} runs edgetl {got!r} after the switch, not {version}")
    seconds["total"] = round(time.perf_counter() - start, 3)
    public_facts = {k: facts[k] for k in ("arch", "python", "python_version", "glibc", "free_bytes", "home", "venv_ok")}
    return {
        "target": target_text(remote.target),
        "where": where,
        "action": action,
        "version": version,
        "previous_version": facts.get("installed"),
        "venv": link,
        "venv_dir": venv_dir,
        "remote_edgetl": edgetl_cmd,
        "extras": extras,
        "mode": "offline" if offline else "online",
        "facts": public_facts,
        "files_copied": len(files),
        "bytes_copied": copied,
        "seconds": seconds,
        "doctor": _doctor_summary(doctor),
    }


def _link_target(facts: dict[str, Any]) -> str | None:
    target = facts.get("venv_target")
    if not target:
        return None
    return target if target.startswith("/") else f"{os.path.dirname(facts['venv'])}/{target}"


def _install(
    remote: Remote,
    facts: dict[str, Any],
    files: list[tuple[Path, str]],
    version: str,
    extras: list[str],
    offline: bool,
    say: Progress,
) -> tuple[str, int, dict[str, float], dict[str, Any]]:
    """Copy, verify, install into a new versioned venv, check it, then swap the symlink."""
    where = remote.target.where
    link = facts["venv"]
    parent, name = os.path.dirname(link), os.path.basename(link)
    token = secrets.token_hex(4)
    store = f"{parent}/.{name}.venvs"
    new_rel = f".{name}.venvs/{version}-{token}"
    new = f"{parent}/{new_rel}"
    upload = f"{store}/upload-{token}"
    times: dict[str, float] = {}
    made = [upload]
    try:
        t = time.perf_counter()
        copied = sum(path.stat().st_size for path, _ in files)
        say(f"copying {len(files)} files ({copied / 1e6:.1f} MB) to {where}")
        _upload_all(remote, [path for path, _ in files], upload)
        listing = remote.check(
            remote.run(f"cd {shlex.quote(upload)} && sha256sum -- " + " ".join(shlex.quote(p.name) for p, _ in files)),
            "checking the copied wheels",
        ).stdout.decode(errors="replace")
        seen = {}
        for line in listing.splitlines():
            digest, _, fname = line.partition("  ")
            seen[fname.lstrip("*")] = digest
        for path, digest in files:
            if seen.get(path.name) != digest:
                raise RemoteError(
                    f"{path.name} arrived damaged on {where} (sha256 {seen.get(path.name) or 'missing'}, expected "
                    f"{digest}): nothing was installed; run the set-up again"
                )
        times["copy"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        say(f"installing edgetl {version} into {new} on {where} ({'offline' if offline else 'online'})")
        marker = json.dumps({"version": version, "extras": extras, "mode": "offline" if offline else "online"})
        requirement = f"{upload}/{files[0][0].name}" + (f"[{','.join(extras)}]" if extras else "")
        made.append(new)
        result = remote.run(
            _sh(INSTALL_SCRIPT, facts["python"], new, upload, requirement, "1" if offline else "0", marker)
        )
        if result.returncode != 0:
            kept = f"the installed edgetl {facts['installed']} in {link} is unchanged" if facts.get("installed") else ""
            raise RemoteError(
                f"installing edgetl {version} on {where} failed: {_why(remote, result)}" + (f"; {kept}" if kept else "")
            )
        got = result.stdout.decode(errors="replace").strip().rsplit(" ", 1)[-1]
        if got != version:
            raise RemoteError(f"the new venv on {where} runs edgetl {got!r}, not {version}")
        times["install"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        say(f"checking the new venv with edgetl doctor on {where}")
        new_remote = dataclasses.replace(remote, edgetl=f"{shlex.quote(new)}/bin/edgetl")
        doctor = envelope_record(
            new_remote.json("doctor", what="edgetl doctor (new venv)", echo_stderr=False), "edgetl doctor"
        )
        times["doctor"] = round(time.perf_counter() - t, 3)

        old = _link_target(facts) or ""
        if old and not old.startswith(f"{store}/"):
            old = ""  # only what setup made is removed
        swap = _sh(SWAP_SCRIPT, facts["python"], link, new_rel, f"{link}.tmp-{token}", old)
        remote.check(remote.run(swap), f"switching {link} to the new venv")
        made.remove(new)
        return new, copied, times, doctor
    finally:
        try:
            remote.run(
                "rm -rf -- " + " ".join(shlex.quote(p) for p in made) + f"; rmdir -- {shlex.quote(store)} 2>/dev/null"
            )
        except (RemoteError, OSError):
            pass


def _why(remote: Remote, result) -> str:
    """The reason a device script failed: ssh's own failure, else pip's (or the shell's) last error line."""
    from edgetl.device.remote import SSH_FAILED

    if result.returncode == SSH_FAILED:
        return remote.explain(result, "the install")
    lines = [ln.strip() for ln in result.stderr_tail if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("ERROR:", "Error:", "error:"))]
    return (errors[-1] if errors else lines[-1] if lines else f"exit {result.returncode}")[:400]


def _upload_all(remote: Remote, paths: list[Path], folder: str) -> None:
    """Stream ``paths`` as one tar (no compression: wheels are zip files) into ``folder`` on the device."""
    import tarfile

    def feed(stdin) -> None:
        with tarfile.open(fileobj=stdin, mode="w|") as tar:
            for path in paths:
                tar.add(path, arcname=path.name, recursive=False)

    command = f"umask 022; mkdir -p -- {shlex.quote(folder)} && tar -xf - -C {shlex.quote(folder)}"
    result = remote.run(command, feed=feed)
    if result.returncode != 0:
        raise RemoteError(f"copying the wheels to {remote.target.where} failed: {remote.explain(result, 'the copy')}")


__all__ = [
    "DEVICE_EXTRAS",
    "build_edgetl_wheel",
    "build_wheelhouse",
    "check_facts",
    "device_facts",
    "parse_facts",
    "parse_host_target",
    "platform_tags",
    "setup_device",
    "wheel_from_distribution",
    "write_wheel",
]
