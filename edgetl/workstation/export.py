"""``edgetl export``: a run directory -> a checked bundle (see docs/bundle.md and docs/export.md).

The trunk and each head become separate graphs with a dynamic batch axis: ONNX (ONNX Runtime) and
OpenVINO IR, in fp32, fp16 (weights), bf16 (OpenVINO inference precision) and int8 (trunk only;
:mod:`edgetl.workstation.quantize` for ONNX Runtime, :mod:`edgetl.workstation.openvino_export` for OpenVINO).
Everything is
written into a temporary folder beside the target, and before that folder is renamed into place
every variant is loaded **through the device runtime** (:func:`edgetl.device.runtime.open_bundle`) from the
temporary bundle and compared with PyTorch on the run's validation images. A variant that misses
its bar (docs/design.md: fp32 max abs logit diff <= 1e-3 with 100% top-1 agreement; fp16, bf16 and int8
top-1 drop <= ``max_drop`` pp against the same format's fp32) raises :class:`ExportError` and no
bundle appears.

What to export comes from an export profile (``export/*.yaml``, :class:`ExportProfile`), with
command-line options on top. Formats are produced by functions looked up in ``_EXPORTERS``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import __version__
from edgetl.core.atomic import atomic_directory, write_json_atomic
from edgetl.core.bundle import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, file_record
from edgetl.core.errors import ConfigError, ExportError
from edgetl.core.formats import FORMATS, variant_name
from edgetl.core.imagefolder import Sample
from edgetl.core.preprocess import Preprocessing, load_image, preprocess_batch
from edgetl.workstation.onnx_graphs import ONNX_OPSET, export_onnx, fp16_weights, merge_trunk_head
from edgetl.workstation.run import Run, load_run

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# What each format can hold. bf16 is an OpenVINO inference precision (the fp32 IR run in bf16);
# ONNX Runtime's CPU provider has no bf16 kernels.
FORMAT_PRECISIONS = {"onnx": ("fp32", "fp16", "int8"), "openvino": ("fp32", "fp16", "bf16", "int8")}
# Libraries each format needs on the workstation; int8 OpenVINO needs NNCF too.
FORMAT_LIBRARIES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",)}
DEFAULT_PROFILE = "default"
HEAD = "default"
FP32_MAX_ABS_DIFF = 1e-3  # docs/design.md quality bar: fp32 parity with PyTorch
# A merged graph computes what its trunk and head files compute; only kernel choice may differ.
MERGED_MAX_ABS_DIFF = 1e-3
BATCH = 64
# The runtime that loads each format on the device: variants are checked through it.
FORMAT_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}
FORMAT_EXTENSIONS = {"onnx": ".onnx", "openvino": ".xml"}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- options and profiles -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportProfile:
    """What ``edgetl export`` produces; ``export/<name>.yaml`` files hold these keys (plus ``description``).

    ``skip_unavailable``: formats whose library is not installed are left out with a warning
    instead of failing (the ``default`` profile: "everything available"). Naming a format on the
    command line always requires it.
    """

    formats: tuple[str, ...] = ("onnx", "openvino")
    precisions: tuple[str, ...] = ("fp32", "int8")
    calib_size: int = 200
    max_drop: float = 1.0
    merged: bool = False
    skip_unavailable: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["formats"], d["precisions"] = list(self.formats), list(self.precisions)
        return d


def load_profile(name_or_path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read an export profile (a shipped name or a path); unknown keys are errors."""
    from edgetl.core import shipped as profiles

    data, path = profiles.load("export-profile", name_or_path, ExportProfile, allowed_extra=("description",))
    data.pop("description", None)
    for key in ("formats", "precisions"):
        if key in data:
            value = data[key]
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"export profile {path}: {key} must be a list of names, not {data[key]!r}")
            data[key] = tuple(value)
    for key in ("merged", "skip_unavailable"):
        if key in data and not isinstance(data[key], bool):
            raise ConfigError(f"export profile {path}: {key} must be true or false, not {data[key]!r}")
    return data, path


def resolve_options(
    profile: str | os.PathLike | None = None,
    *,
    formats: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    calib_size: int | None = None,
    max_drop: float | None = None,
    merged: bool | None = None,
) -> ExportProfile:
    """The profile (default: ``default``) with every option given (not None) on top, checked."""
    values, _ = load_profile(profile or DEFAULT_PROFILE)
    given = {
        "formats": formats,
        "precisions": precisions,
        "calib_size": calib_size,
        "max_drop": max_drop,
        "merged": merged,
    }
    values.update({k: (tuple(v) if k in ("formats", "precisions") else v) for k, v in given.items() if v is not None})
    if formats is not None:
        values["skip_unavailable"] = False  # asked for by name: required
    return check_options(**values)


def missing_library(fmt: str, precisions: Sequence[str] = ()) -> str | None:
    """Why ``fmt`` cannot be exported here, or None when it can."""
    libs = FORMAT_LIBRARIES[fmt] + (("nncf",) if fmt == "openvino" and "int8" in precisions else ())
    missing = [lib for lib in libs if importlib.util.find_spec(lib) is None]
    if not missing:
        return None
    hint = "pip install 'edgetl[openvino]'" if fmt == "openvino" else "pip install 'edgetl[train]'"
    return f"--format {fmt} needs {', '.join(missing)}, which is not installed ({hint})"


def check_options(
    formats: Sequence[str] = ExportProfile.formats,
    precisions: Sequence[str] = ExportProfile.precisions,
    calib_size: int = ExportProfile.calib_size,
    max_drop: float = ExportProfile.max_drop,
    merged: bool = False,
    skip_unavailable: bool = False,
) -> ExportProfile:
    """Validate formats, precisions, calibration size and accuracy gate before any work is done."""
    formats = tuple(dict.fromkeys(formats))
    precisions = tuple(dict.fromkeys(precisions))
    if not formats:
        raise ConfigError(f"no --format given; choose from {', '.join(FORMATS)}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not precisions:
        raise ConfigError(f"no --precision given; choose from {', '.join(PRECISIONS)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"unsupported --precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1:
        raise ConfigError(f"--calib-size must be an integer >= 1, not {calib_size!r}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)):
        raise ConfigError(f"--max-drop must be a number of percentage points, not {max_drop!r}")
    available = []
    for fmt in formats:
        reason = missing_library(fmt, precisions)
        if reason is None:
            available.append(fmt)
        elif skip_unavailable:
            log.warning("%s: leaving %s out of the bundle", reason, fmt)
        else:
            raise ConfigError(reason)
    if not available:
        raise ConfigError(f"none of the formats {', '.join(formats)} can be exported here")
    for p in precisions:
        if not any(p in FORMAT_PRECISIONS[f] for f in available):
            holders = [f for f, ps in FORMAT_PRECISIONS.items() if p in ps]
            raise ConfigError(
                f"--precision {p} is not available for --format {','.join(available)}; "
                f"it needs --format {' or '.join(holders)}"
            )
    return ExportProfile(tuple(available), precisions, calib_size, float(max_drop), bool(merged), skip_unavailable)


# --- data ---------------------------------------------------------------------------------------


def load_arrays(samples: Sequence[Sample], pp: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess ``samples`` exactly as the device does: (N, 3, S, S) float32 and labels."""
    x = np.empty((len(samples), 3, pp.input_size, pp.input_size), dtype=np.float32)
    for i in range(0, len(samples), BATCH):
        chunk = samples[i : i + BATCH]
        x[i : i + len(chunk)] = preprocess_batch([load_image(s.path) for s in chunk], pp)
    return x, np.array([s.label for s in samples], dtype=np.int64)


def batches(x: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, len(x), BATCH):
        yield x[i : i + BATCH]


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(b)).numpy() for b in batches(x)])


def sqnr_db(signal: np.ndarray, reference: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``signal`` against ``reference`` in dB (None: identical)."""
    ref = reference.astype(np.float64)
    noise = float(((signal.astype(np.float64) - ref) ** 2).sum())
    return None if noise == 0.0 else round(10.0 * np.log10(max(float((ref**2).sum()), 1e-30) / noise), 2)


def tensor_spec(name: str, shape: list, dtype: str = "float32") -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype}


def variant_metrics(logits: np.ndarray, ref_logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Top-1 of ``logits`` and how far they are from the reference (PyTorch) logits."""
    pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
    return {
        "val_top1": float((pred == y).mean()),
        "max_abs_diff": float(np.abs(logits.astype(np.float64) - ref_logits).max()),
        "top1_agreement": float((pred == ref_pred).mean()),
        "n": len(y),
    }


def check_bar(
    name: str,
    var: dict[str, Any],
    metrics: dict[str, Any],
    reference_top1: float | None,
    max_drop: float,
    *,
    remedy: str | None = None,
) -> dict[str, Any]:
    """Apply the variant's bar: fp32 parity, or the top-1 drop of a reduced precision; returns the
    metrics with ``top1_drop_pp`` added for reduced precisions."""
    if var["precision"] == "fp32":
        if metrics["max_abs_diff"] > FP32_MAX_ABS_DIFF or metrics["top1_agreement"] < 1.0:
            raise ExportError(
                f"variant {name} does not match PyTorch on {metrics['n']} validation images: max abs logit "
                f"diff {metrics['max_abs_diff']:.2e} (bar {FP32_MAX_ABS_DIFF:g}), top-1 agreement "
                f"{metrics['top1_agreement']:.4f} (bar 1.0); this is a bug, please report it"
            )
        return metrics
    drop = (reference_top1 - metrics["val_top1"]) * 100.0
    metrics = {"val_top1": metrics["val_top1"], "top1_drop_pp": round(drop, 4), **metrics}
    if drop > max_drop + 1e-9:
        raise ExportError(
            f"variant {name} loses {drop:.2f} pp validation top-1 against {var['format']}-fp32 "
            f"({reference_top1:.4f} -> {metrics['val_top1']:.4f} on {metrics['n']} images), over --max-drop "
            f"{max_drop:g} pp{search_summary(var.get('quantization'))}; "
            + (remedy or f"raise --max-drop to accept it, or leave {var['precision']} out (--precision)")
        )
    return metrics


def search_summary(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    settings = [q["calibration"]["method"], "per-channel" if q["per_channel"] else "per-tensor"]
    if q.get("bias_correction"):
        settings.append(f"{q['bias_correction']} bias correction")
    return (
        f" (best of {len(q['attempts'])} quantization attempts: {', '.join(settings)}, "
        f"{len(q['excluded_nodes'])} layer(s) kept in float)"
    )


def ort_model(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime session as the device runtime builds it (CPU, all graph optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})[0]


def versions(formats: Sequence[str] = ("onnx",)) -> dict[str, str | None]:
    import importlib.metadata

    dists = ["torch", "torchvision", "onnx", "onnxruntime"]
    if "openvino" in formats:
        dists += ["openvino", "nncf"]
    out: dict[str, str | None] = {"edgetl": __version__}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# --- the export ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Export:
    """State of one export: the run, its data and reference logits, and the bundle being built."""

    run: Run
    model: Any
    tmp: Path
    work: Path
    options: ExportProfile
    x_val: np.ndarray
    y_val: np.ndarray
    ref_logits: np.ndarray
    ref_features: np.ndarray
    progress: Any
    files: dict[str, Any] = dataclasses.field(default_factory=dict)
    variants: dict[str, Any] = dataclasses.field(default_factory=dict)
    _sources: tuple[Path, Path] | None = None
    _calibration: tuple[list[Sample], np.ndarray] | None = None

    @property
    def pp(self) -> Preprocessing:
        return self.run.preprocessing

    @property
    def max_drop(self) -> float:
        return self.options.max_drop

    @property
    def origin(self) -> str:
        return f"run:{self.run.path.resolve()}/model.pt"

    def precisions(self, fmt: str) -> list[str]:
        """Precisions to build for ``fmt``, fp32 first (always: the others are measured against it)."""
        return ["fp32", *(p for p in PRECISIONS[1:] if p in self.options.precisions and p in FORMAT_PRECISIONS[fmt])]

    def shipped(self, fmt: str, precision: str) -> bool:
        return fmt in self.options.formats and precision in self.options.precisions

    @property
    def trunk_io(self) -> tuple[dict, dict]:
        s, d = self.pp.input_size, self.run.spec.feature_dim
        return tensor_spec("image", ["batch", 3, s, s]), tensor_spec("features", ["batch", d])

    @property
    def head_io(self) -> tuple[dict, dict]:
        d, c = self.run.spec.feature_dim, len(self.run.labels)
        return tensor_spec("features", ["batch", d]), tensor_spec("logits", ["batch", c])

    def sources(self) -> tuple[Path, Path]:
        """The fp32 ONNX trunk and head exported from PyTorch (once), which every format starts from."""
        if self._sources is None:
            import torch

            t0 = time.perf_counter()
            trunk, head = self.work / "trunk.fp32.onnx", self.work / f"head.{HEAD}.onnx"
            s = self.pp.input_size
            export_onnx(self.model.trunk, torch.zeros(2, 3, s, s), trunk, input_name="image", output_name="features")
            export_onnx(
                self.model.head,
                torch.zeros(2, self.run.spec.feature_dim),
                head,
                input_name="features",
                output_name="logits",
            )
            log.info("exported ONNX trunk and head (opset %d) in %.1fs", ONNX_OPSET, time.perf_counter() - t0)
            self._sources = (trunk, head)
        return self._sources

    def calibration(self) -> tuple[list[Sample], np.ndarray]:
        """The calibration images (training split, ``calib_size`` of them, stratified), preprocessed."""
        if self._calibration is None:
            from edgetl.workstation.quantize import select_calibration

            samples = select_calibration(self.run.train_samples, self.options.calib_size)
            if len(samples) < self.options.calib_size:
                log.warning(
                    "only %d training images for calibration (asked for %d)", len(samples), self.options.calib_size
                )
            self._calibration = (samples, load_arrays(samples, self.pp)[0])
        return self._calibration

    def add_file(
        self, rel: str, *, fmt: str, precision: str, role: str, derived_from: str, extra_files: tuple[str, ...] = ()
    ) -> None:
        if role == "trunk":
            inputs, outputs = self.trunk_io
        elif role == "head":
            inputs, outputs = self.head_io
        else:  # merged
            inputs, outputs = self.trunk_io[0], self.head_io[1]
        self.files[rel] = file_record(
            self.tmp,
            rel,
            fmt=fmt,
            precision=precision,
            role=role,
            head=None if role == "trunk" else HEAD,
            inputs=[inputs],
            outputs=[outputs],
            derived_from=derived_from,
            extra_files=extra_files,
        )

    def add_variant(self, fmt: str, precision: str, trunk: str, head: str, **extra: Any) -> str:
        name = variant_name(fmt, precision)
        self.variants[name] = {"format": fmt, "precision": precision, "trunk": trunk, "heads": {HEAD: head}, **extra}
        return name

    def manifest(self) -> dict[str, Any]:
        run = self.run
        trunk_in, trunk_out = self.trunk_io
        head_in, head_out = self.head_io
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "edgetl_version": __version__,
            "backbone": {
                "name": run.spec.name,
                "feature_dim": run.spec.feature_dim,
                "weights": run.config.get("weights"),
            },
            "preprocessing": self.pp.to_dict(),
            "trunk": {"input": trunk_in, "output": trunk_out},
            "heads": {
                HEAD: {
                    "labels": list(run.labels),
                    "input": head_in,
                    "output": head_out,
                    "run": {
                        "path": str(run.path.resolve()),
                        "strategy": run.config.get("train", {}).get("strategy"),
                        "val_top1": run.metrics.get("val_top1"),
                    },
                    "metrics": {v: dict(rec["metrics"]) for v, rec in self.variants.items() if "metrics" in rec},
                }
            },
            "default_head": HEAD,
            "files": self.files,
            "variants": self.variants,
            "export": self.options.to_dict(),
            "versions": versions(self.options.formats),
        }

    def write_manifest(self) -> None:
        write_json_atomic(self.tmp / MANIFEST_NAME, self.manifest())

    def _runtime_logits(self, predictor, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits of the default head and (unless merged) the trunk's features on the validation images."""
        task = self.progress.add_task(f"check {name}", total=len(self.x_val), status="")
        logits, features = [], []
        for b in batches(self.x_val):
            if predictor.merged:
                logits.append(predictor.logits(b)[HEAD])
            else:
                features.append(predictor.features(b))
                logits.append(predictor.head_logits(features[-1], [HEAD])[HEAD])
            self.progress.advance(task, len(b))
        return np.concatenate(logits), (np.concatenate(features) if features else None)

    def check(self, name: str) -> dict[str, Any]:
        """Load variant ``name`` from the temporary bundle through the device runtime and measure it
        against PyTorch on the validation images; raise :class:`ExportError` when it misses its bar."""
        from edgetl.device.runtime import open_bundle

        self.write_manifest()
        var = self.variants[name]
        t0 = time.perf_counter()
        bundle = open_bundle(self.tmp)
        runtime = FORMAT_RUNTIMES[var["format"]]
        predictor = bundle.load(runtime=runtime, precision=var["precision"], heads=[HEAD])
        logits, features = self._runtime_logits(predictor, name)
        metrics = variant_metrics(logits, self.ref_logits, self.y_val)
        metrics["bytes"] = bundle.model_bytes(var, [HEAD])
        # Head-independent: how faithful the trunk's features are (what heads added later will see).
        metrics["features_sqnr_db"] = sqnr_db(features, self.ref_features)
        ran = predictor.runtime_info.get("inference_precision")
        if var.get("inference_precision") is not None:
            metrics["inference_precision"] = ran
            if ran != var["inference_precision"]:
                raise ExportError(
                    f"variant {name}: OpenVINO ran {ran} although {var['inference_precision']} was pinned; "
                    f"this CPU cannot check {var['precision']} (leave it out with --precision)"
                )
        reference = None
        if var["precision"] != "fp32":
            reference = self.variants[variant_name(var["format"], "fp32")]["metrics"]["val_top1"]
        metrics = check_bar(name, var, metrics, reference, self.max_drop)
        var["metrics"] = metrics
        log.info(
            "%s: val top-1 %.4f%s, max abs diff %.2e, agreement %.4f, %.2f MB%s (%.1fs)",
            name,
            metrics["val_top1"],
            f" (drop {metrics['top1_drop_pp']:.2f} pp)" if "top1_drop_pp" in metrics else "",
            metrics["max_abs_diff"],
            metrics["top1_agreement"],
            metrics["bytes"] / 1e6,
            f", ran {ran}" if ran else "",
            time.perf_counter() - t0,
        )
        if var.get("merged"):
            self._check_merged(name, logits)
        return metrics

    def add_merged(
        self,
        name: str,
        merge: Callable[[Path, Path, Path], None],
        *,
        source: str | None = None,
        extra: Callable[[str], tuple[str, ...]] = lambda rel: (),
    ) -> None:
        """Write (or reuse ``source``, a merged file of another variant) the single-graph trunk + head
        file of variant ``name``; it is checked with the variant."""
        var = self.variants[name]
        fmt = var["format"]
        if source is None:
            trunk_precision = self.files[var["trunk"]]["precision"]
            rel = f"{fmt}/merged.{HEAD}.{trunk_precision}{FORMAT_EXTENSIONS[fmt]}"
            merge(self.tmp / var["trunk"], self.tmp / var["heads"][HEAD], self.tmp / rel)
            self.add_file(
                rel,
                fmt=fmt,
                precision=trunk_precision,
                role="merged",
                derived_from=f"{var['trunk']} + {var['heads'][HEAD]}",
                extra_files=extra(rel),
            )
            source = rel
        var["merged"] = {HEAD: source}

    def _check_merged(self, name: str, split_logits: np.ndarray) -> None:
        """The merged graph must compute what the trunk and head files compute (same runtime)."""
        from edgetl.device.runtime import open_bundle

        self.write_manifest()
        var = self.variants[name]
        bundle = open_bundle(self.tmp)
        predictor = bundle.load(
            runtime=FORMAT_RUNTIMES[var["format"]], precision=var["precision"], heads=[HEAD], merged=True
        )
        logits, _ = self._runtime_logits(predictor, f"{name} merged")
        diff = float(np.abs(logits.astype(np.float64) - split_logits).max())
        agreement = float((logits.argmax(1) == split_logits.argmax(1)).mean())
        rec = self.files[var["merged"][HEAD]]
        metrics = var["metrics"]
        metrics["merged_max_abs_diff"] = diff
        metrics["merged_val_top1"] = float((logits.argmax(1) == self.y_val).mean())
        metrics["merged_bytes"] = int(rec["bytes"]) + sum(
            int(r["bytes"]) for r in (rec.get("extra_files") or {}).values()
        )
        if var.get("inference_precision") in (None, "f32"):
            if diff > MERGED_MAX_ABS_DIFF or agreement < 1.0:
                raise ExportError(
                    f"variant {name}: the merged graph {var['merged'][HEAD]} differs from trunk + head by {diff:.2e} "
                    f"(bar {MERGED_MAX_ABS_DIFF:g}), top-1 agreement {agreement:.4f}; this is a bug, please report it"
                )
        else:
            # bf16 rounds where the graphs meet (the split trunk hands over f32 features): the merged
            # graph gets the variant's own accuracy bar instead of an exact match.
            reference = self.variants[variant_name(var["format"], "fp32")]["metrics"]["val_top1"]
            merged = {**variant_metrics(logits, self.ref_logits, self.y_val), "bytes": metrics["merged_bytes"]}
            check_bar(f"{name} (merged graph)", var, merged, reference, self.max_drop)
        log.info("%s merged: max abs diff vs trunk + head %.2e", name, diff)

    def drop_unrequested(self) -> None:
        """Remove the variants that were built only as references, and files no variant uses."""
        for name in list(self.variants):
            var = self.variants[name]
            if not self.shipped(var["format"], var["precision"]):
                del self.variants[name]
        used = set()
        for var in self.variants.values():
            used.update([var["trunk"], *var["heads"].values(), *(var.get("merged") or {}).values()])
        for rel in [r for r in self.files if r not in used]:
            for path in [rel, *(self.files[rel].get("extra_files") or {})]:
                (self.tmp / path).unlink()
            del self.files[rel]
        for folder in FORMATS:
            if (self.tmp / folder).is_dir() and not any((self.tmp / folder).iterdir()):
                (self.tmp / folder).rmdir()


def _export_onnx_format(ex: _Export) -> None:
    """ONNX: fp32 trunk + fp32 head, checked; then fp16 weights and the int8 trunk, each checked."""
    trunk_src, head_src = ex.sources()
    (ex.tmp / "onnx").mkdir()
    trunk_rel, head_rel = "onnx/trunk.fp32.onnx", f"onnx/head.{HEAD}.onnx"
    shutil.copyfile(trunk_src, ex.tmp / trunk_rel)
    shutil.copyfile(head_src, ex.tmp / head_rel)
    ex.add_file(trunk_rel, fmt="onnx", precision="fp32", role="trunk", derived_from=ex.origin)
    ex.add_file(head_rel, fmt="onnx", precision="fp32", role="head", derived_from=ex.origin)
    derived = trunk_rel if ex.shipped("onnx", "fp32") else ex.origin
    for precision in ex.precisions("onnx"):
        if precision == "fp32":
            name = ex.add_variant("onnx", "fp32", trunk_rel, head_rel)
        elif precision == "fp16":
            rel = "onnx/trunk.fp16.onnx"
            n = fp16_weights(ex.tmp / trunk_rel, ex.tmp / rel)
            log.info("onnx-fp16: %d weight tensors stored as fp16", n)
            ex.add_file(rel, fmt="onnx", precision="fp16", role="trunk", derived_from=derived)
            name = ex.add_variant("onnx", "fp16", rel, head_rel)
        else:  # int8
            rel = "onnx/trunk.int8.onnx"
            record = _quantize_onnx(ex, trunk_src, head_src, ex.tmp / rel)
            ex.add_file(rel, fmt="onnx", precision="int8", role="trunk", derived_from=derived)
            name = ex.add_variant("onnx", "int8", rel, head_rel, quantization=record)
        if ex.options.merged:
            ex.add_merged(name, merge_trunk_head)
        ex.check(name)


def _quantize_onnx(ex: _Export, fp32_trunk: Path, head: Path, out: Path) -> dict[str, Any]:
    """Search int8 settings for the trunk (scored with the fp32 head), write the chosen one to ``out``."""
    from edgetl.workstation.quantize import search_int8

    calib_samples, x_calib = ex.calibration()
    head_model = ort_model(head)

    def evaluate(trunk_path: Path) -> float:
        trunk = ort_model(trunk_path)
        pred = np.concatenate([head_model(trunk(b)).argmax(1) for b in batches(ex.x_val)])
        return float((pred == ex.y_val).mean())

    baseline = evaluate(fp32_trunk)
    task = ex.progress.add_task("onnx int8 search", total=None, status="")

    def on_attempt(a) -> None:
        ex.progress.update(task, status=f"attempt {a.config.describe()}: drop {a.top1_drop_pp:.2f} pp")

    t0 = time.perf_counter()
    result = search_int8(
        fp32_trunk,
        out,
        x_calib,
        evaluate,
        baseline_top1=baseline,
        max_drop=ex.max_drop,
        workdir=ex.work / "onnx-int8",
        on_attempt=on_attempt,
    )
    ex.progress.update(task, total=1, completed=1, status=f"chose {result.chosen.config.describe()}")
    log.info(
        "onnx int8: chose %s after %d attempt(s) in %.1fs",
        result.chosen.config.describe(),
        len(result.attempts),
        time.perf_counter() - t0,
    )
    return result.manifest_record([s.path for s in calib_samples])


def _export_openvino_format(ex: _Export) -> None:
    from edgetl.workstation.openvino_export import export_openvino_format

    export_openvino_format(ex)


# Format -> function that adds that format's files and variants (each checked) to the export.
_EXPORTERS: dict[str, Callable[[_Export], None]] = {"onnx": _export_onnx_format, "openvino": _export_openvino_format}


def progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )


def export_bundle(
    run_dir: str | Path,
    out: str | Path,
    *,
    profile: str | os.PathLike | None = None,
    formats: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    calib_size: int | None = None,
    max_drop: float | None = None,
    merged: bool | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Export run ``run_dir`` to bundle ``out``; every variant is checked before the bundle exists.

    ``profile`` (name or path, default ``default``) says what to export; the other options, when
    given, override it. Returns the ``--json`` document: ``{"bundle": path, "profile": {...},
    "variants": {name: {val_top1, max_abs_diff, top1_agreement, bytes, ...}}}``.
    """
    options = resolve_options(
        profile, formats=formats, precisions=precisions, calib_size=calib_size, max_drop=max_drop, merged=merged
    )
    out = Path(out)
    run = load_run(run_dir)
    if run.trunk_from is not None:
        raise ExportError(
            f"run {run.path} holds a head trained on the trunk of bundle {run.trunk_from['bundle']}; "
            f"add it to that bundle with `edgetl export {run.path} --add-to BUNDLE --head NAME`"
        )
    if out.exists() and not force:
        # atomic_directory refuses too; this only saves loading the data first.
        from edgetl.core.errors import OutputExistsError

        raise OutputExistsError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if not run.val_samples:
        raise ExportError(f"run {run.path} has no validation images: exported variants cannot be checked")
    t0 = time.perf_counter()
    model = run.build_model()
    x_val, y_val = load_arrays(run.val_samples, run.preprocessing)
    ref = torch_logits(model, x_val).astype(np.float64)
    ref_features = torch_logits(model.trunk, x_val)
    log.info(
        "run %s: %s, %d validation images; exporting %s x %s",
        run.path,
        run.spec.name,
        len(y_val),
        ",".join(options.formats),
        ",".join(options.precisions),
    )

    with (
        progress_bar(progress) as bar,
        atomic_directory(out, force=force) as tmp,
        tempfile.TemporaryDirectory(prefix="edgetl-export-") as work,
    ):
        ex = _Export(run, model, tmp, Path(work), options, x_val, y_val, ref, ref_features, bar)
        for fmt in options.formats:
            _EXPORTERS[fmt](ex)
        ex.drop_unrequested()
        ex.write_manifest()
        variants = {name: dict(v["metrics"]) for name, v in ex.variants.items()}
    log.info("bundle written to %s in %.1fs", out, time.perf_counter() - t0)
    return {"bundle": str(out), "profile": options.to_dict(), "variants": variants}
