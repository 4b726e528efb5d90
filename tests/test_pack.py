"""`edgetl pack` / `unpack`: a bundle travels as one file; hostile archives are refused before extraction."""

from __future__ import annotations

import io
import shutil
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
from tests.schemas import validate_document


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
    result = runner.invoke(main, ["pack", str(bundle), "--out", str(tmp_path / "x.tar.gz"), "--json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "pack")
    assert doc["bundle"] == str(bundle) and doc["results"][0]["files"] >= 4
    assert doc["results"][0]["sha256"] == sha256_file(tmp_path / "x.tar.gz")
    result = runner.invoke(main, ["unpack", str(tmp_path / "x.tar.gz"), "--out", str(tmp_path / "dev"), "--json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "unpack")
    assert doc["bundle"] == doc["results"][0]["bundle"] == str(tmp_path / "dev")
    assert set(doc["results"][0]["heads"]) == {"colour", "brightness"}
    evil = _tar(tmp_path / "evil.tar.gz", [*_bundle_members(bundle), _file("../x", b"x")])
    result = runner.invoke(main, ["unpack", str(evil), "--out", str(tmp_path / "dev2")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(main, ["unpack", str(evil), "--out", str(tmp_path / "dev2"), "--json"])
    assert validate_document(result.stdout, "unpack")["error"]["exit_code"] == 1
    for command in ("pack", "unpack"):
        help_text = runner.invoke(main, [command, "--help"]).output
        assert "Example:" in help_text and "--out" in help_text


def test_pack_prints_the_full_sha256_that_unpack_accepts(bundle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["pack", str(bundle), "--out", str(tmp_path / "a.tar.gz")])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1  # still one line, in a pipe too
    printed = result.stdout.split()[-1]  # the last word of the line
    assert printed == sha256_file(tmp_path / "a.tar.gz") and len(printed) == 64
    result = runner.invoke(
        main, ["unpack", str(tmp_path / "a.tar.gz"), "--out", str(tmp_path / "ok"), "--sha256", printed]
    )
    assert result.exit_code == 0, result.output
    verify_files(tmp_path / "ok", read_manifest(tmp_path / "ok"))
    # a shortened checksum could never match: a usage error, before anything is read or written
    for wrong in (printed[:16], printed[:16] + "...", "z" * 64):
        result = runner.invoke(
            main, ["unpack", str(tmp_path / "a.tar.gz"), "--out", str(tmp_path / "no"), "--sha256", wrong]
        )
        assert result.exit_code == 2 and "64 hex digits" in result.stderr, result.output
        assert not (tmp_path / "no").exists()


def _bundle_mtimes(bundle: Path, when: float) -> None:
    import os

    for p in [bundle, *bundle.rglob("*")]:
        os.utime(p, (when, when))


def test_pack_is_byte_for_byte_reproducible(bundle, tmp_path):
    import gzip
    import hashlib
    import os

    copy = shutil.copytree(bundle, tmp_path / "first" / "colours")
    _bundle_mtimes(copy, 1_000_000_000)
    one = pack_bundle(copy, tmp_path / "one.tar.gz")
    _bundle_mtimes(copy, 1_700_000_000)  # other times, other permissions: the same archive
    os.chmod(copy / "onnx" / "head.colour.onnx", 0o600)
    os.chmod(copy / "onnx", 0o700)
    two = pack_bundle(copy, tmp_path / "two.tar.gz")
    elsewhere = shutil.copytree(copy, tmp_path / "second" / "colours")  # another folder, the same name
    three = pack_bundle(elsewhere, tmp_path / "three.tar.gz")
    data = (tmp_path / "one.tar.gz").read_bytes()
    assert data == (tmp_path / "two.tar.gz").read_bytes() == (tmp_path / "three.tar.gz").read_bytes()
    assert one["sha256"] == two["sha256"] == three["sha256"] == hashlib.sha256(data).hexdigest()
    # gzip header: no file name (FLG 0), mtime 0
    assert data[:3] == b"\x1f\x8b\x08" and data[3] == 0 and data[4:8] == bytes(4)
    with tarfile.open(tmp_path / "one.tar.gz") as tar:
        members = tar.getmembers()
    created = 1704067200  # the factory's created_utc, 2024-01-01T00:00:00Z
    assert {m.mtime for m in members} == {created}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert {m.mode for m in members if m.isfile()} == {0o644} and {m.mode for m in members if m.isdir()} == {0o755}
    names = [m.name for m in members]
    assert names[:2] == ["colours", "colours/manifest.json"]
    files = [m.name for m in members[2:] if m.isfile()]
    assert files == sorted(files) and len(gzip.decompress(data)) % 10240 == 0


def test_unpack_runs_on_a_device_without_torch(archive, tmp_path):

    from tests.test_no_torch import BLOCK_TORCH, run_python

    code = BLOCK_TORCH + (
        "from click.testing import CliRunner\nfrom edgetl.cli import main\n"
        f"r = CliRunner().invoke(main, ['unpack', {str(archive)!r}, '--out', {str(tmp_path / 'dev')!r}])\n"
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
    result = CliRunner().invoke(main, ["unpack", str(truncated), "--out", str(tmp_path / "bad"), "--sha256", good])
    assert result.exit_code == 1 and "incomplete or altered" in result.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_the_positional_output_still_works_with_a_warning(bundle, archive, tmp_path, command):
    source = bundle if command == "pack" else archive
    out = tmp_path / ("x.tar.gz" if command == "pack" else "dev")
    runner = CliRunner()
    result = runner.invoke(main, [command, str(source), str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and len(result.stdout.splitlines()) == 1
    assert result.stderr.count("deprecated") == 1 and f"--out {out}" in result.stderr
    # both, or neither: a usage error (exit 2), one line, nothing written
    for args in ([str(source), str(tmp_path / "a"), "--out", str(tmp_path / "b")], [str(source)]):
        result = runner.invoke(main, [command, *args])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
        assert "--out" in result.stderr and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
        result = runner.invoke(main, [command, *args, "--json"])
        assert validate_document(result.stdout, command)["error"]["exit_code"] == 2


def test_pack_force_replaces_only_an_archive_pack_wrote(bundle, archive, tmp_path):
    notes = tmp_path / "notes.tar.gz"
    notes.write_text("precious, not an archive")
    result = CliRunner().invoke(main, ["pack", str(bundle), "--out", str(notes), "--force"])
    assert result.exit_code == 1 and "replaces only an archive `edgetl pack` wrote" in result.stderr, result.output
    assert notes.read_text() == "precious, not an archive"
    again = tmp_path / "again.tar.gz"
    shutil.copyfile(archive, again)
    assert CliRunner().invoke(main, ["pack", str(bundle), "--out", str(again), "--force"]).exit_code == 0
    folder = CliRunner().invoke(main, ["pack", str(bundle), "--out", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder; give the archive's file name" in folder.stderr, folder.output
    assert ".tmp" not in folder.stderr
