"""One file to copy to the device: ``pack`` a verified bundle into a .tar.gz, ``unpack`` one safely.

An archive that arrives on a device is untrusted data. :func:`unpack_bundle` reads it member by
member and refuses, before anything is written, an archive whose members would leave the target
folder (absolute paths, ``..``), are anything but regular files and folders (symbolic or hard
links, devices, FIFOs, sparse files), repeat a name, or exceed the size and count limits; only then
does it extract, with tarfile's ``data`` filter as a second line of defence, into a temporary
folder beside the target. The bundle is then verified like any other (schema and every file's
sha256), files the manifest does not list are refused, and only a verified bundle is renamed into
place.
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from edgetl.core.atomic import atomic_directory
from edgetl.core.bundle import MANIFEST_NAME, read_manifest, sha256_file, verify_files
from edgetl.core.errors import BundleError, ConfigError, OutputExistsError

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


def pack_bundle(bundle: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> dict[str, Any]:
    """Verify ``bundle`` and write it to the gzip tar ``out`` under one top folder (the bundle's name).

    Only the files the manifest lists are packed (no stray files). The archive is written to a
    temporary file and renamed, so ``out`` is either complete or absent.
    """
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    if out.resolve().is_relative_to(bundle.resolve()):
        raise ConfigError(f"the archive {out} must not be written inside the bundle {bundle}")
    top = bundle.resolve().name
    rels = bundle_files(bundle, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            tar.add(bundle, arcname=top, recursive=False, filter=_normalise)
            for folder in sorted({str(PurePosixPath(r).parent) for r in rels} - {"."}):
                tar.add(bundle / folder, arcname=f"{top}/{folder}", recursive=False, filter=_normalise)
            for rel in rels:
                tar.add(bundle / rel, arcname=f"{top}/{rel}", recursive=False, filter=_normalise)
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


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner names or ids from the workstation; plain read permissions."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def _member_path(name: str, archive: Path) -> PurePosixPath:
    """A member's path, checked: relative, no ``..``, no backslashes or NUL, not empty."""
    if not name or "\\" in name or "\0" in name:
        raise BundleError(f"archive {archive}: member {name!r} has an invalid name; refusing to unpack")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/"):
        raise BundleError(f"archive {archive}: member {name!r} is an absolute path; refusing to unpack")
    if ".." in p.parts:
        raise BundleError(f"archive {archive}: member {name!r} leaves the target folder (..); refusing to unpack")
    parts = [x for x in p.parts if x != "."]
    if not parts:
        raise BundleError(f"archive {archive}: member {name!r} has an empty path; refusing to unpack")
    return PurePosixPath(*parts)


def _checked_members(
    tar: tarfile.TarFile, archive: Path, max_bytes: int, max_files: int
) -> Iterator[tuple[tarfile.TarInfo, PurePosixPath]]:
    """Members one at a time, each checked as soon as its header is read (a huge or hostile archive
    fails at the first bad member, not after reading everything)."""
    total, seen = 0, set()
    for count, member in enumerate(tar, start=1):
        if count > max_files:
            raise BundleError(f"archive {archive} has more than {max_files} members; refusing to unpack")
        path = _member_path(member.name, archive)
        if member.issym() or member.islnk():
            raise BundleError(f"archive {archive}: member {member.name!r} is a link; refusing to unpack")
        if member.issparse() or not (member.isreg() or member.isdir()):
            raise BundleError(
                f"archive {archive}: member {member.name!r} is not a regular file or folder (device, FIFO, sparse); "
                "refusing to unpack"
            )
        if path in seen:
            raise BundleError(f"archive {archive}: member {member.name!r} appears twice; refusing to unpack")
        seen.add(path)
        total += member.size
        if total > max_bytes:
            raise BundleError(
                f"archive {archive} unpacks to more than {max_bytes / 1e6:.0f} MB; refusing to unpack "
                "(raise --max-size if the bundle really is that large)"
            )
        yield member, path


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
    writes) or the bundle's files at its root. ``sha256``: the archive's expected checksum (what
    ``pack`` printed), checked before anything is read from it.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise BundleError(f"archive {archive} does not exist")
    if sha256 is not None:
        actual = sha256_file(archive)
        if actual != sha256.lower():
            raise BundleError(
                f"archive {archive} has sha256 {actual[:16]}..., expected {sha256[:16]}...: it is "
                "incomplete or altered (copy it again)"
            )
    if max_bytes < 1 or max_files < 1:
        raise ConfigError("the size and file-count limits must be >= 1")
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} already exists; pass --force to replace it, or choose another folder")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = list(_checked_members(tar, archive, max_bytes, max_files))
            prefix = _bundle_root(members, archive)
            with atomic_directory(dest, force=force) as tmp:
                selected = []
                for member, path in members:
                    rel = PurePosixPath(*path.parts[len(prefix.parts) :]) if prefix.parts else path
                    if not rel.parts:
                        continue  # the top folder itself
                    selected.append(member.replace(name=rel.as_posix(), deep=False))
                tar.extractall(tmp, members=selected, filter="data")
                try:
                    manifest = read_manifest(tmp)
                    verify_files(tmp, manifest)
                except BundleError as exc:
                    # The checks name the temporary folder; name the archive and the target instead.
                    raise BundleError(f"archive {archive}: {str(exc).replace(str(tmp), str(dest))}") from None
                listed = set(bundle_files(tmp, manifest))
                stray = sorted(
                    p.relative_to(tmp).as_posix()
                    for p in tmp.rglob("*")
                    if p.is_file() and p.relative_to(tmp).as_posix() not in listed
                )
                if stray:
                    raise BundleError(
                        f"archive {archive} holds files its manifest does not list ({', '.join(stray[:3])}); "
                        "refusing to unpack"
                    )
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BundleError(f"{archive} is not a readable tar archive ({exc})") from None
    size = sum(m.size for m, _ in members)
    log.info("unpacked and verified %s -> %s (%d files, %.1f MB)", archive, dest, len(listed), size / 1e6)
    return {
        "bundle": str(dest),
        "archive": str(archive),
        "files": len(listed),
        "bytes": size,
        "variants": list(manifest["variants"]),
        "heads": list(manifest["heads"]),
    }


def _bundle_root(members: list[tuple[tarfile.TarInfo, PurePosixPath]], archive: Path) -> PurePosixPath:
    """Where the manifest is: the archive's root, or the single top folder."""
    paths = [p for _, p in members]
    if PurePosixPath(MANIFEST_NAME) in paths:
        return PurePosixPath()
    tops = {p.parts[0] for p in paths}
    if len(tops) == 1:
        top = PurePosixPath(next(iter(tops)))
        if top / MANIFEST_NAME in paths:
            return top
    raise BundleError(
        f"archive {archive} is not a packed bundle: no {MANIFEST_NAME} at its root or in a single top folder "
        "(make one with `edgetl pack BUNDLE OUT.tar.gz`)"
    )
