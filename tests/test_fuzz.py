"""Fuzzing the readers of untrusted input: any input ends in a result or an edgetl error.

Bounded example counts keep this in the default run (CI included).
"""

import io
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgetl.core.bundle import read_manifest, validate_manifest
from edgetl.core.errors import EdgetlError
from edgetl.core.preprocess import Preprocessing, load_image, preprocess
from edgetl.workstation.recipes import make_config

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)

MANIFEST_KEYS = ["schema", "schema_version", "backbone", "preprocessing", "heads", "files", "variants", "default_head"]


def _manifest_like():
    """Mostly-valid skeletons with fuzzed parts: reaches deep validation, not only the first check."""
    return st.fixed_dictionaries(
        {
            "schema": st.sampled_from(["edgetl.bundle", "other"]),
            "schema_version": st.sampled_from([1, 2, "1", None]),
        },
        optional=dict.fromkeys(MANIFEST_KEYS[2:], json_values),
    )


@FAST
@given(st.one_of(json_values, _manifest_like()))
def test_manifest_validation_never_crashes(tmp_path, doc):
    try:
        validate_manifest(doc, tmp_path)
    except EdgetlError:
        pass


@FAST
@given(st.binary(max_size=300))
def test_manifest_file_bytes_never_crash(tmp_path, data):
    (tmp_path / "manifest.json").write_bytes(data)
    try:
        read_manifest(tmp_path)
    except EdgetlError:
        pass


@FAST
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "epochs",
                "lr",
                "backbone",
                "strategy",
                "img_size",
                "dropout",
                "device",
                "amp",
                "seed",
                "mixup",
                "workers",
                "unknown_key",
                "batch_size",
            ]
        ),
        json_values,
        max_size=5,
    )
)
def test_recipe_values_never_crash(tmp_path, values):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        make_config(str(path), {})
    except EdgetlError:
        pass


@FAST
@given(st.text(max_size=200))
def test_recipe_text_never_crashes(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        make_config(str(path), {})
    except EdgetlError:
        pass


@FAST
@given(st.binary(max_size=400))
def test_image_bytes_never_crash(tmp_path, data):
    path = tmp_path / "x.png"
    path.write_bytes(data)
    try:
        load_image(path)
    except EdgetlError:
        pass


def _png_prefix() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 7), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


@FAST
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_corrupted_real_png_never_crashes(tmp_path, offset, junk):
    data = bytearray(_png_prefix())
    data[offset % len(data) : offset % len(data) + len(junk)] = junk
    path = tmp_path / "x.png"
    path.write_bytes(bytes(data))
    try:
        img = load_image(path)
        assert img.mode == "RGB"
    except EdgetlError:
        pass


@FAST
@given(
    st.integers(1, 60),
    st.integers(1, 60),
    st.sampled_from(["L", "RGB", "RGBA", "P", "CMYK", "I;16", "LA", "1"]),
    st.integers(8, 40),
    st.sampled_from(["bilinear", "bicubic", "nearest"]),
)
def test_preprocess_any_mode_and_size(w, h, mode, size, interp):
    rng = np.random.default_rng(w * 100 + h)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    pp = Preprocessing(input_size=size, resize_size=size + 4, interpolation=interp)
    out = preprocess(img, pp)
    assert out.shape == (3, size, size) and out.dtype == np.float32 and np.isfinite(out).all()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_real_manifest_never_crashes_the_runtime(tmp_path_factory, data):
    """One leaf of a real bundle's manifest replaced by arbitrary JSON: open_bundle errors cleanly."""
    import copy
    import shutil

    from edgetl.device.bundle_loading import open_bundle
    from tests.bundle_factory import build_bundle
    from tests.helpers import json_paths

    base = tmp_path_factory.getbasetemp() / "fuzz-base"
    if not base.exists():
        build_bundle(base)
    manifest = json.loads((base / "manifest.json").read_text())
    paths = sorted(json_paths(manifest), key=repr)
    path = data.draw(st.sampled_from(paths))
    value = data.draw(json_values)
    mutated = copy.deepcopy(manifest)
    if not path:
        mutated = value
    else:
        target = mutated
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    work = tmp_path_factory.mktemp("m")
    shutil.copytree(base, work, dirs_exist_ok=True)
    (work / "manifest.json").write_text(json.dumps(mutated))
    try:
        bundle = open_bundle(work)
        bundle.load()
    except EdgetlError:
        pass
