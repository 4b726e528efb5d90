"""The searched training paths (edgetl.workstation.fit): crop chosen for the data, augmented views in the
cache, the head chosen on the training split only, --strategy auto; on the tiny backbone, seconds."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.imagefolder import scan_image_folder
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.fit import crop_candidates, crop_variant, holdout_split
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.recipes import make_config
from edgetl.workstation.run import load_run
from edgetl.workstation.train import finetune
from tests.helpers import make_image_folder

TINY = {"backbone": "tiny_test", "weights": "none", "batch_size": 16}


def _train(data, out, val_dir=None, **kw):
    return finetune(data, out, config=TrainConfig(**{**TINY, **kw}), val_dir=val_dir, progress=False)


def test_crop_auto_compares_only_when_the_images_are_no_larger_than_the_resize(tmp_path):
    pp = get_backbone("tiny_test").preprocessing()  # input 32, resize 36
    big = scan_image_folder(make_image_folder(tmp_path / "big", per_class=3, size=(40, 48))).samples
    small = scan_image_folder(make_image_folder(tmp_path / "small", per_class=3, size=(24, 24))).samples
    assert crop_candidates("auto", pp, big, 0)[0] == ["center"]
    crops, why = crop_candidates("auto", pp, small, 0)
    assert crops == ["center", "none"] and "24 px" in why
    assert crop_candidates("compare", pp, big, 0)[0] == ["center", "none"]
    assert crop_candidates("none", pp, small, 0)[0] == ["none"]
    assert crop_variant(pp, "none").resize_size == 32 and crop_variant(pp, "center") == pp


def test_small_images_record_the_crop_comparison_and_the_run_carries_the_choice(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=12, size=(24, 24))
    result = _train(data, tmp_path / "run", strategy="feature-extraction")
    assert result.crop["mode"] == "auto" and {r["crop"] for r in result.crop["table"]} == {"center", "none"}
    best = max(result.crop["table"], key=lambda r: r["cv_top1"])
    assert best["cv_top1"] == max(r["cv_top1"] for r in result.crop["table"])
    chosen = result.crop["chosen"]
    assert load_run(tmp_path / "run").preprocessing.resize_size == (32 if chosen == "none" else 36)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["crop"]["chosen"] == chosen and config["head_search"]["chosen"] == result.head_search["chosen"]
    assert config["strategy"] == "feature-extraction"


def test_the_validation_split_never_chooses(tmp_path):
    """Same training images, validation labels scrambled: the same head, the same crop, the same weights."""
    import torch

    data = make_image_folder(tmp_path / "data", per_class=12, size=(24, 24))
    val = make_image_folder(tmp_path / "val", per_class=6, seed=5, size=(24, 24))
    scrambled = tmp_path / "val2"
    for name, other in (("red", "green"), ("green", "blue"), ("blue", "red")):
        (scrambled / other).mkdir(parents=True)
        for f in (val / name).iterdir():
            (scrambled / other / f.name).write_bytes(f.read_bytes())
    a = _train(data, tmp_path / "a", val_dir=val, strategy="feature-extraction")
    b = _train(data, tmp_path / "b", val_dir=scrambled, strategy="feature-extraction")
    assert a.head_search["chosen"] == b.head_search["chosen"] and a.crop["chosen"] == b.crop["chosen"]
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["head"]
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["head"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.val_top1 != b.val_top1  # the scrambled validation is reported, not used


def test_views_are_cached_once_and_reused(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=10)
    first = _train(data, tmp_path / "a", strategy="feature-extraction", views=3)
    n_train = 24  # 30 images, 20% validation
    assert first.feature_cache == {"status": "miss", "hits": 0, "misses": 3 * n_train + 6}
    second = _train(data, tmp_path / "b", strategy="feature-extraction", views=3)
    assert second.feature_cache["status"] == "hit"
    assert second.head_search["chosen"] == first.head_search["chosen"]


def test_views_give_different_features_than_the_plain_view(tmp_path):
    import torch

    from edgetl.workstation.features import FeatureSettings, cached_trunk_features
    from edgetl.workstation.model import build_trunk
    from edgetl.workstation.prefix import Views

    samples = scan_image_folder(make_image_folder(tmp_path / "data", per_class=2)).samples
    spec = get_backbone("tiny_test")
    torch.manual_seed(0)
    trunk = build_trunk(spec).eval()
    kw = {
        "backbone": spec.name,
        "weights_sha256": "0" * 64,
        "pp": spec.preprocessing(),
        "settings": FeatureSettings(torch.device("cpu"), 8, cache_dir=tmp_path / "cache"),
    }
    plain, _ = cached_trunk_features(trunk, samples, **kw)
    views = Views(3, seed=0)
    v1, _ = cached_trunk_features(trunk, samples, view=(views, 1), **kw)
    v1_again, stats = cached_trunk_features(trunk, samples, view=(views, 1), **kw)
    v2, _ = cached_trunk_features(trunk, samples, view=(views, 2), **kw)
    assert stats.status == "hit" and np.array_equal(v1, v1_again)
    assert not np.allclose(plain, v1) and not np.allclose(v1, v2)


def test_auto_says_why_and_falls_back_with_few_images(tmp_path):
    few = make_image_folder(tmp_path / "few", per_class=5)  # 4 training images per class
    result = _train(few, tmp_path / "a", epochs=2)
    assert result.strategy == "feature-extraction"
    assert result.strategy_choice["chosen"] == "feature-extraction" and "fewer than 5" in result.strategy_choice["why"]
    data = make_image_folder(tmp_path / "data", per_class=16)
    result = _train(data, tmp_path / "b", epochs=2, unfreeze=1)
    choice = result.strategy_choice
    assert choice["chosen"] in ("feature-extraction", "fine-tune") and choice["chosen"] == result.strategy
    assert set(choice["holdout_top1"]) == {"feature-extraction", "fine-tune"} and choice["holdout_images"] == 9
    assert json.loads((tmp_path / "b" / "config.json").read_text())["strategy_choice"] == choice


def test_holdout_split_is_stratified_and_refuses_tiny_classes():
    labels = np.repeat([0, 1, 2], 10)
    fit, held = holdout_split(labels, 0.2, 0)
    assert len(held) == 6 and set(labels[held]) == {0, 1, 2} and not set(fit) & set(held)
    assert holdout_split(np.repeat([0, 1], [10, 4]), 0.2, 0) is None


def test_head_settings_given_turn_the_search_off():
    assert make_config(None, {"strategy": "feature-extraction", "lr": 0.1}).head_search is False
    assert make_config(None, {"strategy": "feature-extraction"}).head_search is True
    assert make_config(None, {"strategy": "fine-tune", "lr": 0.1}).head_search is True  # lr of the fine-tune
    assert make_config(None, {"strategy": "feature-extraction", "lr": 0.1, "head_search": True}).head_search is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--views", "0"], "--views must be an integer in 1..64"),
        (["--folds", "1"], "--folds must be an integer in 2..20"),
    ],
)
def test_bad_search_options_are_one_line_errors(image_folder, tmp_path, args, message):
    result = CliRunner().invoke(main, ["finetune", str(image_folder), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and message in result.output  # a usage error, before anything runs
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_cli_prints_the_search_and_records_it(image_folder, tmp_path):
    out = tmp_path / "run"
    args = ["--backbone", "tiny_test", "--weights", "none", "--strategy", "feature-extraction", "--no-progress"]
    result = CliRunner().invoke(main, ["finetune", str(image_folder), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert "head search (5-fold cross-validation on the training split" in result.output
    assert "crop center" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["head_search"] is True and config["head_search"]["table"]


def test_fine_tune_over_the_activation_budget_trains_end_to_end(image_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDGETL_ACTIVATION_MEMORY", "0")
    with caplog.at_level("INFO", logger="edgetl"):
        result = _train(image_folder, tmp_path / "run", strategy="fine-tune", epochs=2, unfreeze=1)
    assert "EDGETL_ACTIVATION_MEMORY" in caplog.text and "fine-tuning end to end" in caplog.text
    assert result.strategy == "fine-tune" and result.epochs_run == 2 and result.head_search is None


def test_end_to_end_fallback_trains_and_records_the_chosen_crop(tmp_path, monkeypatch):
    """Over the activation budget the fine-tune streams, with the crop the search chose (here resize-only,
    asked for), recorded in the run so that the bundle and the device do the same."""
    monkeypatch.setenv("EDGETL_ACTIVATION_MEMORY", "0")
    data = make_image_folder(tmp_path / "data", per_class=6, size=(24, 24))
    result = _train(data, tmp_path / "run", strategy="fine-tune", epochs=1, unfreeze=1, crop="none")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    input_size = config["preprocessing"]["input_size"]
    assert result.crop["chosen"] == "none" and config["crop"]["chosen"] == "none"
    assert config["preprocessing"]["resize_size"] == input_size  # resize-only, not the backbone's resize + crop


def test_cached_fine_tune_keeps_the_last_epoch_then_searches_its_head_again(image_folder, tmp_path):
    result = _train(image_folder, tmp_path / "run", strategy="fine-tune", epochs=3, unfreeze=1)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert result.strategy == "fine-tune" and result.best_epoch == 3 and len(history) == 3
    # The head trained with the blocks is scored every epoch; the run's head is searched after the last.
    assert config["head_refit"]["finetune_head_val_top1"] == pytest.approx(history[-1]["val_top1"], abs=1e-6)
    assert result.head_search == config["head_search"] and result.head_search["chosen"]["kind"] == "logistic"
    assert result.crop["table"] == []  # 40x48 > the resize: no crop comparison
    small = make_image_folder(tmp_path / "small", per_class=12, size=(24, 24))
    compared = _train(small, tmp_path / "run2", strategy="fine-tune", epochs=1, unfreeze=1)
    assert len(compared.crop["table"]) == 2 and compared.head_search["chosen"]["kind"] == "logistic"


def test_trunk_from_head_settings_given_turn_the_search_off_too():
    from edgetl.workstation.heads import head_config

    assert head_config({"epochs": 10}).head_search is False
    assert head_config({}).head_search is True and head_config({}).strategy == "auto"


def test_the_validation_images_go_through_the_whole_trunk_only_for_feature_extraction(
    image_folder, tmp_path, monkeypatch
):
    from edgetl.workstation import fit

    passes = []
    real = fit._features

    def counted(trunk, samples, pp, ctx, *, description, **kw):
        passes.append(description)
        return real(trunk, samples, pp, ctx, description=description, **kw)

    monkeypatch.setattr(fit, "_features", counted)
    tuned = _train(image_folder, tmp_path / "ft", strategy="fine-tune", epochs=1, unfreeze=1)
    # A fine-tune scores its validation images through the cached prefix: no whole-trunk pass for them.
    assert passes == ["trunk features (train, crop center)"] and tuned.val_top1 > 0
    passes.clear()
    frozen = _train(image_folder, tmp_path / "fe", strategy="feature-extraction")
    assert passes == ["trunk features (train, crop center)", "trunk features (val)"]
    assert frozen.feature_cache["hits"] + frozen.feature_cache["misses"] == 48  # train and val counted


def test_the_sign_test_is_exact_and_one_sided():
    from edgetl.workstation.fit import sign_test

    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(1 / 32)
    assert sign_test(5, 1) == pytest.approx(7 / 64)
    assert sign_test(0, 5) == 1.0 and sign_test(8, 1) == pytest.approx(10 / 512)


def test_auto_chooses_fine_tune_only_when_it_wins_by_the_margin_significantly():
    from edgetl.workstation.fit import auto_choice

    def right(n_wrong, n=120):
        return np.arange(n) >= n_wrong

    # 4 fewer errors out of 120 (3.3 pp): past the margin, but 4-0 is p = 0.0625.
    chosen, test = auto_choice(right(8), right(4))
    assert chosen == "feature-extraction" and test == {
        "fine_tune_only_right": 4,
        "feature_extraction_only_right": 0,
        "p_value": 0.0625,
    }
    assert auto_choice(right(8), right(2))[0] == "fine-tune"  # 6-0: p = 0.016
    assert auto_choice(right(8), right(8))[0] == "feature-extraction"
    # Significant but below the margin (1,000 images, 8 fewer errors = 0.8 pp).
    assert auto_choice(right(20, 1000), right(12, 1000))[0] == "feature-extraction"
    swapped = np.roll(right(8), 60)  # as many errors, on other images: 8 wins, 8 losses
    assert auto_choice(swapped, right(8))[1]["p_value"] > 0.5
