"""The device side never imports torch: a device installs `pip install edgetl`, which has no torch.

torch is installed in the test environment, so "it works here" proves nothing; these tests run in a
subprocess whose import system refuses torch and torchvision outright.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.bundle_factory import build_bundle, colour_folder, write_colour_images

BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is blocked: the device side must not import torch")
            return None

    sys.meta_path.insert(0, BlockTorch())
    """
)


@pytest.fixture(scope="module")
def device_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    bundle = build_bundle(root / "bundle", heads=("colour", "brightness"))
    write_colour_images(root / "images", corrupt=True)
    return bundle, root / "images"


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the checkout (tests prepend BLOCK_TORCH to it)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_runtime_import_does_not_load_torch():
    proc = run_python("import edgetl.device.runtime, sys; assert 'torch' not in sys.modules, 'torch was imported'")
    assert proc.returncode == 0, proc.stderr


def test_predict_and_bench_run_with_torch_blocked(device_files):
    bundle, images = device_files
    code = BLOCK_TORCH + textwrap.dedent(
        f"""
        import importlib, json, pkgutil
        import edgetl.core, edgetl.device
        # Every module of the device side and the core, found by walking the packages (a module
        # added later is covered without editing this list), plus the CLI.
        for pkg in (edgetl.core, edgetl.device):
            for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(mod.name)
        import edgetl.cli
        from click.testing import CliRunner
        from edgetl.cli import main

        predict = CliRunner().invoke(main, ["predict", {str(bundle)!r}, {str(images)!r}, "--head", "all", "--json"])
        assert predict.exit_code == 0, predict.output
        bench = CliRunner().invoke(main, ["bench", {str(bundle)!r}, "--json", "--warmup", "1", "--iterations", "3"])
        assert bench.exit_code == 0, bench.output
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision"))
        assert not leaked, leaked
        print(json.dumps({{"predict": json.loads(predict.stdout), "bench": json.loads(bench.stdout)}}))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["predict"]["results"]) == 6  # 3 readable images x 2 heads; the corrupt one is skipped
    assert [r["precision"] for r in out["bench"]["results"]] == ["fp32", "int8"]


def test_learn_runs_with_torch_blocked(tmp_path):
    """`edgetl learn` on the device: numpy and the runtimes only (torch, scikit-learn and scipy blocked)."""
    bundle = build_bundle(tmp_path / "bundle")
    data = colour_folder(tmp_path / "data", {"yellow": (220, 210, 30), "cyan": (30, 200, 210)}, 6)
    code = BLOCK_TORCH.replace(
        '("torch", "torchvision")', '("torch", "torchvision", "sklearn", "scipy")'
    ) + textwrap.dedent(
        f"""
        import json
        from click.testing import CliRunner
        from edgetl.cli import main

        learned = CliRunner().invoke(main, ["learn", {str(bundle)!r}, {str(data)!r}, "--head", "tints", "--json"])
        assert learned.exit_code == 0, learned.output
        cyan = {str(data / "cyan")!r}
        predict = CliRunner().invoke(main, ["predict", {str(bundle)!r}, cyan, "--head", "all", "--json"])
        assert predict.exit_code == 0, predict.output
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision", "sklearn", "scipy"))
        assert not leaked, leaked
        print(json.dumps(json.loads(predict.stdout)["results"]))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    tints = [r for r in json.loads(proc.stdout) if r["head"] == "tints"]
    assert len(tints) == 6 and {r["label"] for r in tints} == {"cyan"}


def test_blocker_really_blocks():
    proc = run_python(BLOCK_TORCH + "import torch")
    assert proc.returncode != 0 and "is blocked" in proc.stderr


def test_installed_entry_point(device_files):
    """The `edgetl` console script, as a device user runs it."""
    bundle, images = device_files
    script = Path(sys.executable).with_name("edgetl")
    if not script.exists():
        pytest.skip("edgetl console script not installed next to this interpreter")
    proc = subprocess.run(
        [str(script), "predict", str(bundle), str(images / "red.png"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["label"] == "red"
