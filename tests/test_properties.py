"""Property: whatever the manifest, the images and the options, `edgetl predict` and `edgetl bench`
end in a result (exit 0, strict JSON) or one line and a non-zero exit, never a traceback.

Each example mutates a valid bundle's manifest (one leaf replaced by arbitrary JSON, or left valid),
writes images that are valid, truncated, random bytes or odd sizes, and draws option values from
valid, edge and absurd ones. The default run takes a bounded number of examples; the slow suite
(`make test`, CI) runs many more.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgetl.cli import main
from tests.bundle_factory import build_bundle
from tests.helpers import json_paths

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)


@st.composite
def manifests(draw, manifest):
    if draw(st.booleans()):
        return manifest  # valid: the other inputs get exercised on a bundle that opens
    path = draw(st.sampled_from(sorted(json_paths(manifest), key=repr)))
    value = draw(json_values)
    if not path:
        return value
    mutated = copy.deepcopy(manifest)
    target = mutated
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return mutated


@st.composite
def image_files(draw):
    kind = draw(st.sampled_from(["png", "jpeg", "truncated", "bytes", "tiny", "strip", "mode"]))
    w = draw(st.integers(1, 64))
    h = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**16))
    return kind, w, h, seed


def _write_image(path, spec) -> str:
    kind, w, h, seed = spec
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    if kind in ("png", "truncated"):
        target = path.with_suffix(".png")
        Image.fromarray(pixels).save(target)
        if kind == "truncated":
            data = target.read_bytes()
            target.write_bytes(data[: max(8, len(data) // 2)])
    elif kind == "jpeg":
        target = path.with_suffix(".jpg")
        Image.fromarray(pixels).save(target, quality=80)
    elif kind == "bytes":
        target = path.with_suffix(".png")
        target.write_bytes(rng.integers(0, 255, w * h, dtype=np.uint8).tobytes())
    elif kind == "tiny":
        target = path.with_suffix(".png")
        Image.fromarray(pixels[:1, :1]).save(target)
    elif kind == "strip":
        target = path.with_suffix(".png")
        Image.new("RGB", (w * 100, 1)).save(target)
    else:
        target = path.with_suffix(".png")
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(target)  # 16-bit greyscale
    return str(target)


ints = st.sampled_from(["0", "-1", "1", "2", "3", "100000", "nan", "1e9", "x"])
predict_options = st.fixed_dictionaries(
    {},
    optional={
        "--top-k": ints,
        "--batch-size": ints,
        "--threads": ints,
        "--precision": st.sampled_from(["fp32", "int8", "fp16", "bf16", "x"]),
        "--runtime": st.sampled_from(["onnxruntime", "openvino", "x"]),
        "--head": st.sampled_from(["colour", "all", "nope", ""]),
    },
)
bench_options = st.fixed_dictionaries(
    {"--iterations": st.sampled_from(["1", "2"]), "--warmup": st.sampled_from(["0", "1"])},
    optional={
        "--batch-size": ints,
        "--threads": ints,
        "--precision": st.sampled_from(["fp32", "int8", "x"]),
        "--head": st.sampled_from(["colour", "all", "nope"]),
    },
)


def _assert_clean(result, as_json: bool) -> None:
    """Exit 0 with strict JSON, or a one-line error (exit 1, Click's usage error exit 2)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    if result.exit_code == 0:
        if as_json:
            json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
        return
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr


def _prepared_bundle(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "property-base"
    if not base.exists():
        build_bundle(base)
    return base, json.loads((base / "manifest.json").read_text())


def _property(tmp_path_factory, data, command: str) -> None:
    base, manifest = _prepared_bundle(tmp_path_factory)
    work = tmp_path_factory.mktemp("p")
    bundle = work / "b"
    shutil.copytree(base, bundle)
    (bundle / "manifest.json").write_text(json.dumps(data.draw(manifests(manifest)), allow_nan=True))
    if command == "predict":
        images = work / "images"
        images.mkdir()
        for i, spec in enumerate(data.draw(st.lists(image_files(), min_size=1, max_size=4))):
            _write_image(images / f"{i:02d}", spec)
        options = data.draw(predict_options)
        args = ["predict", str(bundle), str(images), "--json"]
    else:
        options = data.draw(bench_options)
        args = ["bench", str(bundle), "--json", "--no-cold-start"]
    args += [w for pair in options.items() for w in pair]
    result = CliRunner().invoke(main, args)
    _assert_clean(result, as_json=True)


QUICK = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
MANY = settings(
    max_examples=int(os.environ.get("EDGETL_PROPERTY_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@QUICK
@given(st.data())
def test_predict_ends_in_a_result_or_one_line(tmp_path_factory, data):
    _property(tmp_path_factory, data, "predict")


@QUICK
@given(st.data())
def test_bench_ends_in_a_result_or_one_line(tmp_path_factory, data):
    _property(tmp_path_factory, data, "bench")


@pytest.mark.slow
@MANY
@given(st.data())
def test_predict_property_many_examples(tmp_path_factory, data):
    _property(tmp_path_factory, data, "predict")


@pytest.mark.slow
@MANY
@given(st.data())
def test_bench_property_many_examples(tmp_path_factory, data):
    _property(tmp_path_factory, data, "bench")


# --- options: any value of any training or export setting is a config or one ConfigError line --------

option_values = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
    | st.text(max_size=8)
)


@st.composite
def train_options(draw):
    import dataclasses

    from edgetl.workstation.options import TrainConfig

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    return {name: draw(option_values) for name in chosen}


@settings(max_examples=300, deadline=None)
@given(train_options())
def test_any_training_option_value_is_accepted_or_one_line(values):
    from edgetl.core.errors import ConfigError
    from edgetl.workstation.options import TrainConfig

    try:
        config = TrainConfig(**values)
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        return
    for name, value in values.items():  # accepted: kept as given, and never a NaN or an infinity
        assert getattr(config, name) == value
        assert not (isinstance(value, float) and not math.isfinite(value)), (name, value)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={"calib_size": option_values, "max_drop": option_values, "merged": option_values},
    )
)
def test_any_export_option_value_is_accepted_or_one_line(values):
    from edgetl.core.errors import ConfigError
    from edgetl.workstation.export import resolve_options

    try:
        options = resolve_options(formats=("onnx",), **values)
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        return
    assert options.calib_size >= 1 and options.max_drop == options.max_drop  # not NaN


@pytest.mark.slow
def test_every_manifest_leaf_of_every_wrong_type_is_one_line(tmp_path_factory):
    """Exhaustive where the property tests sample: each leaf of a real manifest replaced by each of
    seven wrong types; predict and bench end in a result or one line (it found unvalidated
    `bytes`, tensor `shape` and variant `metrics` fields that ended in tracebacks)."""
    from tests.bundle_factory import write_colour_images

    base, manifest = _prepared_bundle(tmp_path_factory)
    images_dir = tmp_path_factory.mktemp("leaf-images")
    write_colour_images(images_dir)
    for path in sorted(json_paths(manifest), key=repr):
        if not path:
            continue
        for value in (1.5, "x", None, [1], {"a": 1}, -3, True):
            mutated = copy.deepcopy(manifest)
            target = mutated
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            work = tmp_path_factory.mktemp("leaf")
            shutil.copytree(base, work / "b")
            (work / "b" / "manifest.json").write_text(json.dumps(mutated))
            for args in (
                ["predict", str(work / "b"), str(images_dir), "--json"],
                ["bench", str(work / "b"), "--json", "--no-cold-start", "--iterations", "1", "--warmup", "0"],
            ):
                result = CliRunner().invoke(main, args)
                assert result.exception is None or isinstance(result.exception, SystemExit), (path, value, args[0])
            shutil.rmtree(work)
