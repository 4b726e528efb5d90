"""edgetl.device.runtime and `edgetl predict` on tiny torch-free bundles (tests/bundle_factory.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.core import formats
from edgetl.core.bundle import sha256_file
from edgetl.core.errors import BackendError, BundleError, ConfigError, DataError
from edgetl.device.backends import RUNTIMES
from edgetl.device.backends import onnxruntime as ort_backend
from edgetl.device.backends import openvino as ov_backend
from edgetl.device.bundle_loading import open_bundle
from edgetl.device.images import predict_files
from edgetl.device.predictor import softmax
from tests.bundle_factory import COLOURS, MEAN, STD, build_bundle, write_colour_images


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def two_head_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle2") / "b", heads=("colour", "brightness"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_colour_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def fresh_bundle(tmp_path, bundle_dir):
    """A private copy to tamper with."""
    return shutil.copytree(bundle_dir, tmp_path / "copy")


def _edit_manifest(bundle, edit):
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


# --- opening and verifying -------------------------------------------------------------------------


def test_open_bundle_exposes_contract(bundle_dir):
    b = open_bundle(bundle_dir)
    assert b.preprocessing.input_size == 32 and b.preprocessing.mean == MEAN
    assert b.heads == {"colour": ("red", "green", "blue")}
    assert b.default_head == "colour"
    assert b.variants == ("onnx-fp32", "onnx-int8")
    assert b.variant("onnx", "int8")["trunk"] == "onnx/trunk.int8.onnx"
    assert b.precisions("onnx") == ["fp32", "int8"]


def test_flipped_byte_is_refused_naming_the_file(fresh_bundle):
    path = fresh_bundle / "onnx" / "trunk.int8.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"onnx/trunk\.int8\.onnx does not match its sha256"):
        open_bundle(fresh_bundle)
    open_bundle(fresh_bundle, verify=False)  # explicit opt-out still reads the manifest


def test_missing_file_is_refused(fresh_bundle):
    (fresh_bundle / "onnx" / "head.colour.onnx").unlink()
    with pytest.raises(BundleError, match=r"onnx/head\.colour\.onnx is missing"):
        open_bundle(fresh_bundle)


def test_wrong_schema_is_refused(fresh_bundle):
    _edit_manifest(fresh_bundle, lambda m: m.update(schema="something.else"))
    with pytest.raises(BundleError, match="schema"):
        open_bundle(fresh_bundle)


def test_newer_schema_version_asks_for_upgrade(fresh_bundle):
    _edit_manifest(fresh_bundle, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="upgrade edgetl"):
        open_bundle(fresh_bundle)


def test_path_traversal_in_files_is_refused(fresh_bundle):
    def edit(m):
        m["files"]["../outside.onnx"] = m["files"]["onnx/head.colour.onnx"]

    _edit_manifest(fresh_bundle, edit)
    with pytest.raises(BundleError, match="escapes the bundle"):
        open_bundle(fresh_bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(tmp_path)
    with pytest.raises(BundleError, match="not a bundle folder"):
        open_bundle(tmp_path / "nope")


def test_file_onnxruntime_cannot_load_is_a_bundle_error(fresh_bundle):
    # Checksums match (the manifest is updated too), but the bytes are no ONNX model.
    rel = "onnx/trunk.fp32.onnx"
    (fresh_bundle / rel).write_bytes(b"not an onnx model")
    _edit_manifest(fresh_bundle, lambda m: m["files"][rel].update(sha256=sha256_file(fresh_bundle / rel)))
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        open_bundle(fresh_bundle).load()


# --- choosing a variant ------------------------------------------------------------------------------


def test_load_defaults_to_fp32_and_default_head(bundle_dir):
    p = open_bundle(bundle_dir).load()
    assert (p.variant, p.precision, p.runtime, p.head_names) == ("onnx-fp32", "fp32", "onnxruntime", ("colour",))
    assert open_bundle(bundle_dir).load(precision="int8", threads=1).variant == "onnx-int8"


def test_only_precision_is_the_default(tmp_path):
    b = build_bundle(tmp_path / "b", precisions=("int8",))
    assert open_bundle(b).load().precision == "int8"


def test_absent_precision_lists_what_the_bundle_has(bundle_dir):
    with pytest.raises(BundleError, match=r"no fp16 variant .*fp32, int8"):
        open_bundle(bundle_dir).load(precision="fp16")


def test_openvino_not_in_bundle_is_a_backend_error(bundle_dir):
    with pytest.raises(BackendError, match=r"no openvino files .*onnx-fp32, onnx-int8"):
        open_bundle(bundle_dir).load(runtime="openvino")


def test_unknown_runtime_and_bad_threads(bundle_dir):
    with pytest.raises(ConfigError, match="unknown runtime 'tflite'"):
        open_bundle(bundle_dir).load(runtime="tflite")
    with pytest.raises(ConfigError, match="threads"):
        open_bundle(bundle_dir).load(threads=0)


def test_head_selection(two_head_bundle, tmp_path):
    b = open_bundle(two_head_bundle)
    assert b.load(heads="all").head_names == ("colour", "brightness")
    assert b.load(heads="brightness").head_names == ("brightness",)
    with pytest.raises(BundleError, match=r"no head 'shape' .*colour, brightness"):
        b.load(heads="shape")
    no_default = build_bundle(tmp_path / "nd", heads=("colour", "brightness"), default_head=None)
    with pytest.raises(BundleError, match="--head NAME or --head all"):
        open_bundle(no_default).load()


# --- running -----------------------------------------------------------------------------------------


def _solid(rgb, size=(40, 48)):
    return Image.new("RGB", size, rgb)


def test_features_and_logits_match_the_graph(two_head_bundle):
    p = open_bundle(two_head_bundle).load(heads="all")
    x = p.preprocess([_solid(COLOURS["red"]), _solid(COLOURS["blue"])])
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    feats = p.features(x)
    assert feats.shape == (2, 8)
    expected = (np.array(COLOURS["red"]) / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(feats[0, :3], expected, atol=1e-5)
    logits = p.logits(x)
    assert set(logits) == {"colour", "brightness"}
    assert logits["colour"].shape == (2, 3) and logits["brightness"].shape == (2, 2)
    np.testing.assert_allclose(logits["colour"][0], 4.0 * expected, atol=1e-4)


def test_trunk_runs_once_for_several_heads(two_head_bundle, monkeypatch):
    import onnxruntime as ort

    p = open_bundle(two_head_bundle).load(heads="all")
    feeds = []
    original = ort.InferenceSession.run

    def counting_run(self, output_names, input_feed, *args, **kwargs):
        feeds.append(next(iter(input_feed)))
        return original(self, output_names, input_feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counting_run)
    p.logits(p.preprocess([_solid((10, 20, 30))] * 3))
    assert feeds.count("image") == 1
    assert feeds.count("features") == 2


def test_wrong_input_shape_is_a_data_error(bundle_dir):
    p = open_bundle(bundle_dir).load()
    with pytest.raises(DataError, match=r"\(N, 3, 32, 32\)"):
        p.features(np.zeros((1, 3, 16, 16), dtype=np.float32))


def test_predict_labels_scores_and_top_k(bundle_dir, images):
    p = open_bundle(bundle_dir).load()
    paths = sorted(images)
    records = p.predict(paths, top_k=2, batch_size=2)
    assert [r["image"] for r in records] == paths
    for r in records:
        assert set(r) == {"image", "head", "label", "score", "top_k"}
        assert r["label"] == images[r["image"]] and r["head"] == "colour"
        assert len(r["top_k"]) == 2
        assert r["top_k"][0] == {"label": r["label"], "score": r["score"]}
        assert 1.0 >= r["top_k"][0]["score"] >= r["top_k"][1]["score"] >= 0.0
    assert len(p.predict(paths[:1], top_k=10)[0]["top_k"]) == 3  # at most the number of labels
    assert p.predict(paths, batch_size=1) == p.predict(paths, batch_size=32)


def test_predict_pil_images_and_all_heads(two_head_bundle):
    p = open_bundle(two_head_bundle).load(heads="all")
    records = p.predict([_solid(COLOURS["green"]), _solid((250, 250, 250))])
    assert [(r["image"], r["head"]) for r in records] == [
        ("<image 0>", "colour"),
        ("<image 0>", "brightness"),
        ("<image 1>", "colour"),
        ("<image 1>", "brightness"),
    ]
    assert records[0]["label"] == "green"
    assert records[3]["label"] == "bright"
    total = sum(t["score"] for t in records[1]["top_k"])
    assert total == pytest.approx(1.0)


def test_predict_option_checks(bundle_dir, images):
    p = open_bundle(bundle_dir).load()
    with pytest.raises(ConfigError, match="top-k"):
        p.predict(list(images), top_k=0)
    with pytest.raises(ConfigError, match="batch-size"):
        p.predict(list(images), batch_size=0)


def test_softmax_is_stable():
    s = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(s, [[1.0, 0.0], [0.5, 0.5]])


def test_predict_files_skips_unreadable(bundle_dir, tmp_path):
    folder = tmp_path / "imgs"
    write_colour_images(folder / "nested", corrupt=True)
    (folder / "notes.txt").write_text("not an image, not an image extension")
    p = open_bundle(bundle_dir).load()
    report = predict_files(p, [folder], batch_size=2)
    assert len(report.predictions) == 3
    assert len(report.skipped) == 1 and report.skipped[0][0].endswith("broken.png")
    assert "cannot read image" in report.skipped[0][1]


def test_predict_files_errors(bundle_dir, tmp_path):
    p = open_bundle(bundle_dir).load()
    with pytest.raises(DataError, match="does not exist"):
        predict_files(p, [tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        predict_files(p, [tmp_path / "empty"])
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 1 image"):
        predict_files(p, [tmp_path / "bad.png"])


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_runtimes_mirror_the_library():
    from edgetl.cli import _runtime_options

    assert _runtime_options.RUNTIMES == RUNTIMES == tuple(formats.RUNTIMES)


def test_cli_predict_table(bundle_dir, images):
    result = CliRunner().invoke(main, ["predict", str(bundle_dir), *images])
    assert result.exit_code == 0, result.output
    assert "onnx-fp32" in result.stdout
    for colour in COLOURS:
        assert colour in result.stdout


def test_cli_predict_json_folder_with_corrupt_image(bundle_dir, tmp_path):
    write_colour_images(tmp_path / "imgs", corrupt=True)
    result = CliRunner().invoke(
        main, ["predict", str(bundle_dir), str(tmp_path / "imgs"), "--json", "--top-k", "2", "--precision", "int8"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert len(rows) == 3
    assert all({"image", "label", "score", "top_k"} <= set(r) for r in rows)
    assert "Skipped 1 unreadable image" in result.stderr and "broken.png" in result.stderr


def test_cli_predict_head_all(two_head_bundle, images):
    result = CliRunner().invoke(main, ["predict", str(two_head_bundle), *images, "--head", "all", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert len(rows) == 2 * len(images)
    assert {r["head"] for r in rows} == {"colour", "brightness"}
    table = CliRunner().invoke(main, ["predict", str(two_head_bundle), *images, "--head", "all"])
    assert table.exit_code == 0 and "brightness" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runtime", "openvino"], "no openvino files"),
        (["--precision", "fp16"], "no fp16 variant"),
        (["--head", "shape"], "no head 'shape'"),
    ],
)
def test_cli_predict_user_errors_are_one_line(bundle_dir, images, args, message):
    result = CliRunner().invoke(main, ["predict", str(bundle_dir), *images, *args])
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_predict_tampered_bundle(fresh_bundle, images):
    (fresh_bundle / "onnx" / "head.colour.onnx").write_bytes(b"tampered")
    result = CliRunner().invoke(main, ["predict", str(fresh_bundle), *images])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "onnx/head.colour.onnx" in result.stderr
    assert "Traceback" not in result.output


def test_cli_help_has_examples():
    for command in ("predict", "bench"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0
        assert "Example:" in result.output


def _add_openvino_variant(bundle):
    """Placeholder OpenVINO files: enough for the manifest and checksums, not for a real load."""
    from edgetl.core.bundle import file_record

    (bundle / "openvino").mkdir()
    (bundle / "openvino" / "trunk.fp32.xml").write_text("<net/>")
    (bundle / "openvino" / "trunk.fp32.bin").write_bytes(b"\0" * 8)

    def edit(m):
        m["files"]["openvino/trunk.fp32.xml"] = file_record(
            bundle,
            "openvino/trunk.fp32.xml",
            fmt="openvino",
            precision="fp32",
            role="trunk",
            head=None,
            inputs=[],
            outputs=[],
            derived_from="onnx/trunk.fp32.onnx",
            extra_files=("openvino/trunk.fp32.bin",),
        )
        m["variants"]["openvino-fp32"] = {
            "format": "openvino",
            "precision": "fp32",
            "trunk": "openvino/trunk.fp32.xml",
            "heads": {"colour": "onnx/head.colour.onnx"},
        }

    _edit_manifest(bundle, edit)


def test_openvino_not_installed_and_broken_ir(fresh_bundle, monkeypatch):
    import importlib.util

    _add_openvino_variant(fresh_bundle)
    b = open_bundle(fresh_bundle)
    assert b.precisions("openvino") == ["fp32"]
    files = b.manifest["files"]
    expected = files["openvino/trunk.fp32.xml"]["bytes"] + 8 + files["onnx/head.colour.onnx"]["bytes"]
    assert b.model_bytes(b.variant("openvino", "fp32"), ["colour"]) == expected  # the .bin counts
    assert b.load().variant == "onnx-fp32"  # the ONNX variants are unaffected
    if importlib.util.find_spec("openvino") is not None:
        # Checksums match but the IR is not one: OpenVINO's refusal names the file.
        with pytest.raises(BundleError, match=r"OpenVINO cannot load .*trunk\.fp32\.xml"):
            b.load(runtime="openvino")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real_find_spec(name, *a)
    )
    with pytest.raises(BackendError, match=r"'openvino' is not installed: pip install 'edgetl\[openvino\]'"):
        b.load(runtime="openvino")


# --- providers and devices ---------------------------------------------------------------------------


def test_cpu_provider_by_short_and_full_name(bundle_dir):
    x = np.zeros((1, 3, 32, 32), dtype=np.float32)
    b = open_bundle(bundle_dir)
    a = b.load(provider="cpu").logits(x)["colour"]
    c = b.load(provider="CPUExecutionProvider", provider_options={}).logits(x)["colour"]
    np.testing.assert_array_equal(a, c)


def test_unavailable_provider_lists_what_is_installed(bundle_dir):
    import onnxruntime as ort

    missing = next(
        p for p in ("tensorrt", "cuda", "coreml") if ort_backend.PROVIDERS[p][0] not in ort.get_available_providers()
    )
    with pytest.raises(BackendError, match=rf"provider '{missing}' is not in this build .*has: cpu") as info:
        open_bundle(bundle_dir).load(provider=missing)
    assert ort_backend.PROVIDERS[missing][1] in str(info.value)  # how to get it
    with pytest.raises(ConfigError, match="unknown ONNX Runtime provider 'warp-drive'; choose one of cpu, cuda"):
        open_bundle(bundle_dir).load(provider="warp-drive")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider")
def test_provider_that_falls_back_to_cpu_is_refused(bundle_dir, monkeypatch):
    """A CUDA build on a machine without a usable GPU: ORT warns and runs on the CPU; edgetl refuses."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA really is available here")
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    with pytest.raises(BackendError, match="provider 'cuda' is installed but did not start"):
        open_bundle(bundle_dir).load(provider="cuda")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"streams": 2}, "--streams applies to --runtime openvino, not onnxruntime"),
        ({"device": "CPU"}, "--openvino-device with --runtime onnxruntime needs --provider openvino"),
        ({"streams": 0}, "streams must be an integer >= 1"),
        ({"runtime": "openvino", "provider": "cpu"}, "--provider applies to --runtime onnxruntime, not openvino"),
    ],
)
def test_options_of_the_other_runtime_are_refused(bundle_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        open_bundle(bundle_dir).load(**kwargs)


def test_onnxruntime_providers_lists_local_ones():
    import onnxruntime as ort

    names = ort_backend.onnxruntime_providers()
    assert "cpu" in names and "AzureExecutionProvider" not in names
    assert len(names) == len([p for p in ort.get_available_providers() if p != "AzureExecutionProvider"])


@pytest.fixture(scope="module")
def ov_bundle(tmp_path_factory):
    pytest.importorskip("openvino")
    return build_bundle(
        tmp_path_factory.mktemp("ov") / "b", heads=("colour", "brightness"), formats=("onnx", "openvino")
    )


def test_openvino_devices_threads_and_streams(ov_bundle):
    import openvino as ov

    available = ov.Core().available_devices
    assert ov_backend.openvino_devices() == list(available)
    b = open_bundle(ov_bundle)
    x = b.load().preprocess([_solid(COLOURS["red"])])
    expected = b.load(heads="all").logits(x)
    for device in ("CPU", "cpu", "AUTO", "AUTO:CPU"):
        got = b.load(runtime="openvino", heads="all", device=device, threads=1, streams=1).logits(x)
        for head in expected:
            np.testing.assert_allclose(got[head], expected[head], atol=1e-4)
    absent = next(d for d in ("NPU", "GPU") if not any(a.startswith(d) for a in available))
    with pytest.raises(BackendError, match=rf"OpenVINO device '{absent}' is not available here \(OpenVINO has: CPU"):
        b.load(runtime="openvino", device=absent)
    with pytest.raises(BackendError, match=rf"device '{absent}' is not available"):
        b.load(runtime="openvino", device=f"AUTO:{absent},CPU")


def test_backends_are_registered_from_the_format_table():
    from edgetl.device import backends

    assert tuple(backends.BACKENDS) == tuple(formats.RUNTIMES)
    for runtime, b in backends.BACKENDS.items():
        row = formats.RUNTIMES[runtime]
        assert (b.format, b.module, b.install_hint) == (row.name, row.runtime_module, row.install_hint)
        assert b.loader is not None and isinstance(b.options, tuple)
    with pytest.raises(ValueError, match="already registered"):
        backends.register(backends.BACKENDS["onnxruntime"])
