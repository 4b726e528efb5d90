"""Image preprocessing in numpy + pillow, identical to the torchvision eval transform used in training.

Training builds ``Resize(resize_size) -> CenterCrop(input_size) -> ToTensor -> Normalize`` on PIL
images (see :func:`edgetl.workstation.prepare.eval_transform`); this module re-implements exactly that without
torch, from the values recorded in a bundle manifest. ``tests/test_preprocess.py`` proves the two
agree on real images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
# What the decoded image may take in memory: width x height x bands x bytes per band. The pixel cap
# alone let a 16-bit RGBA image take 8 bytes a pixel (1.4 GB at the cap); this admits 178M RGB pixels.
MAX_DECODED_BYTES = 3 * MAX_PIXELS
# Resizing the shorter side to the model's size multiplies the longer one by the same factor: a
# 1 x 100,000 strip would become 256 x 25.6M pixels. No camera or scanner crop is this elongated.
MAX_ASPECT_RATIO = 64
# Bounds on the input contract read from a manifest or a training config (a graph's input of
# 100,000 px, or a resize to 50x the crop, is a typo or an attack, not a model).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 2048
MAX_RESIZE_RATIO = 4.0


def _bytes_per_band(mode: str) -> float:
    if mode == "1":
        return 1 / 8
    if mode.startswith("I;16"):
        return 2
    if mode in ("I", "F", "RGBX", "RGBa") or mode.startswith(("I;32", "F;")):
        return 4
    return 1


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
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What is wrong with these values (None: nothing): sizes in range, the resize not far from
        the crop, mean and std finite with std > 0, a known interpolation."""
        for name in ("input_size", "resize_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{name} must be an integer, not {value!r}"
        if not MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE:
            return f"input_size {self.input_size} is outside {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} pixels"
        if not self.input_size <= self.resize_size <= MAX_RESIZE_RATIO * self.input_size:
            return (
                f"resize_size {self.resize_size} must be between input_size ({self.input_size}) and "
                f"{MAX_RESIZE_RATIO:g}x it"
            )
        if self.interpolation not in _PIL_FILTERS:
            return f"interpolation must be one of {sorted(_PIL_FILTERS)}, not {self.interpolation!r}"
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                return f"{name} must be 3 finite numbers, not {list(values)!r}"
        if not all(v > 0 for v in self.std):
            return f"std must be > 0 for every channel, not {list(self.std)!r}"
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        try:
            pp = cls(
                input_size=_int(d["input_size"]),
                resize_size=_int(d["resize_size"]),
                interpolation=str(d["interpolation"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                color_mode=str(d.get("color_mode", "RGB")),
                layout=str(d.get("layout", "NCHW")),
                dtype=str(d.get("dtype", "float32")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BundleError(f"invalid preprocessing record: {_short(exc)}; re-export the bundle") from None
        if (
            pp.color_mode != "RGB"
            or pp.layout != "NCHW"
            or pp.dtype != "float32"
            or len(pp.mean) != 3
            or len(pp.std) != 3
        ):
            raise BundleError("unsupported preprocessing record: edgetl runs RGB, NCHW, float32 inputs")
        return pp


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, not {value!r}"[:120])
    return value


def _short(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16 ...) to RGB; transparency is composited on black."""
    img = _rgb_or_gray(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _rgb_or_gray(img: Image.Image) -> Image.Image:
    """:func:`to_rgb`, except that a grayscale image (L, or 16/32-bit integer) comes back as L.

    Resizing an L image and then converting it to RGB gives the same bytes as converting first and
    resizing the RGB image (Pillow resamples each band alike; tests/test_preprocess.py checks it for
    every filter), for a third of the resampling work: grayscale images (scanners, IR and mono
    cameras, digits) are resized as L and made RGB afterwards.
    """
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(
    path, pp: Preprocessing | None = None, *, max_pixels: int = MAX_PIXELS, gray_ok: bool = False
) -> Image.Image:
    """Open an image file fully (decode now, so corrupt files fail here) and convert it to RGB.

    EXIF orientation is applied (a phone's portrait photo is upright, as every viewer shows it) on
    the workstation and on the device alike. Any failure is a :class:`DataError`: the decoders run
    on untrusted bytes and may raise more than OSError, none of which may crash a long job.

    Memory is bounded by the checks before decoding (pixels, decoded bytes from the mode's bands
    and bit depth, aspect ratio). With ``pp``, the image is reduced to the model's resize size as
    soon as it is decoded (the first step of :func:`preprocess`, so the result is the same to the
    bit): a caller holding many images then holds small ones, whatever the files' sizes.
    ``max_pixels`` lowers the pixel limit (``edgetl serve`` decodes uploads up to 40M pixels).
    ``gray_ok``: a grayscale image comes back as L, not RGB (for :func:`preprocess`, which gives it
    the same numbers as its RGB conversion, with less work).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            _check_decoded_size(path, img, min(max_pixels, MAX_PIXELS))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            img = _rgb_or_gray(img)
        if pp is not None:
            img = resize_shorter(img, pp.resize_size, pp.interpolation)
        return img if gray_ok and img.mode == "L" else to_rgb(img)
    except DataError:
        raise
    except Exception as exc:  # the decoders' own errors, MemoryError included: one image, not the run
        raise DataError(f"cannot read image {path}: {_short(exc)}") from None


def check_image(path) -> None:
    """Raise :class:`DataError` if :func:`load_image` would: open, bound and decode ``path``, then
    orient and convert it. A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling still reads every
    coefficient, so a truncated file fails as it does at full size) for a fraction of the time."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            _check_decoded_size(path, img)
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            to_rgb(img)
    except DataError:
        raise
    except Exception as exc:  # as load_image: the decoders' own errors are one unreadable image
        raise DataError(f"cannot read image {path}: {_short(exc)}") from None


def _check_decoded_size(path, img: Image.Image, max_pixels: int = MAX_PIXELS) -> None:
    w, h = img.width, img.height
    if w < 1 or h < 1:
        raise DataError(f"cannot read image {path}: it is {w}x{h} pixels")
    if w * h > max_pixels:
        raise DataError(
            f"cannot read image {path}: {w}x{h} pixels is more than {max_pixels:,} "
            "(a decompression bomb, or an image to downscale first)"
        )
    decoded = w * h * len(img.getbands()) * _bytes_per_band(img.mode)
    max_bytes = MAX_DECODED_BYTES * max_pixels // MAX_PIXELS  # 3 bytes a pixel at the limit
    if decoded > max_bytes:
        raise DataError(
            f"cannot read image {path}: {w}x{h} {img.mode} would take {decoded / 1e9:.1f} GB decoded "
            f"(limit {max_bytes / 1e9:.2f} GB); downscale it first"
        )
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise DataError(
            f"cannot read image {path}: {w}x{h} is more elongated than 1:{MAX_ASPECT_RATIO} "
            "(crop it to the object first)"
        )


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
    """One PIL image -> float32 array of shape (3, input_size, input_size), normalised; any mode
    :func:`to_rgb` converts gives the numbers of its RGB conversion."""
    out = np.empty((3, pp.input_size, pp.input_size), dtype=np.float32)
    _normalise_into(_cropped(img, pp), pp, out)
    return out


def preprocess_batch(images, pp: Preprocessing) -> np.ndarray:
    """A list of PIL images -> (N, 3, H, W) float32 (each image written in place: no stacking copy)."""
    images = list(images)
    out = np.empty((len(images), 3, pp.input_size, pp.input_size), dtype=np.float32)
    for i, img in enumerate(images):
        _normalise_into(_cropped(img, pp), pp, out[i])
    return out


def _cropped(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """Resize and centre crop: (input_size, input_size, 3) uint8, or (input_size, input_size) for a
    grayscale image (its three RGB channels are that one plane)."""
    resized = resize_shorter(_rgb_or_gray(img), pp.resize_size, pp.interpolation)
    return np.asarray(center_crop(resized, pp.input_size))


def _normalise_into(pixels: np.ndarray, pp: Preprocessing, out: np.ndarray) -> None:
    """(H, W, 3) uint8, or (H, W) for gray -> ``out`` (3, H, W) float32, normalised: one table
    lookup per value.

    Each output value depends only on its byte and channel, so a 256-entry table per channel,
    computed with torchvision's float32 operations (ToTensor + Normalize: ``(x / 255 - mean) /
    std``), gives the same values to the bit as computing every pixel (tests/test_preprocess.py
    checks all 768 entries against torchvision), in about a third of the time.
    """
    table = _normalisation_table(tuple(pp.mean), tuple(pp.std))
    planes = (pixels,) * 3 if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))
    for c in range(3):
        # mode="clip": a uint8 index is always inside the table, so numpy's bounds check is skipped.
        np.take(table[c], planes[c], out=out[c], mode="clip")


@functools.lru_cache(maxsize=16)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: every byte value of every channel, normalised (read-only)."""
    table = np.repeat(np.arange(256, dtype=np.float32)[None, :], 3, axis=0)
    table /= np.float32(255.0)
    m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    for c in range(3):
        table[c] -= m[c]
        table[c] /= s[c]
    table.flags.writeable = False
    return table
