"""Training on the tiny registered backbone and generated images: seconds, offline."""

import json

import pytest
import torch

from edgetl.core.errors import ConfigError, DataError, OutputExistsError
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.run import load_run
from edgetl.workstation.train import finetune
from tests.helpers import count_trunk_images

TINY = {"backbone": "tiny_test", "weights": "none", "batch_size": 16, "epochs": 3, "lr": 1e-2}


def _train(image_folder, out, **kw):
    return finetune(image_folder, out, config=TrainConfig(**{**TINY, **kw}), progress=False)


@pytest.mark.parametrize("strategy", ["feature-extraction", "fine-tune", "full"])
def test_each_strategy_writes_a_complete_run(image_folder, tmp_path, strategy):
    result = _train(image_folder, tmp_path / "run", strategy=strategy, unfreeze=1)
    run_dir = tmp_path / "run"
    for name in ("config.json", "labels.json", "split.json", "model.pt", "history.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    # A curve needs two epochs: the searched feature-extraction head is one fit.
    assert (run_dir / "history.png").is_file() == (result.epochs_run > 1)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_top1"] == result.val_top1 and 0 <= result.val_top1 <= 1
    assert len(metrics["confusion"]) == 3 and set(metrics["per_class"]) == {"blue", "green", "red"}
    history = json.loads((run_dir / "history.json").read_text())
    assert {"train_loss", "val_top1", "gap_top1", "lr"} <= set(history[0])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["pretrained"] is False and config["weights"]["kind"] == "none"
    run = load_run(run_dir)
    model = run.build_model()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folder left behind"


def test_feature_extraction_runs_trunk_once_per_image(image_folder, tmp_path, monkeypatch):
    seen = count_trunk_images(monkeypatch)
    # Every block's features (what the searched head sees by default), head trained for 6 epochs.
    _train(
        image_folder, tmp_path / "run", strategy="feature-extraction", epochs=6, head_search=False, features="blocks"
    )
    assert seen["images"] == 48  # train + validation, once each, for 6 epochs
    seen["images"] = 0
    _train(image_folder, tmp_path / "run2", strategy="feature-extraction")  # searched: the same cached features
    assert seen["images"] == 0


def test_feature_extraction_learns_easy_data(image_folder, tmp_path):
    result = _train(image_folder, tmp_path / "run", strategy="feature-extraction", epochs=15, lr=3e-2)
    assert result.val_top1 >= 0.8


def test_fine_tune_keeps_frozen_blocks_and_their_batchnorm_stats(image_folder, tmp_path):
    from edgetl.workstation.backbones import get_backbone
    from edgetl.workstation.model import build_trunk

    torch.manual_seed(0)
    _train(image_folder, tmp_path / "run", strategy="fine-tune", unfreeze=1, seed=0)
    trained = load_run(tmp_path / "run").build_model().trunk.state_dict()
    torch.manual_seed(0)
    initial = build_trunk(get_backbone("tiny_test")).state_dict()
    # Blocks 0 and 1 frozen (weights and BN running stats untouched), block 2 trained.
    for key in ("body.0.0.weight", "body.0.1.running_mean", "body.1.1.running_var"):
        assert torch.equal(trained[key], initial[key]), key
    assert not torch.equal(trained["body.2.0.weight"], initial["body.2.0.weight"])


def test_same_seed_reproduces_the_same_numbers(image_folder, tmp_path):
    a = _train(image_folder, tmp_path / "a", strategy="fine-tune", unfreeze=2, seed=1)
    b = _train(image_folder, tmp_path / "b", strategy="fine-tune", unfreeze=2, seed=1)
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert a.val_top1 == b.val_top1
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_early_stopping_keeps_best_epoch(image_folder, tmp_path):
    result = _train(
        image_folder, tmp_path / "run", strategy="feature-extraction", epochs=40, patience=2, lr=0.5, head_search=False
    )
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert result.epochs_run == len(history)
    best = max(history, key=lambda h: (h["val_top1"], -h["val_loss"]))
    assert result.best_epoch == best["epoch"]
    assert result.val_top1 == pytest.approx(best["val_top1"], abs=1e-6)


def test_existing_run_refused_before_training(image_folder, tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        _train(image_folder, tmp_path / "run")


def test_val_dir_used_instead_of_split(image_folder, tmp_path):
    from tests.helpers import make_image_folder

    val = make_image_folder(tmp_path / "val", per_class=4, seed=9)
    finetune(image_folder, tmp_path / "run", config=TrainConfig(**TINY), val_dir=val, progress=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) == 48 and len(split["val"]) == 12


@pytest.mark.parametrize(
    "bad", [{"strategy": "linear"}, {"epochs": 0}, {"lr": -1.0}, {"dropout": 1.0}, {"device": "tpu"}]
)
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_bad_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _train(tmp_path / "missing", tmp_path / "run")


def test_balance_weights_inverse_frequency_and_imbalance_warning(tmp_path, caplog):
    from edgetl.workstation.prepare import class_weights
    from tests.helpers import make_image_folder

    w = class_weights([30, 10, 10])
    assert w[1] == pytest.approx(3 * w[0]) and float(w.mean()) == pytest.approx(1.0)
    data = make_image_folder(tmp_path / "imb", per_class=4)
    make_image_folder(data, per_class=40, classes=("red",), seed=5)
    with caplog.at_level("WARNING"):
        result = finetune(data, tmp_path / "run", config=TrainConfig(**{**TINY, "balance": True}), progress=False)
    assert "imbalanced" in caplog.text
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert train["balance"] is True
    # --unfreeze left to the backbone is recorded as the number of blocks it means
    assert train["unfreeze"] == get_backbone(TINY["backbone"]).fine_tune_blocks and "unfreeze" not in TINY
    assert 0 <= result.val_top1 <= 1


@pytest.mark.parametrize("mix", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.2, "cutmix": 1.0}])
def test_mixup_and_cutmix_train(image_folder, tmp_path, mix):
    result = _train(image_folder, tmp_path / "run", strategy="full", **mix)
    assert result.epochs_run == 3


def test_mix_batch_keeps_mass():
    from edgetl.workstation.loops import mix_batch

    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    y = torch.arange(8)
    xm, ya, yb, lam = mix_batch(x, y, TrainConfig(strategy="full", cutmix=1.0))
    assert xm.shape == x.shape and 0 <= lam <= 1 and torch.equal(ya, y)
    changed = (xm != x).any(dim=1).float().mean().item()
    assert changed == pytest.approx(1 - lam, abs=0.05) or torch.equal(yb, y)


def test_mixup_refused_for_feature_extraction():
    with pytest.raises(ConfigError, match="fine-tune or full"):
        TrainConfig(strategy="feature-extraction", mixup=0.2)


def test_amp_settings_on_cpu():
    from edgetl.workstation.loops import amp_settings

    assert amp_settings("auto", torch.device("cpu")) == (False, None, False)
    assert amp_settings("bf16", torch.device("cpu")) == (True, torch.bfloat16, False)


def test_finetune_json_is_one_envelope_and_the_summary_one_line(image_folder, tmp_path):
    from click.testing import CliRunner

    from edgetl.cli import main
    from edgetl.cli.train_cmds import _data_root
    from tests.schemas import validate_document

    args = ["--backbone", "tiny_test", "--weights", "none", "--epochs", "2", "--batch-size", "16", "--no-progress"]
    args += ["--strategy", "feature-extraction"]  # with --epochs: the head trains 2 epochs (no head search)
    result = CliRunner().invoke(main, ["finetune", str(image_folder), "--out", str(tmp_path / "run"), *args, "--json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "finetune")
    assert (doc["run"], doc["data"]) == (str(tmp_path / "run"), str(image_folder))
    [rec] = doc["results"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec["val_top1"] == metrics["val_top1"] and rec["epochs_run"] == 2 and rec["skipped"] == []
    assert _data_root(None, str(tmp_path / "run")) == str(image_folder.resolve())  # --resume: the run's data
    # In a pipe (tsv) and on a terminal (table) the summary stays one line; -q is accepted after the command.
    for fmt in ("tsv", "table"):
        out = tmp_path / f"run-{fmt}"
        result = CliRunner().invoke(
            main, ["finetune", str(image_folder), "--out", str(out), *args, "--format", fmt, "-q"]
        )
        assert result.exit_code == 0, result.output
        assert result.stdout.count("\n") == 1 and "val top-1" in result.stdout and str(out) in result.stdout
    result = CliRunner().invoke(
        main, ["finetune", str(image_folder), "--out", str(tmp_path / "r"), "--json", "--format", "tsv"]
    )
    assert result.exit_code == 2 and "disagree" in result.stderr
