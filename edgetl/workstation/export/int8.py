"""The int8 search: one driver and one attempt/result record for every format's quantizer.

A quantizer (:class:`Quantizer`: ONNX Runtime's in ``formats/onnx_quantize.py``, NNCF's in
``formats/openvino_quantize.py``) owns its remedies and their order; this driver runs them: each
attempt is scored on the run's validation images (int8 trunk, fp32 head) against the fp32
baseline. Without a timer the search stops at the first attempt within ``max_drop`` pp. With one
(the export's: :mod:`edgetl.workstation.export.speed`), every attempt that passes is also timed
against the fp32 trunk, the search goes on for at most :data:`EXPLORE_AFTER_PASS` more attempts
(the quantizer yields only remedies that could be faster, and none once an attempt without float
layers has passed), and the fastest passing attempt is kept (:func:`choose`). With a fidelity
measure (:func:`features_scorer`) every attempt's trunk is also scored by its features' SQNR
against fp32, head-independent: among equally fast attempts the most faithful trunk is kept, so
that heads added later to the bundle see features closest to those they were trained on. When
none passes the best one is kept (ties go to fewer layers in float, then to the earlier attempt). Every attempt is
recorded, so the manifest says what was tried, how fast it was, and why the shipped model looks
the way it does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgetl.core.imagefolder import Sample
from edgetl.workstation.export.speed import Timing, thread_counts

log = logging.getLogger(__name__)

EXPLORE_AFTER_PASS = 4  # attempts after the first that passes, looking for a faster one (with a timer)
# Speed-ups within this fraction of the fastest passing attempt's are a tie (about the spread of
# interleaved p50 ratios on a shared machine); the tie goes to the higher feature SQNR, then the
# higher top-1, then fewer layers in float, then the earlier attempt.
SPEED_TIE = 0.03
# Where attempts are scored as written (a CPU whose int8 kernels saturate), one that also passes as
# this CPU runs it keeps its accuracy on every CPU: it wins over a faster one that does not when its
# graph is as lean (the same weight type, no more layers in float: then the measured difference is
# noise), or when it is within this fraction of its speed.
PORTABLE_TIE = 0.15


class QuantConfigLike(Protocol):
    """One way of quantizing a trunk (each quantizer has its own frozen dataclass)."""

    method: str  # calibration / range-estimation method: the manifest's ``calibration.method``

    def describe(self) -> str: ...

    def to_dict(self) -> dict[str, Any]:
        """The settings as recorded in the manifest (per attempt and for the chosen one)."""
        ...


class Quantizer(Protocol):
    """What :func:`search_int8` drives; see ``formats/__init__.py`` for where formats use it."""

    label: str  # in logs: "onnx int8", "openvino int8"
    calibration_size: int

    def configs(self, attempts: Sequence[Attempt]) -> Iterator[Any]:
        """The remedies in order; it may look at the attempts so far to choose the next ones."""
        ...

    def quantize(self, config: Any, *, max_drop: float) -> tuple[Any, tuple[str, ...]] | None:
        """One quantization: (model, layers kept in float), or None when this remedy cannot run here."""
        ...

    def evaluate(self, model: Any) -> float:
        """Validation top-1 of the int8 trunk with the fp32 head: what the accuracy bar is held to."""
        ...

    # Optional: ``evaluate_here(model) -> float | None``, the top-1 as this CPU runs the model when
    # that differs from what ``evaluate`` scores (ONNX Runtime's int8 kernels saturate on x86
    # without VNNI: ``evaluate`` then scores the graph as written). See :attr:`Attempt.passed_here`.

    def save(self, model: Any, out: Path) -> None: ...

    def runner(self, model: Any | None, threads: int) -> Callable[[np.ndarray], Any]:
        """``model`` (None: the fp32 trunk) loaded to run at ``threads`` threads, as the device
        runtime would: what the search times an attempt with."""
        ...

    def header(self) -> dict[str, Any]:
        """Manifest record fields before the chosen settings (method, library versions, types)."""
        ...

    def extra(self) -> dict[str, Any]:
        """Manifest record fields after ``excluded_nodes`` (e.g. the sensitivity ranking)."""
        ...


@dataclasses.dataclass(frozen=True)
class QatHook:
    """Quantization-aware fine-tuning as a quantizer's last remedy (``export --qat-epochs``).

    ``wanted(attempts)``: whether to try it after the post-training attempts so far (the export
    decides: asked for, or the bar or the speed floor missed). ``source()``: the fp32 ONNX trunk
    with QAT-trained weights (fine-tuned on first call, shared by every format), which the
    quantizer then quantizes like the original trunk. The driver asks a quantizer that has a hook
    for its QAT config (``qat_config(attempts)``) after its post-training remedies, so the
    attempt is never cut off by :data:`EXPLORE_AFTER_PASS`.
    """

    wanted: Callable[[Sequence[Attempt]], bool]
    source: Callable[[], Path]


@dataclasses.dataclass(frozen=True)
class Attempt:
    config: Any  # the quantizer's config (QuantConfigLike)
    val_top1: float
    top1_drop_pp: float
    passed: bool
    seconds: float
    float_layers: tuple[str, ...] = ()  # weighted layers left in float (the manifest's excluded_nodes)
    speed: Timing | None = None  # against the fp32 trunk; None: not timed (failed the bar, or no timer)
    # The trunk's feature fidelity against fp32 on validation images, in dB: what any head sees,
    # not only the head the bar is measured with. None: not measured; inf: identical to fp32.
    features_sqnr_db: float | None = None
    # When the attempt was scored as written because this CPU's kernels compute something else:
    # the drop as run here, and whether that passes too (None: scored as run, nothing else to say).
    top1_drop_here_pp: float | None = None
    passed_here: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        speed = self.speed.to_dict() if self.speed is not None and self.speed.finite else None
        return {
            **self.config.to_dict(),
            "excluded_nodes": list(self.float_layers),
            "val_top1": self.val_top1,
            "top1_drop_pp": round(self.top1_drop_pp, 4),
            "passed": self.passed,
            "features_sqnr_db": _finite_or_none(self.features_sqnr_db),
            **({} if self.passed_here is None else self._this_cpu()),
            "speed": speed,
            "seconds": round(self.seconds, 2),
        }

    @property
    def fidelity(self) -> float:
        """Feature SQNR for ranking: unmeasured or NaN counts as the worst, identical as the best."""
        value = self.features_sqnr_db
        return -math.inf if value is None or math.isnan(value) else value

    def _this_cpu(self) -> dict[str, Any]:
        return {"top1_drop_pp_this_cpu": _finite_or_none(self.top1_drop_here_pp), "passed_this_cpu": self.passed_here}

    @property
    def portable(self) -> bool:
        """Passed, and passes as this CPU runs it too (or there was no difference to measure)."""
        return self.passed and self.passed_here is not False

    @property
    def speedup(self) -> float:
        """The timed speed-up over fp32 (lowest over the thread counts); NaN when not timed or not finite."""
        return self.speed.speedup if self.speed is not None else math.nan


@dataclasses.dataclass(frozen=True)
class QuantResult:
    """The chosen model (written to the output path) and the record of the search."""

    chosen: Attempt
    attempts: tuple[Attempt, ...]
    calibration_size: int
    header: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timed: bool = False  # whether passing attempts were timed (and the fastest chosen)

    @property
    def passed(self) -> bool:
        return self.chosen.passed

    def manifest_record(self, calibration_images: list[str]) -> dict[str, Any]:
        cfg = self.chosen.config
        settings = {k: v for k, v in cfg.to_dict().items() if k not in ("method", "excluded_nodes")}
        return {
            **self.header,
            **settings,
            "calibration": {"method": cfg.method, "size": self.calibration_size, "images": calibration_images},
            "excluded_nodes": list(self.chosen.float_layers),
            **self.extra,
            "selection": "fastest passing" if self.timed else "first passing",
            "chosen_attempt": self.attempts.index(self.chosen),
            "attempts": [a.to_dict() for a in self.attempts],
        }


def search_int8(
    quantizer: Quantizer,
    out: Path,
    *,
    baseline_top1: float,
    max_drop: float,
    timer: Callable[[Any], Timing] | None = None,
    fidelity: Callable[[Any], float] | None = None,
    explore: int = EXPLORE_AFTER_PASS,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> QuantResult:
    """Run ``quantizer``'s remedies until one is within ``max_drop`` pp of ``baseline_top1`` (with a
    ``timer``: then at most ``explore`` more, keeping the fastest that passes); write the chosen model
    to ``out``. The caller decides what a failure means; the result says whether the bar was met.

    ``timer(model)`` times an attempt's trunk against the fp32 trunk (:class:`Timing`); tests inject
    a fake one. The search is deterministic for a given seed except for what the timer measures.
    """
    attempts: list[Attempt] = []
    models: list[Any] = []
    first_pass: int | None = None
    evaluate_here = getattr(quantizer, "evaluate_here", None)

    def remedies() -> Iterator[Any]:
        for config in quantizer.configs(attempts):
            if first_pass is not None and len(attempts) - first_pass >= explore:
                break
            yield config
        qat_config = getattr(quantizer, "qat_config", None)  # the last remedy, when the export wants it
        config = qat_config(attempts) if qat_config is not None else None
        if config is not None:
            yield config

    for config in remedies():
        t0 = time.perf_counter()
        done = quantizer.quantize(config, max_drop=max_drop)
        if done is None:
            continue
        model, float_layers = done
        top1 = quantizer.evaluate(model)
        drop = (baseline_top1 - top1) * 100.0
        # NaN-safe: a NaN top-1 never passes.
        passed = bool(drop <= max_drop + 1e-9)
        timing = timer(model) if passed and timer is not None else None
        sqnr = fidelity(model) if fidelity is not None else None
        here_top1 = evaluate_here(model) if evaluate_here is not None else None
        drop_here = None if here_top1 is None else (baseline_top1 - here_top1) * 100.0
        passed_here = None if drop_here is None else bool(drop_here <= max_drop + 1e-9)
        result = Attempt(
            config, top1, drop, passed, time.perf_counter() - t0, float_layers, timing, sqnr, drop_here, passed_here
        )
        attempts.append(result)
        models.append(model)
        log.info(
            "%s attempt %d (%s): val top-1 %.4f, drop %.2f pp%s%s%s%s%s (%.1fs)",
            quantizer.label,
            len(attempts),
            config.describe(),
            top1,
            drop,
            "" if result.passed else f" > {max_drop:g} pp",
            "" if drop_here is None else f" as written, {drop_here:.2f} pp as run on this CPU",
            f", {len(float_layers)} layer(s) in float" if float_layers else "",
            f", features {sqnr:.1f} dB" if sqnr is not None else "",
            f", {timing.describe()}" if timing is not None else "",
            result.seconds,
        )
        if on_attempt:
            on_attempt(result)
        if result.passed:
            if timer is None and result.portable:
                break
            if first_pass is None:
                first_pass = len(attempts)
    if not attempts:
        raise RuntimeError(f"{quantizer.label}: no quantization attempt could run")
    index = choose(attempts)
    quantizer.save(models[index], out)
    header, extra = quantizer.header(), quantizer.extra()
    return QuantResult(
        attempts[index], tuple(attempts), quantizer.calibration_size, header, extra, timed=timer is not None
    )


def choose(attempts: Sequence[Attempt]) -> int:
    """The index of the attempt to ship.

    Among the attempts that passed the accuracy bar, the fastest (highest timed speed-up over fp32;
    speed-ups within :data:`SPEED_TIE` of it are a tie, which goes to the higher feature SQNR (the
    trunk closest to fp32 serves heads added later best), then the higher top-1, then fewer layers
    in float, then the earlier attempt). Attempts that also pass as this CPU runs them
    (:attr:`Attempt.portable`) come first when one is as lean as the fastest (:func:`_lean`: the same
    kernels, no more layers in float) or within :data:`PORTABLE_TIE` of its speed.
    A NaN or missing timing never beats a measured one; when no passing attempt has one (no timer),
    the first portable one, else the first that passed. When none passed, the best
    top-1 (a NaN counting as the worst; ties to fewer layers in float, then the earlier attempt).
    """
    passed = [i for i, a in enumerate(attempts) if a.passed]
    if not passed:
        return max(range(len(attempts)), key=lambda i: (_score(attempts[i]), -len(attempts[i].float_layers), -i))
    timed = [i for i in passed if math.isfinite(attempts[i].speedup) and attempts[i].speedup > 0]
    if not timed:
        return next((i for i in passed if attempts[i].portable), passed[0])
    top = max(timed, key=lambda i: attempts[i].speedup)
    fastest = attempts[top].speedup
    portable = [
        i
        for i in timed
        if attempts[i].portable
        and (_lean(attempts[i]) <= _lean(attempts[top]) or attempts[i].speedup >= fastest * (1.0 - PORTABLE_TIE))
    ]
    pool = portable or timed
    fastest = max(attempts[i].speedup for i in pool)
    near = [i for i in pool if attempts[i].speedup >= fastest * (1.0 - SPEED_TIE)]
    return max(near, key=lambda i: (attempts[i].fidelity, _score(attempts[i]), -len(attempts[i].float_layers), -i))


def _lean(attempt: Attempt) -> tuple[int, int]:
    """How lean an attempt's graph is, lower is faster by construction: uint8 weights (ONNX Runtime's
    slower U8U8 kernels on x86) after int8 ones, then the number of layers kept in float."""
    return (int(getattr(attempt.config, "weight_type", "int8") == "uint8"), len(attempt.float_layers))


def settled(attempts: Sequence[Attempt]) -> bool:
    """Whether an attempt with no layer kept in float has passed (as this CPU runs it too): no other
    remedy of a quantizer (calibration method, bias correction, weight granularity) changes the int8
    graph's structure, so none can be meaningfully faster and the search need not go on."""
    return any(a.portable and not a.float_layers for a in attempts)


def best(attempts: Sequence[Attempt]) -> Attempt:
    """The attempt with the highest top-1 so far (the earliest on ties): where later remedies start."""
    return max(attempts, key=_score)


def _finite_or_none(value: float | None) -> float | None:
    return round(value, 2) if value is not None and math.isfinite(value) else None


def features_scorer(runner: Callable[[Any, int], Callable[[np.ndarray], Any]], x: np.ndarray) -> Callable[[Any], float]:
    """The search's fidelity measure: ``runner(model, threads)`` loads a trunk (None: the fp32 one)
    as :meth:`Quantizer.runner` does; the scorer gives an attempt's feature SQNR in dB against the
    fp32 trunk on ``x`` (inf when identical, NaN when either output is not finite)."""
    threads = max(thread_counts())
    reference: list[np.ndarray] = []

    def features(model: Any) -> np.ndarray:
        run = runner(model, threads)
        out = [run(x[i : i + 32]) for i in range(0, len(x), 32)]
        return np.concatenate([np.asarray(o if isinstance(o, np.ndarray) else o[0]) for o in out]).astype(np.float64)

    def score(model: Any) -> float:
        if not reference:
            reference.append(features(None))
        ref, got = reference[0], features(model)
        if not (np.isfinite(ref).all() and np.isfinite(got).all()):
            return math.nan
        noise = float(((got - ref) ** 2).sum())
        return math.inf if noise == 0.0 else 10.0 * math.log10(max(float((ref**2).sum()), 1e-30) / noise)

    return score


def _score(attempt: Attempt) -> float:
    """Top-1 for ranking attempts, a NaN counting as the worst: ``max`` compares with ``>``, which is
    false both ways with a NaN, so a NaN attempt met first would otherwise stay "the best"."""
    top1 = attempt.val_top1
    return top1 if math.isfinite(top1) else -math.inf


def select_calibration(samples: Sequence[Sample], size: int, *, seed: int = 0) -> list[Sample]:
    """``size`` training samples, the same every time, classes taken in turn (stratified).

    Round-robin over classes (each shuffled with ``seed``) keeps a small calibration set from
    missing a class whose activations would then fall outside the calibrated ranges.
    """
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: (s.label, s.path)):
        by_class[s.label].append(s)
    rng = np.random.default_rng(seed)
    queues = [[items[i] for i in rng.permutation(len(items))] for _, items in sorted(by_class.items())]
    chosen: list[Sample] = []
    depth = 0
    while len(chosen) < size and any(depth < len(q) for q in queues):
        chosen.extend(q[depth] for q in queues if depth < len(q) and len(chosen) < size)
        depth += 1
    return chosen[:size]
