"""The bundle format: a folder with ``manifest.json`` and model files, the only hand-off to the device.

This module is torch-free. It knows the manifest schema, writes bundles atomically and verifies
them (schema, types, every referenced file present with the right sha256) before anything is loaded.
See docs/bundle.md for the format.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from edgetl.core.atomic import write_json_atomic
from edgetl.core.errors import BundleError
from edgetl.core.formats import FORMATS, INFERENCE_PRECISIONS, PRECISIONS, ROLES, STATS_FORMAT
from edgetl.core.jsonio import read_json

MANIFEST_NAME = "manifest.json"
SCHEMA = "edgetl.bundle"
SCHEMA_VERSION = 1
# heads.<name>.training_data.train_sha256_prefixes: 16-hex-digit sha256 prefixes of the training images
# (edgetl.core.imagefolder.HASH_HEX), concatenated.
# A head name becomes part of file names (head.<name>.onnx): no dots, no separators.
HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_HASH_PREFIXES = re.compile(r"(?:[0-9a-f]{16})*")


def check_head_name(head: str) -> str:
    """``head``, or one ConfigError line when it cannot be a head's name (it becomes part of file names)."""
    from edgetl.core.errors import ConfigError

    if not isinstance(head, str) or not HEAD_NAME.match(head):
        raise ConfigError(f"--head {head!r}: use letters, digits, '-' and '_' (it becomes part of file names)")
    return head


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(
    bundle_dir: Path,
    rel_path: str,
    *,
    fmt: str,
    precision: str,
    role: str,
    head: str | None,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    derived_from: str,
    extra_files: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Manifest record of one model file (OpenVINO's .bin goes in ``extra_files``, hashed too)."""
    rec = {
        "sha256": sha256_file(bundle_dir / rel_path),
        "bytes": (bundle_dir / rel_path).stat().st_size,
        "format": fmt,
        "precision": precision,
        "role": role,
        "head": head,
        "inputs": inputs,
        "outputs": outputs,
        "derived_from": derived_from,
    }
    if extra_files:
        rec["extra_files"] = {
            p: {"sha256": sha256_file(bundle_dir / p), "bytes": (bundle_dir / p).stat().st_size} for p in extra_files
        }
    return rec


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a manifest (it is verified when opened, not here)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def _one_of(value: Any, names: Any) -> bool:
    """``value`` is one of ``names`` (a JSON list or object is never a name, and must not raise)."""
    return isinstance(value, str) and value in names


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40


def _tensor_specs(value: Any) -> bool:
    """``[{"name": str, "shape": [int >= 1 or a named axis, ...], "dtype": str}, ...]`` as file_record writes."""
    if not isinstance(value, list) or len(value) > 16:
        return False
    for spec in value:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            return False
        if not isinstance(spec.get("dtype"), str) or not isinstance(spec.get("shape"), list):
            return False
        for dim in spec["shape"]:
            if not (isinstance(dim, str) or (isinstance(dim, int) and not isinstance(dim, bool) and 0 < dim < 1 << 31)):
                return False
    return True


def _require(cond: bool, bundle_dir: Path, what: str) -> None:
    if not cond:
        raise BundleError(f"bundle {bundle_dir}: invalid manifest: {what}; re-export the bundle with `edgetl export`")


def _safe_rel_path(bundle_dir: Path, rel: Any) -> Path:
    _require(isinstance(rel, str) and rel != "", bundle_dir, f"file path {rel!r} is not a string")
    p = PurePosixPath(rel)
    _require(not p.is_absolute() and ".." not in p.parts, bundle_dir, f"file path {rel!r} escapes the bundle")
    return bundle_dir.joinpath(*p.parts)


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``manifest.json`` (schema and types only; see :func:`verify_files`)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle folder (made by `edgetl export RUN --out {bundle_dir}`)")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST_NAME}; is it a bundle made by `edgetl export`?")
    manifest = read_json(path, what=f"bundle {bundle_dir}: {MANIFEST_NAME}", error=BundleError)
    validate_manifest(manifest, bundle_dir)
    return manifest


def validate_manifest(m: Any, bundle_dir: Path) -> None:
    _require(isinstance(m, dict), bundle_dir, "top level is not an object")
    _require(m.get("schema") == SCHEMA, bundle_dir, f"schema is {m.get('schema')!r}, expected {SCHEMA!r}")
    version = m.get("schema_version")
    _require(isinstance(version, int), bundle_dir, "schema_version is not an integer")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle {bundle_dir} has schema version {version}; "
            f"this edgetl reads up to {SCHEMA_VERSION}: upgrade edgetl"
        )
    for key, typ in (("backbone", dict), ("preprocessing", dict), ("heads", dict), ("files", dict), ("variants", dict)):
        _require(isinstance(m.get(key), typ), bundle_dir, f"{key!r} missing or not an object")
    _require(len(m["heads"]) > 0, bundle_dir, "no heads")
    _require(
        m.get("default_head") is None or isinstance(m["default_head"], str),
        bundle_dir,
        "default_head is not a head name",
    )
    for name, head in m["heads"].items():
        _require(isinstance(head, dict), bundle_dir, f"head {name!r} is not an object")
        labels = head.get("labels")
        _require(
            isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels),
            bundle_dir,
            f"head {name!r} labels must be a list of >= 2 strings",
        )
        _check_lineage(head, bundle_dir, name)
        _check_learning_records(m, head, bundle_dir, name)
    for rel, rec in m["files"].items():
        _safe_rel_path(bundle_dir, rel)
        _require(isinstance(rec, dict), bundle_dir, f"file record {rel!r} is not an object")
        _require(isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64, bundle_dir, f"{rel}: bad sha256")
        formats = (STATS_FORMAT,) if rec.get("role") == "stats" else FORMATS
        _require(_one_of(rec.get("format"), formats), bundle_dir, f"{rel}: unknown format {rec.get('format')!r}")
        _require(
            _one_of(rec.get("precision"), PRECISIONS), bundle_dir, f"{rel}: unknown precision {rec.get('precision')!r}"
        )
        _require(_one_of(rec.get("role"), ROLES), bundle_dir, f"{rel}: unknown role {rec.get('role')!r}")
        _require(_size(rec.get("bytes")), bundle_dir, f"{rel}: bytes must be a size in bytes")
        for side in ("inputs", "outputs"):
            _require(_tensor_specs(rec.get(side)), bundle_dir, f"{rel}: {side} must be a list of tensor records")
        extra_files = rec.get("extra_files", {})
        _require(isinstance(extra_files, dict), bundle_dir, f"{rel}: extra_files is not an object")
        for extra, extra_rec in extra_files.items():
            _safe_rel_path(bundle_dir, extra)
            _require(
                isinstance(extra_rec, dict)
                and isinstance(extra_rec.get("sha256"), str)
                and len(extra_rec["sha256"]) == 64
                and _size(extra_rec.get("bytes")),
                bundle_dir,
                f"{extra}: bad sha256",
            )
    for vname, var in m["variants"].items():
        _require(isinstance(var, dict), bundle_dir, f"variant {vname!r} is not an object")
        _require(
            _one_of(var.get("format"), FORMATS) and _one_of(var.get("precision"), PRECISIONS),
            bundle_dir,
            f"variant {vname!r}: bad format/precision",
        )
        _require(
            isinstance(var.get("trunk"), str) and var["trunk"] in m["files"],
            bundle_dir,
            f"variant {vname!r}: trunk file not listed in files",
        )
        heads = var.get("heads")
        _require(isinstance(heads, dict) and heads, bundle_dir, f"variant {vname!r}: no heads")
        _check_graphs(m, bundle_dir, vname, heads, unknown="unknown head", kind="head")
        metrics = var.get("metrics", {})
        _require(isinstance(metrics, dict), bundle_dir, f"variant {vname!r}: 'metrics' is not an object")
        top1 = metrics.get("val_top1")
        _require(
            top1 is None or (isinstance(top1, (int, float)) and not isinstance(top1, bool) and 0 <= top1 <= 1),
            bundle_dir,
            f"variant {vname!r}: val_top1 must be a fraction in 0..1",
        )
        speedup = metrics.get("speedup_vs_fp32")
        _require(
            speedup is None or _ratio(speedup),
            bundle_dir,
            f"variant {vname!r}: speedup_vs_fp32 must be a finite positive ratio (up to {MAX_RATIO:g})",
        )
        if "speed" in var:
            problem = _speed_problem(var["speed"], record=True)
            _require(problem is None, bundle_dir, f"variant {vname!r}: speed record: {problem}")
        saturation = var.get("int8_saturation")
        _require(
            saturation is None
            or (isinstance(saturation, dict) and _number(saturation.get("top1_drop_pp"), 0.0, 100.0)),
            bundle_dir,
            f"variant {vname!r}: int8_saturation must record top1_drop_pp, a number in 0..100",
        )
        this_cpu = metrics.get("this_cpu")
        _require(
            this_cpu is None or (isinstance(this_cpu, dict) and _number(this_cpu.get("val_top1"), -1e-12, 1.0)),
            bundle_dir,
            f"variant {vname!r}: metrics.this_cpu must record val_top1, a fraction in 0..1",
        )
        quantization = var.get("quantization")
        attempts = quantization.get("attempts") if isinstance(quantization, dict) else None
        for i, attempt in enumerate(attempts if isinstance(attempts, list) else []):
            if isinstance(attempt, dict) and attempt.get("speed") is not None:
                problem = _speed_problem(attempt["speed"], record=False)
                what = f"variant {vname!r}: quantization attempt {i + 1} speed: {problem}"
                _require(problem is None, bundle_dir, what)
        merged = var.get("merged", {})
        _require(isinstance(merged, dict), bundle_dir, f"variant {vname!r}: 'merged' is not an object")
        _check_graphs(m, bundle_dir, vname, merged, unknown="merged graph of unknown head", kind="merged")
        _require(
            var.get("inference_precision") in (None, *INFERENCE_PRECISIONS),
            bundle_dir,
            f"variant {vname!r}: unknown inference_precision {var.get('inference_precision')!r}",
        )


MAX_RATIO = 1000.0  # a speed-up beyond this is a measurement error, not a model
_MAX_MS = 1e7  # a p50 latency in ms (about three hours)


def _number(value: Any, low: float, high: float) -> bool:
    """A finite JSON number in ``(low, high]`` (a NaN, an infinity or a boolean is not)."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low < value <= high
    )


def _ratio(value: Any) -> bool:
    return _number(value, 0.0, MAX_RATIO)


def _count(value: Any, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= high


def _speed_problem(rec: Any, *, record: bool) -> str | None:
    """What is wrong with a timing of int8 against fp32 (a variant's ``speed``, ``record=True``, or a
    quantization attempt's ``speed``), or None. Every figure must be finite and positive."""
    if not isinstance(rec, dict):
        return "not an object"
    if not _count(rec.get("batch_size"), 1 << 16) or not _count(rec.get("calls"), 10_000_000):
        return "batch_size and calls must be positive integers"
    rows = rec.get("by_threads")
    if not isinstance(rows, list) or not 1 <= len(rows) <= 64:
        return "by_threads must be a list of 1..64 records"
    for row in rows:
        if not isinstance(row, dict) or not _count(row.get("threads"), 1 << 16):
            return "each by_threads record needs threads, a positive integer"
        if not (_number(row.get("fp32_p50_ms"), 0.0, _MAX_MS) and _number(row.get("int8_p50_ms"), 0.0, _MAX_MS)):
            return "p50 latencies must be finite positive numbers of ms"
        if not _ratio(row.get("speedup")):
            return f"speedup must be a finite positive ratio (up to {MAX_RATIO:g})"
    if not _ratio(rec.get("speedup_vs_fp32")):
        return f"speedup_vs_fp32 must be a finite positive ratio (up to {MAX_RATIO:g})"
    if not record:
        return None
    if not _ratio(rec.get("min_speedup")):
        return "min_speedup must be a finite positive ratio"
    dot = rec.get("int8_dot_product")
    if not (dot is None or isinstance(dot, bool)) or not isinstance(rec.get("checked"), bool):
        return "int8_dot_product must be true, false or null and checked true or false"
    if rec["checked"] and dot is not True:
        return "checked is true on a machine without int8 dot-product instructions"
    if not isinstance(rec.get("machine"), dict):
        return "machine must be an object (the machine it was measured on)"
    return None


def _check_lineage(head: dict[str, Any], bundle_dir: Path, name: str) -> None:
    """A head's optional ``run`` and ``training_data`` records (older bundles have no training_data)."""
    run = head.get("run", {})
    _require(isinstance(run, dict), bundle_dir, f"head {name!r}: 'run' is not an object")
    data = head.get("training_data", {})
    _require(isinstance(data, dict), bundle_dir, f"head {name!r}: 'training_data' is not an object")
    for key in ("classes", "train_images", "val_images"):
        _require(
            data.get(key) is None or _size(data[key]), bundle_dir, f"head {name!r}: training_data.{key} is not a count"
        )
    prefixes = data.get("train_sha256_prefixes")
    _require(
        prefixes is None or (isinstance(prefixes, str) and _HASH_PREFIXES.fullmatch(prefixes) is not None),
        bundle_dir,
        f"head {name!r}: training_data.train_sha256_prefixes must be 16-digit lowercase hex sha256 prefixes",
    )


def _check_learning_records(m: dict[str, Any], head: dict[str, Any], bundle_dir: Path, name: str) -> None:
    """A head's optional ``stats`` (its feature statistics file), ``familiarity`` (the unfamiliar-input
    threshold) and ``origin`` (where it was trained) records: every number bounded, NaN refused."""
    stats = head.get("stats")
    if stats is not None:
        rel = stats.get("file") if isinstance(stats, dict) else None
        _require(
            isinstance(rel, str) and m["files"].get(rel, {}).get("role") == "stats",
            bundle_dir,
            f"head {name!r}: stats.file must name a listed file of role 'stats'",
        )
    fam = head.get("familiarity")
    if fam is not None:
        _require(
            isinstance(fam, dict)
            and _number(fam.get("threshold"), 0.0, 1e12)
            and _number(fam.get("acceptance"), 0.0, 1.0)
            and stats is not None
            and isinstance(fam.get("by_variant", {}), dict)
            and all(_number(t, 0.0, 1e12) for t in fam.get("by_variant", {}).values()),
            bundle_dir,
            f"head {name!r}: familiarity needs stats, finite positive thresholds and an acceptance in (0, 1]",
        )
    origin = head.get("origin")
    if origin is not None:
        _require(
            isinstance(origin, dict) and origin.get("where") in ("workstation", "device"),
            bundle_dir,
            f"head {name!r}: origin.where must be 'workstation' or 'device'",
        )
        images = origin.get("images")
        _require(images is None or _size(images), bundle_dir, f"head {name!r}: origin.images is not a count")


def _check_graphs(m: dict[str, Any], bundle_dir: Path, vname: str, graphs: dict, *, unknown: str, kind: str) -> None:
    """A variant's head files or merged (trunk + head) graphs: each names a known head and a listed file."""
    for hname, rel in graphs.items():
        _require(hname in m["heads"], bundle_dir, f"variant {vname!r}: {unknown} {hname!r}")
        _require(
            isinstance(rel, str) and rel in m["files"],
            bundle_dir,
            f"variant {vname!r}: {kind} file {rel!r} not listed in files",
        )


def new_manifest(
    *,
    backbone: dict[str, Any],
    preprocessing: dict[str, Any],
    trunk: dict[str, Any],
    heads: dict[str, Any],
    files: dict[str, Any],
    variants: dict[str, Any],
    default_head: str | None = None,
    versions: dict[str, Any] | None = None,
    created_utc: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A manifest's skeleton in schema order: schema, version, creation time (now, UTC, unless given),
    edgetl version, then the given sections; ``extra`` adds top-level keys (e.g. ``export`` options).
    Pass it to :func:`write_manifest`, which validates it."""
    from edgetl import __version__

    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": created_utc or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "edgetl_version": __version__,
        "backbone": backbone,
        "preprocessing": preprocessing,
        "trunk": trunk,
        "heads": heads,
        "files": files,
        "variants": variants,
    }
    if default_head is not None:
        manifest["default_head"] = default_head
    manifest.update(extra)
    manifest["versions"] = versions if versions is not None else {"edgetl": __version__}
    return manifest


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """The one writer of ``manifest.json``: validated first, then written atomically."""
    bundle_dir = Path(bundle_dir)
    validate_manifest(manifest, bundle_dir)
    write_json_atomic(bundle_dir / MANIFEST_NAME, manifest)


def verify_files(bundle_dir: str | os.PathLike, manifest: dict[str, Any], rel_paths: list[str] | None = None) -> None:
    """Check that each listed file (default: all) exists and has the recorded sha256."""
    bundle_dir = Path(bundle_dir)
    for rel in rel_paths if rel_paths is not None else list(manifest["files"]):
        rec = manifest["files"][rel]
        items = [(rel, rec["sha256"])] + [(p, r["sha256"]) for p, r in (rec.get("extra_files") or {}).items()]
        for path_rel, expected in items:
            path = _safe_rel_path(bundle_dir, path_rel)
            if not path.is_file():
                raise BundleError(f"bundle {bundle_dir}: file {path_rel} is missing; copy the whole bundle again")
            if sha256_file(path) != expected:
                raise BundleError(
                    f"bundle {bundle_dir}: file {path_rel} does not match its sha256 in the manifest "
                    "(modified or corrupted); copy or export the bundle again"
                )
