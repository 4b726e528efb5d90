"""The int8 search: one driver and one attempt/result record for every format's quantizer.

A quantizer (:class:`Quantizer`: ONNX Runtime's in ``formats/onnx_quantize.py``, NNCF's in
``formats/openvino_quantize.py``) owns its remedies and their order; this driver runs them: each
attempt is scored on the run's validation images (int8 trunk, fp32 head) against the fp32
baseline, the search stops at the first attempt within ``max_drop`` pp, and otherwise keeps the
best one (ties go to fewer layers in float, then to the earlier attempt). Every attempt is
recorded, so the manifest says what was tried and why the shipped model looks the way it does.
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

log = logging.getLogger(__name__)


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
        """Validation top-1 of the int8 trunk with the fp32 head."""
        ...

    def save(self, model: Any, out: Path) -> None: ...

    def header(self) -> dict[str, Any]:
        """Manifest record fields before the chosen settings (method, library versions, types)."""
        ...

    def extra(self) -> dict[str, Any]:
        """Manifest record fields after ``excluded_nodes`` (e.g. the sensitivity ranking)."""
        ...


@dataclasses.dataclass(frozen=True)
class Attempt:
    config: Any  # the quantizer's config (QuantConfigLike)
    val_top1: float
    top1_drop_pp: float
    passed: bool
    seconds: float
    float_layers: tuple[str, ...] = ()  # weighted layers left in float (the manifest's excluded_nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            "excluded_nodes": list(self.float_layers),
            "val_top1": self.val_top1,
            "top1_drop_pp": round(self.top1_drop_pp, 4),
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
        }


@dataclasses.dataclass(frozen=True)
class QuantResult:
    """The chosen model (written to the output path) and the record of the search."""

    chosen: Attempt
    attempts: tuple[Attempt, ...]
    calibration_size: int
    header: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

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
            "attempts": [a.to_dict() for a in self.attempts],
        }


def search_int8(
    quantizer: Quantizer,
    out: Path,
    *,
    baseline_top1: float,
    max_drop: float,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> QuantResult:
    """Run ``quantizer``'s remedies until one is within ``max_drop`` pp of ``baseline_top1``; write the
    chosen model to ``out``. The caller decides what a failure means; the result says whether the bar was met."""
    attempts: list[Attempt] = []
    models: list[Any] = []
    for config in quantizer.configs(attempts):
        t0 = time.perf_counter()
        done = quantizer.quantize(config, max_drop=max_drop)
        if done is None:
            continue
        model, float_layers = done
        top1 = quantizer.evaluate(model)
        drop = (baseline_top1 - top1) * 100.0
        # NaN-safe: a NaN top-1 never passes.
        result = Attempt(config, top1, drop, bool(drop <= max_drop + 1e-9), time.perf_counter() - t0, float_layers)
        attempts.append(result)
        models.append(model)
        log.info(
            "%s attempt %d (%s): val top-1 %.4f, drop %.2f pp%s%s (%.1fs)",
            quantizer.label,
            len(attempts),
            config.describe(),
            top1,
            drop,
            "" if result.passed else f" > {max_drop:g} pp",
            f", {len(float_layers)} layer(s) in float" if float_layers else "",
            result.seconds,
        )
        if on_attempt:
            on_attempt(result)
        if result.passed:
            break
    if not attempts:
        raise RuntimeError(f"{quantizer.label}: no quantization attempt could run")
    passed = [i for i, a in enumerate(attempts) if a.passed]
    # Ties on top-1 go to the attempt with fewer float layers, then to the earlier one.
    index = (
        passed[0]
        if passed
        else max(range(len(attempts)), key=lambda i: (_score(attempts[i]), -len(attempts[i].float_layers), -i))
    )
    quantizer.save(models[index], out)
    header, extra = quantizer.header(), quantizer.extra()
    return QuantResult(attempts[index], tuple(attempts), quantizer.calibration_size, header, extra)


def best(attempts: Sequence[Attempt]) -> Attempt:
    """The attempt with the highest top-1 so far (the earliest on ties): where later remedies start."""
    return max(attempts, key=_score)


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
