"""--force replaces only what the same command wrote, never its input; concurrent writers are refused."""

from __future__ import annotations

import pytest

from edgetl.core.atomic import atomic_directory, check_output, output_lock
from edgetl.core.errors import OutputBusyError, OutputExistsError


def test_force_replaces_only_a_folder_of_the_same_kind(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    (data / "cat.jpg").write_bytes(b"precious")
    with (
        pytest.raises(OutputExistsError, match="replaces only a bundle folder"),
        atomic_directory(data, force=True, kind="bundle") as tmp,
    ):
        (tmp / "manifest.json").write_text("{}")
    assert (data / "cat.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temp folder, no lock left behind

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    with atomic_directory(bundle, force=True, kind="bundle") as tmp:
        (tmp / "manifest.json").write_text('{"new": 1}')
    assert (bundle / "manifest.json").read_text() == '{"new": 1}'


def test_an_output_that_is_or_contains_an_input_is_refused(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    for out in (run, tmp_path / "runs", tmp_path):
        with pytest.raises(OutputExistsError, match="this command's input"):
            check_output(out, force=True, kind="run", inputs=[run])
    check_output(tmp_path / "elsewhere", force=True, kind="run", inputs=[run])  # a new path is fine


def test_a_second_writer_fails_at_once_and_the_first_finishes(tmp_path):
    out = tmp_path / "b"
    with atomic_directory(out) as tmp:
        (tmp / "manifest.json").write_text("first")
        with (
            pytest.raises(OutputBusyError, match="another edgetl command is writing"),
            atomic_directory(out, force=True, kind="bundle"),
        ):
            pytest.fail("the second writer must not start")
    assert (out / "manifest.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the lock went with its holder
    with output_lock(out):  # released when the first writer finished
        pass
