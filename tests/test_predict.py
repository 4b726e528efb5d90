"""Streaming prediction: folders of any size in bounded memory, JSON/CSV output, the summary."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import _tables, main, predict_cmd
from edgetl.core.errors import BundleError, DataError
from edgetl.device import images as images_mod
from edgetl.device.bundle_loading import open_bundle
from edgetl.device.images import PredictionStream, find_images, iter_images
from tests.bundle_factory import build_bundle, write_colour_images
from tests.schemas import validate_document

COLUMNS = ["image", "head", "label", "score", "top_k", "variant", "runtime", "unfamiliar"]


def predict(*args):
    return CliRunner().invoke(main, ["predict", *(str(a) for a in args)])


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
    monkeypatch.setattr(images_mod, "load_image", lambda p, pp=None, **kw: opened.append(p) or real_load(p, pp, **kw))
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
    result = predict(bundle_dir, tree / "a" / "z", "--csv", "--top-k", "2")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == COLUMNS
    assert [Path(r["image"]).name for r in rows] == ["blue.png", "green.png", "red.png"]
    assert [r["label"] for r in rows] == ["blue", "green", "red"]
    assert all(len(r["top_k"].split(";")) == 2 and float(r["score"]) > 0.3 for r in rows)
    assert {(r["variant"], r["runtime"]) for r in rows} == {("onnx-fp32", "onnxruntime")}
    assert "Classified 3 image(s)" in result.stderr and "images/s" in result.stderr
    assert "blue: 1" in result.stderr


def test_cli_predict_json_streams_one_envelope(bundle_dir, tree):
    result = predict(bundle_dir, tree, "--json", "--batch-size", "4", "--head", "all", "--top-k", "2")
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "predict")
    assert list(doc)[:3] == ["schema", "schema_version", "edgetl"] and list(doc)[-2:] == ["results", "summary"]
    assert (doc["bundle"], doc["variant"], doc["runtime"], doc["precision"]) == (
        str(bundle_dir),
        "onnx-fp32",
        "onnxruntime",
        "fp32",
    )
    assert doc["head"] == "all" and doc["heads"] == ["colour", "brightness"] and doc["top_k"] == 2
    assert "device_profile" not in doc
    rows = doc["results"]
    assert len(rows) == 18 and rows[0]["head"] == "colour" and rows[1]["head"] == "brightness"
    # A record cut out of the document still says where it came from.
    assert all(r["variant"] == "onnx-fp32" and r["runtime"] == "onnxruntime" for r in rows)
    summary = doc["summary"]
    assert summary["images"] == 9 and summary["skipped"] == 0 and summary["images_per_s"] > 0
    assert sum(summary["per_class"]["colour"].values()) == 9
    assert "colour: " in result.stderr and "brightness: " in result.stderr


def test_cli_predict_json_failing_part_way_is_still_one_document(bundle_dir, tree, monkeypatch):
    """The second batch fails: what was written is closed with the error, stdout parses."""
    from edgetl.device.predictor import Predictor

    real, calls = Predictor.outputs, []

    def failing(self, x, heads=None):
        calls.append(len(x))
        if len(calls) == 2:
            raise BundleError("variant onnx-fp32 produced non-finite logits for head colour (NaN)")
        return real(self, x, heads)

    monkeypatch.setattr(Predictor, "outputs", failing)
    result = predict(bundle_dir, tree, "--json", "--batch-size", "4")
    assert result.exit_code == 1 and result.stderr.splitlines()[-1].startswith("Error: variant onnx-fp32 produced")
    doc = validate_document(result.stdout, "predict")
    assert doc["partial"] is True and "summary" not in doc
    assert doc["error"] == {
        "type": "BundleError",
        "message": "variant onnx-fp32 produced non-finite logits for head colour (NaN)",
        "exit_code": 1,
    }
    assert len(doc["results"]) == 4  # the first batch, as it was streamed


def test_cli_predict_json_when_no_image_can_be_read(bundle_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    result = predict(bundle_dir, tmp_path / "bad.png", "--json")
    assert result.exit_code == 1 and "Skipped: cannot read image" in result.stderr
    doc = validate_document(result.stdout, "predict")
    assert doc["partial"] is True and doc["results"] == [] and doc["error"]["type"] == "DataError"


def test_cli_predict_json_error_before_streaming_is_the_error_document(tmp_path, tree):
    result = predict(tmp_path / "no-bundle", tree, "--json")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    doc = validate_document(result.stdout, "predict")
    assert set(doc) == {"schema", "schema_version", "edgetl", "error"} and doc["error"]["exit_code"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--json", "--csv"], "choose one of --json and --csv"),
        (["--format", "json", "--csv"], "choose one of --json and --csv"),
        (["--format", "tsv", "--csv"], "--csv and --format tsv disagree"),
        (["--json", "--format", "table"], "--json and --format table disagree"),
        (["--device-profile", "rpi9"], "unknown device-profile 'rpi9'"),
    ],
)
def test_cli_predict_usage_errors_exit_2(bundle_dir, tree, args, message):
    result = predict(bundle_dir, tree, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    if "--json" in args or "json" in args:
        assert validate_document(result.stdout, "predict")["error"]["exit_code"] == 2
    else:
        assert result.stdout == ""


def test_cli_predict_without_arguments_is_a_usage_error(bundle_dir):
    for args in ([], [bundle_dir]):
        result = predict(*args)
        assert result.exit_code == 2 and "Missing argument" in result.stderr


def _pipe_lines(result) -> list[list[str]]:
    assert result.exit_code == 0, result.output
    return [line.split("\t") for line in result.stdout.splitlines()]


def test_cli_predict_pipe_output_has_one_shape_for_5_and_500_images(bundle_dir, tmp_path):
    """The issue's test: in a pipe (the default there is tsv) 5 images and 500 give the same header
    and one line per image with the same columns; no table, no wrapping, whatever the count."""
    colours = write_colour_images(tmp_path / "src", size=(8, 8))
    sources = sorted(colours)
    for n in (5, 500):
        folder = tmp_path / f"n{n}"
        folder.mkdir()
        for i in range(n):
            shutil.copyfile(sources[i % 3], folder / f"{i:04d}-{Path(sources[i % 3]).name}")
    small = _pipe_lines(predict(bundle_dir, tmp_path / "n5", "--top-k", "2"))
    large = _pipe_lines(predict(bundle_dir, tmp_path / "n500", "--top-k", "2", "--batch-size", "64"))
    assert small[0] == large[0] == COLUMNS
    assert len(small) == 5 + 1 and len(large) == 500 + 1
    assert {len(row) for row in small + large} == {len(COLUMNS)}
    for rows in (small, large):
        labels = [row[2] for row in rows[1:]]
        assert labels == [Path(sources[i % 3]).stem for i in range(len(labels))]
        assert all(row[5:] == ["onnx-fp32", "onnxruntime", ""] and float(row[3]) > 0.3 for row in rows[1:])
    explicit = _pipe_lines(predict(bundle_dir, tmp_path / "n5", "--top-k", "2", "--format", "tsv"))
    assert explicit == small


def test_cli_predict_tsv_escapes_names_from_files(bundle_dir, tmp_path):
    write_colour_images(tmp_path / "src")
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copyfile(tmp_path / "src" / "red.png", folder / "a\tb.png")
    shutil.copyfile(tmp_path / "src" / "blue.png", folder / "c\nd.png")
    rows = _pipe_lines(predict(bundle_dir, folder))
    assert len(rows) == 3 and {len(r) for r in rows} == {len(COLUMNS)}
    assert [Path(r[0]).name for r in rows[1:]] == ["a\\tb.png", "c\\nd.png"]
    wide = {"COLUMNS": "200"}
    table = CliRunner().invoke(main, ["predict", str(bundle_dir), str(folder), "--format", "table"], env=wide)
    assert table.exit_code == 0 and "\t" not in table.stdout and len(table.stdout.splitlines()) == 4 + 2 + 1
    assert "a\\x09b.png" in table.stdout and "c\\x0ad.png" in table.stdout


def test_cli_predict_table_and_long_output_as_aligned_lines(bundle_dir, tree, monkeypatch):
    small = predict(bundle_dir, tree / "a" / "z", "--format", "table")
    assert small.exit_code == 0, small.output
    assert "onnx-fp32 (onnxruntime)" in small.stdout and "┃ image" in small.stdout
    monkeypatch.setattr(_tables, "TABLE_ROWS", 4)
    result = predict(bundle_dir, tree, "--format", "table", "--top-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "# onnx-fp32 (onnxruntime)" and lines[1].split() == ["image", "label", "score", "top", "2"]
    assert len(lines) == 2 + 9 and all(".png" in line and "\t" not in line for line in lines[2:])
    starts = {line.index(line.split()[1], len(line.split()[0])) for line in lines[1:]}
    assert len(starts) == 1  # the label column is aligned


def test_cli_predict_quiet_and_progress_options(bundle_dir, tmp_path, monkeypatch):
    write_colour_images(tmp_path / "imgs", corrupt=True)
    quiet = predict(bundle_dir, tmp_path / "imgs", "-q", "--no-progress")
    assert quiet.exit_code == 0, quiet.output
    assert "Skipped: cannot read image" in quiet.stderr and "Classified" not in quiet.stderr
    assert len(quiet.stdout.splitlines()) == 4
    verbose = predict(bundle_dir, tmp_path / "imgs", "-v")
    assert verbose.exit_code == 0 and verbose.stdout == quiet.stdout and "Classified 3" in verbose.stderr
    # A progress count shows on stderr only when it is a terminal and the results go elsewhere.
    monkeypatch.setattr(predict_cmd, "_stderr_is_terminal", lambda: True)
    assert predict_cmd._Progress(enabled=True).enabled
    assert not predict_cmd._Progress(enabled=False).enabled
    shown = predict(bundle_dir, tmp_path / "imgs")
    assert shown.exit_code == 0 and "Skipped: cannot read image" in shown.stderr and "Classified 3" in shown.stderr
    monkeypatch.setattr(predict_cmd, "_stderr_is_terminal", lambda: False)
    assert not predict_cmd._Progress(enabled=True).enabled


def test_cli_predict_device_profile_and_provider(bundle_dir, tree, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("description: test\nprecision: int8\nthreads: 1\n")
    result = predict(bundle_dir, tree / "a" / "z", "--json", "--device-profile", profile, "--provider", "cpu")
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "predict")
    assert doc["precision"] == "int8" and doc["variant"] == "onnx-int8"
    assert doc["device_profile"] == {
        "name": "p",
        "path": str(profile),
        "applied": {"runtime": "onnxruntime", "precision": "int8", "threads": 1},
        "overridden": [],
    }
    bad = predict(bundle_dir, tree, "--provider", "cuda")
    assert bad.exit_code == 1 and "'cuda' is not in this build" in bad.stderr and "has: cpu" in bad.stderr


def test_cli_predict_remote_forwards_options_and_asks_json_by_name(monkeypatch, tmp_path):
    """BUNDLE on a device: the options given travel (not the ssh ones, not --format), JSON is asked
    for as --json, and the device's output streams back as it is."""
    from edgetl.device import remote_bench

    seen = {}

    def fake(remote, images, args, *, on_stdout):
        seen.update(target=remote.target.where, images=images, args=args)
        on_stdout(b'{"schema": "edgetl.predict"')
        on_stdout(b', "x": 1}\n')

    monkeypatch.setattr(remote_bench, "predict_remote", fake)
    key = tmp_path / "key"
    key.write_text("not used")
    result = predict("pi@rpi:bundles/b", "/home/pi/cam", "--format", "json", "--top-k", "2", "-q", "-i", key)
    assert result.exit_code == 0, result.output
    assert seen["images"] == ("/home/pi/cam",) and seen["target"] == "pi@rpi"
    assert seen["args"] == ["--top-k", "2", "--quiet", "--json"]
    assert result.stdout == '{"schema": "edgetl.predict", "x": 1}\n'
    csv_run = predict("pi@rpi:bundles/b", "/home/pi/cam", "--csv")
    assert csv_run.exit_code == 0 and seen["args"] == ["--csv"]
    tsv_run = predict("pi@rpi:bundles/b", "/home/pi/cam", "--format", "table")
    assert tsv_run.exit_code == 0 and seen["args"] == []


def test_cli_predict_remote_json_errors_stay_one_document(monkeypatch):
    """The device printed its own (error) document: the failure reported here adds none; a
    failure before the device printed anything is the usual error document."""
    from edgetl.core.errors import RemoteError
    from edgetl.device import remote_bench

    device_doc = '{"schema": "edgetl.predict", "schema_version": 1, "edgetl": "0.1.0", "error": {"type": "DataError", '
    device_doc += '"message": "image /x.png does not exist", "exit_code": 1}}\n'

    def device_fails(remote, images, args, *, on_stdout):
        on_stdout(device_doc.encode())
        raise RemoteError("edgetl predict on rpi failed (exit 1): image /x.png does not exist")

    monkeypatch.setattr(remote_bench, "predict_remote", device_fails)
    result = predict("pi@rpi:bundles/b", "/x.png", "--json")
    assert result.exit_code == 1 and result.stdout == device_doc
    assert result.stderr == "Error: edgetl predict on rpi failed (exit 1): image /x.png does not exist\n"

    def unreachable(remote, images, args, *, on_stdout):
        raise RemoteError("ssh to rpi failed: Connection refused")

    monkeypatch.setattr(remote_bench, "predict_remote", unreachable)
    result = predict("pi@rpi:bundles/b", "/x.png", "--json")
    assert result.exit_code == 1
    assert validate_document(result.stdout, "predict")["error"]["message"] == "ssh to rpi failed: Connection refused"


def test_cli_predict_json_interrupted_is_still_one_document(bundle_dir, tree, monkeypatch):
    from edgetl.device.predictor import Predictor

    real, calls = Predictor.outputs, []

    def interrupted(self, x, heads=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, x, heads)

    monkeypatch.setattr(Predictor, "outputs", interrupted)
    result = predict(bundle_dir, tree, "--json", "--batch-size", "2")
    assert result.exit_code == 130 and "Interrupted." in result.stderr
    doc = validate_document(result.stdout, "predict")
    assert doc["partial"] is True and len(doc["results"]) == 4 and doc["error"]["exit_code"] == 130
