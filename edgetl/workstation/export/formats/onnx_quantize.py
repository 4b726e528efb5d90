"""Static int8 quantization of an ONNX trunk, searched until it keeps its accuracy and stays fast.

Only the trunk is quantized: it holds almost all weights and compute, while a head is a few
kilobytes and stays fp32 in every variant.

Plain ORT static quantization is not enough for small mobile backbones: on a digits-fine-tuned
MobileNetV2 at 96 px its defaults lost 15.9 pp of top-1 and per-channel weights 20.3 pp, while
NNCF's ONNX backend with full bias correction lost 0.28 pp (benchmarks/onnx_int8_remedies.py, on an
x86 CPU without VNNI: there ONNX Runtime's U8S8 kernels saturate 16-bit sums, and per-channel
weights, which fill the int8 range in every channel, suffer most; the same per-channel graph
computed as written loses nothing).
:class:`OrtQuantizer` therefore tries remedies in order of cost, each scored on the run's
validation images (and, when it passes ``max_drop``, timed):

1. ORT's defaults (QDQ, int8 weights, MinMax calibration, per-tensor weights);
2. per-channel weights (depthwise convolutions have very different ranges per channel);
   on a CPU whose int8 kernels saturate (x86 without VNNI or AMX: attempts are then held to the bar
   as the graph is written, and also scored as run here), per-channel uint8 weights, which ONNX
   Runtime runs on its exact U8U8 kernels; when they hold up better as run here, the ORT remedies
   of steps 4-5 keep them;
3. remedies that keep every node in int8 (:data:`WHOLE_INT8`): NNCF's ONNX backend with fast,
   then full bias correction (:mod:`.onnx_nncf`), then cross-layer equalization before ORT's
   per-tensor and per-channel quantization (:mod:`.onnx_equalize`);
4. keeping the most sensitive nodes in float: those around the worst 1, 2, 4, 8 ... noise sources,
   measured on calibration images by :func:`~.onnx_sensitivity.rank_noise_sources` (no per-backbone
   list), up to a cap of a quarter of the weighted layers;
5. other calibration methods (percentile, entropy), alone and with that exclusion set; or, when an
   exclusion set passed and the search is timed, those methods with fewer nodes in float (fewest
   first: every float island costs speed), looking for a faster attempt that still passes;
6. when the export wants it (``--qat-epochs``: asked for, or the bar or the speed floor missed), the
   trunk fine-tuned for int8 (:mod:`edgetl.workstation.export.qat`), quantized whole with the
   settings of the best whole-int8 attempt (:meth:`OrtQuantizer.qat_config`).

Activations are uint8 by default (:attr:`OrtQuantizer.activation_type`): on x86 ONNX Runtime fuses
a QDQ residual Add into QLinearAdd only for uint8, so with int8 activations MobileNetV2's 10 residual
Adds and the 15 convolutions around them ran in float (96 px, 1 thread: 0.91x fp32 against 1.52x
with uint8, same top-1). An attempt that passes with no node in float ends the search: the remedies
before float islands all give the same int8 graph structure, so none could be faster. Every attempt
is recorded, so the manifest says what was tried and why the shipped model looks the way it does.
ORT calibrates once per method and graph: ranges are cached in the work folder. The search itself
(scoring, timing, stopping, choosing, recording) is :func:`edgetl.workstation.export.int8.search_int8`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.workstation.export.formats.onnx_sensitivity import (
    NoiseSource,
    exclusion_schedule,
    rank_noise_sources,
    worst_first,
)
from edgetl.workstation.export.int8 import Attempt, QatHook, best, settled

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
QUANT_METHOD = "onnxruntime static QDQ"
# Ops whose weights make them the unit a user thinks of as "a layer".
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """One way of quantizing the trunk.

    ``quantizer``: ONNX Runtime's ``quantize_static`` or NNCF's ONNX backend (:mod:`.onnx_nncf`;
    ``method`` is then NNCF's activation range estimator, ``mean-minmax`` or ``minmax``).
    ``bias_correction``: NNCF's ``fast`` or ``full`` (None: none; ONNX Runtime has none).
    ``equalize``: cross-layer equalization first (:mod:`.onnx_equalize`; ReLU6 between equalized
    convolutions becomes ReLU). ``activation_type``: ``int8`` or ``uint8`` activations (weights are
    always int8). ``source``: the fp32 trunk, or the quantization-aware fine-tuned one
    (:attr:`OrtQuantizer.qat_source`).
    """

    method: str = "minmax"
    per_channel: bool = False
    excluded_nodes: tuple[str, ...] = ()
    quantizer: str = "onnxruntime"  # onnxruntime | nncf
    bias_correction: str | None = None  # None | fast | full (nncf only)
    equalize: bool = False
    activation_type: str = "int8"  # int8 | uint8
    source: str = "fp32"  # fp32 | qat
    weight_type: str = "int8"  # int8 | uint8 (asymmetric: ONNX Runtime's U8U8 kernels, which do not saturate)

    def describe(self) -> str:
        parts = [self.method, "per-channel" if self.per_channel else "per-tensor"]
        if self.quantizer != "onnxruntime":
            parts.insert(0, self.quantizer)
        if self.bias_correction:
            parts.append(f"{self.bias_correction} bias correction")
        if self.equalize:
            parts.append("equalized")
        if self.activation_type != "int8":
            parts.append(f"{self.activation_type} activations")
        if self.weight_type != "int8":
            parts.append(f"{self.weight_type} weights")
        if self.source != "fp32":
            parts.append(f"{self.source} trunk")
        if self.excluded_nodes:
            parts.append(f"{len(self.excluded_nodes)} node(s) in float")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "per_channel": self.per_channel,
            "excluded_nodes": list(self.excluded_nodes),
            "quantizer": self.quantizer,
            "bias_correction": self.bias_correction,
            "equalize": self.equalize,
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "source": self.source,
        }


def _settled(attempts: Sequence[Attempt]) -> bool:
    """:func:`~edgetl.workstation.export.int8.settled`, not counting uint8-weight attempts: they run on
    ONNX Runtime's U8U8 kernels, slower on x86 than the U8S8 ones, so an int8-weight attempt with the
    same structure could still be faster."""
    return settled([a for a in attempts if getattr(a.config, "weight_type", "int8") != "uint8"])


def _here_score(attempt: Attempt) -> float:
    """How an attempt fares as run on this CPU (its drop there, lower is better), a NaN the worst."""
    drop = attempt.top1_drop_here_pp if attempt.top1_drop_here_pp is not None else attempt.top1_drop_pp
    return -drop if drop == drop else -float("inf")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ArrayReader:
    """ORT ``CalibrationDataReader`` over a preprocessed array, in fixed-size batches.

    It supports ``len``/``set_range`` so that ORT collects statistics one batch at a time
    (``CalibStridedMinMax``): memory stays bounded by one batch of activations, and the histogram
    calibrators never see batches of unequal size (which they cannot stack).
    """

    def __init__(self, x: np.ndarray, input_name: str, batch_size: int = 16):
        self._batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
        self._name = input_name
        self._range = (0, len(self._batches))
        self._next = 0

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (start_index, min(end_index, len(self._batches)))
        self._next = start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._range[1]:
            return None
        batch = self._batches[self._next]
        self._next += 1
        return {self._name: batch}

    def rewind(self) -> None:
        self.set_range(0, len(self._batches))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


# --- ORT plumbing -------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Keep ORT's quantization chatter off the user's terminal for the duration of the block.

    The calibrators ``print`` progress to stdout (which must stay clean for ``--json``) and the
    graph optimizer warns about every initializer a fusion made unused. Both go to the debug log.
    ORT has no getter for its logger severity; 2 (warning) is its default and is restored.
    """
    import onnxruntime as ort

    captured = io.StringIO()
    # ORT's quantizer warns through the root logger (``logging.warning``: "Quantized bias ... exceeds
    # the range of a int32", once per layer). With no handler on the root logger, that call would
    # also install logging.basicConfig's, and every edgetl log line after it would print twice.
    collector = _RootRecords()
    root = logging.getLogger()
    root.addHandler(collector)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        ort.set_default_logger_severity(2)
        root.removeHandler(collector)
        if captured.getvalue().strip():
            log.debug("onnxruntime.quantization output:\n%s", captured.getvalue().rstrip())
        if collector.messages:
            log.debug(
                "onnxruntime.quantization logged %d warning(s), e.g. %s", len(collector.messages), collector.messages[0]
            )


class _RootRecords(logging.Handler):
    """Collects what libraries log straight to the root logger (edgetl's own records propagate past it)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "root":
            self.messages.append(record.getMessage())


def prepare_for_quantization(fp32_path: Path, out_path: Path) -> Path:
    """ORT's recommended ``quant_pre_process`` (shape inference, constant folding, Conv+BN fusion).

    It keeps node names, so ranked nodes are the bundle's node names. Symbolic shape inference
    does not support every graph; then the exported model is quantized as it is.
    """
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out_path))
        return out_path
    except Exception as exc:  # ORT raises plain Exceptions from its shape inference
        log.warning("quant_pre_process failed (%s); quantizing the exported graph as it is", _first_line(exc))
        return fp32_path


def quantize_trunk(
    model_path: Path,
    out_path: Path,
    calib: np.ndarray,
    config: QuantConfig,
    *,
    input_name: str,
    cache_dir: Path,
    cache_tag: str = "",
) -> Path:
    """One ``quantize_static`` call; calibration ranges are cached per method in ``cache_dir`` (per
    ``cache_tag`` too: one per graph calibrated, e.g. the equalized one)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    reader = ArrayReader(calib, input_name)
    quantize_static(
        str(model_path),
        str(out_path),
        reader,
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QUInt8 if config.weight_type == "uint8" else QuantType.QInt8,
        per_channel=config.per_channel,
        nodes_to_exclude=list(config.excluded_nodes),
        calibrate_method=methods[config.method],
        calibration_cache_path=str(cache_dir / f"calibration.{config.method}{cache_tag}.json"),
        extra_options={"CalibStridedMinMax": 1},
    )
    return out_path


# --- the remedies -------------------------------------------------------------------------------

# 3: remedies that keep every node in int8, most likely first and, among the NNCF ones, cheapest
# first. benchmarks/onnx_int8_remedies.py, digits MobileNetV2 fine-tune at 96 px, uint8 activations,
# drop on an x86 CPU without VNNI (whose U8S8 kernels saturate) / as the QDQ graph computes it:
# NNCF fast bias correction 2.79 / 0.28 pp in 32 s, full 0.28 / 0.00 pp in 46 s; equalization +
# ORT per-tensor 19.8 / 3.1 pp, + per-channel 73.8 / 4.2 pp, each in under 5 s. The activation
# type is the quantizer's (:attr:`OrtQuantizer.activation_type`). One that passes ends the search.
WHOLE_INT8 = (
    QuantConfig("mean-minmax", True, quantizer="nncf", bias_correction="fast"),
    QuantConfig("mean-minmax", True, quantizer="nncf", bias_correction="full"),
    QuantConfig("minmax", False, equalize=True),
    QuantConfig("minmax", True, equalize=True),
)


@dataclasses.dataclass
class OrtQuantizer:
    """The ONNX Runtime remedies for :func:`~edgetl.workstation.export.int8.search_int8`.

    ``evaluate(path)`` gives an int8 trunk's validation top-1 (with the fp32 head). Attempts are
    written to ``workdir``; calibration ranges are cached there per method and per graph.
    ``qat`` (:class:`~edgetl.workstation.export.int8.QatHook`): the quantization-aware fine-tuned
    fp32 trunk for configs with ``source="qat"`` (fine-tuned on first use, prepared once) and
    whether the export wants that remedy (:meth:`qat_config`).
    """

    fp32_path: Path
    calib: np.ndarray
    evaluate_path: Callable[[Path], float]
    workdir: Path
    # The top-1 as this CPU runs an attempt, when ``evaluate_path`` scores the graph as written
    # instead (a CPU whose int8 kernels saturate: :func:`edgetl.core.envinfo.int8_saturates`).
    evaluate_here: Callable[[Path], float] | None = None
    input_name: str = "image"
    sensitivity_images: int = 8
    max_excluded_fraction: float = 0.25
    label: str = "onnx int8"
    sensitivity: list[NoiseSource] = dataclasses.field(default_factory=list)
    whole_int8: tuple[QuantConfig, ...] = WHOLE_INT8
    activation_type: str = "uint8"  # of every attempt: see the module docstring
    qat: QatHook | None = None
    equalization: dict[str, Any] = dataclasses.field(default_factory=dict)  # source -> Equalization
    _prepared: Path | None = None
    _bases: dict[tuple[str, bool], Path | None] = dataclasses.field(default_factory=dict)
    _paths: dict[QuantConfig, Path] = dataclasses.field(default_factory=dict)
    _saved: QuantConfig | None = None

    @property
    def calibration_size(self) -> int:
        return len(self.calib)

    def prepare(self) -> Path:
        """The fp32 trunk prepared for quantization (once): what every fp32-source attempt starts from."""
        if self._prepared is None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            with quiet_onnxruntime():
                self._prepared = prepare_for_quantization(self.fp32_path, self.workdir / "trunk.prepared.onnx")
        return self._prepared

    def configs(self, attempts: Sequence[Attempt]) -> Iterator[QuantConfig]:
        self.prepare()
        act = self.activation_type
        # 1-2: ORT defaults, then per-channel weights. Either passing leaves nothing faster to try.
        plain = {pc: QuantConfig("minmax", pc, activation_type=act) for pc in (False, True)}
        yield plain[False]
        if _settled(attempts):
            return
        yield plain[True]
        if _settled(attempts):
            return
        per_channel = best(attempts[:2]).config.per_channel  # of the two plain ORT attempts
        base = plain[per_channel]  # the ORT attempt later remedies start from
        if self.evaluate_here is not None:
            # 2b: this CPU's U8S8 kernels saturate (attempts are scored as written, and as run here):
            # uint8 weights run on ONNX Runtime's U8U8 kernels, which sum in 32 bits everywhere, so
            # the graph computes what it says on every CPU. When that holds up better as run here,
            # the ORT remedies below (layers in float, other calibrations) keep uint8 weights.
            u8 = QuantConfig("minmax", True, activation_type=act, weight_type="uint8")
            yield u8
            if _settled(attempts):
                return
            tried = {a.config: a for a in attempts}
            if u8 in tried and _here_score(tried[u8]) > _here_score(tried[base]):
                base = u8
        # 3: remedies that keep the int8 chain whole (NNCF with bias correction, equalization): they
        # cost no speed, so they come before any node is kept in float.
        for config in self.whole_int8:
            yield dataclasses.replace(config, activation_type=act)
            if _settled(attempts):
                return
        # 4: keep the worst noise sources in float, measured on the better of the two ORT models.
        t0 = time.perf_counter()
        with quiet_onnxruntime():
            self.sensitivity = rank_noise_sources(
                self.prepare(),
                self._paths[base],
                self.calib[: self.sensitivity_images],
                input_name=self.input_name,
            )
        log.info(
            "int8 sensitivity (%.1fs): worst %s",
            time.perf_counter() - t0,
            "; ".join(f"{s.kind} {s.tensor} {s.sqnr_db:.1f} dB" for s in worst_first(self.sensitivity)[:3]) or "none",
        )
        import onnx

        graph = onnx.load(str(self.prepare())).graph
        weighted = {n.name for n in graph.node if n.op_type in WEIGHTED_OPS}
        cap = max(3, int(len(weighted) * self.max_excluded_fraction))  # tiny graphs still get a few layers
        tried: list[tuple[str, ...]] = []
        for nodes in exclusion_schedule(self.sensitivity, cap, counted=weighted.__contains__):
            tried.append(nodes)
            yield dataclasses.replace(base, excluded_nodes=nodes)
            if any(a.passed for a in attempts):
                break
        if any(a.passed for a in attempts):
            # 5 (with a timer; the driver bounds how many): every float island costs speed, so try the
            # other calibrations with fewer nodes in float, fewest first.
            candidates = [(nodes, method) for nodes in [(), *tried[:-1]] for method in ("percentile", "entropy")]
        else:
            # 5: other calibration methods, alone and with the last exclusion set.
            excluded = tried[-1] if tried else ()
            sets = dict.fromkeys(((), excluded))
            candidates = [(nodes, method) for method in ("percentile", "entropy") for nodes in sets]
        for nodes, method in candidates:
            # Once an attempt passes, one with as many nodes in float or more cannot be faster.
            if any(a.passed and len(a.float_layers) <= len(nodes) for a in attempts):
                continue
            yield dataclasses.replace(base, method=method, excluded_nodes=nodes)

    def qat_config(self, attempts: Sequence[Attempt]) -> QuantConfig | None:
        """The QAT remedy, when the export wants it: the whole-int8 attempt (nothing in float: the
        point of QAT) that did best, on the quantization-aware fine-tuned trunk."""
        if self.qat is None or not attempts or not self.qat.wanted(attempts):
            return None
        whole = [a for a in attempts if not a.float_layers and a.config.source == "fp32"] or list(attempts)
        top = best(whole).config
        return dataclasses.replace(top, excluded_nodes=(), source="qat")

    def base(self, config: QuantConfig) -> Path | None:
        """The fp32 graph ``config`` quantizes: the prepared fp32 or QAT trunk, equalized if asked (each
        made once); None when the QAT trunk was asked for and there is none."""
        key = (config.source, config.equalize)
        if key in self._bases:
            return self._bases[key]
        self.workdir.mkdir(parents=True, exist_ok=True)
        path: Path | None
        if config.source == "qat":
            source = self.qat.source() if self.qat is not None else None
            if source is None:
                path = None
            else:
                with quiet_onnxruntime():
                    path = prepare_for_quantization(Path(source), self.workdir / "trunk.qat.prepared.onnx")
        else:
            path = self.prepare()
        if path is not None and config.equalize:
            from edgetl.workstation.export.formats.onnx_equalize import equalize_file

            out = self.workdir / f"trunk.{config.source}.equalized.onnx"
            self.equalization[config.source] = equalize_file(path, out)
            path = out
        self._bases[key] = path
        return path

    def quantize(self, config: QuantConfig, *, max_drop: float) -> tuple[Path, tuple[str, ...]] | None:
        base = self.base(config)
        if base is None:
            log.info("%s: no quantization-aware trunk to quantize (%s)", self.label, config.describe())
            return None
        path = self.workdir / f"trunk.int8.attempt{len(self._paths)}.onnx"
        if config.quantizer == "nncf":
            import onnx

            from edgetl.workstation.export.formats import onnx_nncf

            if not onnx_nncf.available():
                log.info("%s: NNCF is not installed, skipping %s", self.label, config.describe())
                return None
            onnx_nncf.quantize_nncf_onnx(base, path, self.calib, config, input_name=self.input_name)
            floats = tuple(onnx_nncf.float_nodes(onnx.load(str(path))))
        else:
            tag = (
                ""
                if (config.source, config.equalize) == ("fp32", False)
                else f".{config.source}" + (".equalized" if config.equalize else "")
            )
            with quiet_onnxruntime():
                quantize_trunk(
                    base, path, self.calib, config, input_name=self.input_name, cache_dir=self.workdir, cache_tag=tag
                )
            floats = config.excluded_nodes
        self._paths[config] = path
        return path, floats

    def evaluate(self, model: Path) -> float:
        return self.evaluate_path(model)

    def save(self, model: Path, out: Path) -> None:
        self._saved = next((c for c, p in self._paths.items() if p == model), None)
        model.replace(out)

    def runner(self, model: Path | None, threads: int) -> Callable[[np.ndarray], Any]:
        """The device runtime's ONNX Runtime session (CPU, all graph optimizations) for ``model``
        (None: the fp32 trunk) at ``threads`` intra-op threads."""
        from edgetl.device.backends import backend

        loader = backend("onnxruntime").loader
        assert loader is not None
        return loader(self.fp32_path if model is None else model, threads=threads)

    def scoring_runner(self, model: Path | None, threads: int) -> Callable[[np.ndarray], Any]:
        """What attempts are scored with (features' fidelity): :meth:`runner`, or, when attempts are
        scored as written (:attr:`evaluate_here` is set), the graph run without optimization."""
        if self.evaluate_here is None:
            return self.runner(model, threads)
        from edgetl.workstation.export.common import ort_model

        return ort_model(self.fp32_path if model is None else model, as_written=True)

    def header(self) -> dict[str, Any]:
        """The shipped model's quantizer and types (known once :meth:`save` ran)."""
        saved = self._saved or QuantConfig(activation_type=self.activation_type)
        types = {"activation_type": saved.activation_type, "weight_type": saved.weight_type}
        if saved.quantizer == "nncf":
            import importlib.metadata

            from edgetl.workstation.export.formats.onnx_nncf import QUANT_METHOD as NNCF_METHOD

            return {
                "method": NNCF_METHOD,
                "nncf_version": importlib.metadata.version("nncf"),
                "preset": "performance",
                **types,
            }
        return {"method": QUANT_METHOD, **types}

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sensitivity": [s.to_dict() for s in self.sensitivity[:10]]}
        saved = self._saved
        if saved is not None and saved.equalize and saved.source in self.equalization:
            out["equalization"] = self.equalization[saved.source].to_dict()
        return out
