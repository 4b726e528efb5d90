"""The persistent feature cache: hits across runs, no trunk pass on a hit, same numbers as no cache."""

import json
import shutil

import numpy as np
import pytest

from edgetl.core.bundle import sha256_file
from edgetl.workstation.featcache import FeatureCache, cached_features
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.train import finetune
from tests.helpers import count_trunk_images

TINY = {
    "backbone": "tiny_test",
    "weights": "none",
    "batch_size": 16,
    "epochs": 4,
    "lr": 3e-2,
    "strategy": "feature-extraction",
}


def test_second_run_with_other_head_settings_hits_the_cache(image_folder, tmp_path, monkeypatch):
    seen = count_trunk_images(monkeypatch)
    first = finetune(image_folder, tmp_path / "a", config=TrainConfig(**TINY), progress=False)
    assert first.feature_cache == {"status": "miss", "hits": 0, "misses": 48}
    assert seen["images"] == 48
    second = finetune(
        image_folder, tmp_path / "b", config=TrainConfig(**{**TINY, "lr": 1e-2, "dropout": 0.5}), progress=False
    )
    assert second.feature_cache == {"status": "hit", "hits": 48, "misses": 0}
    assert seen["images"] == 48, "the trunk ran again on a cache hit"
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["feature_cache"]["status"] == "hit"


def test_cache_is_keyed_by_content_not_path(image_folder, tmp_path):
    finetune(image_folder, tmp_path / "a", config=TrainConfig(**TINY), progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    result = finetune(moved, tmp_path / "b", config=TrainConfig(**TINY), progress=False)
    assert result.feature_cache["status"] == "hit"
    # Changing one image's bytes makes exactly that one a miss.
    victim = sorted((moved / "red").glob("*.png"))[0]
    from PIL import Image

    Image.new("RGB", (40, 48), (1, 2, 3)).save(victim)
    result = finetune(moved, tmp_path / "c", config=TrainConfig(**TINY), progress=False)
    assert result.feature_cache == {"status": "partial", "hits": 47, "misses": 1}


def test_other_preprocessing_is_another_cache_entry(image_folder, tmp_path):
    finetune(image_folder, tmp_path / "a", config=TrainConfig(**TINY), progress=False)
    result = finetune(image_folder, tmp_path / "b", config=TrainConfig(**{**TINY, "img_size": 24}), progress=False)
    assert result.feature_cache["status"] == "miss"


def test_no_feature_cache_runs_trunk_every_epoch_with_same_result(image_folder, tmp_path, monkeypatch):
    seen = count_trunk_images(monkeypatch)
    cached = finetune(image_folder, tmp_path / "a", config=TrainConfig(**TINY, head_search=False), progress=False)
    before = seen["images"]
    plain = finetune(
        image_folder,
        tmp_path / "b",
        config=TrainConfig(**{**TINY, "feature_cache": False, "augment": False}),
        progress=False,
    )
    assert plain.feature_cache is None
    # Every epoch: train (39) + validation (9); then validation once more for the best epoch's head.
    assert seen["images"] - before == 4 * 48 + 9
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    # Same batches in the same order, same features: the same training up to float summation order.
    np.testing.assert_allclose([h["train_loss"] for h in ha], [h["train_loss"] for h in hb], rtol=1e-4)
    assert abs(cached.val_top1 - plain.val_top1) <= 0.005


def test_cache_survives_a_damaged_index(tmp_path):
    files = []
    for i in range(3):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]) * 10)
        files.append(str(p))
    cache = FeatureCache(tmp_path / "c", "k")
    feats, stats = cached_features(cache, files, lambda idx: np.array([[float(i)] * 2 for i in idx], np.float32), 2)
    assert stats.misses == 3 and feats[:, 0].tolist() == [0.0, 1.0, 2.0]
    (tmp_path / "c" / "k" / "index.json").write_text("{not json")
    feats, stats = cached_features(
        FeatureCache(tmp_path / "c", "k"), files, lambda idx: np.array([[float(i)] * 2 for i in idx], np.float32), 2
    )
    assert stats.misses == 3 and feats[:, 1].tolist() == [0.0, 1.0, 2.0]
    assert sha256_file(files[0]) != sha256_file(files[1])


@pytest.mark.parametrize("duplicates", [True])
def test_duplicate_files_computed_once(tmp_path, duplicates):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    calls = []

    def compute(idx):
        calls.append(list(idx))
        return np.ones((len(idx), 4), np.float32)

    feats, _stats = cached_features(FeatureCache(tmp_path / "c", "k"), [str(a), str(b)], compute, 4)
    assert calls == [[0]] and feats.shape == (2, 4)
