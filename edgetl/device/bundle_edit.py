"""Change one head of a bundle in place, atomically: copy -> edit -> verify -> replace.

The one way a head is added or replaced in an existing bundle, on the workstation (``export
--add-to``, :mod:`edgetl.workstation.add_head`) and on the device (``edgetl learn``,
:mod:`edgetl.device.learn`). The bundle is copied beside itself, the caller edits the copy (writes the
head's files and manifest records), the manifest is validated and written, every checksum of the copy
is verified, every file that was there and does not belong to the head is checked to be byte for byte
what it was (a trunk is never rewritten), and only then is the copy renamed over the bundle. An
error or an interruption at any point leaves the old bundle as it was (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgetl.core.atomic import atomic_directory
from edgetl.core.bundle import read_manifest, sha256_file, write_manifest
from edgetl.core.errors import ExportError


@contextlib.contextmanager
def editing_head(
    bundle_dir: str | Path, head: str, *, inputs: list[Path] = ()
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(copy, manifest)``: a copy of the bundle and its manifest, for the caller to give
    ``head`` new files and records. On leaving the block the manifest is written to the copy, the copy
    is verified and renamed over ``bundle_dir``. ``inputs``: folders the bundle must not be (as
    ``--force`` elsewhere)."""
    from edgetl.device.bundle_loading import open_bundle

    bundle_dir = Path(bundle_dir)
    manifest = open_bundle(bundle_dir).manifest  # schema and every checksum, before anything is copied
    original = {
        rel: rec["sha256"]
        for rel, rec in manifest["files"].items()
        if not (rec["role"] != "trunk" and rec.get("head") == head)
    }
    with atomic_directory(bundle_dir, force=True, kind="bundle", inputs=list(inputs)) as tmp:
        shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True)
        m = read_manifest(tmp)
        yield tmp, m
        write_manifest(tmp, m)
        open_bundle(tmp)  # what is renamed into place verifies
        for rel, sha in original.items():  # the files that were there are the files that are there
            for path, expected in [
                (rel, sha),
                *((p, r["sha256"]) for p, r in (m["files"][rel].get("extra_files") or {}).items()),
            ]:
                if sha256_file(tmp / path) != expected:
                    raise ExportError(f"bundle file {path} changed while writing head {head!r}; this is a bug")


def drop_head_files(tmp: Path, m: dict[str, Any], head: str) -> None:
    """Delete ``head``'s files (head graphs, merged graphs, statistics) from the copy and the manifest,
    before it is written anew (a head replaced with ``--force`` or extended in place)."""
    for rel in [r for r, rec in m["files"].items() if rec.get("head") == head and rec["role"] != "trunk"]:
        for path in (rel, *(m["files"][rel].get("extra_files") or {})):
            (tmp / path).unlink(missing_ok=True)
        del m["files"][rel]
    for var in m["variants"].values():
        var["heads"].pop(head, None)
        (var.get("merged") or {}).pop(head, None)


def leave_out(tmp: Path, m: dict[str, Any], head: str, left_out: dict[str, str]) -> None:
    """Take ``head`` out of the variants in ``left_out`` (variant -> why) and delete files no variant
    uses any more; the head's ``left_out`` record says why."""
    for name in left_out:
        var = m["variants"][name]
        var["heads"].pop(head, None)
        (var.get("merged") or {}).pop(head, None)
    m["heads"][head]["left_out"] = left_out
    used = {
        rel
        for var in m["variants"].values()
        for rel in (var["trunk"], *var["heads"].values(), *(var.get("merged") or {}).values())
    }
    for rel in [
        r for r, rec in m["files"].items() if rec.get("head") == head and rec["role"] != "stats" and r not in used
    ]:
        for path in (rel, *(m["files"][rel].get("extra_files") or {})):
            (tmp / path).unlink()
        del m["files"][rel]
