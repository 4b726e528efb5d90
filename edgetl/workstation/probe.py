"""Which backbone should I fine-tune? A fast transferability estimate on frozen trunk features.

For each candidate (a backbone and its weights) the frozen trunk runs once over the images
(features go to the persistent cache, so probing again, or training feature extraction later on
the same images, costs no trunk pass) and two scores are computed on those features:

* ``linear``: stratified k-fold cross-validated top-1 of a logistic regression on standardised
  features: how well a linear head separates the classes without seeing the scored images;
* ``logme``: LogME (You et al., ICML 2021), the log marginal evidence per sample of a Bayesian
  linear model of the one-hot labels: no training and no folds; higher is better; only ranks, its
  scale depends on the data.

Both cost one inference pass plus seconds of CPU, against epochs of forward and backward passes
for a fine-tune. They estimate a ranking, not the fine-tuned top-1: fine-tuning also changes the
trunk, which a frozen-feature probe cannot see (``benchmarks/probe_vs_finetune.py`` measures how
well the ranking holds on the digits).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.errors import ConfigError, DataError, WeightsError
from edgetl.core.imagefolder import Sample, class_counts, drop_unreadable, scan_image_folder

log = logging.getLogger(__name__)

METRICS = ("linear", "logme")
# Below this mean per-dimension spread, features carry no signal a head trained at edgetl's learning
# rates can use (random-init MobileNets pool to ~1e-9: their eval-mode batch norms hold the initial
# statistics), although standardising them for the probe makes them look informative.
DEGENERATE_STD = 1e-4


@dataclasses.dataclass(frozen=True)
class Candidate:
    """``backbone[:weights]`` with weights ``imagenet`` (default), ``none`` (random init) or a file path."""

    backbone: str
    weights: str = "imagenet"

    @classmethod
    def parse(cls, text: str) -> Candidate:
        text = text.strip()
        prefix = "timm:" if text.startswith("timm:") else ""  # timm:<model>[:weights]
        name, sep, weights = text[len(prefix) :].partition(":")
        name = prefix + name if name else ""
        if not name:
            raise ConfigError(f"--backbones entry {text!r} has no backbone name (write NAME, NAME:none or NAME:PATH)")
        if sep and not weights:
            raise ConfigError(
                f"--backbones entry {text!r} has an empty weights part (write NAME, NAME:none or NAME:PATH)"
            )
        return cls(name, weights or "imagenet")

    @property
    def label(self) -> str:
        return self.backbone if self.weights == "imagenet" else f"{self.backbone}:{self.weights}"


@dataclasses.dataclass(frozen=True)
class ProbeRow:
    backbone: str
    weights: str  # imagenet | none | the file given
    candidate: str  # as written on the command line
    pretrained: bool
    score: float  # the ranking metric's value (``linear``: mean cross-validated top-1)
    linear_top1: float
    linear_top1_std: float
    logme: float
    feature_dim: int
    seconds: float  # everything for this candidate: weights, trunk pass (or cache reads), scores
    feature_seconds: float
    score_seconds: float
    feature_cache: dict
    feature_std: float  # mean over dimensions of the features' standard deviation across images
    degenerate: bool  # features too small to train a head on (see DEGENERATE_STD): ranked last

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    rows: list[ProbeRow]  # best first
    metric: str
    data: str
    images: int
    labels: list[str]
    img_size: int | None  # None: each backbone's default
    folds: int
    seed: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows"}
        d["chance_top1"] = round(1 / len(self.labels), 4)
        return {"rows": [r.to_dict() for r in self.rows], **d}


def parse_candidates(text: str | Sequence[str | Candidate]) -> list[Candidate]:
    """``"mobilenet_v2,resnet18:none,x:/path/w.pth"`` -> candidates; unknown backbones are an error."""
    from edgetl.workstation.backbones import get_backbone

    items = [s for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text)
    candidates = [c if isinstance(c, Candidate) else Candidate.parse(c) for c in items]
    if not candidates:
        raise ConfigError("--backbones is empty; e.g. --backbones mobilenet_v2,resnet18:none")
    for c in candidates:
        get_backbone(c.backbone)
    labels = [c.label for c in candidates]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--backbones lists a candidate twice: {', '.join(labels)}")
    return candidates


def _check_available(c: Candidate) -> None:
    """Fail before any trunk pass when a candidate's weights cannot be had."""
    from edgetl.workstation.backbones import get_backbone
    from edgetl.workstation.weights import find_imagenet_weights

    if c.weights == "none":
        return
    if c.weights == "imagenet":
        spec = get_backbone(c.backbone)
        hint = f"in --backbones write {c.backbone}:none for random init or {c.backbone}:PATH for a weights file"
        if spec.weights_file is None and spec.source != "timm":
            raise WeightsError(f"candidate {c.label}: backbone {c.backbone!r} has no ImageNet weights; {hint}")
        try:
            find_imagenet_weights(spec)
        except WeightsError as exc:
            raise WeightsError(f"candidate {c.label}: {exc}; {hint}") from None
    elif not Path(c.weights).is_file():
        raise WeightsError(f"candidate {c.label}: weights file {c.weights} does not exist")


# --- scores -------------------------------------------------------------------------------------


def linear_probe_score(
    features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation over stratified folds of a logistic regression's held-out top-1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # A probe is a ranking heuristic: an lbfgs fit a few iterations short does not change it.
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(model, features, labels, cv=cv, scoring="accuracy")
    return float(scores.mean()), float(scores.std())


def logme_score(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: mean over classes of the per-sample log evidence of a Bayesian linear model of one-hot labels.

    The algorithm of You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning" (ICML 2021): per class, the prior precision alpha and noise precision beta are found by
    fixed-point iteration in the eigenbasis of the features. The eigendecomposition is of the smaller
    Gram matrix (D x D or N x N) and is shared by all classes, so a score costs about one
    (N, D) x (D, N) product.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    eps = 1e-5
    if n >= d:
        s, v = np.linalg.eigh(f.T @ f)
        keep = s > max(float(s.max()), 0.0) * 1e-12
        s, v = s[keep], v[:, keep]
        basis = (f @ v) / np.sqrt(s)  # left singular vectors of f
    else:
        s, basis = np.linalg.eigh(f @ f.T)
        keep = s > max(float(s.max()), 0.0) * 1e-12
        s, basis = s[keep], basis[:, keep]
    r = len(s)
    evidences = []
    for k in np.unique(y):
        t = (y == k).astype(np.float64)
        proj = basis.T @ t
        outside = float(t @ t - proj @ proj)  # the part of t no linear model of f can fit
        alpha, beta, lam = 1.0, 1.0, 1.0
        for _ in range(11):  # converges in a few steps
            gamma = float((s / (s + lam)).sum())
            shrink = alpha / (alpha + beta * s)
            alpha_de = float((beta**2 * s * proj**2 / (alpha + beta * s) ** 2).sum())  # |m|^2
            beta_de = outside + float(((shrink * proj) ** 2).sum())  # |t - f m|^2
            # > 0: uninformative (e.g. all-zero) features keep a finite score
            alpha = max(gamma / (alpha_de + eps), 1e-12)
            beta = (n - gamma) / (beta_de + eps)
            new_lam = alpha / beta
            if abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        log_det = float(np.log(alpha + beta * s).sum()) + (d - r) * np.log(alpha)
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * log_det
            - beta / 2 * (beta_de + eps)
            - alpha / 2 * (alpha_de + eps)
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


# --- the probe ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """How candidates are probed: the image size, the folds and seed of the score, the ranking metric,
    and where and in what batches the trunks run."""

    img_size: int | None = None  # None: each backbone's default
    folds: int = 5
    seed: int = 0
    metric: str = "linear"
    device: str = "auto"
    batch_size: int = 64
    progress: bool = True
    cache_dir: str | Path | None = None


def _rank(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _check_options(o: ProbeOptions) -> None:
    if o.metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, not {o.metric!r}")
    from edgetl.workstation.options import MAX_IMG_SIZE, MIN_IMG_SIZE

    def integer(value, low: int, high: int) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high

    if not integer(o.folds, 2, 100):
        raise ConfigError(f"--folds must be an integer in 2..100, not {o.folds!r}")
    if o.img_size is not None and not integer(o.img_size, MIN_IMG_SIZE, MAX_IMG_SIZE):
        raise ConfigError(f"--img-size must be an integer in {MIN_IMG_SIZE}..{MAX_IMG_SIZE}, not {o.img_size!r}")
    if not integer(o.batch_size, 1, 4096):
        raise ConfigError(f"--batch-size must be an integer in 1..4096, not {o.batch_size!r}")
    if not integer(o.seed, 0, 2**32 - 1):
        raise ConfigError(f"--seed must be an integer in 0..{2**32 - 1}, not {o.seed!r}")


def probe_samples(
    samples: list[Sample],
    labels: list[str],
    candidates: Sequence[str | Candidate] | str,
    *,
    options: ProbeOptions | None = None,
    root: str = "",
) -> ProbeResult:
    """Score each candidate on ``samples`` (every image is used; the folds hold images out)."""
    import torch

    from edgetl.workstation.backbones import get_backbone
    from edgetl.workstation.export.common import progress_bar
    from edgetl.workstation.features import FeatureSettings, backbone_features
    from edgetl.workstation.prepare import select_device

    o = options or ProbeOptions()
    _check_options(o)
    img_size, folds, seed, metric = o.img_size, o.folds, o.seed, o.metric
    cands = parse_candidates(candidates)
    counts = class_counts(samples, len(labels))
    if min(counts) < folds:
        small = labels[counts.index(min(counts))]
        raise DataError(
            f"class {small!r} has {min(counts)} image(s), fewer than --folds {folds}; "
            f"use --folds {max(2, min(counts))} or add images"
        )
    for c in cands:
        _check_available(c)
    settings = FeatureSettings(select_device(o.device), o.batch_size, cache_dir=o.cache_dir)
    y = np.array([s.label for s in samples])
    rows = []
    t_all = time.perf_counter()
    with progress_bar(o.progress) as bar:
        for c in cands:
            t0 = time.perf_counter()
            spec = get_backbone(c.backbone)
            pp = spec.preprocessing(img_size)
            torch.manual_seed(seed)  # random-init trunks are reproducible, so their cache entries hit again
            feats, stats, source = backbone_features(
                spec, c.weights, samples, pp, settings, progress=bar, description=f"{c.label} features"
            )
            t1 = time.perf_counter()
            finite = bool(np.isfinite(feats).all())
            spread = float(feats.std(axis=0).mean()) if finite else math.nan
            if finite:
                top1, std = linear_probe_score(feats, y, folds=folds, seed=seed)
                lm = logme_score(feats, y)
            else:
                # NaN/inf features (a broken weights file): no score means anything; ranked last.
                log.warning("%s: its features are not finite (NaN or inf): ranked last, unscored", c.label)
                top1 = std = lm = math.nan
            t2 = time.perf_counter()
            rows.append(
                ProbeRow(
                    backbone=spec.name,
                    weights=c.weights,
                    candidate=c.label,
                    pretrained=source.kind != "none",
                    score=round(top1 if metric == "linear" else lm, 6),
                    linear_top1=round(top1, 6),
                    linear_top1_std=round(std, 6),
                    logme=round(lm, 6),
                    feature_dim=int(feats.shape[1]),
                    seconds=round(t2 - t0, 3),
                    feature_seconds=round(t1 - t0, 3),
                    score_seconds=round(t2 - t1, 3),
                    feature_cache=stats.to_dict(),
                    feature_std=float(f"{spread:.4g}"),
                    degenerate=not finite or spread < DEGENERATE_STD,
                )
            )
            log.info(
                "%s: linear probe top-1 %.4f +- %.4f, LogME %.3f (%.1fs, feature cache %s)",
                c.label,
                top1,
                std,
                lm,
                t2 - t0,
                stats.status,
            )
            if spread < DEGENERATE_STD:
                log.warning(
                    "%s: its features hardly vary across images (mean std %.1e): a head trained on them stays "
                    "near chance, whatever the standardised probe scores (%.3f); ranked last",
                    c.label,
                    spread,
                    top1,
                )
    # Best first (usable features before degenerate ones); ties on the chosen metric go to the other one.
    # A NaN compares false both ways and would leave the order to chance: it counts as the lowest.
    rows.sort(
        key=lambda r: (not r.degenerate, _rank(r.score), _rank(r.logme if metric == "linear" else r.linear_top1)),
        reverse=True,
    )
    return ProbeResult(
        rows=rows,
        metric=metric,
        data=root,
        images=len(samples),
        labels=list(labels),
        img_size=img_size,
        folds=folds,
        seed=seed,
        seconds=round(time.perf_counter() - t_all, 3),
    )


def probe_backbones(
    data: str | Path,
    candidates: Sequence[str | Candidate] | str,
    *,
    options: ProbeOptions | None = None,
    max_per_class: int | None = None,
    on_bad_image: str = "skip",
    samples_per_class: int | None = None,
) -> ProbeResult:
    """Rank ``candidates`` for the image folder ``data`` (best first); see the module docstring.

    ``max_per_class`` caps the images per class (chosen by ``options.seed``) to probe large folders
    faster (``samples_per_class`` is its old name, still accepted).
    """
    from edgetl.workstation.prepare import subsample_per_class

    o = options or ProbeOptions()
    if samples_per_class is not None:
        if max_per_class is not None:
            raise ConfigError("give max_per_class only (samples_per_class is its old name)")
        max_per_class = samples_per_class
    if max_per_class is not None and (
        isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 2
    ):
        raise ConfigError(f"--max-per-class must be an integer >= 2, not {max_per_class!r}")
    parse_candidates(candidates)  # unknown names fail before the folder is decoded
    folder = drop_unreadable(scan_image_folder(data), on_bad_image=on_bad_image)
    samples = subsample_per_class(list(folder.samples), max_per_class, o.seed)
    return probe_samples(samples, list(folder.classes), candidates, options=o, root=str(Path(data).resolve()))
