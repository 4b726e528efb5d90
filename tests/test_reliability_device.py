"""Reliability, round two (device side): broken models, strict JSON, bounded image memory, graph
checks against the manifest, bounds on numeric options, and pack/unpack/deploy member rules."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.core.bundle import read_manifest, sha256_file, write_manifest
from edgetl.core.errors import BundleError, ConfigError, DataError
from edgetl.device import evaluate as evaluate_mod
from edgetl.device import images as images_mod
from edgetl.device import pack as pack_mod
from edgetl.device.bundle_loading import open_bundle
from edgetl.device.images import PredictionStream
from tests.bundle_factory import build_bundle, colour_head_weights, write_colour_images, write_head


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _rerecord(bundle: Path, rel: str, edit=None) -> None:
    """Re-hash one file in the manifest (after it was rewritten), and apply ``edit`` to the manifest."""
    m = read_manifest(bundle)
    m["files"][rel]["sha256"] = sha256_file(bundle / rel)
    m["files"][rel]["bytes"] = (bundle / rel).stat().st_size
    if edit is not None:
        edit(m)
    write_manifest(bundle, m)


@pytest.fixture
def bundle(tmp_path):
    return build_bundle(tmp_path / "b", precisions=("fp32",))


@pytest.fixture
def imgs(tmp_path):
    write_colour_images(tmp_path / "imgs")
    return tmp_path / "imgs"


# --- non-finite logits, strict JSON ---------------------------------------------------------------


def test_nan_logits_refused_with_one_line(bundle, imgs):
    w, b = colour_head_weights()
    write_head(bundle / "onnx/head.colour.onnx", w, np.full_like(b, np.nan))
    _rerecord(bundle, "onnx/head.colour.onnx")
    result = CliRunner().invoke(main, ["predict", str(bundle), str(imgs), "--json"])
    assert result.exit_code == 1
    assert "variant onnx-fp32 produced non-finite logits for head colour (NaN)" in result.stderr
    assert "Traceback" not in result.output
    doc = _strict_json(result.stdout)  # one strict document: the error closes it, no bare NaN anywhere
    assert doc["partial"] is True and doc["error"]["exit_code"] == 1 and "non-finite" in doc["error"]["message"]
    assert all(record["score"] is None or record["score"] == record["score"] for record in doc["results"])


def test_nan_features_refused(bundle):
    predictor = open_bundle(bundle).load()
    x = np.full((1, 3, 32, 32), np.inf, dtype=np.float32)
    with pytest.raises(BundleError, match="non-finite features"):
        predictor.features(x)


def test_emit_json_is_strict(capsys):
    from edgetl.cli._common import emit_json

    emit_json({"score": float("nan"), "x": [float("inf")]})
    assert _strict_json(capsys.readouterr().out) == {"score": None, "x": [None]}


def test_streamed_json_is_strict():
    from edgetl.cli import predict_cmd

    class Summary:
        def to_dict(self):
            return {"images": 1, "seconds": float("inf")}

    class Stream:
        summary = Summary()

    out = io.StringIO()
    with click.Context(main) as ctx:
        predict_cmd._stream_json(ctx, iter([{"image": "a", "score": float("nan")}]), Stream(), out, {"bundle": "b"})
    doc = _strict_json(out.getvalue())
    assert doc["results"] == [{"image": "a", "score": None}] and doc["summary"]["seconds"] is None
    assert doc["schema"] == "edgetl.predict" and doc["bundle"] == "b"


# --- memory bounded by the model, skipped images with reasons -----------------------------------


def test_stream_reduces_images_as_soon_as_decoded(bundle, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("RGB", (1200, 900), (200, 20, 20)).save(folder / "big.png")
    predictor = open_bundle(bundle).load()
    seen = []
    real = predictor.preprocess

    def spy(images):
        images = list(images)
        seen.extend(im.size for im in images)
        return real(images)

    predictor.preprocess = spy
    records = list(PredictionStream(predictor, [folder]))
    assert records[0]["label"] == "red"
    assert seen == [(48, 36)]  # the resize size (36) on the shorter side, not 1200x900


def test_evaluate_and_predict_pass_the_models_preprocessing(bundle, tmp_path, monkeypatch):
    for label in ("red", "green", "blue"):
        write_colour_images(tmp_path / "data" / label)
    calls = []
    real = images_mod.load_image

    def spy(path, pp=None, **kwargs):
        calls.append(pp)
        return real(path, pp, **kwargs)

    monkeypatch.setattr(images_mod, "load_image", spy)
    monkeypatch.setattr(evaluate_mod, "load_image", spy)
    predictor = open_bundle(bundle).load()
    predictor.predict([next(iter(write_colour_images(tmp_path / "p")))])
    list(PredictionStream(predictor, [tmp_path / "p"]))
    evaluate_mod.evaluate_bundle(bundle, tmp_path / "data")
    assert calls and all(pp == predictor.preprocessing for pp in calls)


def test_all_unreadable_shows_every_reason(bundle, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("one.png", "two.png"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    result = CliRunner().invoke(main, ["predict", str(bundle), str(folder)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert any("one.png" in line for line in lines[:-1]) and any("two.png" in line for line in lines[:-1])
    assert "none of the 2 image(s) could be read" in lines[-1]
    assert "Traceback" not in result.output


# --- graphs against the manifest -----------------------------------------------------------------


def test_manifest_input_size_not_matching_graph_is_one_line(bundle, imgs):
    def edit(m):
        m["preprocessing"].update(input_size=40, resize_size=44)

    _rerecord(bundle, "onnx/trunk.fp32.onnx", edit)
    for args in (["predict", str(bundle), str(imgs)], ["bench", str(bundle), "--no-cold-start", "--iterations", "2"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "onnx/trunk.fp32.onnx" in result.stderr and "40" in result.stderr
        assert "Traceback" not in result.output


def test_graph_output_not_matching_record_is_refused(bundle):
    def edit(m):
        m["files"]["onnx/trunk.fp32.onnx"]["outputs"][0]["shape"] = ["batch", 16]

    _rerecord(bundle, "onnx/trunk.fp32.onnx", edit)
    with pytest.raises(BundleError, match=r"onnx/trunk\.fp32\.onnx.*output"):
        open_bundle(bundle).load()


def test_graph_dtype_not_matching_record_is_refused(bundle):
    def edit(m):
        m["files"]["onnx/head.colour.onnx"]["inputs"][0]["dtype"] = "float16"

    _rerecord(bundle, "onnx/head.colour.onnx", edit)
    with pytest.raises(BundleError, match=r"onnx/head\.colour\.onnx.*float16"):
        open_bundle(bundle).load()


def test_label_count_mismatch_caught_at_load_by_bench_and_doctor(bundle):
    def edit(m):
        m["heads"]["colour"]["labels"].append("yellow")
        m["files"]["onnx/head.colour.onnx"]["outputs"][0]["shape"] = ["batch", 4]

    _rerecord(bundle, "onnx/head.colour.onnx", edit)
    with pytest.raises(BundleError, match=r"4 labels"):
        open_bundle(bundle).load()
    result = CliRunner().invoke(main, ["bench", str(bundle), "--no-cold-start", "--iterations", "2"])
    assert result.exit_code == 1 and "4 labels" in result.stderr, result.output
    result = CliRunner().invoke(main, ["doctor", str(bundle)])
    assert "4 labels" in result.output, result.output


# --- bounds on numeric options and profiles ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "{b}", "--batch-size", "100000"],
        ["bench", "{b}", "--threads", "5000"],
        ["bench", "{b}", "--iterations", "100000000"],
        ["predict", "{b}", "{i}", "--batch-size", "100000"],
        ["predict", "{b}", "{i}", "--threads", "5000"],
        ["evaluate", "{b}", "{i}", "--batch-size", "0"],
        ["evaluate", "{b}", "{i}", "--batch-size", "100000"],
    ],
)
def test_numeric_options_are_bounded(bundle, imgs, args):
    args = [a.format(b=bundle, i=imgs) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2), result.output
    assert ("Traceback" not in result.output and result.exception is None) or isinstance(result.exception, SystemExit)
    assert "Error" in result.output or "Invalid value" in result.output


@pytest.mark.parametrize(
    "key,value",
    [("threads", 5000), ("streams", 100000), ("batch_size", 100000), ("batch_size", float("nan"))],
)
def test_profile_values_are_bounded(key, value):
    from edgetl.device.profiles import profile_from_dict

    with pytest.raises(ConfigError, match=key):
        profile_from_dict({"description": "x", "runtime": "onnxruntime", key: value}, name="p")


def test_profile_provider_options_must_be_finite():
    from edgetl.device.profiles import profile_from_dict

    with pytest.raises(ConfigError, match="finite"):
        profile_from_dict(
            {"description": "x", "runtime": "onnxruntime", "provider_options": {"x": float("inf")}}, name="p"
        )


# --- pack, unpack, remote paths --------------------------------------------------------------------


def test_pack_refuses_what_unpack_refuses(bundle, tmp_path):
    real = bundle / "onnx/head.colour.onnx"
    elsewhere = tmp_path / "elsewhere.onnx"
    real.rename(elsewhere)
    real.symlink_to(elsewhere)
    with pytest.raises(BundleError, match="link"):
        pack_mod.pack_bundle(bundle, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def _archive_with(bundle: Path, out: Path, extra: list[tuple[str, bytes]]) -> Path:
    """The manifest, then ``extra`` members, then the model files."""
    with tarfile.open(out, "w:gz") as tar:
        models = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*.onnx"))
        names = ["manifest.json", "EXTRA", *models]
        for name in names:
            if name == "EXTRA":
                for arcname, data in extra:
                    info = tarfile.TarInfo(f"b/{arcname}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(bundle / name, arcname=f"b/{name}")
    return out


@pytest.fixture
def written(monkeypatch):
    """Every file in unpack's temporary folder when it finishes or fails."""
    seen: list[str] = []
    real = pack_mod.atomic_directory

    @contextlib.contextmanager
    def spy(dest, **kwargs):
        with real(dest, **kwargs) as tmp:
            try:
                yield tmp
            finally:
                seen.extend(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())

    monkeypatch.setattr(pack_mod, "atomic_directory", spy)
    return seen


def test_unpack_checks_each_member_before_writing_it(bundle, tmp_path, written):
    archive = _archive_with(bundle, tmp_path / "a.tar.gz", [("junk.bin", bytes(4 << 20))])
    with pytest.raises(BundleError, match=r"junk\.bin.*not a file its manifest lists"):
        pack_mod.unpack_bundle(archive, tmp_path / "out")
    assert "junk.bin" not in written and not (tmp_path / "out").exists()


def test_unpack_refuses_a_member_larger_than_listed(bundle, tmp_path, written):
    rel = "onnx/head.colour.onnx"
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
        tar.add(bundle / "manifest.json", arcname="b/manifest.json")
        info = tarfile.TarInfo(f"b/{rel}")
        info.size = 4 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(BundleError, match=r"head\.colour\.onnx.*bytes"):
        pack_mod.unpack_bundle(tmp_path / "a.tar.gz", tmp_path / "out")
    assert rel not in written


def test_unpack_force_replaces_only_a_bundle(bundle, tmp_path):
    archive = tmp_path / "b.tar.gz"
    pack_mod.pack_bundle(bundle, archive)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["unpack", str(archive), str(other), "--force"])
    assert result.exit_code == 1 and (other / "keep.txt").exists(), result.output
    # the archive's own folder is an input: never replaced
    result = CliRunner().invoke(main, ["unpack", str(archive), str(tmp_path), "--force"])
    assert result.exit_code == 1 and archive.exists(), result.output
    # a bundle is replaced
    pack_mod.unpack_bundle(archive, tmp_path / "u")
    assert pack_mod.unpack_bundle(archive, tmp_path / "u", force=True)["files"] >= 2


@pytest.mark.parametrize("target", ["pi@host:-rf", "host:~/-x", "ssh://pi@host/~/-oProxyCommand=x"])
def test_remote_path_starting_with_dash_is_refused(target):
    from edgetl.device.remote import parse_target

    with pytest.raises(ConfigError, match="-"):
        parse_target(target)


def test_predict_skips_decode_memory_error(bundle, tmp_path, monkeypatch):
    """A MemoryError while decoding one file skips that file; the rest of the batch is predicted."""
    write_colour_images(tmp_path / "imgs")
    real = images_mod.load_image

    def flaky(path, pp=None, **kwargs):
        if Path(path).name == "green.png":
            raise DataError(f"cannot read image {path}: MemoryError")
        return real(path, pp, **kwargs)

    monkeypatch.setattr(images_mod, "load_image", flaky)
    predictor = open_bundle(bundle).load()
    report = images_mod.predict_files(predictor, [tmp_path / "imgs"], batch_size=8)
    assert {Path(r["image"]).name for r in report.predictions} == {"red.png", "blue.png"}
    assert report.skipped and "MemoryError" in report.skipped[0][1]
