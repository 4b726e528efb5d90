"""Interrupted runs (kill -9) resume to the same result; torchrun with 2 gloo processes matches 1."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.errors import OutputExistsError, RunError
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.train import finetune, partial_dir, resume
from tests.helpers import make_image_folder

ENTRY = str(Path(__file__).with_name("cli_entry.py"))
TINY = ["--backbone", "tiny_test", "--weights", "none", "--batch-size", "16", "--lr", "0.02", "--no-progress"]


def _history(run):
    return json.loads((Path(run) / "history.json").read_text())


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "images", per_class=30, size=(48, 48))


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(data, tmp_path):
    args = ["--strategy", "full", "--epochs", "12", "--patience", "12", *TINY]
    reference = CliRunner().invoke(main, ["finetune", str(data), "--out", str(tmp_path / "ref"), *args, "--json"])
    assert reference.exit_code == 0, reference.output

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, ENTRY, "finetune", str(data), "--out", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = partial_dir(out) / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done < 12

    result = CliRunner().invoke(main, ["finetune", "--resume", str(out), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["results"][0]
    assert doc["resumed_from_epoch"] == done
    assert doc["val_top1"] == json.loads(reference.stdout)["results"][0]["val_top1"]
    ref_h, res_h = _history(tmp_path / "ref"), _history(out)
    assert [h["epoch"] for h in res_h] == list(range(1, 13))
    for a, b in zip(ref_h, res_h, strict=False):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_top1"] == b["val_top1"]
    assert not partial_dir(out).exists()


def test_resume_in_process_after_exception(image_folder, tmp_path, monkeypatch):
    """An exception mid-training (here after epoch 2) leaves a resumable RUN.partial."""
    import edgetl.workstation.train as train_mod

    cfg = TrainConfig(
        backbone="tiny_test", weights="none", batch_size=16, epochs=4, patience=4, strategy="fine-tune", unfreeze=1
    )
    reference = finetune(image_folder, tmp_path / "ref", config=cfg, progress=False)
    original = train_mod._save_checkpoint

    def crash_after_two(path, state):
        original(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_save_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        finetune(image_folder, tmp_path / "run", config=cfg, progress=False)
    monkeypatch.setattr(train_mod, "_save_checkpoint", original)
    assert partial_dir(tmp_path / "run").is_dir() and not (tmp_path / "run").exists()
    with pytest.raises(OutputExistsError, match="--resume"):
        finetune(image_folder, tmp_path / "run", config=cfg, progress=False)
    resumed = resume(tmp_path / "run", progress=False)
    assert resumed.resumed_from_epoch == 2 and resumed.val_top1 == reference.val_top1
    assert [h["train_loss"] for h in _history(tmp_path / "run")] == pytest.approx(
        [h["train_loss"] for h in _history(tmp_path / "ref")], rel=1e-6
    )


def test_resume_refuses_to_change_what_is_learned(image_folder, tmp_path):
    with pytest.raises(RunError, match="no interrupted run"):
        resume(tmp_path / "nothing")
    cfg = TrainConfig(backbone="tiny_test", weights="none", batch_size=16, epochs=2)
    finetune(image_folder, tmp_path / "done", config=cfg, progress=False)
    with pytest.raises(RunError, match="already complete"):
        resume(tmp_path / "done")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "feature-extraction"])
def test_torchrun_two_gloo_processes_match_one(data, tmp_path, strategy):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    args = ["--strategy", strategy, "--epochs", "4", *TINY]
    single = CliRunner().invoke(main, ["finetune", str(data), "--out", str(tmp_path / "one"), *args, "--json"])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            ENTRY,
            "finetune",
            str(data),
            "--out",
            str(tmp_path / "two"),
            *args,
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert abs(one["val_top1"] - two["val_top1"]) <= 0.01
    assert two["n_val"] == one["n_val"]  # metrics cover the whole validation set, once
    assert len(_history(tmp_path / "two")) == 4
    assert not list(tmp_path.glob("*.partial"))
