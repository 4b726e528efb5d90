"""What a bundle or a run holds, read from its JSON files only (``edgetl info``).

Torch-free and runtime-free: a bundle is described from its manifest (and its files' sizes and
sha256), a run from its config, labels, split, metrics and history files; ``model.pt`` is never
loaded, so this works on a device-only install. Everything read is untrusted: values of the wrong
type are shown as null rather than raising, except what :func:`edgetl.core.bundle.read_manifest`
itself refuses.

:func:`describe` returns ``(kind, record)``; the record is what ``edgetl info --json`` prints
(docs/schemas/info.json) and :func:`problems` says what makes it a failure (exit 1): a file that
does not match the manifest or is missing, a run file missing or unreadable.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath
from typing import Any

from edgetl.core.bundle import MANIFEST_NAME, read_manifest, sha256_file
from edgetl.core.errors import EdgetlError, RunError
from edgetl.core.formats import runtime_of
from edgetl.core.jsonio import read_json
from edgetl.core.runfiles import run_files_problem

# A run folder as `finetune` writes it (edgetl.workstation.run, which the device side may not import).
RUN_REQUIRED = ("config.json", "labels.json", "split.json", "model.pt", "metrics.json")
RUN_OPTIONAL = ("history.json", "history.png")

ACCEPTS = (
    "a bundle (a folder with manifest.json, from `edgetl export`) or a run "
    "(a folder with config.json, from `edgetl finetune`)"
)


def describe(path: str | os.PathLike, *, verify: bool = True) -> tuple[str, dict[str, Any]]:
    """``("bundle", record)`` or ``("run", record)`` for ``path``; anything else is one error line."""
    p = Path(path)
    if not p.exists():
        raise EdgetlError(f"{p} does not exist; INFO takes {ACCEPTS}")
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return "bundle", bundle_info(p, verify=verify)
    if p.is_dir() and (p / "config.json").is_file():
        return "run", run_info(p)
    if p.is_dir():
        what = "a folder with neither manifest.json nor config.json"
    elif p.name.endswith((".tar.gz", ".tgz")):
        what = "an archive (unpack it first: `edgetl unpack ARCHIVE --out DIR`)"
    else:
        what = "a file"
    raise EdgetlError(f"{p} is {what}; INFO takes {ACCEPTS}")


def problems(kind: str, record: dict[str, Any]) -> list[str]:
    """What is wrong with the thing described (empty: nothing); each item one short phrase."""
    if kind == "bundle":
        sums = record["checksums"]
        return [f"{rel} does not match its sha256" for rel in sums["mismatched"]] + [
            f"{rel} is missing" for rel in sums["missing"]
        ]
    return list(record["problems"])


# --- untrusted values ---------------------------------------------------------------------------------


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _scalars(value: Any) -> dict[str, str]:
    """A flat ``{name: text}`` from an object of scalars (versions): anything nested is left out."""
    return {
        str(k): str(v) for k, v in _dict(value).items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)
    }


def _weights(value: Any) -> dict[str, Any] | None:
    """Where the trunk's initial weights came from: kind, origin, file name, sha256 (as recorded; a
    bundle written before edgetl stopped shipping workstation paths has ``path`` instead of ``file``)."""
    if not isinstance(value, dict):
        return None
    record = {key: _str(value.get(key)) for key in ("kind", "origin", "sha256")}
    record["file"] = _str(value.get("file")) or _str(value.get("path"))
    return record


# --- bundles ------------------------------------------------------------------------------------------


def _on_disk(bundle: Path, rel: str) -> Path:
    return bundle.joinpath(*PurePosixPath(rel).parts)  # read_manifest checked that rel stays inside


def _listed(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every file the manifest lists, with its record: each model file, then its companions."""
    out: list[tuple[str, dict[str, Any]]] = []
    for rel, rec in manifest["files"].items():
        out.append((rel, rec))
        out.extend((extra, erec) for extra, erec in (rec.get("extra_files") or {}).items())
    return out


def check_files(bundle: Path, manifest: dict[str, Any], *, verify: bool = True) -> dict[str, Any]:
    """Each listed file against the manifest: ``ok``, ``mismatch`` (size or sha256) or ``missing``;
    without ``verify`` the sha256 is not computed (``not checked``; sizes and presence still are)."""
    files, total = [], 0
    for rel, rec in _listed(manifest):
        path = _on_disk(bundle, rel)
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            status = "missing"
        elif size != rec.get("bytes"):
            status = "mismatch"
        elif not verify:
            status = "not checked"
        else:
            status = "ok" if sha256_file(path) == rec["sha256"] else "mismatch"
        total += size or 0
        files.append({"path": rel, "bytes": size, "expected_bytes": _int(rec.get("bytes")), "status": status})
    mismatched = [f["path"] for f in files if f["status"] == "mismatch"]
    missing = [f["path"] for f in files if f["status"] == "missing"]
    status = "failed" if mismatched or missing else "ok" if verify else "not checked"
    return {
        "status": status,
        "checked": verify,
        "count": len(files) + 1,  # and the manifest itself
        "bytes": total + (bundle / MANIFEST_NAME).stat().st_size,
        "mismatched": mismatched,
        "missing": missing,
        "files": files,
    }


def _variant_files(manifest: dict[str, Any], var: dict[str, Any]) -> list[str]:
    """The files one variant loads (trunk, head files, merged graphs) and their companions."""
    rels = [var["trunk"], *var["heads"].values(), *_dict(var.get("merged")).values()]
    out: list[str] = []
    for rel in dict.fromkeys(rels):
        out.append(rel)
        out.extend((manifest["files"][rel].get("extra_files") or {}).keys())
    return out


def _quantization(value: Any) -> dict[str, Any] | None:
    """The int8 record in brief: method, calibration method and size, per-channel, nodes kept in float."""
    if not isinstance(value, dict):
        return None
    calib = _dict(value.get("calibration"))
    excluded = value.get("excluded_nodes")
    per_channel = value.get("per_channel")
    return {
        "method": _str(value.get("method")),
        "calibration": _str(calib.get("method")),
        "calibration_size": _int(calib.get("size")),
        "per_channel": per_channel if isinstance(per_channel, bool) else None,
        "float_nodes": len(excluded) if isinstance(excluded, list) else None,
    }


def _variant(bundle: Path, manifest: dict[str, Any], name: str, var: dict[str, Any]) -> dict[str, Any]:
    metrics = _dict(var.get("metrics"))
    rels = _variant_files(manifest, var)
    sizes = [_on_disk(bundle, rel) for rel in rels]
    ran = _str(metrics.get("inference_precision")) or _str(var.get("inference_precision"))
    return {
        "name": name,
        "format": var["format"],
        "precision": var["precision"],
        "runtime": runtime_of(var["format"]),
        "bytes": sum(p.stat().st_size for p in sizes if p.is_file()),
        "files": rels,
        "merged": sorted(_dict(var.get("merged"))),
        "val_top1": _num(metrics.get("val_top1")),
        "top1_drop_pp": _num(metrics.get("top1_drop_pp")),
        "max_abs_diff": _num(metrics.get("max_abs_diff")),
        "top1_agreement": _num(metrics.get("top1_agreement")),
        "n": _int(metrics.get("n")),
        "features_sqnr_db": _num(metrics.get("features_sqnr_db")),
        "inference_precision": ran,
        # Only when the manifest records a measured speed-up against fp32 (export measures it for int8).
        "speedup_vs_fp32": _num(metrics.get("speedup_vs_fp32")),
        "quantization": _quantization(var.get("quantization")),
        "scored": _str(metrics.get("scored")),
        "int8_saturation_drop_pp": _num(_dict(var.get("int8_saturation")).get("top1_drop_pp")),
    }


def _head(manifest: dict[str, Any], name: str, head: dict[str, Any]) -> dict[str, Any]:
    run = head.get("run")
    per_variant = {
        v: _num(_dict(m).get("val_top1")) for v, m in _dict(head.get("metrics")).items() if v in manifest["variants"]
    }
    return {
        "name": name,
        "default": name == manifest.get("default_head"),
        "classes": len(head["labels"]),
        "labels": list(head["labels"]),
        "variants": sorted(v for v, var in manifest["variants"].items() if name in var["heads"]),
        "val_top1": per_variant,
        "run": (
            {
                "name": _str(run.get("name")) or _str(run.get("path")),
                "strategy": _str(run.get("strategy")),
                "val_top1": _num(run.get("val_top1")),
            }
            if isinstance(run, dict)
            else None
        ),
        "left_out": {str(k): str(v) for k, v in _dict(head.get("left_out")).items()},
    }


def bundle_info(bundle: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Everything ``edgetl info`` shows about a bundle: variants, heads, preprocessing, lineage and
    the state of every file. ``verify=False`` skips hashing (sizes and presence are still checked)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    backbone = manifest["backbone"]
    default = manifest.get("default_head")
    first = manifest["heads"].get(default) or next(iter(manifest["heads"].values()))
    run = _dict(first.get("run"))  # the default head's run: where the trunk was trained
    versions = _scalars(manifest.get("versions"))
    return {
        "kind": "bundle",
        "path": str(bundle),
        "schema_version": manifest["schema_version"],
        "default_head": _str(default),
        "variants": [_variant(bundle, manifest, n, v) for n, v in manifest["variants"].items()],
        "heads": [_head(manifest, n, h) for n, h in manifest["heads"].items()],
        "preprocessing": manifest["preprocessing"],
        "lineage": {
            "backbone": _str(backbone.get("name")),
            "feature_dim": _int(backbone.get("feature_dim")),
            "weights": _weights(backbone.get("weights")),
            "run": _str(run.get("name")) or _str(run.get("path")),
            "strategy": _str(run.get("strategy")),
            "run_val_top1": _num(run.get("val_top1")),
            "created_utc": _str(manifest.get("created_utc")),
            "edgetl_version": _str(manifest.get("edgetl_version")) or versions.get("edgetl"),
            "versions": versions,
            "export": manifest.get("export") if isinstance(manifest.get("export"), dict) else None,
        },
        "checksums": check_files(bundle, manifest, verify=verify),
    }


# --- runs ---------------------------------------------------------------------------------------------


def _read(run: Path, name: str, problems: list[str]) -> Any:
    """A run's JSON file, or None when it is absent or unreadable (said in ``problems``)."""
    path = run / name
    if not path.is_file():
        return None
    try:
        return read_json(path, what=f"run {run}: {name}", error=RunError)
    except RunError as exc:
        problems.append(str(exc))
        return None


def _split_counts(split: Any) -> tuple[int | None, int | None]:
    split = _dict(split)
    counts = [len(split[k]) if isinstance(split.get(k), list) else None for k in ("train", "val")]
    return counts[0], counts[1]


def run_info(run: str | os.PathLike) -> dict[str, Any]:
    """Everything ``edgetl info`` shows about a run folder, from its JSON files (model.pt is not loaded)."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run folder {run} does not exist")
    issues: list[str] = []
    files = []
    for name in (*RUN_REQUIRED, *RUN_OPTIONAL):
        path = run / name
        present = path.is_file()
        files.append(
            {
                "name": name,
                "required": name in RUN_REQUIRED,
                "present": present,
                "bytes": path.stat().st_size if present else None,
            }
        )
    missing = [f["name"] for f in files if f["required"] and not f["present"]]
    if missing:
        issues.append(f"run {run} is incomplete: missing {', '.join(missing)}")
    raw_config = _read(run, "config.json", issues)
    config = _dict(raw_config)
    labels = _read(run, "labels.json", issues)
    split = _read(run, "split.json", issues)
    if not issues:
        damaged = run_files_problem(raw_config, labels, split)
        if damaged:
            issues.append(f"run {run} is damaged or was edited: {damaged}")
    metrics = _dict(_read(run, "metrics.json", issues))
    history = _read(run, "history.json", issues)
    train = _dict(config.get("train"))
    data = _dict(config.get("data"))
    trunk_from = config.get("trunk_from")
    n_train, n_val = _split_counts(split)
    labels = [str(x) for x in labels] if isinstance(labels, list) else []
    skipped = data.get("skipped")
    return {
        "kind": "run",
        "path": str(run),
        "complete": not missing,
        "backbone": _str(config.get("backbone")),
        "strategy": _str(train.get("strategy")),
        "weights": _weights(config.get("weights")),
        "trunk_from": (
            {
                "bundle": _str(trunk_from.get("bundle")),
                "trunk": _str(trunk_from.get("trunk")),
                "sha256": _str(trunk_from.get("sha256")),
                "backbone": _str(trunk_from.get("backbone")),
                "feature_dim": _int(trunk_from.get("feature_dim")),
            }
            if isinstance(trunk_from, dict)
            else None
        ),
        "data": {
            "root": _str(data.get("root")),
            "val_dir": _str(data.get("val_dir")),
            "train_images": n_train,
            "val_images": n_val,
            "skipped": len(skipped) if isinstance(skipped, list) else None,
        },
        "classes": len(labels),
        "labels": labels,
        "val_top1": _num(metrics.get("val_top1")),
        "best_epoch": _int(metrics.get("best_epoch")),
        "epochs_run": _first(_int(metrics.get("epochs_run")), len(history) if isinstance(history, list) else None),
        "n_val": _first(_int(metrics.get("n_val")), _int(metrics.get("n")), n_val),
        "preprocessing": config["preprocessing"] if isinstance(config.get("preprocessing"), dict) else None,
        "train": train or None,
        "versions": {
            k: v
            for k, v in (("edgetl", _str(config.get("edgetl_version"))), ("torch", _str(config.get("torch_version"))))
            if v is not None
        },
        "files": files,
        "problems": issues,
    }


__all__ = ["ACCEPTS", "bundle_info", "check_files", "describe", "problems", "run_info"]
