"""Image preprocessing in numpy + pillow, identical to the torchvision eval transform used in training.

Training builds ``Resize(resize_size) -> CenterCrop(input_size) -> ToTensor -> Normalize`` on PIL
images (see :func:`edgetl.workstation.train.eval_transform`); this module re-implements exactly that without
torch, from the values recorded in a bundle manifest. ``tests/test_preprocess.py`` proves the two
agree on real images.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from edgetl.core.errors import BundleError, DataError

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# A decompression-bomb guard that still admits large camera images (~ 16k x 11k); checked before
# decoding, so a 50 kB PNG that claims 100k x 100k pixels never allocates its 30 GB.
# (PIL itself refuses above twice its default limit, ~179M pixels; its warning below that is ours to give.)
MAX_PIXELS = 178_000_000


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The input contract of a model: what the trunk expects and how to get there from an image file."""

    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color_mode: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, not {self.interpolation!r}")
        if self.resize_size < self.input_size:
            raise ValueError("resize_size must be >= input_size")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        try:
            pp = cls(
                input_size=int(d["input_size"]),
                resize_size=int(d["resize_size"]),
                interpolation=str(d["interpolation"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                color_mode=str(d.get("color_mode", "RGB")),
                layout=str(d.get("layout", "NCHW")),
                dtype=str(d.get("dtype", "float32")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid preprocessing record {d!r}: {exc}") from None
        if (
            pp.color_mode != "RGB"
            or pp.layout != "NCHW"
            or pp.dtype != "float32"
            or len(pp.mean) != 3
            or len(pp.std) != 3
        ):
            raise BundleError(f"unsupported preprocessing record {d!r}: edgetl runs RGB, NCHW, float32 inputs")
        return pp


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16 ...) to RGB; transparency is composited on black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(path) -> Image.Image:
    """Open an image file fully (decode now, so corrupt files fail here) and convert it to RGB.

    EXIF orientation is applied (a phone's portrait photo is upright, as every viewer shows it) on
    the workstation and on the device alike. Any failure is a :class:`DataError`: the decoders run
    on untrusted bytes and may raise more than OSError, none of which may crash a long job.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(
                    f"cannot read image {path}: {img.width}x{img.height} pixels is more than {MAX_PIXELS:,} "
                    "(a decompression bomb, or an image to downscale first)"
                )
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
    except DataError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize so that the shorter side is ``size``, as torchvision's ``Resize(int)`` does on PIL images."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), _PIL_FILTERS[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop as torchvision's ``CenterCrop`` computes it (rounding included)."""
    w, h = img.size
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """One RGB PIL image -> float32 array of shape (3, input_size, input_size), normalised."""
    img = center_crop(resize_shorter(to_rgb(img), pp.resize_size, pp.interpolation), pp.input_size)
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(pp.mean, dtype=np.float32)
    std = np.asarray(pp.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_batch(images, pp: Preprocessing) -> np.ndarray:
    """A list of PIL images -> (N, 3, H, W) float32."""
    return np.stack([preprocess(img, pp) for img in images]).astype(np.float32, copy=False)
