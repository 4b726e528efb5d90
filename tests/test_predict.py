"""Streaming prediction: folders of any size in bounded memory, JSON/CSV output, the summary."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import _tables, main
from edgetl.core.errors import DataError
from edgetl.device import images as images_mod
from edgetl.device.bundle_loading import open_bundle
from edgetl.device.images import PredictionStream, find_images, iter_images
from tests.bundle_factory import build_bundle, write_colour_images


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle") / "b", heads=("colour", "brightness"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Nested folders whose names make per-directory and full-path sort orders differ."""
    root = tmp_path_factory.mktemp("tree")
    write_colour_images(root / "a")
    write_colour_images(root / "a-b")
    write_colour_images(root / "a" / "z")
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def test_iter_images_matches_sorted_rglob(tree):
    expected = sorted(p for p in tree.rglob("*") if p.suffix == ".png")
    assert list(iter_images([tree])) == expected == find_images([tree])


def test_iter_images_dedupes_files_and_nested_folders(tree):
    red = tree / "a" / "red.png"
    got = list(iter_images([red, tree / "a", tree, red]))
    assert got[0] == red and got.count(red) == 1
    assert len(got) == len(set(got)) == 9  # a/ inside tree/ is walked once


def test_iter_images_checks_inputs_before_yielding(tmp_path, tree):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        iter_images([tree, tmp_path / "empty"])
    with pytest.raises(DataError, match="does not exist"):
        iter_images([tree, tmp_path / "missing.png"])


def test_stream_is_lazy_one_batch_at_a_time(bundle_dir, tree, monkeypatch):
    opened = []
    real_load = images_mod.load_image
    monkeypatch.setattr(images_mod, "load_image", lambda p, pp=None: opened.append(p) or real_load(p, pp))
    predictor = open_bundle(bundle_dir).load()
    it = iter(PredictionStream(predictor, [tree], batch_size=2))
    next(it)
    assert len(opened) == 2  # only the first batch was read
    rest = list(it)
    assert len(rest) == 8 and len(opened) == 9


def test_stream_summary_counts_labels_and_skips(bundle_dir, tmp_path):
    write_colour_images(tmp_path / "imgs", corrupt=True)
    skipped = []
    predictor = open_bundle(bundle_dir).load(heads="all")
    stream = PredictionStream(
        predictor, [tmp_path / "imgs"], batch_size=2, on_skip=lambda path, reason: skipped.append(path)
    )
    records = list(stream)
    s = stream.summary
    assert len(records) == 6 and s.images == 3 and s.skipped == 1
    assert skipped == [str(tmp_path / "imgs" / "broken.png")]
    assert s.per_class["colour"] == {"red": 1, "green": 1, "blue": 1}
    assert sum(s.per_class["brightness"].values()) == 3
    assert s.seconds > 0 and s.images_per_s > 0 and s.inference_s > 0 and s.preprocess_s > 0 and s.decode_s > 0
    assert set(s.to_dict()) >= {"images", "skipped", "images_per_s", "per_class"}


def test_stream_of_only_unreadable_files(bundle_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    predictor = open_bundle(bundle_dir).load()
    with pytest.raises(DataError, match="none of the 1 image"):
        list(PredictionStream(predictor, [tmp_path / "bad.png"]))


def test_cli_predict_csv(bundle_dir, tree):
    result = CliRunner().invoke(main, ["predict", str(bundle_dir), str(tree / "a" / "z"), "--csv", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [Path(r["image"]).name for r in rows] == ["blue.png", "green.png", "red.png"]
    assert [r["label"] for r in rows] == ["blue", "green", "red"]
    assert all(len(r["top_k"].split(";")) == 2 and float(r["score"]) > 0.3 for r in rows)
    assert "Classified 3 image(s)" in result.stderr and "images/s" in result.stderr
    assert "blue: 1" in result.stderr


def test_cli_predict_json_streams_one_document(bundle_dir, tree):
    result = CliRunner().invoke(
        main, ["predict", str(bundle_dir), str(tree), "--json", "--batch-size", "4", "--head", "all"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 18 and rows[0]["head"] == "colour" and rows[1]["head"] == "brightness"
    assert "colour: " in result.stderr and "brightness: " in result.stderr


def test_cli_predict_json_and_csv_conflict(bundle_dir, tree):
    result = CliRunner().invoke(main, ["predict", str(bundle_dir), str(tree), "--json", "--csv"])
    assert result.exit_code == 1 and "choose one of --json and --csv" in result.stderr


def test_cli_predict_long_output_switches_to_lines(bundle_dir, tree, monkeypatch):
    monkeypatch.setattr(_tables, "TABLE_ROWS", 4)
    result = CliRunner().invoke(main, ["predict", str(bundle_dir), str(tree)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.endswith(")") is False and ".png\t" in line]
    assert len(lines) == 9 and result.stdout.startswith("# onnx-fp32")


def test_cli_predict_device_profile_and_provider(bundle_dir, tree, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("description: test\nprecision: int8\nthreads: 1\n")
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(bundle_dir),
            str(tree / "a" / "z"),
            "--json",
            "--device-profile",
            str(profile),
            "--provider",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(main, ["predict", str(bundle_dir), str(tree), "--provider", "cuda"])
    assert bad.exit_code == 1 and "'cuda' is not in this build" in bad.stderr and "has: cpu" in bad.stderr
