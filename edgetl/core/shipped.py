"""Recipes (``models/``), export profiles (``export/``) and device profiles (``devices/``): YAML data.

The three folders sit at the top of the repository and are mapped into the package as
``edgetl.shipped.<folder>`` (package data, see pyproject.toml), so a checkout, an editable install
and an installed wheel all read them through :mod:`importlib.resources`. A name is resolved against
those folders, never the working directory; anything with a path separator or a ``.yaml``/``.yml``
suffix is a path. Files are read with ``yaml.safe_load`` and must be a mapping whose keys all belong
to the target dataclass: an unknown key is an error that names it (a typo must not silently do
nothing).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edgetl.core.errors import ConfigError

KINDS = {"recipe": "models", "export-profile": "export", "device-profile": "devices"}
T = TypeVar("T")


def shipped_folder(kind: str) -> Traversable | None:
    """The shipped folder of ``kind`` (None when this installation has none)."""
    try:
        folder = importlib.resources.files(f"edgetl.shipped.{KINDS[kind]}")
    except ModuleNotFoundError:
        return None
    return folder if folder.is_dir() else None


def list_shipped(kind: str) -> list[str]:
    folder = shipped_folder(kind)
    if folder is None:
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml") and p.is_file())


def resolve(kind: str, name_or_path: str | os.PathLike) -> Path | Traversable:
    text = str(name_or_path)
    looks_like_path = os.sep in text or "/" in text or text.endswith((".yaml", ".yml"))
    if looks_like_path:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"{kind} file {path} does not exist")
        return path
    folder = shipped_folder(kind)
    candidate = folder.joinpath(f"{text}.yaml") if folder is not None else None
    if candidate is not None and candidate.is_file():
        return candidate
    known = ", ".join(list_shipped(kind)) or "none shipped"
    raise ConfigError(f"unknown {kind} {text!r}; choose one of: {known}, or pass a path to a .yaml file")


def read_yaml(path: Path | Traversable, kind: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read {kind} {path}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{kind} {path} must be a mapping of option names to values")
    return data


def check_keys(data: dict[str, Any], cls: type, where: str, *, allowed_extra: tuple[str, ...] = ()) -> None:
    fields = {f.name for f in dataclasses.fields(cls)} | set(allowed_extra)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; valid keys: {', '.join(sorted(fields))}"
        )


def load(
    kind: str, name_or_path: str | os.PathLike, cls: type[T], *, allowed_extra: tuple[str, ...] = ()
) -> tuple[dict[str, Any], Path]:
    """Resolve, read and key-check a YAML file for ``cls``; returns (values, path).

    Values are returned, not instantiated, so that callers can merge command-line overrides first.
    Keys in ``allowed_extra`` (e.g. ``description``) are accepted and left to the caller.
    """
    path = resolve(kind, name_or_path)
    data = read_yaml(path, kind)
    check_keys(data, cls, f"{kind} {path}", allowed_extra=allowed_extra)
    return data, path
