"""Multi-layer features (``--features blocks``): every block's output pooled and concatenated, what the
searched feature-extraction head sees by default; the fine-tune keeps the last feature map."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.errors import ConfigError, RunError
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.fast_trunk import frozen_runner
from edgetl.workstation.model import Trunk, build_trunk, tap_positions
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.run import load_run
from edgetl.workstation.train import finetune
from tests.helpers import branchy_trunk, make_image_folder

TINY = {"backbone": "tiny_test", "weights": "none", "batch_size": 16}


def _train(data, out, **kw):
    return finetune(data, out, config=TrainConfig(**{**TINY, **kw}), progress=False)


@pytest.mark.parametrize(
    ("name", "taps", "dim"),
    [
        # after each of the 18 blocks before the last; 32+16+24*2+32*3+64*4+96*3+160*3+320 + 1280
        ("mobilenet_v2", list(range(18)), 2816),
        # the stem's batch norm (not the conv it normalises), layer1..layer3; + layer4's 512
        ("resnet18", [1, 4, 5, 6], 64 + 64 + 128 + 256 + 512),
    ],
)
def test_taps_concatenate_every_block_and_end_with_the_last_feature_map(name, taps, dim):
    torch.manual_seed(0)
    trunk = build_trunk(get_backbone(name)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = trunk(x)
    assert tap_positions(trunk) == taps
    trunk.set_taps(taps)
    assert trunk.feature_dim == dim and trunk.last_dim == last.shape[1]
    with torch.no_grad():
        tapped = trunk(x)
        first_block = trunk.body[0](x).mean((2, 3)) if name == "mobilenet_v2" else None
    assert tapped.shape == (2, dim)
    assert torch.allclose(tapped[:, -last.shape[1] :], last, atol=1e-5)
    if first_block is not None:
        assert torch.allclose(tapped[:, : first_block.shape[1]], first_block, atol=1e-5)
    trunk.set_taps(())
    assert trunk.feature_dim == last.shape[1] and torch.allclose(trunk(x), last)


def test_a_body_that_is_not_a_chain_cannot_be_tapped():
    trunk = branchy_trunk()
    assert tap_positions(trunk) is None
    with pytest.raises(ValueError, match="not a chain"):
        trunk.set_taps([0])
    chain = Trunk(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3)), [], 6)
    with pytest.raises(ValueError, match="increasing positions"):
        chain.set_taps([2])  # the last module's output is always in the features


def test_the_tapped_trunk_runs_in_onnx_runtime_as_in_torch_and_its_runner_is_reused():
    torch.manual_seed(0)
    trunk = build_trunk(get_backbone("mobilenet_v2"), taps=list(range(18))).eval()
    x = torch.randn(3, 3, 64, 64)
    runner = frozen_runner(trunk, x, "cpu")
    with torch.no_grad():
        want = trunk(x)
    got = runner(x)
    assert got.shape == (3, 2816) and float((got - want).abs().max()) < 1e-3 * max(1.0, float(want.abs().max()))
    assert frozen_runner(trunk, x, "cpu") is runner  # same trunk, same tensors: no second export
    with torch.no_grad():
        trunk.body[18][0].weight.mul_(2)  # an in-place change (what an optimizer step does)
    again = frozen_runner(trunk, x, "cpu")
    assert again is not runner
    with torch.no_grad():
        assert torch.allclose(again(x), trunk(x), atol=1e-3 * max(1.0, float(trunk(x).abs().max())))


def test_the_default_run_taps_every_block_and_the_run_rebuilds_them(image_folder, tmp_path):
    result = _train(image_folder, tmp_path / "run", strategy="feature-extraction")
    features = result.features
    assert features["mode"] == "blocks" and features["taps"] and features["dim"] > features["last_dim"]
    run = load_run(tmp_path / "run")
    assert run.taps == features["taps"] and run.spec.feature_dim == features["dim"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["features"] == features
    model = run.build_model()
    assert model.trunk.feature_dim == features["dim"] and model.head.fc.in_features == features["dim"]
    # The run's validation top-1 is what the rebuilt model scores (the taps are the trained ones).
    from edgetl.workstation.evaluate import evaluate_run

    scored = evaluate_run(tmp_path / "run", split="val")["results"][0]
    assert scored["top1"] == pytest.approx(result.val_top1)


def test_last_features_keep_the_last_feature_map(image_folder, tmp_path):
    last = _train(image_folder, tmp_path / "last", strategy="feature-extraction", features="last")
    assert last.features == {"mode": "last", "dim": 16}
    assert load_run(tmp_path / "last").build_model().head.fc.in_features == 16
    tuned = _train(image_folder, tmp_path / "ft", strategy="fine-tune", epochs=1, unfreeze=1, features="last")
    assert tuned.features["mode"] == "last" and load_run(tmp_path / "ft").taps == []
    assert load_run(tmp_path / "ft").build_model().head.fc.in_features == 16


@pytest.mark.parametrize("backbone", ["tiny_test", "mobilenet_v2"])
def test_a_fine_tune_searches_its_head_again_on_every_block_of_the_tuned_trunk(tmp_path, backbone):
    data = make_image_folder(tmp_path / "data", per_class=12)
    result = _train(data, tmp_path / "ft", strategy="fine-tune", epochs=2, unfreeze=2, backbone=backbone, img_size=32)
    assert result.strategy == "fine-tune" and result.features["mode"] == "blocks"
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    refit = config["head_refit"]
    assert result.head_refit == refit
    assert refit["features_dim"] == result.features["dim"] and 0 <= refit["finetune_head_val_top1"] <= 1
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert config["head_search"]["chosen"] == metrics["head_search"]["chosen"] == result.head_search["chosen"]
    model = load_run(tmp_path / "ft").build_model()
    assert model.head.fc.in_features == result.features["dim"] > result.features["last_dim"]
    # The recorded top-1 (features walked from the cached prefix) is what the rebuilt model scores.
    from edgetl.workstation.evaluate import evaluate_run

    scored = evaluate_run(tmp_path / "ft", split="val")["results"][0]
    assert scored["top1"] == pytest.approx(result.val_top1)


@pytest.mark.parametrize("name", ["tiny_test", "mobilenet_v2", "efficientnet_lite0", "resnet18"])
def test_prefix_taps_and_the_features_after_the_cut_are_the_trunks_features(name):
    from edgetl.workstation.model import PrefixWithTaps, features_after
    from edgetl.workstation.prefix import split_trunk

    torch.manual_seed(0)
    trunk = build_trunk(get_backbone(name))
    trunk.set_taps(tap_positions(trunk))
    trunk.eval()
    split = split_trunk(trunk, 2)
    cut = len(split.prefix)
    module = PrefixWithTaps(split.prefix, trunk.taps, 48).eval()
    assert module.taps == tuple(t for t in trunk.taps if t < cut) and module.taps_dim > 0
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = module(x)
        act = out[:, : out.shape[1] - module.taps_dim].reshape(2, *module.act_shape)
        whole = torch.cat([out[:, out.shape[1] - module.taps_dim :], features_after(trunk, cut, act)], 1)
        assert torch.allclose(whole, trunk(x), atol=1e-5) and torch.allclose(act, split.prefix(x))


def test_blocks_and_last_features_are_cached_apart(image_folder, tmp_path):
    first = _train(image_folder, tmp_path / "a", strategy="feature-extraction", features="last")
    second = _train(image_folder, tmp_path / "b", strategy="feature-extraction")
    assert first.feature_cache["status"] == "miss" and second.feature_cache["status"] == "miss"
    third = _train(image_folder, tmp_path / "c", strategy="feature-extraction", features="blocks")
    assert third.feature_cache["status"] == "hit"


def test_blocks_with_a_full_or_end_to_end_fine_tune_is_a_one_line_error(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--strategy full trains every block"):
        TrainConfig(strategy="full", features="blocks")
    with pytest.raises(ConfigError, match="--no-head-search fine-tunes end to end"):
        TrainConfig(strategy="fine-tune", features="blocks", head_search=False)
    with pytest.raises(ConfigError, match="--mixup, --cutmix"):
        TrainConfig(strategy="fine-tune", features="blocks", mixup=0.2, cutmix=1.0)
    assert TrainConfig(strategy="fine-tune", features="blocks").features == "blocks"
    with pytest.raises(ConfigError, match="--features must be one of"):
        TrainConfig(features="all")
    out = CliRunner().invoke(
        main,
        ["finetune", str(image_folder), "--out", str(tmp_path / "r"), "--strategy", "full", "--features", "blocks"],
    )
    assert out.exit_code != 0 and "Traceback" not in out.output and "--features blocks" in out.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"mode": "blocks", "taps": [3, 1], "dim": 40}, "features.taps"),
        ({"mode": "blocks", "taps": [0], "dim": 1e9}, "features.dim"),
        ({"mode": "sideways"}, "mode last or blocks"),
        ({"mode": "blocks", "taps": [0], "dim": 17}, "its taps give"),  # valid shape, wrong size
        ({"mode": "blocks", "taps": [900], "dim": 40}, "features"),  # past this backbone's blocks
    ],
)
def test_edited_features_records_are_refused_in_one_line(image_folder, tmp_path, features, message):
    _train(image_folder, tmp_path / "run", strategy="feature-extraction")
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    config["features"] = features
    path.write_text(json.dumps(config))
    with pytest.raises(RunError, match=message):
        load_run(tmp_path / "run").build_model()


def test_auto_skips_the_fine_tune_when_it_cannot_win(tmp_path):
    # Three colours the frozen trunk tells apart perfectly: no fine-tune would beat it by 1 pp.
    data = make_image_folder(tmp_path / "data", per_class=16)
    result = _train(data, tmp_path / "run", epochs=2, unfreeze=1)
    choice = result.strategy_choice
    wrong = round((1 - choice["holdout_top1"]["feature-extraction"]) * choice["holdout_images"])
    assert choice["holdout_images"] == 9
    if wrong <= 4:  # a fine-tune right where feature extraction is wrong, 4-0 at best: p = 1/16 >= 0.05
        assert choice["holdout_top1"]["fine-tune"] is None and "would not win" in choice["why"]
        assert result.strategy == "feature-extraction" and f"got {wrong} wrong" in choice["why"]
    else:  # the tiny random trunk did not separate them: the comparison ran
        assert isinstance(choice["holdout_top1"]["fine-tune"], float) and "sign test p =" in choice["why"]
    assert choice["compared_images"] == 39 and choice["comparison_views"] == 1  # every training image (< 600)


def test_history_plot_only_for_more_than_one_epoch(image_folder, tmp_path):
    _train(image_folder, tmp_path / "fe", strategy="feature-extraction")
    assert not (tmp_path / "fe" / "history.png").exists()
    _train(image_folder, tmp_path / "ft", strategy="fine-tune", epochs=2, unfreeze=1)
    assert (tmp_path / "ft" / "history.png").is_file()


def test_unreadable_images_are_found_in_parallel_and_reported_in_order(tmp_path):
    from PIL import Image

    from edgetl.core.errors import DataError
    from edgetl.core.imagefolder import drop_unreadable, scan_image_folder
    from edgetl.core.preprocess import check_image

    data = make_image_folder(tmp_path / "data", per_class=6)
    photo = tmp_path / "photo.jpg"
    Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype("uint8")).save(photo)
    check_image(photo)  # decodes at 1/8 scale, still a full read
    raw = photo.read_bytes()
    bad = sorted((data / "red").glob("*"))[:2]
    for path in bad:
        path.unlink()
    (data / "red" / "a_truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (data / "red" / "b_text.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="truncated"):
        check_image(data / "red" / "a_truncated.jpg")
    folder = drop_unreadable(scan_image_folder(data))
    assert [p.rsplit("/", 1)[-1] for p, _ in folder.skipped] == ["a_truncated.jpg", "b_text.jpg"]
    assert len(folder.samples) == 18 - 2
    with pytest.raises(DataError, match="a_truncated.jpg.*--on-bad-image skip"):
        drop_unreadable(scan_image_folder(data), on_bad_image="fail")


@pytest.mark.parametrize("name", ["tiny_test", "mobilenet_v2"])
def test_the_trunk_with_its_prefix_gives_the_features_and_the_prefix_output_in_one_pass(name):
    from edgetl.workstation.model import TrunkWithPrefix
    from edgetl.workstation.prefix import split_trunk

    torch.manual_seed(0)
    trunk = build_trunk(get_backbone(name), taps=None).eval()
    split = split_trunk(trunk, 1)
    both = TrunkWithPrefix(trunk, len(split.prefix), 64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want_features, want_prefix = trunk(x), split.prefix(x)
    assert both.prefix_shape == tuple(want_prefix.shape[1:])
    runner = frozen_runner(both, x, "cpu")  # what the feature pass runs (ONNX Runtime on the CPU)
    got = runner(x)
    assert got.shape == (2, trunk.feature_dim + want_prefix[0].numel())
    scale = max(1.0, float(want_prefix.abs().max()))
    assert torch.allclose(got[:, : trunk.feature_dim], want_features, atol=1e-3 * scale)
    assert torch.allclose(got[:, trunk.feature_dim :], torch.flatten(want_prefix, 1), atol=1e-3 * scale)
    with pytest.raises(ValueError, match="cannot keep"):
        TrunkWithPrefix(trunk, 0, 64)


def test_auto_compares_on_the_prefix_kept_by_the_feature_pass_and_recomputes_it_only_on_a_warm_cache(
    tmp_path, monkeypatch
):
    import edgetl.workstation.fit as fit

    monkeypatch.setattr(fit, "AUTO_MARGIN", 0.0)  # the comparison always runs
    monkeypatch.setattr(fit, "AUTO_ALPHA", 1.5)
    kept, recomputed, inside, kept_taps, recomputed_taps = [], [], [], [], []
    real_cached_prefix, real_cache_prefix = fit.CachedPrefix, fit.cache_prefix

    def spy_kept(split, train, val, seconds, **taps):
        if not inside:  # built from the kept activations, not by cache_prefix
            kept.append(np.concatenate([train, val]))
            kept_taps.append(np.concatenate([taps["train_taps"], taps["val_taps"]]))
        return real_cached_prefix(split, train, val, seconds, **taps)

    def spy_recomputed(*args, views, **kwargs):
        inside.append(1)
        try:
            out = real_cache_prefix(*args, views=views, **kwargs)
        finally:
            inside.pop()
        if views == 1:  # the comparison's (a final fine-tune's has 4 views)
            recomputed.append(np.concatenate([out.train, out.val]))
            recomputed_taps.append(np.concatenate([out.train_taps, out.val_taps]))
        return out

    monkeypatch.setattr(fit, "CachedPrefix", spy_kept)
    monkeypatch.setattr(fit, "cache_prefix", spy_recomputed)
    data = make_image_folder(tmp_path / "data", per_class=16)
    first = _train(data, tmp_path / "cold", epochs=2, unfreeze=1)
    assert isinstance(first.strategy_choice["holdout_top1"]["fine-tune"], float)
    assert len(kept) == 1 and not recomputed  # cold cache: the feature pass kept the sample's prefix
    _train(data, tmp_path / "warm", epochs=2, unfreeze=1)  # every feature a cache hit: nothing kept
    assert len(recomputed) == 1 and len(kept) == 1
    # The same images in the same order (the sample, fit part then held-out part), the same activations.
    assert kept[0].shape == recomputed[0].shape and kept[0].dtype == np.float16
    scale = max(1.0, float(np.abs(recomputed[0]).max()))
    assert np.allclose(kept[0].astype(np.float32), recomputed[0].astype(np.float32), atol=2e-3 * scale)
    # The taps inside the prefix: the first columns of the feature pass's features = the prefix pass's.
    assert kept_taps[0].shape == recomputed_taps[0].shape and kept_taps[0].shape[1] > 0
    assert np.allclose(kept_taps[0], recomputed_taps[0], atol=1e-3 * max(1.0, float(np.abs(kept_taps[0]).max())))
