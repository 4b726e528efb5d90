"""The wheel ships what a checkout has: every package, and the recipes and profiles as package data.

The test builds the wheel from a copy of the sources (the checkout gets no build/ or egg-info),
installs it with ``--no-deps --no-index`` into a fresh venv and, from a folder outside the
checkout with PYTHONPATH unset, lists the recipes and profiles through
:mod:`edgetl.core.shipped` and imports the core. The bare venv has no PyYAML or numpy, so a
``.pth`` file appends this venv's site-packages *after* the new venv's own: the dependencies come
from there, ``edgetl`` from the wheel (checked: its ``__file__`` is inside the new venv). About 10 s.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"recipe": "models", "export-profile": "export", "device-profile": "devices"}


def _declared_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def _package_dirs() -> dict[str, Path]:
    """Declared package -> its source folder (``package-dir`` maps edgetl.shipped.* to the top-level folders)."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
    return {p: ROOT / mapping.get(p, p.replace(".", "/")) for p in _declared_packages()}


def test_every_subpackage_is_declared():
    """pyproject lists packages explicitly (the shipped folders need a mapping): a new sub-package
    that is not listed would be missing from the wheel while every test of the checkout passes."""
    declared = set(_declared_packages())
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "edgetl").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    missing = sorted(found - declared)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {', '.join(missing)}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """A fresh venv with the wheel installed: (its python, the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("edgetl", "models", "export", "devices"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("edgetl-*.whl")

    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # Appended after the new venv's site-packages: dependencies only (.pth files in there are not run,
    # so this venv's editable edgetl stays out).
    (Path(purelib) / "zz_outer_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python, wheel


def _yaml_stems(folder: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / folder).glob("*.yaml"))


def test_wheel_holds_every_module_and_yaml(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for package, folder in _package_dirs().items():
        prefix = package.replace(".", "/")
        expected |= {f"{prefix}/{p.name}" for p in folder.glob("*.py")}
        if package.startswith("edgetl.shipped."):
            expected |= {f"{prefix}/{p.name}" for p in folder.glob("*.yaml")}
    # The page `edgetl serve` shows (package data: html, js, css)
    static = ROOT / "edgetl" / "device" / "serve" / "static"
    assert {p.name for p in static.iterdir() if p.is_file()} >= {"index.html", "page.js", "page.css"}
    expected |= {f"edgetl/device/serve/static/{p.name}" for p in static.iterdir() if p.is_file()}
    assert sorted(expected - names) == []


_CHECK = """
import importlib, json, pkgutil, sys
import edgetl, edgetl.core, edgetl.shipped
from edgetl.core import shipped
out = {"edgetl": edgetl.__file__, "listed": {k: shipped.list_shipped(k) for k in shipped.KINDS}}
path = shipped.resolve("recipe", out["listed"]["recipe"][0])
out["resolved"] = [str(path), sorted(shipped.read_yaml(path, "recipe"))]
out["imported"] = []
for pkg in (edgetl.core, edgetl.shipped):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
        out["imported"].append(info.name)
out["heavy"] = [m for m in ("torch", "onnxruntime", "openvino") if m in sys.modules]
print(json.dumps(out))
"""


def test_installed_wheel_lists_and_reads_the_shipped_yaml(installed, tmp_path):
    python, _ = installed
    proc = subprocess.run([python, "-c", _CHECK], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    venv_dir = Path(python).parent.parent
    assert Path(out["edgetl"]).is_relative_to(venv_dir), f"edgetl came from {out['edgetl']}, not the wheel"
    assert out["listed"] == {kind: _yaml_stems(folder) for kind, folder in SHIPPED.items()}
    assert Path(out["resolved"][0]).is_relative_to(venv_dir) and out["resolved"][1]
    core = sorted(f"edgetl.core.{p.stem}" for p in (ROOT / "edgetl" / "core").glob("*.py") if p.stem != "__init__")
    assert sorted(m for m in out["imported"] if m.startswith("edgetl.core.")) == core
    assert {f"edgetl.shipped.{f}" for f in SHIPPED.values()} <= set(out["imported"])
    assert out["heavy"] == []
