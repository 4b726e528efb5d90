"""Reliability, round two (the workstation side): every numeric option checked when read, training
stopped at the first non-finite loss, NaN never passing an int8 attempt, ``--force`` never deleting a
command's own input, one writer per output, and a run that fails at start leaving nothing behind."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.atomic import output_lock
from edgetl.core.errors import ConfigError, OutputBusyError, OutputExistsError, RunError
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.train import finetune, partial_dir, resume

TINY = {"backbone": "tiny_test", "weights": "none", "batch_size": 16, "epochs": 2, "lr": 1e-2}
# Runs that checkpoint every epoch (resume tests): the cached fine-tune; its resume path is the one exercised.
CKPT = {"strategy": "fine-tune", "unfreeze": 1}


def _train(data, out, *, force=False, **kw):
    return finetune(data, out, config=TrainConfig(**{**TINY, **kw}), force=force, progress=False)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *words, code=1):
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()  # log lines (training's progress) may come before it
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# --- every numeric option is checked for range and finiteness when read -------------------------------


@pytest.mark.parametrize(
    ("values", "option"),
    [
        ({"lr": math.inf}, "--lr"),
        ({"lr": math.nan}, "--lr"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": 1e38}, "--lr"),
        ({"trunk_lr_scale": math.nan}, "--trunk-lr-scale"),
        ({"trunk_lr_scale": -0.1}, "--trunk-lr-scale"),
        ({"weight_decay": math.inf}, "--weight-decay"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"dropout": math.nan}, "--dropout"),
        ({"dropout": 1.0}, "--dropout"),
        ({"label_smoothing": -0.1}, "--label-smoothing"),
        ({"mixup": math.inf, "strategy": "full"}, "--mixup"),
        ({"cutmix": math.nan, "strategy": "full"}, "--cutmix"),
        ({"val_split": 0.0}, "--val-split"),
        ({"val_split": math.nan}, "--val-split"),
        ({"epochs": 0}, "--epochs"),
        ({"epochs": 10**6}, "--epochs"),
        ({"batch_size": 10**5}, "--batch-size"),
        ({"img_size": 100_000}, "--img-size"),
        ({"img_size": 4}, "--img-size"),
        ({"workers": -1}, "--workers"),
        ({"patience": 0}, "--patience"),
        ({"seed": -1}, "--seed"),
        ({"augment": "yes"}, "--augment"),
    ],
)
def test_train_config_checks_every_value(values, option):
    with pytest.raises(ConfigError, match=f"^{option} "):
        TrainConfig(**values)


def test_zero_trunk_lr_scale_is_allowed():
    assert TrainConfig(trunk_lr_scale=0.0).trunk_lr_scale == 0.0


def test_img_size_bounds_are_the_preprocessing_bounds():
    from edgetl.core.preprocess import MAX_INPUT_SIZE, MIN_INPUT_SIZE
    from edgetl.workstation.options import MAX_IMG_SIZE, MIN_IMG_SIZE

    assert (MIN_IMG_SIZE, MAX_IMG_SIZE) == (MIN_INPUT_SIZE, MAX_INPUT_SIZE)


@pytest.mark.parametrize(("option", "value"), [("--lr", "nan"), ("--lr", "inf"), ("--img-size", "100000")])
def test_bad_numbers_on_the_command_line_are_one_line(image_folder, tmp_path, option, value):
    result = _cli("finetune", image_folder, "--out", tmp_path / "run", "--backbone", "tiny_test", option, value)
    _one_line_error(result, option, code=2)  # a value out of range: a usage error
    assert not (tmp_path / "run").exists() and not partial_dir(tmp_path / "run").exists()


def test_a_recipe_and_a_run_config_are_checked_too(tmp_path):
    from edgetl.workstation.recipes import make_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("backbone: tiny_test\nlr: .nan\n")
    with pytest.raises(ConfigError, match="^--lr "):
        make_config(str(recipe), {})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"train": {"backbone": "tiny_test", "lr": Infinity}}')
    with pytest.raises(ConfigError, match="^--lr "):
        make_config(str(run), {})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"calib_size": 10**6}, "--calib-size"),
        ({"max_drop": math.nan}, "--max-drop"),
        ({"max_drop": math.inf}, "--max-drop"),
    ],
)
def test_export_options_are_bounded(values, message):
    from edgetl.workstation.export.options import check_options

    with pytest.raises(ConfigError, match=message):
        check_options(formats=("onnx",), precisions=("fp32",), **values)


def test_a_negative_max_drop_is_allowed():
    from edgetl.workstation.export.options import check_options

    assert check_options(formats=("onnx",), precisions=("fp32",), max_drop=-1.0).max_drop == -1.0


# --- training stops at the first non-finite loss -------------------------------------------------


@pytest.mark.parametrize("strategy", ["feature-extraction", "full"])
def test_a_diverging_run_stops_in_one_line_and_a_retry_works(image_folder, tmp_path, strategy, monkeypatch):
    from edgetl.workstation.model import Head

    # A diverged model, made certain: the head's logits turn NaN (what a too-high rate does, in a few steps).
    forward = Head.forward
    monkeypatch.setattr(Head, "forward", lambda self, x: forward(self, x) * math.nan)
    out = tmp_path / "run"
    args = ["finetune", image_folder, "--out", out, "--backbone", "tiny_test", "--weights", "none"]
    args += ["--strategy", strategy, "--epochs", "2", "--batch-size", "16", "--no-progress"]
    result = _cli(*args, "--lr", "100")
    line = _one_line_error(result, "diverged", "epoch 1", "--lr 100")
    assert "learning rate" in line
    assert not out.exists() and not partial_dir(out).exists()
    monkeypatch.undo()
    retry = _cli(*args, "--lr", "0.01", "--json")
    assert retry.exit_code == 0, retry.output
    assert (out / "model.pt").is_file()


# --- the int8 search: a NaN top-1 never passes, and never counts as the best --------------------


class _Config:
    method = "fake"

    def __init__(self, top1):
        self.top1 = top1

    def describe(self):
        return f"top-1 {self.top1}"

    def to_dict(self):
        return {"method": self.method, "top1": self.top1}


class _Quantizer:
    label = "fake int8"
    calibration_size = 1

    def __init__(self, scores):
        self.scores = scores
        self.saved = None

    def configs(self, attempts):
        yield from (_Config(s) for s in self.scores)

    def quantize(self, config, *, max_drop):
        return config, ()

    def evaluate(self, model):
        return model.top1

    def save(self, model, out):
        self.saved = model

    def header(self):
        return {}

    def extra(self):
        return {}


def test_an_int8_attempt_with_a_nan_top1_never_passes(tmp_path):
    from edgetl.workstation.export.int8 import best, search_int8

    q = _Quantizer([math.nan, 0.5])
    result = search_int8(q, tmp_path / "m", baseline_top1=0.9, max_drop=1.0)
    assert not result.passed and not result.attempts[0].passed
    assert result.chosen.val_top1 == 0.5 and q.saved.top1 == 0.5  # the NaN one is never "the best"
    assert best(result.attempts).val_top1 == 0.5
    # A bar so wide that anything passes still does not pass a NaN.
    wide = search_int8(_Quantizer([math.nan]), tmp_path / "m2", baseline_top1=0.9, max_drop=1000.0)
    assert not wide.passed


# --- --force never deletes a command's own input -------------------------------------------------


def test_finetune_force_never_replaces_its_data_or_a_folder_holding_it(image_folder, tmp_path):
    before = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*"))
    for out in (image_folder, image_folder.parent):
        with pytest.raises(OutputExistsError, match="input"):
            _train(image_folder, out, force=True)
    result = _cli("finetune", image_folder, "--out", image_folder, "--backbone", "tiny_test", "--force")
    _one_line_error(result, "input")
    assert sorted(p.relative_to(image_folder) for p in image_folder.rglob("*")) == before


def test_finetune_force_replaces_only_a_run(image_folder, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="only a run folder"):
        _train(image_folder, other, force=True)
    assert (other / "keep.txt").read_text() == "mine"
    _train(image_folder, tmp_path / "run")
    _train(image_folder, tmp_path / "run", force=True)  # a run: replaced
    assert (tmp_path / "run" / "model.pt").is_file()


def test_finetune_head_force_never_replaces_its_inputs(image_folder, tmp_path):
    from edgetl.workstation.heads import finetune_head

    with pytest.raises(OutputExistsError, match="input"):
        finetune_head(image_folder, image_folder, trunk_from=tmp_path / "no-bundle", force=True, progress=False)


def test_export_force_never_replaces_the_run_it_exports(image_folder, tmp_path):
    from tests.run_factory import make_run

    run = make_run(tmp_path / "run", image_folder, steps=20)
    config = (run / "config.json").read_bytes()
    for out in (run, tmp_path):
        result = _cli("export", run, "--out", out, "--model-format", "onnx", "--force", "--no-progress")
        _one_line_error(result, "input")
    assert (run / "config.json").read_bytes() == config
    folder = tmp_path / "not-a-bundle"
    folder.mkdir()
    result = _cli("export", run, "--out", folder, "--model-format", "onnx", "--force", "--no-progress")
    _one_line_error(result, "only a bundle folder")
    assert folder.is_dir()


# --- one writer per output ------------------------------------------------------------------------


def test_a_second_finetune_to_the_same_out_fails_at_once(image_folder, tmp_path):
    out = tmp_path / "run"
    with output_lock(out):  # what a first finetune to this --out holds for its whole run
        with pytest.raises(OutputBusyError, match="another edgetl command"):
            _train(image_folder, out, force=True)
        assert not out.exists() and not partial_dir(out).exists()
    _train(image_folder, out)
    assert not list(tmp_path.glob(".run.*")), "lock or temporary folder left behind"


def test_resume_holds_the_output_lock_too(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_after_epoch_1(image_folder, out, monkeypatch)
    with output_lock(out), pytest.raises(OutputBusyError):
        resume(out, progress=False)
    assert resume(out, progress=False).resumed_from_epoch == 1


def test_data_digits_takes_the_lock_and_leaves_other_folders_alone(tmp_path):
    pytest.importorskip("sklearn")
    from edgetl.workstation.data import write_digits

    out = tmp_path / "digits"
    mine = tmp_path / "digits.tmp-digits"  # once a fixed scratch name, deleted without asking
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with output_lock(out), pytest.raises(OutputBusyError):
        write_digits(out)
    assert not out.exists()
    assert write_digits(out)["images"] == 1797
    assert (mine / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- a run that fails at start leaves nothing that blocks a retry -------------------------------------


def _interrupted_after_epoch_1(image_folder, out, monkeypatch) -> None:
    """A 3-epoch fine-tune to ``out`` stopped by Ctrl-C right after epoch 1's checkpoint."""
    _fail_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _train(image_folder, out, epochs=3, **CKPT)
    monkeypatch.undo()


def _fail_after_first_checkpoint(monkeypatch):
    import edgetl.workstation.train as train

    saved = train._save_checkpoint

    def save_then_stop(path, state):
        saved(path, state)
        raise KeyboardInterrupt  # Ctrl-C right after epoch 1 was saved

    monkeypatch.setattr(train, "_save_checkpoint", save_then_stop)


def test_a_run_that_fails_at_start_leaves_no_partial(image_folder, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="weights"):
        _train(image_folder, out, weights=str(tmp_path / "missing.pth"))  # fails inside training
    assert not partial_dir(out).exists()
    _train(image_folder, out)  # the retry: no --force, no "interrupted run"
    assert (out / "model.pt").is_file()


def test_a_run_that_fails_after_a_checkpoint_keeps_its_partial_for_resume(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _train(image_folder, out, epochs=3, **CKPT)
    assert (partial_dir(out) / "checkpoint.pt").is_file()
    monkeypatch.undo()
    with pytest.raises(OutputExistsError, match="--resume"):
        _train(image_folder, out, epochs=3)
    assert resume(out, progress=False).resumed_from_epoch == 1
    assert (out / "model.pt").is_file() and not partial_dir(out).exists()


def test_a_partial_that_is_not_a_run_is_not_deleted_by_force(image_folder, tmp_path):
    out = tmp_path / "run"
    partial = partial_dir(out)
    partial.mkdir()
    (partial / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="only a run folder"):
        _train(image_folder, out, force=True)
    assert (partial / "keep.txt").read_text() == "mine"


def test_an_edited_run_config_is_checked_on_resume(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_after_epoch_1(image_folder, out, monkeypatch)
    config = partial_dir(out) / "config.json"
    doc = json.loads(config.read_text())
    doc["train"]["lr"] = "fast"
    config.write_text(json.dumps(doc))
    with pytest.raises((ConfigError, RunError), match="--lr"):
        resume(out, progress=False)
    shutil.rmtree(partial_dir(out))


# Edited or damaged run files: one line naming the file, never a traceback or a silent wrong answer.
RUN_EDITS = {
    "config.json is a list": ("config.json", lambda c: [1, 2, 3], "config.json must hold an object"),
    "train is null": ("config.json", lambda c: {**c, "train": None}, "'train' must be an object"),
    "dropout is text": ("config.json", lambda c: {**c, "train": {**c["train"], "dropout": "abc"}}, "train.dropout"),
    "dropout out of range": ("config.json", lambda c: {**c, "train": {**c["train"], "dropout": 5.0}}, "train.dropout"),
    "preprocessing is a list": ("config.json", lambda c: {**c, "preprocessing": [1, 2]}, "'preprocessing' must be"),
    "a label of -1": ("split.json", lambda s: {**s, "val": [[s["val"][0][0], -1], *s["val"][1:]]}, "as -1"),
    "a label of 1.5": ("split.json", lambda s: {**s, "val": [[s["val"][0][0], 1.5], *s["val"][1:]]}, "as 1.5"),
    "a label of 99": ("split.json", lambda s: {**s, "train": [[s["train"][0][0], 99]]}, "as 99"),
    "val is not a list": ("split.json", lambda s: {**s, "val": {"a": 1}}, "'val' must be a list"),
    "labels are numbers": ("labels.json", lambda labels: [1, 2, 3], "labels.json must be a list of class names"),
}


@pytest.mark.parametrize("case", sorted(RUN_EDITS))
def test_an_edited_run_is_one_line_for_evaluate_export_and_info(tmp_path_factory, tmp_path, case):
    from tests.run_factory import shared_run

    name, edit, words = RUN_EDITS[case]
    run = tmp_path / "run"
    shutil.copytree(shared_run(tmp_path_factory), run)
    path = run / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    data = json.loads((shared_run(tmp_path_factory) / "config.json").read_text())["data"]["root"]
    for args in (["evaluate", str(run), data, "--json"], ["export", str(run), "--out", str(tmp_path / "b")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
        assert f"run {run} is damaged or was edited" in result.stderr and words in result.stderr, result.stderr
        if "--json" in args:
            assert json.loads(result.stdout)["error"]["message"].startswith(f"run {run} is damaged")
    info = CliRunner().invoke(main, ["info", str(run), "--json"])
    assert info.exit_code == 1 and words in info.stderr and "Traceback" not in info.output, info.output
    assert not (tmp_path / "b").exists()


def test_a_damaged_interrupted_run_is_one_line_on_resume(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_after_epoch_1(image_folder, out, monkeypatch)
    partial = partial_dir(out)
    kept = {name: (partial / name).read_bytes() for name in ("config.json", "split.json", "checkpoint.pt")}
    damage = {
        "config.json": (b"[]", "config.json must hold an object"),
        "split.json": (json.dumps({"train": [["x.png", -1]], "val": []}).encode(), "as -1"),
        "checkpoint.pt": (kept["checkpoint.pt"][:200], "truncated or not a PyTorch checkpoint"),
    }
    for name, (broken, words) in damage.items():
        (partial / name).write_bytes(broken)
        result = CliRunner().invoke(main, ["finetune", "--resume", str(out), "--json", "--no-progress"])
        assert result.exit_code == 1 and "Traceback" not in result.output, (name, result.output)
        assert words in result.stderr and "--force" in result.stderr, (name, result.stderr)
        assert json.loads(result.stdout)["error"]["exit_code"] == 1
        (partial / name).write_bytes(kept[name])
    # Repaired, it resumes.
    assert resume(out, progress=False).epochs_run == 3
