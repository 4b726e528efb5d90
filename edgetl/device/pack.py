"""One file to copy to the device: ``pack`` a verified bundle into a .tar.gz, ``unpack`` one safely.

An archive that arrives on a device is untrusted data. :func:`unpack_bundle` reads it once, as a
stream, member by member, and refuses before a member is written: a path that would leave the
target folder (absolute, ``..``), anything but regular files and folders (symbolic or hard links,
devices, FIFOs, sparse files), a repeated name, more members or bytes than the limits, and, once
the manifest (the first file) is read, any file the manifest does not list or of another size than
it lists. The files go to a temporary folder beside the target; the bundle is then verified like
any other (every file's sha256) and only a verified bundle is renamed into place. :func:`pack_bundle`
applies the same member rules (:func:`check_member`), so it never writes what unpack refuses."""

from __future__ import annotations

import datetime
import gzip
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from edgetl.core.atomic import atomic_directory
from edgetl.core.bundle import MANIFEST_NAME, read_manifest, sha256_file, verify_files
from edgetl.core.errors import BundleError, ConfigError, OutputExistsError
from edgetl.core.jsonio import MAX_JSON_BYTES

log = logging.getLogger(__name__)

# A MobileNetV2 bundle with every variant is ~40 MB; ResNet-50 fp32 ONNX + IR ~200 MB.
DEFAULT_MAX_BYTES = 4 * 1024**3
DEFAULT_MAX_FILES = 10_000


def bundle_files(bundle_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Every file of a bundle, relative: the manifest, then each listed model file and its companions."""
    rels = [MANIFEST_NAME]
    for rel, rec in manifest["files"].items():
        rels.append(rel)
        rels.extend((rec.get("extra_files") or {}).keys())
    return list(dict.fromkeys(rels))


def _is_pack_archive(path: Path) -> bool:
    """Whether ``path`` is a gzip tar as :func:`pack_bundle` writes it: a top folder, then its
    manifest.json (only the first two members are read)."""
    try:
        with tarfile.open(path, "r|gz") as tar:
            first, second = next(iter(tar), None), tar.next()
    except (OSError, tarfile.TarError, EOFError):
        return False
    return first is not None and second is not None and first.isdir() and second.name == f"{first.name}/{MANIFEST_NAME}"


def pack_bundle(bundle: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> dict[str, Any]:
    """Verify ``bundle`` and write it to the gzip tar ``out`` under one top folder (the bundle's name).

    Only the files the manifest lists are packed (no stray files). The archive is reproducible:
    the same bundle gives the same bytes every time, whatever the files' times, owners and
    permissions on this machine (see :func:`_normalise`; gzip header without time or file name;
    members in a fixed order: the manifest first, then folders and files sorted). The archive is
    written to a temporary file and renamed, so ``out`` is either complete or absent. Returns
    ``{archive, bundle, files, bytes, archive_bytes, sha256}`` (the full sha256 that ``unpack
    --sha256`` checks).
    """
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    if out.is_dir():
        example = out / f"{bundle.name}.tar.gz"
        raise ConfigError(f"--out {out} is a folder; give the archive's file name, e.g. {example}")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not _is_pack_archive(out):
        raise OutputExistsError(
            f"--force replaces only an archive `edgetl pack` wrote, and {out} is not one; choose another --out "
            "or remove it yourself"
        )
    if out.resolve().is_relative_to(bundle.resolve()):
        raise ConfigError(f"the archive {out} must not be written inside the bundle {bundle}")
    top = bundle.resolve().name
    rels = bundle_files(bundle, manifest)
    mtime = _member_mtime(manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # gzip's header holds a time and the file's name unless told otherwise: mtime 0, no name.
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):

            def add(rel: str | None) -> None:
                source, arcname = (bundle, top) if rel is None else (bundle / rel, f"{top}/{rel}")

                def checked(info: tarfile.TarInfo) -> tarfile.TarInfo:
                    check_member(info, f"bundle {bundle}: {rel or '.'}", "pack")  # what unpack refuses
                    return _normalise(info, mtime)

                tar.add(source, arcname=arcname, recursive=False, filter=checked)

            # The manifest first: unpack reads it first and checks every other member against it.
            add(None)
            add(MANIFEST_NAME)
            for folder in sorted({str(PurePosixPath(r).parent) for r in rels} - {"."}):
                add(folder)
            for rel in sorted(rels[1:]):
                add(rel)
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = sum((bundle / r).stat().st_size for r in rels)
    log.info(
        "packed %d files (%.1f MB) of %s into %s (%.1f MB)",
        len(rels),
        size / 1e6,
        bundle,
        out,
        out.stat().st_size / 1e6,
    )
    return {
        "archive": str(out),
        "bundle": str(bundle),
        "files": len(rels),
        "bytes": size,
        "archive_bytes": out.stat().st_size,
        "sha256": sha256_file(out),
    }


def _member_mtime(manifest: dict[str, Any]) -> int:
    """Every member's time: the bundle's creation time from its manifest (fixed for a bundle, and
    a meaningful date once unpacked), else 0."""
    created = manifest.get("created_utc")
    if isinstance(created, str):
        try:
            when = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            return 0
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return max(0, min(int(when.timestamp()), 8**11 - 1))  # what a ustar header holds
    return 0


def _normalise(info: tarfile.TarInfo, mtime: int = 0) -> tarfile.TarInfo:
    """Nothing from this machine: no owner names or ids, plain read permissions, a fixed time."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    info.mtime = mtime
    info.devmajor = info.devminor = 0
    return info


def check_member(member: tarfile.TarInfo, where: str, action: str = "unpack") -> PurePosixPath:
    """The rules every archive member obeys, on both sides: ``pack`` refuses to write what ``unpack``
    would refuse to read (a bundle with a symbolic link packed fine and then failed on the device).
    Returns the member's path: relative, no ``..``, no backslash or NUL, a regular file or folder."""
    name = member.name
    if not name or "\\" in name or "\0" in name:
        raise BundleError(f"{where}: member {name!r} has an invalid name; refusing to {action}")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/"):
        raise BundleError(f"{where}: member {name!r} is an absolute path; refusing to {action}")
    if ".." in p.parts:
        raise BundleError(f"{where}: member {name!r} leaves the target folder (..); refusing to {action}")
    parts = [x for x in p.parts if x != "."]
    if not parts:
        raise BundleError(f"{where}: member {name!r} has an empty path; refusing to {action}")
    if member.issym() or member.islnk():
        raise BundleError(f"{where}: member {name!r} is a link; refusing to {action}")
    if member.issparse() or not (member.isreg() or member.isdir()):
        raise BundleError(
            f"{where}: member {name!r} is not a regular file or folder (device, FIFO, sparse); refusing to {action}"
        )
    return PurePosixPath(*parts)


def parse_sha256(text: str) -> str:
    """The 64 hex digits `pack` prints (any case, surrounding spaces ignored), lower-case; anything
    else (a shortened one, a typo) is a ConfigError: it could never match."""
    value = text.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError(
            f"--sha256 {text.strip()[:80]!r} is not a sha256: give the 64 hex digits `edgetl pack` prints"
        )
    return value


def unpack_bundle(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    force: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    sha256: str | None = None,
) -> dict[str, Any]:
    """Safely extract a packed bundle into ``dest`` and verify it; nothing appears unless it verifies.

    The archive holds either one top folder with the bundle inside (what :func:`pack_bundle`
    writes) or the bundle's files at its root, the manifest as its first file (``pack`` writes it
    first). The archive is read once, as a stream: the manifest is read first, then each member is
    checked against it (a file the manifest lists, of the size it lists, within ``max_bytes``)
    before a byte of it is written, and the first one that is not stops the unpack (a 9 MB archive
    with an unlisted 1 GB member of zeros used to write all of it before the check). ``sha256``:
    the archive's expected checksum (what ``pack`` printed), checked before anything is read.
    ``force`` replaces only a bundle folder, never one holding the archive.
    """
    archive, dest = Path(archive), Path(dest)
    expected = parse_sha256(sha256) if sha256 is not None else None
    if not archive.is_file():
        raise BundleError(f"archive {archive} does not exist")
    if expected is not None:
        actual = sha256_file(archive)
        if actual != expected:
            raise BundleError(
                f"archive {archive} has sha256 {actual}, expected {expected}: "
                "it is incomplete or altered (copy it again)"
            )
    if max_bytes < 1 or max_files < 1:
        raise ConfigError("the size and file-count limits must be >= 1")
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} already exists; pass --force to replace it, or choose another folder")
    try:
        with (
            tarfile.open(archive, "r|*") as tar,
            atomic_directory(dest, force=force, kind="bundle", inputs=[archive]) as tmp,
        ):
            manifest, total = _extract_checked(tar, archive, dest, tmp, max_bytes, max_files)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"{archive} is not a readable tar archive ({exc})") from None
    files = len(bundle_files(dest, manifest))
    log.info("unpacked and verified %s -> %s (%d files, %.1f MB)", archive, dest, files, total / 1e6)
    return {
        "bundle": str(dest),
        "archive": str(archive),
        "files": files,
        "bytes": total,
        "variants": list(manifest["variants"]),
        "heads": list(manifest["heads"]),
    }


def _extract_checked(
    tar: tarfile.TarFile, archive: Path, dest: Path, tmp: Path, max_bytes: int, max_files: int
) -> tuple[dict[str, Any], int]:
    """Read the members in order into ``tmp``: each checked before it is written (see
    :func:`unpack_bundle`); then every file's sha256. Returns the manifest and the bytes written."""
    where = f"archive {archive}"
    manifest: dict[str, Any] | None = None
    listed: dict[str, int | None] = {}
    prefix = PurePosixPath()
    folders: list[PurePosixPath] = []
    seen: set[PurePosixPath] = set()
    total = 0
    for count, member in enumerate(tar, start=1):
        if count > max_files:
            raise BundleError(f"{where} has more than {max_files} members; refusing to unpack")
        path = check_member(member, where)
        if path in seen:
            raise BundleError(f"{where}: member {member.name!r} appears twice; refusing to unpack")
        seen.add(path)
        if member.isdir():  # nothing to write: files create their folders
            folders.append(path)
            continue
        if manifest is None:
            if path.name != MANIFEST_NAME or len(path.parts) > 2:
                raise BundleError(
                    f"{where}: its first file is {member.name!r}, not {MANIFEST_NAME}; not a packed bundle "
                    "(make one with `edgetl pack BUNDLE --out OUT.tar.gz`, which writes the manifest first)"
                )
            if member.size > MAX_JSON_BYTES:
                raise BundleError(f"{where}: its {MANIFEST_NAME} is {member.size / 1e6:.0f} MB; refusing to unpack")
            prefix = path.parent
            _write_member(tar, member, tmp / MANIFEST_NAME)
            total += member.size
            try:
                manifest = read_manifest(tmp)
            except BundleError as exc:  # the check names the temporary folder; name the archive instead
                raise BundleError(f"{where}: {str(exc).replace(str(tmp), str(dest))}") from None
            listed = _listed_sizes(manifest)
            continue
        rel = _inside(path, prefix)
        if rel is None or rel not in listed or rel == MANIFEST_NAME:
            raise BundleError(f"{where}: member {member.name!r} is not a file its manifest lists; refusing to unpack")
        if listed[rel] is not None and member.size != listed[rel]:
            raise BundleError(
                f"{where}: member {member.name!r} is {member.size} bytes but its manifest lists {listed[rel]} bytes; "
                "refusing to unpack"
            )
        total += member.size
        if total > max_bytes:
            raise BundleError(
                f"{where} unpacks to more than {max_bytes / 1e6:.0f} MB; refusing to unpack "
                "(raise --max-size if the bundle really is that large)"
            )
        _write_member(tar, member, tmp / rel)
    if manifest is None:
        raise BundleError(
            f"{where} is not a packed bundle: no {MANIFEST_NAME} at its root or in a single top folder "
            "(make one with `edgetl pack BUNDLE --out OUT.tar.gz`)"
        )
    outside = [f for f in folders if f != prefix and _inside(f, prefix) is None]
    if outside:
        raise BundleError(
            f"{where}: folder {outside[0].as_posix()!r} is outside the bundle's folder; refusing to unpack"
        )
    try:
        verify_files(tmp, manifest)
    except BundleError as exc:
        raise BundleError(f"{where}: {str(exc).replace(str(tmp), str(dest))}") from None
    return manifest, total


def _listed_sizes(manifest: dict[str, Any]) -> dict[str, int | None]:
    """Every file the manifest lists (model files and their companions) with its recorded size."""
    sizes: dict[str, int | None] = {}
    for rel, rec in manifest["files"].items():
        for name, r in [(rel, rec), *(rec.get("extra_files") or {}).items()]:
            size = r.get("bytes") if isinstance(r, dict) else None
            sizes[name] = size if isinstance(size, int) and not isinstance(size, bool) else None
    return sizes


def _inside(path: PurePosixPath, prefix: PurePosixPath) -> str | None:
    """``path`` relative to the bundle's folder in the archive, or None when it is outside."""
    if prefix.parts and path.parts[: len(prefix.parts)] != prefix.parts:
        return None
    rest = path.parts[len(prefix.parts) :]
    return PurePosixPath(*rest).as_posix() if rest else None


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Copy one checked regular member to ``target`` (a new file; its path was checked)."""
    source = tar.extractfile(member)
    if source is None:  # not a regular file: check_member already refused it
        raise BundleError(f"archive member {member.name!r} has no data")
    target.parent.mkdir(parents=True, exist_ok=True)
    with source, open(target, "xb") as f:
        shutil.copyfileobj(source, f, 1 << 20)
