"""`edgetl learn`: a head (or new classes of a head) learned on the device, torch-free, written for every
variant, atomically; the unfamiliar flag in predict. Tiny real bundles (tests/bundle_factory.py: ONNX
and OpenVINO variants of a colour trunk) with statistics stored through the exporter's own code path."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.core.bundle import read_manifest, sha256_file
from edgetl.device.runtime import open_bundle
from tests.bundle_factory import COLOURS, add_colour_stats, build_bundle, colour_folder
from tests.schemas import validate_document

NEW = {"yellow": (220, 210, 30), "cyan": (30, 200, 210), "magenta": (210, 30, 200)}


@pytest.fixture
def bundle(tmp_path):
    b = build_bundle(tmp_path / "bundle", formats=("onnx", "openvino"), precisions=("fp32", "int8"))
    return add_colour_stats(b, tmp_path)


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def snapshot(bundle: Path) -> dict[str, str]:
    return {str(p.relative_to(bundle)): sha256_file(p) for p in sorted(bundle.rglob("*")) if p.is_file()}


def test_learn_adds_a_head_to_every_variant_that_predict_uses(bundle, tmp_path):
    data = colour_folder(tmp_path / "new", NEW, 8)
    trunks = {rel: rec["sha256"] for rel, rec in read_manifest(bundle)["files"].items() if rec["role"] == "trunk"}
    doc = json.loads(run("learn", bundle, data, "--head", "tints", "--json", "--no-progress").stdout)["results"][0]
    assert doc["labels"] == sorted(NEW) and doc["images"] == 24
    assert doc["learn"]["method"] in ("logistic", "imprinting") and doc["learn"]["cv_top1"] >= 0.95
    assert set(doc["variants"]) == {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}
    assert all(v["max_abs_diff"] <= 1e-3 for v in doc["variants"].values())
    m = read_manifest(bundle)
    assert {rel: m["files"][rel]["sha256"] for rel in trunks} == trunks  # the trunk never changes
    head = m["heads"]["tints"]
    assert head["origin"]["where"] == "device" and head["origin"]["trunk_variant"] == "onnx-fp32"
    assert head["origin"]["images"] == 24 and head["stats"]["file"] == "stats/tints.npz"
    assert m["files"]["stats/tints.npz"]["role"] == "stats"
    assert all("tints" in v["heads"] for v in m["variants"].values())
    open_bundle(bundle)  # every checksum
    # evaluate knows the device's training images: scoring on them leaves them all out
    scored = json.loads(run("evaluate", bundle, data, "--head", "tints", "--json").stdout)["results"][0]
    assert scored["excluded_train"] == 24 and scored["n"] == 0
    # Held-out images of the new colours, through every variant, with --head all.
    test = colour_folder(tmp_path / "test", NEW, 2, seed=7)
    for runtime in ("onnxruntime", "openvino"):
        for precision in ("fp32", "int8"):
            out = run(
                "predict", bundle, test, "--head", "all", "--runtime", runtime, "--precision", precision, "--json"
            )
            records = [r for r in json.loads(out.stdout)["results"] if r["head"] == "tints"]
            assert len(records) == 6
            assert all(Path(r["image"]).parent.name == r["label"] for r in records), records


def test_learn_trains_on_the_variant_the_device_runs(bundle, tmp_path):
    data = colour_folder(tmp_path / "new", NEW, 6)
    run("learn", bundle, data, "--head", "tints", "--runtime", "openvino", "--precision", "int8", "-q", "--no-progress")
    assert read_manifest(bundle)["heads"]["tints"]["origin"]["trunk_variant"] == "openvino-int8"


def test_extend_adds_classes_and_keeps_the_old_ones(bundle, tmp_path):
    data = colour_folder(tmp_path / "new", {"yellow": NEW["yellow"]}, 6)
    doc = json.loads(
        run("learn", bundle, data, "--head", "colour", "--extend", "colour", "--json", "--no-progress").stdout
    )["results"][0]
    assert doc["labels"] == [*COLOURS, "yellow"]
    old = doc["learn"]["old_classes"]
    assert old["images"] == 18 and old["top1_before"] == 1.0 and old["top1_after"] >= 0.95
    m = read_manifest(bundle)
    assert m["heads"]["colour"]["labels"] == [*COLOURS, "yellow"]
    assert m["heads"]["colour"]["origin"]["extends"] == "colour"
    test = colour_folder(tmp_path / "test", {**COLOURS, "yellow": NEW["yellow"]}, 2, seed=9)
    records = json.loads(run("predict", bundle, test, "--json").stdout)["results"]
    assert all(Path(r["image"]).parent.name == r["label"] for r in records), records
    # The extended head extends again: its statistics were stored with it.
    more = colour_folder(tmp_path / "more", {"cyan": NEW["cyan"]}, 6)
    run("learn", bundle, more, "--head", "colour", "--extend", "colour", "-q", "--no-progress")
    assert read_manifest(bundle)["heads"]["colour"]["labels"] == [*COLOURS, "yellow", "cyan"]


def test_extend_refused_above_max_drop_leaves_the_bundle(bundle, tmp_path):
    # A new class of exactly red's colour steals red images: old-class accuracy drops.
    data = colour_folder(tmp_path / "new", {"scarlet": COLOURS["red"]}, 10)
    before = snapshot(bundle)
    result = run("learn", bundle, data, "--head", "colour", "--extend", "colour", "--max-drop", "0", ok=False)
    assert result.exit_code == 1 and "--max-drop" in result.output and "Traceback" not in result.output
    assert snapshot(bundle) == before


def test_learn_bad_inputs_are_one_line_and_leave_the_bundle(bundle, tmp_path):
    before = snapshot(bundle)
    dup = colour_folder(tmp_path / "dup", {"red": COLOURS["red"]}, 4)
    r = run("learn", bundle, dup, "--head", "colour", "--extend", "colour", ok=False)
    assert r.exit_code == 1 and "already in head 'colour'" in r.output
    new = colour_folder(tmp_path / "new", NEW, 4)
    r = run("learn", bundle, new, "--head", "colour", ok=False)
    assert r.exit_code == 1 and "already has a head 'colour'" in r.output
    r = run("learn", bundle, new, "--head", "../x", ok=False)
    assert r.exit_code == 2 and "--head" in r.output
    r = run("learn", bundle, new, "--head", "x", "--extend", "nope", ok=False)
    assert r.exit_code == 2 and "no such head" in r.output
    plain = build_bundle(tmp_path / "plain")
    r = run("learn", plain, new, "--head", "x", "--extend", "colour", ok=False)
    assert r.exit_code == 1 and "re-export" in r.output
    not_images = tmp_path / "junk"
    for c in ("a", "b"):
        (not_images / c).mkdir(parents=True)
        (not_images / c / "x.png").write_text("not an image")
    r = run("learn", bundle, not_images, "--head", "junk", ok=False)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: class 'a' has 0 readable image(s)")
    assert snapshot(bundle) == before


def test_too_few_images_for_the_folds_falls_back_to_imprinting(bundle, tmp_path):
    data = colour_folder(tmp_path / "new", NEW, 3)
    result = run("learn", bundle, data, "--head", "tints", "--json", "--no-progress")
    learned = json.loads(result.stdout)["results"][0]["learn"]
    assert learned["method"] == "imprinting" and "fewer than --folds 5" in learned["fallback"]
    assert "imprinting" in result.stderr


def test_one_image_per_class_gives_an_imprinted_head_without_the_unfamiliar_check(bundle, tmp_path):
    data = colour_folder(tmp_path / "new", NEW, 1)
    result = run("learn", bundle, data, "--head", "tints", "--json", "--no-progress")
    doc = validate_document(result.stdout, "learn")["results"][0]
    assert doc["learn"]["method"] == "imprinting" and doc["familiarity"] is None
    assert "no unfamiliar-input check" in result.stderr
    test = colour_folder(tmp_path / "test", NEW, 1, seed=5)
    records = json.loads(run("predict", bundle, test, "--head", "all", "--json").stdout)["results"]
    tints = [r for r in records if r["head"] == "tints"]
    assert all(Path(r["image"]).parent.name == r["label"] and "unfamiliar" not in r for r in tints), tints
    assert len(tints) == 3


def test_full_disk_mid_write_leaves_the_old_bundle(bundle, tmp_path, monkeypatch):
    import edgetl.device.learn as learn_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(learn_module, "write_stats", full)
    before = snapshot(bundle)
    data = colour_folder(tmp_path / "new", NEW, 6)
    r = run("learn", bundle, data, "--head", "tints", ok=False)
    assert r.exit_code == 1 and "No space left" in r.output
    assert snapshot(bundle) == before
    assert [p.name for p in bundle.parent.iterdir() if p.name.startswith(".bundle")] == []


def test_export_calibrates_a_threshold_per_variant(bundle):
    fam = read_manifest(bundle)["heads"]["colour"]["familiarity"]
    assert set(fam["by_variant"]) == {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}
    assert all(t > 0 for t in fam["by_variant"].values()) and fam["acceptance"] == 0.95


def test_predict_flags_unfamiliar_images(bundle, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(np.full((40, 40, 3), COLOURS["red"], np.uint8)).save(folder / "red.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(np.full((40, 40, 3), (128, 128, 128), np.uint8)).save(folder / "grey.png")
    records = {Path(r["image"]).name: r for r in json.loads(run("predict", bundle, folder, "--json").stdout)["results"]}
    assert records["red.png"]["unfamiliar"] is False and records["red.png"]["label"] == "red"
    assert records["grey.png"]["unfamiliar"] is True and records["grey.png"]["unfamiliar_score"] > 1
    rejected = json.loads(run("predict", bundle, folder, "--json", "--reject-unfamiliar").stdout)["results"]
    labels = {Path(r["image"]).name: r["label"] for r in rejected}
    assert labels["grey.png"] == "unknown" and labels["red.png"] == "red"
    tsv = run("predict", bundle, folder / "grey.png", "--format", "tsv").stdout.splitlines()
    assert tsv[0].split("\t")[-1] == "unfamiliar" and tsv[1].split("\t")[-1] == "true"


def test_a_bundle_without_statistics_predicts_as_before(tmp_path):
    plain = build_bundle(tmp_path / "plain")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((40, 40, 3), COLOURS["red"], np.uint8)).save(tmp_path / "imgs" / "r.png")
    record = json.loads(run("predict", plain, tmp_path / "imgs", "--json").stdout)["results"][0]
    assert "unfamiliar" not in record and record["label"] == "red"


def test_stats_file_is_checked_before_use(bundle):
    from edgetl.core.errors import BundleError
    from edgetl.device.head_stats import stats_from_arrays

    b = open_bundle(bundle)
    with np.load(bundle / "stats/colour.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key, value in (
        ("means", np.full_like(arrays["means"], np.nan)),
        ("val_labels", arrays["val_labels"] + 10),
        ("exemplars", arrays["exemplars"][:, :3]),
    ):
        with pytest.raises(BundleError, match="re-export"):
            stats_from_arrays({**arrays, key: value}, 3, 8, "x")
    assert stats_from_arrays(arrays, len(b.heads["colour"]), 8, "x").means.shape == (3, 8)
