import numpy as np
import pytest
from PIL import Image

from edgetl.core.errors import DataError
from edgetl.core.imagefolder import drop_unreadable, scan_image_folder
from edgetl.workstation.data import stratified_split, write_digits


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
    with pytest.raises(DataError, match="not empty"):
        write_digits(tmp_path / "digits")
