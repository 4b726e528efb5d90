"""Bounds on what edgetl reads: preprocessing records, untrusted JSON, image sizes (reliability, round two)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgetl.core.atomic import write_json_atomic
from edgetl.core.errors import BundleError, DataError
from edgetl.core.jsonio import dumps, loads
from edgetl.core.preprocess import (
    MAX_ASPECT_RATIO,
    MAX_DECODED_BYTES,
    Preprocessing,
    load_image,
    preprocess,
)
from edgetl.device.bundle_loading import open_bundle
from tests.bundle_factory import build_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("limits") / "b")


@pytest.fixture
def fresh_bundle(tmp_path, bundle_dir):
    return shutil.copytree(bundle_dir, tmp_path / "copy")


def _edit_preprocessing(bundle, **values):
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m["preprocessing"].update(values)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"std": [0.0, 0.0, 0.0]}, "std must be > 0"),
        ({"std": [0.2, -0.1, 0.2]}, "std must be > 0"),
        ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
        ({"input_size": 0}, "input_size 0 is outside"),
        ({"input_size": -32}, "input_size -32 is outside"),
        ({"input_size": 100000, "resize_size": 100000}, "input_size 100000 is outside"),
        ({"input_size": 32.5}, "expected an integer"),
        ({"resize_size": 100000}, "resize_size 100000 must be between"),
        ({"resize_size": 4}, "must be between input_size"),
        ({"interpolation": "magic"}, "interpolation must be one of"),
    ],
)
def test_bad_preprocessing_is_one_line_bundle_error(fresh_bundle, values, words):
    _edit_preprocessing(fresh_bundle, **values)
    with pytest.raises(BundleError, match=words) as err:
        open_bundle(fresh_bundle)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_nan_and_infinity_in_a_manifest_are_refused(fresh_bundle):
    path = fresh_bundle / "manifest.json"
    text = path.read_text().replace('"mean": [', '"mean": [NaN, ', 1)
    path.write_text(text)
    with pytest.raises(BundleError, match="NaN is not JSON"):
        open_bundle(fresh_bundle)


def test_a_deeply_nested_manifest_is_one_line(fresh_bundle):
    (fresh_bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested") as err:
        open_bundle(fresh_bundle)
    assert "\n" not in str(err.value)


def test_json_depth_is_checked_without_recursion():
    with pytest.raises(Exception, match="nested more than 64"):
        loads("[" * 65 + "]" * 65, what="x")
    assert loads("[" * 60 + "]" * 60, what="x") is not None


def test_written_json_is_strict(tmp_path):
    """NaN and Infinity are not JSON: everything edgetl writes has null there instead."""
    write_json_atomic(tmp_path / "m.json", {"a": math.nan, "b": [math.inf, 1.5], "c": np.float32("nan")})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}")) == {
        "a": None,
        "b": [None, 1.5],
        "c": None,
    }
    assert dumps({"x": -math.inf}) == '{"x": null}'


def _png_header_only(path, width: int, height: int, *, bit_depth: int = 8, colour_type: int = 6) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` (the pixel data is a stub): the size
    checks must refuse it before anything is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_decoded_size_counts_bands_and_depth(tmp_path):
    """12000 x 12000 is under the pixel cap, but RGBA takes 576 MB decoded: refused, from a ~100 B file."""
    path = tmp_path / "rgba.png"
    _png_header_only(path, 12000, 12000, colour_type=6)
    assert MAX_DECODED_BYTES < 12000 * 12000 * 4
    with pytest.raises(DataError, match=r"would take .* GB decoded"):
        load_image(path)


def test_extreme_aspect_ratio_is_refused(tmp_path):
    """Resizing a 1-pixel-high strip's short side to 256 would allocate 256 x (256 x its length)."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 8 + 1, 8)).save(path)
    with pytest.raises(DataError, match="elongated"):
        load_image(path)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 8, 8)).save(ok)
    assert load_image(ok).size == (MAX_ASPECT_RATIO * 8, 8)


def test_reducing_at_load_time_is_exact(tmp_path):
    """load_image(path, pp) holds a small image, and preprocess gives the same array to the bit."""
    rng = np.random.default_rng(0)
    path = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 255, (900, 1300, 3), dtype=np.uint8)).save(path)
    pp = Preprocessing(input_size=64, resize_size=73)
    small = load_image(path, pp)
    assert min(small.size) == 73
    np.testing.assert_array_equal(preprocess(small, pp), preprocess(load_image(path), pp))


def test_the_bundle_format_name_is_the_published_one(bundle_dir):
    """A bundle written before the packages moved must still open: the schema name is data, not a
    module path."""
    from edgetl.core.bundle import SCHEMA

    assert SCHEMA == "edgetl.bundle"
    assert json.loads((bundle_dir / "manifest.json").read_text())["schema"] == "edgetl.bundle"
