"""Writing files and folders so that an interruption leaves the old state or the new, never half."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgetl.core.errors import ConfigError, OutputBusyError, OutputExistsError
from edgetl.core.jsonio import dumps


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it (fsync, then ``os.replace``): an
    interruption leaves the old file or the new one. ``mode`` defaults to 0666 less the umask
    (``mkstemp`` makes 0600; runs, bundles and config files are read by others)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, dumps(obj, indent=2) + "\n")  # strict JSON: a NaN is written as null


# What a folder must hold to be "what this command wrote before": --force replaces only such a folder.
OUTPUT_KINDS = {"bundle": "manifest.json", "run": "config.json"}


@contextlib.contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on writing ``target`` (``fcntl`` on ``.<name>.lock`` beside it).

    A second writer to the same output fails at once with one line instead of silently replacing
    the first one's work. The lock file is removed by its holder before the lock is released; a
    writer that locked a file which was removed meanwhile sees that (another inode at the path) and
    counts the output as busy, so two writers never both hold it. A killed holder's lock ends with
    its process; its file, left behind, is simply locked again by the next writer.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock_path).st_ino:
                raise BlockingIOError  # the holder finished and removed it between our open and lock
        except (BlockingIOError, FileNotFoundError):
            raise OutputBusyError(
                f"another edgetl command is writing {target} right now (lock {lock_path}); "
                "wait for it to finish, or choose another --out"
            ) from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def check_output(
    target: str | os.PathLike,
    *,
    force: bool,
    kind: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> None:
    """Refuse, in one line, an output the command may not write: an existing ``target`` without
    ``force``; with ``force``, a target that is not a ``kind`` folder (a bundle, a run) written by
    edgetl before, or that is or contains one of the command's ``inputs``."""
    target = Path(target)
    resolved = target.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if src == resolved or resolved in src.parents:
            raise OutputExistsError(
                f"the output {target} {'is' if src == resolved else 'contains'} this command's input {item}; "
                "choose another output path"
            )
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise OutputExistsError(f"{target} already exists; pass --force to replace it, or choose another --out")
    if kind is not None:
        marker = OUTPUT_KINDS[kind]
        if target.is_symlink() or not target.is_dir() or not (target / marker).is_file():
            raise OutputExistsError(
                f"--force replaces only a {kind} folder (one with {marker}), and {target} is not one; "
                "choose another --out or remove it yourself"
            )


def check_data_folders(outputs: Sequence[str | os.PathLike | None], data: str | os.PathLike, val_dir=None) -> None:
    """Refuse, in one line, what would mix a command's outputs or validation into its training images:
    an output inside an image folder (the next scan would read the run as a class), and a
    validation folder that is, holds or sits inside the training folder (its score would be
    measured on training images)."""
    folders = [("the training data", Path(data))] + ([("--val-dir", Path(val_dir))] if val_dir is not None else [])
    for out in outputs:
        if out is None:
            continue
        resolved = Path(out).resolve()
        for what, folder in folders:
            if folder.resolve() in resolved.parents:
                raise OutputExistsError(
                    f"the output {out} is inside {what} {folder}: its files would be read as images of a "
                    "class next time; choose an output outside the image folders"
                )
    if val_dir is not None:
        train, val = Path(data).resolve(), Path(val_dir).resolve()
        if train == val or train in val.parents or val in train.parents:
            how = "is" if train == val else "is inside" if train in val.parents else "holds"
            raise ConfigError(
                f"--val-dir {val_dir} {how} the training data {data}: validation must be images the "
                "model is not trained on; give a separate folder, or leave --val-dir out to split the data"
            )


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike,
    *,
    force: bool = False,
    kind: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it becomes ``target`` only if the block succeeds.

    An existing ``target`` is refused unless ``force``; with ``force`` it is replaced only after the
    new folder is complete, so an interruption at any point leaves either the old or the new one,
    and only when it is a ``kind`` folder that is not one of ``inputs`` (:func:`check_output`).
    The whole write holds :func:`output_lock`.
    """
    target = Path(target)
    check_output(target, force=force, kind=kind, inputs=inputs)
    with output_lock(target):
        check_output(target, force=force, kind=kind, inputs=inputs)  # again, now that it is ours
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; bundles are copied and read by others
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_directory(tmp, target)


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``: the old one is renamed aside first and removed
    after, so an interruption leaves the old folder or the new one (or the old one beside it as
    ``.NAME.old-*``), never half of either."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
