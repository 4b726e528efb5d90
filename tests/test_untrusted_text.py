"""Names from user data (file names, class folders, labels) are untrusted text: escaped for the
terminal, TSV, CSV and logs, wherever edgetl prints them."""

import csv
import io
import json
import logging
import os

import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.cli._common import setup_logging
from edgetl.cli._output import clean, clean_log, csv_cell, tsv_cell
from tests.bundle_factory import build_bundle, write_colour_images

TINY = ["--backbone", "tiny_test", "--weights", "none", "--epochs", "1", "--batch-size", "16", "--no-progress"]
# What a terminal acts on: ESC (CSI, OSC), BEL, CR, the 8-bit CSI, and a right-to-left override.
HOSTILE = "x\x1b]0;pwned\x07\x1b[31m\r\x9b2J\u202ey"
RAW = ("\x1b", "\x07", "\r", "\x9b", "\u202e")


def _raw(text: str) -> list[str]:
    return [c for c in RAW if c in text]


def test_every_escape_leaves_no_control_character():
    for escape in (clean, tsv_cell, csv_cell):
        shown = escape(HOSTILE)
        assert _raw(shown) == [] and "\n" not in shown, (escape.__name__, shown)
        assert "\\x1b" in shown and "\\x9b" in shown and "\\u202e" in shown
    assert clean("a\x85b\x00c\x7f") == "a\\x85b\\x00c\\x7f"  # C1 (NEL), NUL, DEL
    assert clean("café 日本 naïve") == "café 日本 naïve"  # letters of any script are left alone
    assert tsv_cell("a\tb\\c") == "a\\tb\\\\c"
    # A log message keeps its own line breaks but no other control character.
    assert clean_log("two\nlines \x1b[2J\u2066") == "two\nlines \\x1b[2J\\u2066"


@pytest.mark.parametrize("cell", ['=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)"])
def test_csv_cells_never_start_a_formula(cell):
    assert csv_cell(cell) == "'" + cell
    assert csv_cell("plain") == "plain" and csv_cell(-0.5) == "-0.5" and csv_cell(3) == "3"


def test_log_lines_are_escaped(capsys):
    setup_logging()
    logging.getLogger("edgetl.test").warning("skipped unreadable image: %s", HOSTILE)
    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and _raw(err) == [], repr(err)


def test_finetune_lists_a_hostile_file_name_escaped(image_folder, tmp_path):
    (image_folder / "red" / f"{HOSTILE}.png").write_bytes(b"not an image")
    result = CliRunner().invoke(main, ["finetune", str(image_folder), "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image(s)" in result.stdout
    assert _raw(result.stdout) == [] and _raw(result.stderr) == [], (result.stdout, result.stderr)
    assert "\\x1b]0;pwned\\x07" in result.stdout


def test_an_error_naming_a_hostile_path_is_one_escaped_line(tmp_path):
    result = CliRunner().invoke(main, ["finetune", str(tmp_path / f"no{HOSTILE}\nsuch"), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error:") and _raw(result.stderr) == [], result.stderr


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle") / "b")


def test_predict_csv_stays_one_row_per_image_and_spreadsheet_safe(bundle_dir, tmp_path, monkeypatch):
    write_colour_images(tmp_path / "src")
    folder = tmp_path / "odd"
    folder.mkdir()
    names = [f"{HOSTILE}.png", "b\rc.png", "=cmd.png", "@x.png"]
    for name, src in zip(names, ("red", "green", "blue", "red"), strict=True):
        (folder / name).write_bytes((tmp_path / "src" / f"{src}.png").read_bytes())
    monkeypatch.chdir(folder)  # images given as bare names: the image cell starts with the name
    result = CliRunner().invoke(main, ["predict", str(bundle_dir), *sorted(names), "--csv"])
    assert result.exit_code == 0, result.output
    assert _raw(result.stdout) == []
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert {len(r) for r in rows} == {8} and len(rows) == 1 + len(names)
    images = [r[0] for r in rows[1:]]
    assert "'=cmd.png" in images and "'@x.png" in images and "b\\x0dc.png" in images
    assert not any(cell.startswith(("=", "+", "@")) for r in rows for cell in r)


def test_predict_walks_no_hidden_files_reports_dangling_links_and_lists_skips(bundle_dir, tmp_path):
    write_colour_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "._red.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "imgs" / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / ".cache" / "thumb.png")
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "loop")  # a link to a folder is not followed
    os.symlink(tmp_path / "gone.png", tmp_path / "imgs" / "dangling.png")
    Image.new("RGB", (30, 20), (200, 20, 20)).save(tmp_path / "imgs" / "scan.tif")
    result = CliRunner().invoke(main, ["predict", str(bundle_dir), str(tmp_path / "imgs"), "--json", "--top-k", "9"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    seen = sorted(os.path.basename(r["image"]) for r in doc["results"])
    assert seen == ["blue.png", "green.png", "red.png", "scan.tif"]
    assert doc["top_k"] == 3  # the bundle has 3 labels: that is what each record can list
    skipped = doc["summary"]["skipped_files"]
    assert doc["summary"]["skipped"] == 1 and [os.path.basename(s["path"]) for s in skipped] == ["dangling.png"]
    assert skipped[0]["reason"]


def test_table_headers_from_user_data_are_escaped_and_not_markup(capsys, monkeypatch):
    from edgetl.cli import _output

    monkeypatch.setattr(_output, "stdout_is_terminal", lambda: True)
    _output.emit_table("table", ["true", "a\x1b[31mRED", "[bold]b[/bold]", "c\x9bd"], [["x", 1, 2, 3]])
    out = capsys.readouterr().out
    assert _raw(out) == [] and "\\x1b[31mRED" in out and "[bold]b[/bold]" in out and "\\x9bd" in out, out
