import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.core.atomic import output_lock
from edgetl.core.errors import DataError, OutputBusyError, OutputExistsError
from edgetl.core.imagefolder import drop_unreadable, scan_image_folder
from edgetl.workstation import data as data_mod
from edgetl.workstation.data import stratified_split, write_digits
from tests.schemas import validate_document


def cli(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


@pytest.fixture
def small_digits(monkeypatch):
    """The first 40 of scikit-learn's digits (every class): the folder logic without 1,797 PNGs each time."""
    datasets = pytest.importorskip("sklearn.datasets")
    real = datasets.load_digits()

    class Small:
        target_names = real.target_names
        images = real.images[:40]
        target = real.target[:40]

    monkeypatch.setattr(datasets, "load_digits", lambda: Small)
    return 40


def test_scan_lists_classes_and_images(image_folder):
    folder = scan_image_folder(image_folder)
    assert folder.classes == ("blue", "green", "red")
    assert folder.counts() == [16, 16, 16]


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_one_class_is_an_error(tmp_path):
    (tmp_path / "only").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "only" / "a.png")
    with pytest.raises(DataError, match="at least 2"):
        scan_image_folder(tmp_path)


def test_empty_class_folder_is_an_error(image_folder):
    (image_folder / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no images"):
        scan_image_folder(image_folder)


def test_val_dir_with_other_classes(image_folder, tmp_path):
    other = tmp_path / "val"
    for c in ("red", "green", "yellow"):
        (other / c).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(other / c / "x.png")
    with pytest.raises(DataError, match="missing: \\['blue'\\].*extra: \\['yellow'\\]"):
        scan_image_folder(other, classes=("blue", "green", "red"))


def test_split_is_stratified_and_deterministic(image_folder):
    folder = scan_image_folder(image_folder)
    a = stratified_split(folder, 0.25, seed=3)
    b = stratified_split(folder, 0.25, seed=3)
    c = stratified_split(folder, 0.25, seed=4)
    assert a == b and a != c
    train, val = a
    assert [sum(s.label == k for s in val) for k in range(3)] == [4, 4, 4]
    assert not {s.path for s in train} & {s.path for s in val}


def test_corrupt_images_skipped_with_reason_or_fail(image_folder):
    (image_folder / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    (image_folder / "red" / "empty.jpg").write_bytes(b"")
    folder = drop_unreadable(scan_image_folder(image_folder))
    assert len(folder.skipped) == 2 and folder.counts() == [16, 16, 16]
    assert all("cannot read image" in reason for _, reason in folder.skipped)
    with pytest.raises(DataError, match="broken.png|empty.jpg"):
        drop_unreadable(scan_image_folder(image_folder), on_bad_image="fail")


def test_digits_written_as_image_folder(tmp_path):
    info = write_digits(tmp_path / "digits")
    assert info["images"] == 1797 and info["classes"] == [str(i) for i in range(10)]
    folder = scan_image_folder(tmp_path / "digits")
    assert len(folder.samples) == 1797
    img = Image.open(folder.samples[0].path)
    assert img.size == (8, 8) and np.asarray(img).max() > 200
    with pytest.raises(OutputExistsError, match="exists and is not empty; pass --force"):
        write_digits(tmp_path / "digits")
    (tmp_path / "empty").mkdir()
    assert write_digits(tmp_path / "empty")["replaced"] is False  # an empty folder is as good as a new one


def test_digits_force_replaces_only_a_digits_folder(tmp_path, small_digits):
    out = tmp_path / "digits"
    write_digits(out)
    (out / "3" / "0003.png").unlink()  # the old folder, changed: --force puts back a complete one
    assert write_digits(out, force=True)["replaced"] is True
    assert len(scan_image_folder(out).samples) == small_digits
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no old or temporary folder left
    with output_lock(out), pytest.raises(OutputBusyError):
        write_digits(out, force=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force replaces only a digits folder"):
        write_digits(out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "cv.pdf").write_text("x")
    with pytest.raises(OutputExistsError, match="is not one"):
        write_digits(home, force=True)
    assert (home / "docs" / "cv.pdf").is_file()


def test_digits_force_interrupted_keeps_the_old_folder(tmp_path, monkeypatch, small_digits):
    out = tmp_path / "digits"
    write_digits(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    real_save = Image.Image.save
    saved = []

    def save_then_stop(self, *args, **kwargs):
        saved.append(1)
        if len(saved) == 20:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        write_digits(out, force=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_is_digits_folder(tmp_path):
    assert not data_mod._is_digits_folder(tmp_path / "missing")
    (tmp_path / "d" / "0").mkdir(parents=True)
    (tmp_path / "d" / "0" / "0000.png").write_bytes(b"x")
    assert data_mod._is_digits_folder(tmp_path / "d")
    (tmp_path / "d" / "0" / "link.png").symlink_to(tmp_path / "d" / "0" / "0000.png")
    assert not data_mod._is_digits_folder(tmp_path / "d")


def test_cli_data_digits_out_force_and_json(tmp_path, small_digits):
    out = tmp_path / "d"
    result = cli("data", "digits", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "data.digits")
    assert doc["results"] == [
        {"path": str(out), "classes": [str(i) for i in range(10)], "images": small_digits, "replaced": False}
    ]
    again = cli("data", "digits", "--out", out)
    assert again.exit_code == 1 and again.stdout == ""
    message = f"{out} exists and is not empty; pass --force to replace it, or choose another --out"
    assert again.stderr == f"Error: {message}\n"
    again_json = cli("data", "digits", "--out", out, "--json")
    assert again_json.exit_code == 1
    assert validate_document(again_json.stdout, "data.digits")["error"]["type"] == "OutputExistsError"
    forced = cli("data", "digits", "--out", out, "--force")
    assert forced.exit_code == 0
    assert forced.stdout == f"Wrote {small_digits} images in 10 classes to {out} (replaced the old folder)\n"


def test_cli_data_digits_positional_out_is_deprecated(tmp_path, small_digits):
    result = cli("data", "digits", tmp_path / "old", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == "Warning: `edgetl data digits OUT` is deprecated and will be removed; use --out OUT.\n"
    assert validate_document(result.stdout, "data.digits")["results"][0]["path"] == str(tmp_path / "old")


@pytest.mark.parametrize(
    "args, message",
    [
        (["OUT", "--out", "OUT2"], "give the output folder once: --out OUT"),
        ([], "Missing option '--out'"),
        (["--out", "OUT", "--json", "--format", "tsv"], "--json and --format tsv disagree"),
    ],
)
def test_cli_data_digits_usage_errors_exit_2(tmp_path, args, message):
    args = [str(tmp_path / a) if a.startswith("OUT") else a for a in args]
    result = cli("data", "digits", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not list(tmp_path.iterdir())


def test_cli_backbones_table_tsv_and_json():
    doc = validate_document(cli("backbones", "--json").stdout, "backbones")
    by_name = {r["name"]: r for r in doc["results"]}
    mb = by_name["mobilenet_v2"]  # every field: tests/test_cli.py
    assert (mb["feature_dim"], mb["params"], mb["input_size"], mb["weights"]) == (
        1280,
        3504872,
        224,
        "mobilenet_v2-b0353104.pth",
    )
    tsv = cli("backbones")  # stdout is not a terminal: tab-separated lines, numbers as numbers
    assert tsv.exit_code == 0, tsv.output
    lines = [line.split("\t") for line in tsv.stdout.splitlines()]
    assert lines[0] == ["name", "source", "feature_dim", "params", "input", "normalisation", "available"]
    row = [
        "mobilenet_v2",
        "torchvision",
        "1280",
        "3504872",
        "224 (resize 256, bilinear)",
        "imagenet",
        "offline-package",
    ]
    assert row in lines
    lite0 = next(line for line in lines if line[0] == "efficientnet_lite0")
    assert lite0[1] == "timm" and lite0[5] == "mean 0.5/0.5/0.5 std 0.5/0.5/0.5"
    assert len(lines) == len(doc["results"]) + 1
    table = cli("backbones", "--format", "table", env={"COLUMNS": "150"})
    assert table.exit_code == 0 and "Backbones" in table.stdout and "3.5M" in table.stdout
    assert json.loads(cli("backbones", "--format", "json").stdout) == doc
