"""Schema tests over the backbone registry (like torchvision's test_extended_models)."""

import re

import pytest
import torch

from edgetl.core.errors import ConfigError, WeightsError
from edgetl.workstation.backbones import get_backbone, list_backbones, register_backbone
from edgetl.workstation.model import build_trunk, set_trainable
from edgetl.workstation.weights import find_imagenet_weights, resolve_weights, verify_name_hash

REAL = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50", "efficientnet_b0"]


def test_required_backbones_registered():
    names = {s.name for s in list_backbones()}
    assert set(REAL) <= names


@pytest.mark.parametrize("name", REAL)
def test_spec_is_complete_and_trunk_has_right_feature_dim(name):
    spec = get_backbone(name)
    assert spec.weights_file and re.search(r"-[0-9a-f]{8}\.pth$", spec.weights_file)
    assert spec.weights_url.endswith(spec.weights_file)
    assert spec.input_size == 224 and spec.resize_size >= spec.input_size
    assert len(spec.mean) == 3 and len(spec.std) == 3
    trunk = build_trunk(spec).eval()
    assert len(trunk.blocks) >= 4
    with torch.no_grad():
        feats = trunk(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, spec.feature_dim)


@pytest.mark.parametrize("name", REAL)
def test_official_weights_load_strictly_into_builder(name):
    """The builder accepts a state dict with torchvision's exact keys (as in the official files)."""
    import torchvision

    spec = get_backbone(name)
    full = torchvision.models.get_model(spec.torchvision_name, weights=None)
    trunk = build_trunk(spec, full.state_dict())
    first = next(iter(trunk.state_dict().values()))
    assert torch.equal(first, next(iter(full.state_dict().values())))


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(get_backbone("resnet18"))


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        get_backbone("vgg_nonexistent")


def test_unfreeze_last_blocks_only():
    trunk = build_trunk(get_backbone("mobilenet_v2"))
    set_trainable(trunk, 2)
    trainable = [any(p.requires_grad for p in b.parameters()) for b in trunk.blocks]
    assert trainable[-2:] == [True, True] and not any(trainable[:-2])
    set_trainable(trunk, None)
    assert all(p.requires_grad for p in trunk.parameters())


def test_real_mobilenet_v2_weights_found_offline_and_hash_verified(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    spec = get_backbone("mobilenet_v2")
    path, origin = find_imagenet_weights(spec, allow_download=False)
    assert origin == "offline-package" and path.name == "mobilenet_v2-b0353104.pth"
    state, source = resolve_weights(spec, "imagenet")
    assert source.sha256.startswith("b0353104") and source.kind == "imagenet"
    trunk = build_trunk(spec, state)
    assert trunk.feature_dim == 1280


def test_hub_cache_preferred_and_corrupt_file_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = get_backbone("resnet18")
    ckpt = tmp_path / "hub" / "checkpoints" / spec.weights_file
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not the real weights")
    path, origin = find_imagenet_weights(spec, allow_download=False)
    assert origin == "hub-cache"
    with pytest.raises(WeightsError, match="corrupt"):
        verify_name_hash(path)


def test_missing_weights_error_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="download .*resnet50-0676ba61.pth.*--weights none"):
        find_imagenet_weights(get_backbone("resnet50"), allow_download=False)


def test_user_weights_file_loaded_weights_only(tmp_path):
    spec = get_backbone("tiny_test")
    body, _ = spec.builder()
    f = tmp_path / "mine.pth"
    torch.save(body.state_dict(), f)
    state, source = resolve_weights(spec, str(f))
    assert source.kind == "file" and len(source.sha256) == 64
    build_trunk(spec, state)
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights(spec, str(tmp_path / "missing.pth"))


def test_unfreeze_left_to_the_backbone():
    from edgetl.workstation.options import TrainConfig

    assert TrainConfig().unfreeze is None  # valid: resolved from the backbone when training starts
    assert get_backbone("mobilenet_v2").train_config(TrainConfig()).unfreeze == 2
    for name in ("efficientnet_b0", "resnet18", "mobilenet_v3_large"):
        assert get_backbone(name).train_config(TrainConfig(backbone=name)).unfreeze == 3
    given = TrainConfig(unfreeze=3)
    assert get_backbone("mobilenet_v2").train_config(given) is given  # a given --unfreeze stands
