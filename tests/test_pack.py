"""`edgetl pack` / `unpack`: a bundle travels as one file; hostile archives are refused before extraction."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.bundle import read_manifest, sha256_file, verify_files
from edgetl.core.errors import BundleError, OutputExistsError
from edgetl.device.bundle_loading import open_bundle
from edgetl.device.pack import pack_bundle, unpack_bundle
from tests.bundle_factory import build_bundle, write_colour_images


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("pack") / "colours", heads=("colour", "brightness"))


@pytest.fixture(scope="module")
def archive(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archives") / "colours.tar.gz"
    pack_bundle(bundle, out)
    return out


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _bundle_members(bundle: Path, top: str = "b") -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        _file(f"{top}/{p.relative_to(bundle).as_posix()}", p.read_bytes())
        for p in sorted(bundle.rglob("*"))
        if p.is_file()
    ]


def test_pack_then_unpack_gives_the_same_verified_bundle(bundle, archive, tmp_path):
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert all(n == "colours" or n.startswith("colours/") for n in names)
        assert all(m.uid == 0 and m.uname == "" for m in tar.getmembers())
    doc = unpack_bundle(archive, tmp_path / "device" / "b")
    out = Path(doc["bundle"])
    m = read_manifest(out)
    verify_files(out, m)
    for rel in m["files"]:
        assert sha256_file(out / rel) == sha256_file(bundle / rel)
    assert doc["files"] == len(m["files"]) + 1 and set(doc["heads"]) == {"colour", "brightness"}
    images = write_colour_images(tmp_path / "img")
    record = open_bundle(out).load(heads="all").predict(list(images))
    assert [r["label"] for r in record if r["head"] == "colour"] == list(images.values())


def test_pack_packs_only_the_manifest_files_and_refuses_a_broken_bundle(bundle, tmp_path):
    import shutil

    copy = shutil.copytree(bundle, tmp_path / "copy")
    (copy / "notes.txt").write_text("not part of the bundle")
    doc = pack_bundle(copy, tmp_path / "a.tar.gz")
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        assert not any(n.endswith("notes.txt") for n in tar.getnames())
    assert doc["sha256"] == sha256_file(tmp_path / "a.tar.gz")
    with pytest.raises(OutputExistsError):
        pack_bundle(copy, tmp_path / "a.tar.gz")
    (copy / "onnx" / "head.colour.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="head.colour.onnx"):
        pack_bundle(copy, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


@pytest.mark.parametrize(
    "name, match",
    [
        ("../evil.txt", "leaves the target folder"),
        ("b/../../evil.txt", "leaves the target folder"),
        ("/etc/evil.txt", "absolute path"),
    ],
)
def test_unpack_refuses_paths_leaving_the_target(bundle, tmp_path, name, match):
    path = _tar(tmp_path / "evil.tar.gz", [*_bundle_members(bundle), _file(name, b"x")])
    with pytest.raises(BundleError, match=match):
        unpack_bundle(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "chardev", "fifo"])
def test_unpack_refuses_links_and_special_files(bundle, tmp_path, kind):
    info = tarfile.TarInfo("b/onnx/link")
    info.type = {
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "chardev": tarfile.CHRTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[kind]
    if kind in ("symlink", "hardlink"):
        info.linkname = "/etc/passwd"
    path = _tar(tmp_path / "evil.tar.gz", [*_bundle_members(bundle), (info, None)])
    with pytest.raises(BundleError, match="link|not a regular file"):
        unpack_bundle(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_oversized_duplicated_and_unlisted_content(bundle, tmp_path):
    members = _bundle_members(bundle)
    with pytest.raises(BundleError, match="more than"):
        unpack_bundle(_tar(tmp_path / "big.tar.gz", members), tmp_path / "o1", max_bytes=1000)
    with pytest.raises(BundleError, match="appears twice"):
        unpack_bundle(_tar(tmp_path / "dup.tar.gz", [*members, members[0]]), tmp_path / "o2")
    with pytest.raises(BundleError, match=r"extra\.bin.*not a file its manifest lists"):
        unpack_bundle(_tar(tmp_path / "stray.tar.gz", [*members, _file("b/extra.bin", b"?")]), tmp_path / "o3")
    with pytest.raises(BundleError, match="not a packed bundle"):
        unpack_bundle(_tar(tmp_path / "none.tar.gz", [_file("a/x.txt", b"x"), _file("c/y.txt", b"y")]), tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_unpack_verifies_checksums_and_names_the_file(bundle, tmp_path):
    members = [
        # same size, one byte changed: only the checksum can tell
        (info, data[:-1] + bytes([data[-1] ^ 1]) if info.name.endswith("head.colour.onnx") else data)
        for info, data in _bundle_members(bundle)
    ]
    with pytest.raises(BundleError, match=r"archive .*file onnx/head.colour.onnx does not match its sha256"):
        unpack_bundle(_tar(tmp_path / "t.tar.gz", members), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(BundleError, match="not a readable tar archive"):
        unpack_bundle(tmp_path / "junk.tar.gz", tmp_path / "out")


def test_unpack_accepts_files_at_the_root_and_replaces_only_with_force(bundle, archive, tmp_path):
    flat = _tar(
        tmp_path / "flat.tar.gz",
        [_file(p.relative_to(bundle).as_posix(), p.read_bytes()) for p in sorted(bundle.rglob("*")) if p.is_file()],
    )
    out = tmp_path / "out"
    unpack_bundle(flat, out)
    with pytest.raises(OutputExistsError, match="--force"):
        unpack_bundle(archive, out)
    unpack_bundle(archive, out, force=True)
    verify_files(out, read_manifest(out))


def test_cli_pack_unpack_and_one_line_errors(bundle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["pack", str(bundle), str(tmp_path / "x.tar.gz"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] >= 4
    result = runner.invoke(main, ["unpack", str(tmp_path / "x.tar.gz"), str(tmp_path / "dev"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bundle"] == str(tmp_path / "dev")
    evil = _tar(tmp_path / "evil.tar.gz", [*_bundle_members(bundle), _file("../x", b"x")])
    result = runner.invoke(main, ["unpack", str(evil), str(tmp_path / "dev2")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    for command in ("pack", "unpack"):
        assert "Example:" in runner.invoke(main, [command, "--help"]).output


def test_unpack_runs_on_a_device_without_torch(archive, tmp_path):

    from tests.test_no_torch import BLOCK_TORCH, run_python

    code = BLOCK_TORCH + (
        "from click.testing import CliRunner\nfrom edgetl.cli import main\n"
        f"r = CliRunner().invoke(main, ['unpack', {str(archive)!r}, {str(tmp_path / 'dev')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert not [m for m in sys.modules if m.partition('.')[0] in ('torch', 'torchvision')]\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dev" / "manifest.json").is_file()


def test_unpack_checks_the_archive_sha256_first(bundle, archive, tmp_path):
    good = sha256_file(archive)
    doc = unpack_bundle(archive, tmp_path / "ok", sha256=good.upper())
    assert doc["files"] == len(read_manifest(tmp_path / "ok")["files"]) + 1
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(BundleError, match="incomplete or altered"):
        unpack_bundle(truncated, tmp_path / "bad", sha256=good)
    assert not (tmp_path / "bad").exists()
    result = CliRunner().invoke(main, ["unpack", str(truncated), str(tmp_path / "bad"), "--sha256", good])
    assert result.exit_code == 1 and "incomplete or altered" in result.stderr and not (tmp_path / "bad").exists()
