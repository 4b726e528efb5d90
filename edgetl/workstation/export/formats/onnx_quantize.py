"""Static int8 quantization of an ONNX trunk with ONNX Runtime, searched until it keeps its accuracy.

Only the trunk is quantized: it holds almost all weights and compute, while a head is a few
kilobytes and stays fp32 in every variant.

Plain ORT static quantization is not enough for small mobile backbones: on a digits-fine-tuned
MobileNetV2 at 96 px its defaults lost 12.8 pp of top-1, per-channel weights still 0.6 pp, and
the worst single noise sources sit in the first two convolutions. :class:`OrtQuantizer` therefore tries
remedies in order of
cost, each scored on the run's validation images (and, when it passes ``max_drop``, timed):

1. ORT's defaults (QDQ, int8 weights and activations, MinMax calibration, per-tensor weights);
2. per-channel weights (depthwise convolutions have very different ranges per channel);
3. keeping the most sensitive nodes in float: those around the worst 1, 2, 4, 8 ... noise sources,
   measured on calibration images by :func:`~.onnx_sensitivity.rank_noise_sources` (no per-backbone list), up to a
   cap of a quarter of the weighted layers;
4. other calibration methods (percentile, entropy), alone and with that exclusion set; or, when an
   exclusion set passed and the search is timed, those methods with fewer nodes in float (fewest
   first: every float island costs speed), looking for a faster attempt that still passes.

An attempt that passes with no node in float ends the search: nothing else here changes the int8
graph's structure, so nothing could be faster. Every attempt is recorded, so the manifest says what
was tried and why the shipped model looks the way it does. ORT calibrates once per method: ranges
are cached in the work folder. The search itself (scoring, timing, stopping, choosing, recording) is
:func:`edgetl.workstation.export.int8.search_int8`.
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

from edgetl.workstation.export.formats.onnx_sensitivity import NoiseSource, exclusion_schedule, rank_noise_sources
from edgetl.workstation.export.int8 import Attempt, best, settled

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
QUANT_METHOD = "onnxruntime static QDQ"
# Ops whose weights make them the unit a user thinks of as "a layer".
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """One way of quantizing the trunk."""

    method: str = "minmax"
    per_channel: bool = False
    excluded_nodes: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [self.method, "per-channel" if self.per_channel else "per-tensor"]
        if self.excluded_nodes:
            parts.append(f"{len(self.excluded_nodes)} node(s) in float")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "per_channel": self.per_channel, "excluded_nodes": list(self.excluded_nodes)}


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
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        ort.set_default_logger_severity(2)
        if captured.getvalue().strip():
            log.debug("onnxruntime.quantization output:\n%s", captured.getvalue().rstrip())


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
) -> Path:
    """One ``quantize_static`` call; calibration ranges are cached per method in ``cache_dir``."""
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
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=config.per_channel,
        nodes_to_exclude=list(config.excluded_nodes),
        calibrate_method=methods[config.method],
        calibration_cache_path=str(cache_dir / f"calibration.{config.method}.json"),
        extra_options={"CalibStridedMinMax": 1},
    )
    return out_path


# --- the remedies -------------------------------------------------------------------------------


@dataclasses.dataclass
class OrtQuantizer:
    """The ONNX Runtime remedies for :func:`~edgetl.workstation.export.int8.search_int8`.

    ``evaluate(path)`` gives an int8 trunk's validation top-1 (with the fp32 head). Attempts are
    written to ``workdir``; calibration ranges are cached there per method.
    """

    fp32_path: Path
    calib: np.ndarray
    evaluate_path: Callable[[Path], float]
    workdir: Path
    input_name: str = "image"
    sensitivity_images: int = 8
    max_excluded_fraction: float = 0.25
    label: str = "onnx int8"
    sensitivity: list[NoiseSource] = dataclasses.field(default_factory=list)
    _prepared: Path | None = None
    _paths: dict[QuantConfig, Path] = dataclasses.field(default_factory=dict)

    @property
    def calibration_size(self) -> int:
        return len(self.calib)

    def configs(self, attempts: Sequence[Attempt]) -> Iterator[QuantConfig]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with quiet_onnxruntime():
            self._prepared = prepare_for_quantization(self.fp32_path, self.workdir / "trunk.prepared.onnx")
        # 1-2: ORT defaults, then per-channel weights. Either passing leaves nothing faster to try.
        yield QuantConfig("minmax", False)
        if settled(attempts):
            return
        yield QuantConfig("minmax", True)
        if settled(attempts):
            return
        per_channel = best(attempts).config.per_channel
        # 3: keep the worst noise sources in float, measured on the better of the two models.
        t0 = time.perf_counter()
        with quiet_onnxruntime():
            self.sensitivity = rank_noise_sources(
                self._prepared,
                self._paths[QuantConfig("minmax", per_channel)],
                self.calib[: self.sensitivity_images],
                input_name=self.input_name,
            )
        log.info(
            "int8 sensitivity (%.1fs): worst %s",
            time.perf_counter() - t0,
            "; ".join(f"{s.kind} {s.tensor} {s.sqnr_db:.1f} dB" for s in self.sensitivity[:3]) or "none",
        )
        import onnx

        graph = onnx.load(str(self._prepared)).graph
        weighted = sum(1 for n in graph.node if n.op_type in WEIGHTED_OPS)
        cap = max(3, int(weighted * self.max_excluded_fraction))  # tiny graphs still get a few nodes
        tried: list[tuple[str, ...]] = []
        for nodes in exclusion_schedule(self.sensitivity, cap):
            tried.append(nodes)
            yield QuantConfig("minmax", per_channel, nodes)
            if any(a.passed for a in attempts):
                break
        if any(a.passed for a in attempts):
            # 4 (with a timer; the driver bounds how many): every float island costs speed, so try the
            # other calibrations with fewer nodes in float, fewest first.
            candidates = [(nodes, method) for nodes in [(), *tried[:-1]] for method in ("percentile", "entropy")]
        else:
            # 4: other calibration methods, alone and with the last exclusion set.
            excluded = tried[-1] if tried else ()
            sets = dict.fromkeys(((), excluded))
            candidates = [(nodes, method) for method in ("percentile", "entropy") for nodes in sets]
        for nodes, method in candidates:
            # Once an attempt passes, one with as many nodes in float or more cannot be faster.
            if any(a.passed and len(a.float_layers) <= len(nodes) for a in attempts):
                continue
            yield QuantConfig(method, per_channel, nodes)

    def quantize(self, config: QuantConfig, *, max_drop: float) -> tuple[Path, tuple[str, ...]]:
        assert self._prepared is not None
        path = self.workdir / f"trunk.int8.attempt{len(self._paths)}.onnx"
        with quiet_onnxruntime():
            quantize_trunk(self._prepared, path, self.calib, config, input_name=self.input_name, cache_dir=self.workdir)
        self._paths[config] = path
        return path, config.excluded_nodes

    def evaluate(self, model: Path) -> float:
        return self.evaluate_path(model)

    def save(self, model: Path, out: Path) -> None:
        model.replace(out)

    def runner(self, model: Path | None, threads: int) -> Callable[[np.ndarray], Any]:
        """The device runtime's ONNX Runtime session (CPU, all graph optimizations) for ``model``
        (None: the fp32 trunk) at ``threads`` intra-op threads."""
        from edgetl.device.backends import backend

        loader = backend("onnxruntime").loader
        assert loader is not None
        return loader(self.fp32_path if model is None else model, threads=threads)

    def header(self) -> dict[str, Any]:
        return {"method": QUANT_METHOD, "activation_type": "int8", "weight_type": "int8"}

    def extra(self) -> dict[str, Any]:
        return {"sensitivity": [s.to_dict() for s in self.sensitivity[:10]]}
