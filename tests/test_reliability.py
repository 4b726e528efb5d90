"""Interrupted and failing exports: nothing half-written, an existing bundle is never lost."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.device.runtime import open_bundle
from tests.run_factory import make_run

ENTRY = str(Path(__file__).with_name("cli_entry.py"))


@pytest.fixture
def run_dir(image_folder, tmp_path):
    return make_run(tmp_path / "run", image_folder)


def _export(run_dir, out, *extra):
    return CliRunner().invoke(
        main, ["export", str(run_dir), "--out", str(out), "--model-format", "onnx", "--no-progress", "--json", *extra]
    )


def _leftovers(parent: Path, name: str):
    # Neither temporary folders nor the output lock (.NAME.lock) may be left behind.
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_existing_bundle_needs_force(run_dir, tmp_path):
    first = _export(run_dir, tmp_path / "b")
    assert first.exit_code == 0, first.output
    before = (tmp_path / "b" / "manifest.json").read_bytes()
    again = _export(run_dir, tmp_path / "b")
    assert again.exit_code == 1 and "--force" in again.stderr
    assert (tmp_path / "b" / "manifest.json").read_bytes() == before
    forced = _export(run_dir, tmp_path / "b", "--force")
    assert forced.exit_code == 0, forced.output
    open_bundle(tmp_path / "b")
    assert not _leftovers(tmp_path, "b")


def test_full_disk_during_export_is_one_line_and_leaves_old_bundle(run_dir, tmp_path, monkeypatch):
    assert _export(run_dir, tmp_path / "b").exit_code == 0
    before = (tmp_path / "b" / "manifest.json").read_bytes()

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("edgetl.core.bundle.write_json_atomic", full)
    result = _export(run_dir, tmp_path / "b", "--force")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "No space left on device" in result.stderr and len(result.stderr.strip().splitlines()[-1]) < 400
    assert (tmp_path / "b" / "manifest.json").read_bytes() == before
    open_bundle(tmp_path / "b")  # still verifies
    assert not _leftovers(tmp_path, "b")
    fresh = _export(run_dir, tmp_path / "new")
    assert fresh.exit_code == 1 and not (tmp_path / "new").exists() and not _leftovers(tmp_path, "new")


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_kill_9_during_export_leaves_no_half_bundle(run_dir, tmp_path, existing):
    out = tmp_path / "b"
    if existing:
        assert _export(run_dir, out).exit_code == 0
        before = (out / "manifest.json").read_bytes()
    scratch = tmp_path / "scratch"  # its temporary files: kill -9 leaves them, here and not in /tmp
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, ENTRY, "export", str(run_dir), "--out", str(out), "--force", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    deadline = time.monotonic() + 120
    # Kill once the new bundle is being written (its temporary folder has model files in it).
    while proc.poll() is None and time.monotonic() < deadline:
        tmp = [p for p in _leftovers(tmp_path, "b") if ".tmp-" in p.name]
        if tmp and any(tmp[0].rglob("*.onnx")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "export finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if existing:
        assert (out / "manifest.json").read_bytes() == before
        open_bundle(out)
    else:
        assert not out.exists()
    # A hidden temporary folder may remain (kill -9 runs no clean-up); it is never the bundle.
    for p in _leftovers(tmp_path, "b"):
        # The killed writer's temporary folder, and its lock file (the lock itself died with it).
        assert p.name.startswith((".b.tmp-", ".b.old-")) or p.name == ".b.lock"
    # The next export succeeds and is complete.
    assert _export(run_dir, out, "--force").exit_code == 0
    open_bundle(out)


def test_checkpoints_and_runs_load_weights_only(image_folder, tmp_path):
    """A model.pt that carries code (a pickled object) is refused, not executed."""
    import pickle

    from edgetl.core.errors import RunError
    from edgetl.workstation.run import load_run

    run = make_run(tmp_path / "evil", image_folder)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (run / "model.pt").write_bytes(pickle.dumps({"trunk": Boom(), "head": {}}))
    with pytest.raises(RunError, match="cannot load model.pt"):
        load_run(run).build_model()
    assert not (tmp_path / "pwned").exists()


def test_no_unsafe_calls_in_the_package():
    root = Path(__file__).resolve().parents[1] / "edgetl"
    bad = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for needle in ("shell=True", "pickle.load", "yaml.load(", "weights_only=False", "os.system("):
            if needle in text:
                bad.append(f"{path.name}: {needle}")
    assert not bad, bad
