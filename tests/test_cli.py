"""CLI contract: --help with an example, --json on stdout, one-line errors with a non-zero exit."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main

TINY = ["--backbone", "tiny_test", "--weights", "none", "--epochs", "2", "--batch-size", "16", "--no-progress"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, pattern, code=1):
    """One ``Error:`` line on stderr, no traceback; exit 1 for a failure, 2 for a usage error."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and pattern in lines[0], result.stderr


@pytest.mark.parametrize("command", ["data", "backbones", "finetune", "evaluate", "export", "predict", "bench"])
def test_help_has_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output or command == "data"


def test_backbones_json():
    rows = json.loads(run("backbones", "--json").stdout)["results"]
    mb = next(r for r in rows if r["name"] == "mobilenet_v2")
    assert mb == {
        "name": "mobilenet_v2",
        "source": "torchvision",
        "architecture": "mobilenet_v2",
        "feature_dim": 1280,
        "params": 3504872,
        "input_size": 224,
        "resize_size": 256,
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "weights": "mobilenet_v2-b0353104.pth",
        "weights_available": "offline-package",
    }
    lite0 = next(r for r in rows if r["name"] == "efficientnet_lite0")
    assert (lite0["source"], lite0["architecture"], lite0["mean"], lite0["std"], lite0["weights_available"]) == (
        "timm",
        "tf_efficientnet_lite0",
        [0.5, 0.5, 0.5],
        [0.5, 0.5, 0.5],
        "offline-package",
    )


def test_data_digits_json(tmp_path):
    doc = json.loads(run("data", "digits", "--out", tmp_path / "d", "--json").stdout)["results"][0]
    assert doc["images"] == 1797 and len(doc["classes"]) == 10 and doc["path"].endswith("d")


def test_finetune_and_evaluate_json(image_folder, tmp_path):
    result = run("finetune", image_folder, "--out", tmp_path / "run", *TINY, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["results"][0]
    for key in ("run_dir", "backbone", "strategy", "epochs", "val_top1", "train_seconds"):
        assert key in doc
    assert doc["pretrained"] is False
    ev = run("evaluate", tmp_path / "run", image_folder, "--json")
    assert ev.exit_code == 0, ev.output
    [rec] = json.loads(ev.stdout)["results"]
    # the run's training images are left out: its validation images are scored
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert (rec["n"], rec["excluded_train"]) == (len(split["val"]), len(split["train"])) == (9, 39)
    assert {"top1", "per_class", "confusion"} <= set(rec)
    table = run("evaluate", tmp_path / "run", image_folder, "--format", "table")
    assert "confusion" in table.output


def test_finetune_reports_skipped_images(image_folder, tmp_path):
    (image_folder / "red" / "corrupt.png").write_bytes(b"garbage")
    result = run("finetune", image_folder, "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable" in result.output and "corrupt.png" in result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["skipped"][0]["path"].endswith("corrupt.png")


def test_finetune_missing_folder(tmp_path):
    assert_one_line_error(run("finetune", tmp_path / "nope", "--out", tmp_path / "run", *TINY), "does not exist")


def test_finetune_one_class(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a" / "x.png")
    assert_one_line_error(run("finetune", tmp_path / "data", "--out", tmp_path / "run", *TINY), "at least 2")


def test_finetune_unknown_backbone(image_folder, tmp_path):
    assert_one_line_error(
        run("finetune", image_folder, "--out", tmp_path / "run", "--backbone", "nope"), "unknown backbone", code=2
    )


def test_finetune_existing_out(image_folder, tmp_path):
    (tmp_path / "run").mkdir()
    assert_one_line_error(run("finetune", image_folder, "--out", tmp_path / "run", *TINY), "--force")


def test_evaluate_not_a_model(image_folder, tmp_path):
    assert_one_line_error(run("evaluate", tmp_path, image_folder), "neither a run")
