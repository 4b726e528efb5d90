"""Test helpers: a tiny registered backbone and generated image folders (no network, seconds to train)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from edgetl.workstation.backbones import BackboneSpec, get_backbone, register_backbone

TINY = "tiny_test"


def _build_tiny(state_dict=None):
    import torch.nn as nn

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    body = nn.Sequential(block(3, 8, 2), block(8, 16, 2), block(16, 16, 1))
    if state_dict is not None:
        body.load_state_dict(state_dict)
    return body, list(body.children())


def tiny_spec(name: str, builder, *, feature_dim: int = 16) -> BackboneSpec:
    """A test backbone at the tiny one's 32-pixel preprocessing, without ImageNet weights."""
    return BackboneSpec(
        name=name,
        feature_dim=feature_dim,
        params=0,
        input_size=32,
        resize_size=36,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights_file=None,
        weights_url=None,
        builder=builder,
    )


def register_tiny_backbone() -> BackboneSpec:
    try:
        return get_backbone(TINY)
    except Exception:
        return register_backbone(tiny_spec(TINY, _build_tiny))


def branchy_trunk():
    """A trunk whose body adds two branches: not a chain of modules (it cannot be cut or tapped)."""
    import torch.nn as nn

    from edgetl.workstation.model import Trunk

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.a(x) + self.b(x)

    body = Branchy()
    return Trunk(body, [body.a, body.b], 4)


def count_trunk_images(monkeypatch) -> dict[str, int]:
    """Count the images every Trunk.forward sees from now on: ``counter["images"]``.

    Frozen trunks then run in eager PyTorch (``EDGETL_FROZEN_ENGINE=eager``): through ONNX Runtime
    they would not call ``Trunk.forward`` per image.
    """
    from edgetl.workstation.model import Trunk

    monkeypatch.setenv("EDGETL_FROZEN_ENGINE", "eager")
    seen = {"images": 0}
    original = Trunk.forward

    def counting(self, x):
        seen["images"] += x.shape[0]
        return original(self, x)

    monkeypatch.setattr(Trunk, "forward", counting)
    return seen


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_image_folder(
    root: Path,
    per_class: int = 16,
    classes=("red", "green", "blue"),
    seed: int = 0,
    size: tuple[int, int] = (40, 48),
    fmt: str = "png",
) -> Path:
    """Classes told apart by colour, with noise and a random bright square: easy but not trivial."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        base = np.array(COLOURS.get(name, tuple(int(v) for v in rng.integers(0, 255, 3))), dtype=np.float32)
        for i in range(per_class):
            h, w = size
            arr = base + rng.normal(0, 30, (h, w, 3))
            y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
            arr[y : y + 10, x : x + 10] = 255
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
            img.save(root / name / f"{name}_{i:03d}.{fmt}")
    return root


def digits_subset(root: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each of scikit-learn's digits, at ``root/digits``."""
    import shutil

    from edgetl.workstation.data import write_digits

    full = Path(write_digits(root / "all-digits")["path"])
    for d in range(10):
        (root / "digits" / str(d)).mkdir(parents=True)
        for p in sorted((full / str(d)).glob("*.png"))[:per_class]:
            shutil.copyfile(p, root / "digits" / str(d) / p.name)
    return root / "digits"


def json_paths(obj, prefix=()):
    """Every path (tuple of keys and indices) into a JSON value, the value itself first."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, (*prefix, i))
