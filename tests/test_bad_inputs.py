"""Faults in user data (issue: reliability): each one injected, each outcome checked."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.core.errors import DataError
from edgetl.core.imagefolder import drop_unreadable, scan_image_folder
from edgetl.core.preprocess import MAX_PIXELS, load_image

TINY = ["--backbone", "tiny_test", "--weights", "none", "--epochs", "2", "--batch-size", "16", "--no-progress"]


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature + chunk length/type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


BAD = {
    "zero-byte.png": lambda: b"",
    "truncated.jpg": lambda: _jpeg_bytes(Image.new("RGB", (64, 64), (200, 10, 10)))[:300],
    "not-an-image.png": lambda: b"this is a text file, not a picture\n" * 20,
    "bomb.png": lambda: _png_claiming(100_000, 100_000),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_a_data_error_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD[name]())
    with pytest.raises(DataError, match="cannot read image .*" + name.split(".")[0]):
        load_image(path)


def test_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(20_000, 10_000))
    assert MAX_PIXELS < 20_000 * 10_000
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(path)


def _good_variants(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    out = {}
    out["cmyk.jpg"] = _jpeg_bytes(rgb.convert("CMYK"))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(buf, "PNG")
    out["sixteen-bit.png"] = buf.getvalue()
    pal = rgb.convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    out["palette-transparent.png"] = buf.getvalue()
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    out["exif-rotated.jpg"] = _jpeg_bytes(rgb, exif=exif)
    return out


def test_odd_but_valid_images_load_as_rgb(tmp_path):
    for name, data in _good_variants(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        img = load_image(tmp_path / name)
        assert img.mode == "RGB", name
        if name.startswith("exif"):
            assert img.size == (20, 30)  # upright: EXIF orientation applied
        else:
            assert img.size == (30, 20)


def test_unreadable_permissions_reported(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads everything: simulate the OS refusing
        real_open = Image.open

        def refusing(fp, *a, **kw):
            if str(fp) == str(path):
                raise PermissionError(13, "Permission denied", str(fp))
            return real_open(fp, *a, **kw)

        monkeypatch.setattr(Image, "open", refusing)
    with pytest.raises(DataError, match="Permission denied"):
        load_image(path)


def test_finetune_skips_every_bad_file_and_reports_it(image_folder, tmp_path):
    for name, make in BAD.items():
        (image_folder / "red" / name).write_bytes(make())
    for name, data in _good_variants(tmp_path).items():
        (image_folder / "green" / name).write_bytes(data)
    odd = os.fsencode(str(image_folder / "blue")) + b"/caf\xe9 with spaces \xff.png"
    Image.new("RGB", (40, 48), (40, 60, 200)).save(odd.decode(errors="surrogateescape"))
    result = CliRunner().invoke(main, ["finetune", str(image_folder), "--out", str(tmp_path / "run"), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["results"][0]
    skipped = {os.path.basename(s["path"]) for s in doc["skipped"]}
    assert skipped == set(BAD)
    assert all(s["reason"].startswith("cannot read image") for s in doc["skipped"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(config["data"]["skipped"]) == len(BAD)
    assert config["data"]["train_counts"][0] + config["data"]["val_counts"][0] == 17  # blue: 16 + the odd name
    assert config["data"]["train_counts"][1] + config["data"]["val_counts"][1] == 20  # green: 16 + 4 odd formats


def test_on_bad_image_fail_stops_with_one_line(image_folder, tmp_path):
    (image_folder / "red" / "zero.png").write_bytes(b"")
    result = CliRunner().invoke(
        main, ["finetune", str(image_folder), "--out", str(tmp_path / "run"), *TINY, "--on-bad-image", "fail"]
    )
    assert result.exit_code == 1 and "zero.png" in result.stderr and "--on-bad-image skip" in result.stderr
    assert not (tmp_path / "run").exists()


def test_too_few_readable_images_left(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / cls / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a" / "ok2.png")
    (tmp_path / "d" / "b" / "bad.png").write_bytes(b"")
    with pytest.raises(DataError, match="class 'b' has 1 readable image"):
        drop_unreadable(scan_image_folder(tmp_path / "d"), min_per_class=2)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="0 class folder"):
        scan_image_folder(tmp_path / "empty")


def test_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        scan_image_folder(tmp_path / "f.png")


def test_symlink_loop_does_not_hang(image_folder):
    os.symlink(image_folder, image_folder / "red" / "loop")
    os.symlink(image_folder / "red" / "nowhere.png", image_folder / "red" / "dangling.png")
    folder = scan_image_folder(image_folder)
    assert folder.counts() == [16, 16, 17]  # the link to nothing is listed, to be reported ...
    kept = drop_unreadable(folder)
    assert kept.counts() == [16, 16, 16]  # ... as unreadable, not dropped unseen
    assert [os.path.basename(p) for p, _ in kept.skipped] == ["dangling.png"]


def test_hidden_files_and_folders_are_not_images(image_folder):
    (image_folder / "red" / "._img.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble metadata")
    (image_folder / "red" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(image_folder / "red" / ".thumbs" / "t.png")
    (image_folder / ".trash").mkdir()
    Image.new("RGB", (8, 8)).save(image_folder / ".trash" / "x.png")
    Image.new("RGB", (20, 20), (200, 10, 10)).save(image_folder / "red" / "scan.tiff")
    folder = scan_image_folder(image_folder)
    assert folder.classes == ("blue", "green", "red") and folder.counts() == [16, 16, 17]
    assert drop_unreadable(folder).skipped == ()


def test_classes_that_are_one_folder_or_look_alike_are_warned(tmp_path, caplog):
    root = tmp_path / "d"
    for name in ("blue", "Cat", "cat", "caf\u00e9", "cafe\u0301"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")
    os.symlink(root / "blue", root / "blue2")
    with caplog.at_level("WARNING", logger="edgetl"):
        folder = scan_image_folder(root)
    assert len(folder.classes) == 6  # still separate classes: a warning, not a guess
    text = caplog.text
    assert "'blue', 'blue2' are the same folder" in text
    assert "'Cat', 'cat' differ only by case or Unicode form" in text
    assert "'cafe\\u0301', 'caf\\xe9' differ only by case or Unicode form" in text


def test_outputs_inside_the_data_and_validation_on_training_images_are_refused(image_folder, tmp_path):
    cases = [
        (["--out", str(image_folder / "runs" / "r1")], 1, "inside the training data"),
        (["--out", str(tmp_path / "r"), "--val-dir", str(image_folder)], 2, "is the training data"),
        (["--out", str(tmp_path / "r"), "--val-dir", str(image_folder / "red")], 2, "is inside the training data"),
    ]
    for args, code, message in cases:
        result = CliRunner().invoke(main, ["finetune", str(image_folder), *args, *TINY])
        assert result.exit_code == code and message in result.stderr, result.output
        assert "Traceback" not in result.output
    assert sorted(p.name for p in image_folder.iterdir()) == ["blue", "green", "red"]  # nothing written there
    assert not (tmp_path / "r").exists()
    study = CliRunner().invoke(
        main, ["study", str(image_folder), "--out", str(image_folder / "red" / "s"), "--strategies", "scratch"]
    )
    assert study.exit_code == 1 and "inside the training data" in study.stderr, study.output
    head = CliRunner().invoke(  # refused before the bundle is even opened
        main, ["finetune", str(image_folder), "--out", str(image_folder / "heads"), "--trunk-from", str(tmp_path / "b")]
    )
    assert head.exit_code == 1 and "inside the training data" in head.stderr, head.output


def test_ctrl_c_says_how_to_resume_once_there_is_a_checkpoint(image_folder, tmp_path, monkeypatch):
    from edgetl.workstation import train

    run = tmp_path / "run"

    def interrupted(data, out, **kwargs):
        if kwargs["config"].epochs == 2:  # as far as a checkpoint
            train.partial_dir(out).mkdir()
            (train.partial_dir(out) / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "finetune", interrupted)
    early = CliRunner().invoke(main, ["finetune", str(image_folder), "--out", str(run), *TINY, "--epochs", "1"])
    assert early.exit_code == 130 and "Interrupted." in early.stderr and "--resume" not in early.stderr
    late = CliRunner().invoke(main, ["finetune", str(image_folder), "--out", str(run), *TINY])
    assert late.exit_code == 130 and f"continue it with `edgetl finetune --resume {run}`" in late.stderr


def test_validation_copies_of_training_images_are_warned(image_folder, tmp_path, caplog):
    import shutil

    from edgetl.workstation.options import TrainConfig
    from edgetl.workstation.prepare import prepare_data
    from tests.helpers import make_image_folder

    val = make_image_folder(tmp_path / "val", per_class=4, seed=7)
    with caplog.at_level("WARNING", logger="edgetl"):
        prepare_data(image_folder, TrainConfig(), val_dir=val)
    assert "copies of training images" not in caplog.text  # distinct images: no warning
    shutil.copyfile(image_folder / "red" / "red_003.png", val / "red" / "renamed.png")
    shutil.copyfile(image_folder / "blue" / "blue_000.png", val / "green" / "mislabelled.png")
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgetl"):
        prepare_data(image_folder, TrainConfig(), val_dir=val)
    assert "2 validation image(s) are byte-for-byte copies of training images" in caplog.text
    shutil.copyfile(image_folder / "green" / "green_001.png", image_folder / "green" / "dup.png")
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgetl"):  # a copy inside DATA can land on both sides of the split
        prepared = prepare_data(image_folder, TrainConfig(val_split=0.5, seed=3))
    names = {os.path.basename(s.path) for s in prepared.val}
    both = {"dup.png", "green_001.png"}
    assert len(names & both) == 1  # seed 3 splits the pair (checked): the copy is on both sides
    assert "1 validation image(s) are byte-for-byte copies" in caplog.text
