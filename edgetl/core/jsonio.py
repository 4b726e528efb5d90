"""JSON in and out: strict (never NaN or Infinity), bounded when the file is untrusted.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no other JSON parser accepts
(a script piping ``edgetl predict --json`` into ``jq`` fails on them), and reads them back without
complaint. It also recurses once per nesting level: a 100 kB file of ``[[[[...`` ends in
RecursionError. Everything edgetl writes goes through :func:`strict`, and every JSON file it did
not write itself (a bundle's manifest, a run's files, a remote command's output) through
:func:`read_json`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from edgetl.core.errors import EdgetlError

MAX_JSON_BYTES = 64 << 20  # a manifest with 1,000 heads and their metrics is well under 1 MB
MAX_JSON_DEPTH = 64  # edgetl's own files nest fewer than 10 levels


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():  # numpy scalars
        return strict(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text (non-finite floats as null)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of ``obj``, iteratively (a deep object must not exhaust the stack here either)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def loads(
    text: str | bytes, *, what: str, error: type[EdgetlError] = EdgetlError, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Parse untrusted JSON text; any problem (syntax, NaN/Infinity, nesting) is one ``error`` line."""
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise error(f"{what} is nested too deeply to be an edgetl file") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise error(f"{what} is not valid JSON ({first})") from None
    if _depth(obj, max_depth) > max_depth:
        raise error(f"{what} is nested more than {max_depth} levels deep; edgetl files are not")
    return obj


def read_json(
    path: str | os.PathLike,
    *,
    what: str,
    error: type[EdgetlError] = EdgetlError,
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    """Read a JSON file edgetl did not write just now: size-checked before reading, then :func:`loads`."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise error(f"{what} is {size / 1e6:.1f} MB, more than the {max_bytes / 1e6:.0f} MB an edgetl file can be")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from None
    return loads(data, what=what, error=error)
