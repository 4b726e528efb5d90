"""One export in progress: :class:`ExportSession`, what format plug-ins write into and check through.

The session holds the run, its validation images and PyTorch's logits on them, and the bundle
being built in a temporary folder (files, variants, the manifest). A format plug-in
(``formats/``) writes its graphs with :meth:`ExportSession.add_file`, declares variants with
:meth:`ExportSession.add_variant` (and :meth:`ExportSession.add_merged`), and calls
:meth:`ExportSession.check` on each: the variant is loaded **through the device runtime** from the
temporary bundle and must pass :mod:`edgetl.workstation.export.checks` before anything else happens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.bundle import file_record, new_manifest, write_manifest
from edgetl.core.errors import ExportError
from edgetl.core.formats import FORMATS, PRECISIONS, variant_name
from edgetl.core.imagefolder import Sample
from edgetl.core.preprocess import Preprocessing
from edgetl.device.head_stats import origin_record
from edgetl.workstation.export.checks import check_bar, check_merged, check_precision_pin, variant_metrics
from edgetl.workstation.export.common import (
    HEAD,
    batches,
    images_sha256,
    int8_as_written,
    load_arrays,
    onnx_as_written,
    run_lineage,
    run_origin,
    sqnr_db,
    tensor_spec,
    training_data_record,
    versions,
    weights_lineage,
)
from edgetl.workstation.export.options import ExportProfile
from edgetl.workstation.run import Run

log = logging.getLogger(__name__)

FIDELITY_IMAGES = 128  # validation images each int8 attempt's feature SQNR is measured on


@dataclasses.dataclass
class ExportSession:
    """State of one export: the run, its data and reference logits, and the bundle being built."""

    run: Run
    model: Any
    tmp: Path  # the temporary bundle folder (renamed into place when every variant passed)
    work: Path  # scratch space that is never shipped
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
    _training_data: dict[str, Any] | None = None
    _speed_unchecked_said: bool = False
    _qat: Any = None  # qat_source()'s QatResult, once per export

    @property
    def pp(self) -> Preprocessing:
        return self.run.preprocessing

    @property
    def max_drop(self) -> float:
        return self.options.max_drop

    @property
    def origin(self) -> str:
        """``derived_from`` of graphs exported from the checkpoint: the run's name, not its path."""
        return run_origin(self.run)

    def precisions(self, fmt: str) -> list[str]:
        """Precisions to build for ``fmt``, fp32 first (always: the others are measured against it)."""
        return ["fp32", *(p for p in PRECISIONS[1:] if p in self.options.precisions and p in FORMATS[fmt].precisions)]

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

            from edgetl.workstation.export.formats.onnx import ONNX_OPSET, export_onnx

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
            from edgetl.workstation.export.int8 import select_calibration

            samples = select_calibration(self.run.train_samples, self.options.calib_size)
            if len(samples) < self.options.calib_size:
                log.warning(
                    "only %d training images for calibration (asked for %d)", len(samples), self.options.calib_size
                )
            self._calibration = (samples, load_arrays(samples, self.pp)[0])
        return self._calibration

    def search_int8(
        self, fmt: str, make_quantizer: Callable[[], Any], out: Path, baseline_top1: float
    ) -> dict[str, Any]:
        """Run a format's int8 search (:func:`~edgetl.workstation.export.int8.search_int8`) with a
        progress line and a log line; returns the chosen variant's manifest record for ``out``."""
        from edgetl.workstation.export import speed
        from edgetl.workstation.export.int8 import features_scorer, search_int8  # at call time: tests replace it

        calib_samples, _ = self.calibration()
        task = self.progress.add_task(f"{fmt} int8 search", total=None, status="")

        def on_attempt(a) -> None:
            self.progress.update(task, status=f"attempt {a.config.describe()}: drop {a.top1_drop_pp:.2f} pp")

        t0 = time.perf_counter()
        quantizer = make_quantizer()
        # Passing attempts are timed against the fp32 trunk (batch 1, one validation image) and the
        # fastest is kept: int8 is for speed, the accuracy bar keeps it correct.
        timer = speed.attempt_timer(quantizer.runner, self.x_val[: speed.BATCH_SIZE], floor=self._speed_floor())
        # Every attempt's trunk is also scored by its features' fidelity to fp32 (what heads added
        # later will see), on the first FIDELITY_IMAGES validation images.
        fidelity = features_scorer(getattr(quantizer, "scoring_runner", quantizer.runner), self.x_val[:FIDELITY_IMAGES])
        result = search_int8(
            quantizer,
            out,
            baseline_top1=baseline_top1,
            max_drop=self.max_drop,
            timer=timer,
            fidelity=fidelity,
            on_attempt=on_attempt,
        )
        self.progress.update(task, total=1, completed=1, status=f"chose {result.chosen.config.describe()}")
        log.info(
            "%s int8: chose %s after %d attempt(s) in %.1fs",
            fmt,
            result.chosen.config.describe(),
            len(result.attempts),
            time.perf_counter() - t0,
        )
        record = result.manifest_record([])
        if getattr(result.chosen.config, "source", "fp32") == "qat" and self._qat is not None:
            # The shipped int8 trunk comes from a trunk fine-tuned for int8: its weights differ from
            # the fp32 trunk's, and heads added later are checked on it (export --add-to).
            record["qat"] = self._qat.record()
        # Which images calibrated, without their workstation paths: how many, and one hash of their
        # content hashes in order (the run's split and select_calibration name them again).
        calibration = {k: v for k, v in record["calibration"].items() if k != "images"}
        record["calibration"] = {**calibration, "images_sha256": images_sha256(calib_samples)}
        return record

    def add_file(self, rel: str, *, fmt: str, precision: str, role: str, derived_from: str) -> None:
        """Record graph file ``rel`` (already written) and its sidecars (``core.formats``: OpenVINO's ``.bin``)."""
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
            extra_files=FORMATS[fmt].sidecar_paths(rel),
        )

    def add_variant(self, fmt: str, precision: str, trunk: str, head: str, **extra: Any) -> str:
        name = variant_name(fmt, precision)
        self.variants[name] = {"format": fmt, "precision": precision, "trunk": trunk, "heads": {HEAD: head}, **extra}
        return name

    def add_merged(self, name: str, merge: Callable[[Path, Path, Path], None], *, source: str | None = None) -> None:
        """Write (or reuse ``source``, a merged file of another variant) the single-graph trunk + head
        file of variant ``name``; it is checked with the variant."""
        var = self.variants[name]
        fmt = var["format"]
        if source is None:
            trunk_precision = self.files[var["trunk"]]["precision"]
            rel = f"{fmt}/merged.{HEAD}.{trunk_precision}{FORMATS[fmt].extension}"
            merge(self.tmp / var["trunk"], self.tmp / var["heads"][HEAD], self.tmp / rel)
            self.add_file(
                rel,
                fmt=fmt,
                precision=trunk_precision,
                role="merged",
                derived_from=f"{var['trunk']} + {var['heads'][HEAD]}",
            )
            source = rel
        var["merged"] = {HEAD: source}

    def int8_as_written(self, fmt: str) -> bool:
        """:func:`~edgetl.workstation.export.common.int8_as_written`: then an int8 variant is scored
        both ways, the bar as written, and one that misses it as run here carries ``int8_saturation``
        (the device side warns on such CPUs)."""
        return int8_as_written(fmt)

    def fp32_top1(self, fmt: str) -> float:
        return self.variants[variant_name(fmt, "fp32")]["metrics"]["val_top1"]

    def training_data(self) -> dict[str, Any]:
        """The head's ``training_data`` record (hashing the training images once per export)."""
        if self._training_data is None:
            self._training_data = training_data_record(self.run)
        return self._training_data

    def manifest(self) -> dict[str, Any]:
        run = self.run
        trunk_in, trunk_out = self.trunk_io
        head_in, head_out = self.head_io
        return new_manifest(
            backbone={
                "name": run.spec.name,
                "feature_dim": run.spec.feature_dim,
                # last: the last feature map, pooled; blocks: every block's output pooled and concatenated
                "features": "blocks" if run.taps else "last",
                "weights": weights_lineage(run.config.get("weights")),
            },
            preprocessing=self.pp.to_dict(),
            trunk={"input": trunk_in, "output": trunk_out},
            heads={
                HEAD: {
                    "labels": list(run.labels),
                    "input": head_in,
                    "output": head_out,
                    "run": run_lineage(run, run.config.get("strategy") or run.config.get("train", {}).get("strategy")),
                    "training_data": self.training_data(),
                    "origin": origin_record(
                        "workstation", images=len(run.train_samples), trunk_variant=None, run=run.path.resolve().name
                    ),
                    "metrics": {v: dict(rec["metrics"]) for v, rec in self.variants.items() if "metrics" in rec},
                }
            },
            default_head=HEAD,
            files=self.files,
            variants=self.variants,
            export=self.options.to_dict(),
            versions=versions(self.options.formats),
        )

    def write_manifest(self) -> None:
        write_manifest(self.tmp, self.manifest())

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
        runtime = FORMATS[var["format"]].runtime
        predictor = bundle.load(runtime=runtime, precision=var["precision"], heads=[HEAD])
        logits, features = self._runtime_logits(predictor, name)
        metrics = variant_metrics(logits, self.ref_logits, self.y_val)
        here, run_logits = None, logits
        if var["precision"] == "int8" and self.int8_as_written(var["format"]):
            here = metrics
            written, features = self._as_written_logits(var)
            metrics = {**variant_metrics(written, self.ref_logits, self.y_val), "scored": "as written"}
        metrics["bytes"] = bundle.model_bytes(var, [HEAD])
        # Head-independent: how faithful the trunk's features are (what heads added later will see).
        metrics["features_sqnr_db"] = sqnr_db(features, self.ref_features)
        ran = check_precision_pin(name, var, predictor.runtime_info)
        if var.get("inference_precision") is not None:
            metrics["inference_precision"] = ran
        reference = None if var["precision"] == "fp32" else self.fp32_top1(var["format"])
        metrics = check_bar(name, var, metrics, reference, self.max_drop)
        if here is not None:
            self._record_saturation(name, var, metrics, here, reference)
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
        if var["precision"] == "int8":
            self._measure_speed(name, bundle)
        if var.get("merged"):
            self._check_merged(name, run_logits)
        return metrics

    def _as_written_logits(self, var: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The variant's logits and features on the validation images with its ONNX graphs run as
        written (no graph optimization: each DequantizeLinear, then the float operator)."""
        return onnx_as_written(self.tmp, var["trunk"], var["heads"][HEAD], self.x_val)

    def _record_saturation(
        self, name: str, var: dict[str, Any], metrics: dict[str, Any], here: dict[str, Any], reference: float
    ) -> None:
        """Add what this CPU computes to ``metrics`` (``this_cpu``); when that misses the bar, mark the
        variant (``int8_saturation``) and say so: it passed as written, which is what CPUs with exact
        int8 sums run, and loses more on CPUs like this one."""
        from edgetl.core import envinfo

        drop = (reference - here["val_top1"]) * 100.0
        metrics["this_cpu"] = {
            "val_top1": here["val_top1"],
            "top1_drop_pp": round(drop, 4),
            "top1_agreement": here["top1_agreement"],
        }
        if drop <= self.max_drop + 1e-9:
            return
        var["int8_saturation"] = {
            "top1_drop_pp": round(drop, 4),
            "affects": "x86 CPUs without VNNI or AMX (ONNX Runtime's U8S8 kernels sum pairs of products in 16 bits)",
            "machine": envinfo.environment(),
        }
        log.warning(
            "%s passes as its graph is written (drop %.2f pp: what a Raspberry Pi or a CPU with VNNI computes) "
            "but loses %.2f pp as this CPU runs it: ONNX Runtime's int8 kernels saturate on x86 without VNNI or "
            "AMX. On such devices run openvino-int8 or %s-fp32; the bundle records this (int8_saturation)",
            name,
            metrics["top1_drop_pp"],
            drop,
            var["format"],
        )

    def _speed_floor(self) -> float | None:
        """The speed-up a miss of which is confirmed by timing again: ``--min-speedup`` where this CPU
        has int8 dot-product instructions (a miss there warns, and can trigger QAT); None elsewhere."""
        from edgetl.core import envinfo

        return self.options.min_speedup if envinfo.int8_dot_product() else None

    def _measure_speed(self, name: str, bundle) -> None:
        """Time int8 variant ``name`` against its format's fp32 through the device runtime; record
        ``metrics.speedup_vs_fp32`` and the variant's ``speed``, and say where it is under
        ``min_speedup`` (or, once per export, that this CPU cannot be held to it). Never fails the
        export on speed; a NaN figure is a measurement bug and does."""
        from edgetl.core import envinfo
        from edgetl.workstation.export import speed

        var = self.variants[name]
        fmt = var["format"]
        measured = speed.measure_variant(
            bundle, FORMATS[fmt].runtime, HEAD, self.x_val[: speed.BATCH_SIZE], floor=self._speed_floor()
        )
        if not measured.finite:
            raise ExportError(
                f"variant {name}: its speed against {fmt}-fp32 could not be measured (p50 int8 "
                f"{list(measured.int8_p50_ms)} vs fp32 {list(measured.fp32_p50_ms)} ms); "
                "this is a bug, please report it"
            )
        dot = envinfo.int8_dot_product()
        floor = self.options.min_speedup
        var["speed"] = speed.speed_record(measured, min_speedup=floor, dot_product=dot)
        var["metrics"]["speedup_vs_fp32"] = round(measured.speedup, 4)
        log.info("%s: %s", name, measured.describe())
        if dot:
            if measured.speedup < floor:
                log.warning(speed.below_floor_message(name, fmt, measured, floor, dot, var.get("quantization")))
        elif not self._speed_unchecked_said:
            self._speed_unchecked_said = True
            log.warning(speed.cannot_check_message(floor, dot))

    def _check_merged(self, name: str, split_logits: np.ndarray) -> None:
        """The merged graph must compute what the trunk and head files compute (same runtime)."""
        from edgetl.device.runtime import open_bundle

        self.write_manifest()
        var = self.variants[name]
        bundle = open_bundle(self.tmp)
        predictor = bundle.load(
            runtime=FORMATS[var["format"]].runtime, precision=var["precision"], heads=[HEAD], merged=True
        )
        logits, _ = self._runtime_logits(predictor, f"{name} merged")
        rec = self.files[var["merged"][HEAD]]
        metrics = var["metrics"]
        reference = None if var["precision"] == "fp32" else self.fp32_top1(var["format"])
        merged = check_merged(
            name,
            var,
            logits,
            split_logits,
            what=f"the merged graph {var['merged'][HEAD]}",
            reference=(self.ref_logits, self.y_val, reference),
            max_drop=self.max_drop,
        )
        metrics.update(merged)
        metrics["merged_bytes"] = int(rec["bytes"]) + sum(
            int(r["bytes"]) for r in (rec.get("extra_files") or {}).values()
        )
        log.info("%s merged: max abs diff vs trunk + head %.2e", name, merged["merged_max_abs_diff"])

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

    def qat_hook(self) -> Any:
        """Quantization-aware fine-tuning as the quantizers' last remedy
        (:class:`~edgetl.workstation.export.int8.QatHook`), or None with ``--qat-epochs 0``.

        Wanted when ``--qat-epochs N`` asked for it; in auto (the default) only when no
        post-training attempt passed the accuracy bar, or, on a CPU with int8 dot-product
        instructions, when the fastest passing one is under ``--min-speedup`` (elsewhere the speed
        cannot be judged, so it never triggers QAT)."""
        from edgetl.core import envinfo
        from edgetl.workstation.export.int8 import QatHook

        epochs = self.options.qat_epochs
        if epochs == 0:
            return None

        def wanted(attempts) -> bool:
            if epochs is not None:
                return True
            passed = [a for a in attempts if a.passed]
            if not passed:
                return True
            if not envinfo.int8_dot_product():
                return False
            fastest = max((a.speedup for a in passed if a.speedup == a.speedup), default=float("nan"))
            return not fastest >= self.options.min_speedup  # a NaN speed-up misses the floor too

        return QatHook(wanted, lambda: self.qat_source().path)

    def qat_source(self) -> Any:
        """The trunk fine-tuned for int8 (:func:`~edgetl.workstation.export.qat.qat_trunk`): an fp32
        ONNX trunk every format's quantizer can quantize as one more remedy, made once per export
        (``work/trunk.qat.onnx``) and shared; its ``QatResult``, or None when ``qat_epochs`` is 0.
        With ``qat_epochs`` None (auto) it runs ``DEFAULT_QAT_EPOCHS``: the caller decides when."""
        from edgetl.workstation.export.options import DEFAULT_QAT_EPOCHS

        epochs = self.options.qat_epochs
        if epochs == 0:
            return None
        if self._qat is None:
            from edgetl.workstation.export.qat import check_images, qat_trunk

            samples = self.run.train_samples
            # split.json names the training images; the data folder may have moved since training.
            missing = [s.path for s in samples if not Path(s.path).is_file()]
            if missing or not samples:
                root = (self.run.config.get("data") or {}).get("root") or "its data folder"
                gone = (
                    f"{len(missing)} of {len(samples)} are gone from {root} (first: {missing[0]})"
                    if missing
                    else "it has none"
                )
                raise ExportError(
                    f"quantization-aware fine-tuning needs run {self.run.path.name}'s training images, but {gone}; "
                    "rerun with the data in place, or pass --qat-epochs 0"
                )
            _, x_calib = self.calibration()
            self._qat = qat_trunk(
                self.model,
                samples,
                self.pp,
                epochs=epochs if epochs is not None else DEFAULT_QAT_EPOCHS,
                x_calib=x_calib,
                x_check=check_images(self.x_val),
                out=self.work / "trunk.qat.onnx",
                progress=self.progress,
            )
        return self._qat
