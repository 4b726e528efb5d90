"""Learning a linear classification head on the device, in numpy only (no scipy, sklearn or torch).

``edgetl learn`` fits ``logits = X @ W.T + b`` on features ``X`` (n, D) of a frozen trunk and integer
labels ``y`` in ``0 .. n_classes-1``, often with only a handful of images per class. Two methods:

Multinomial logistic regression (:func:`fit_logistic`)
------------------------------------------------------
The features are standardised internally (per-feature mean and std of the fitted rows; a std below
1% of the mean std is floored there, so a nearly constant feature cannot be amplified without bound
on new images) and the objective, on the standardised features ``z``, is::

    mean_i CE(softmax(W_std z_i + b), y_i)  +  weight_decay / 2 * ||W_std||^2

The bias is not penalised. ``weight_decay`` is per row, so one value means the same on a fold and on
the full set; it is sklearn's ``LogisticRegression(C=1 / (weight_decay * n))`` on the same
standardised features (sklearn sums the cross-entropy and penalises ``||W||^2 / 2``). The returned
``W, b`` are folded back so that they apply to RAW features.

The solver is a small L-BFGS (two-loop recursion, memory 10, backtracking Armijo line search, curvature
pairs kept only when ``s.y > 0``) in float64. Standardised trunk features are strongly correlated and
badly conditioned, so the problem is first rewritten, exactly, in the principal axes of the
standardised rows (a thin SVD: the optimum of ``W_std`` lies in their span, anything orthogonal only
pays the penalty), and each axis is scaled by the inverse square root of its approximate curvature
(``variance / n_classes + weight_decay``). L-BFGS then converges in tens of iterations, not hundreds.

Weight imprinting (:func:`imprint`)
-----------------------------------
Each row of ``W`` is the L2-normalised mean of the class's L2-normalised features, times a scale; ``b``
is zero. The argmax is the class whose mean direction has the largest cosine with ``x`` (a positive
factor ``||x||`` shared by all logits does not change it). The scale is ``T / median ||x||``: the
median norm makes a typical image's logits ``T * cosine``, and the temperature ``T`` minimises the
leave-one-out cross-entropy on the fitted images (each image scored against its class mean computed
without it: fitting ``T`` on means that contain the image itself would make it overconfident). ``T``
is searched on a log grid from 1 to 100; with no class of two images it is ``DEFAULT_TEMPERATURE``.

Choosing between them (:func:`cross_validate`, :func:`train_head`)
------------------------------------------------------------------
Stratified k-fold cross-validation (``folds = min(folds, smallest class count)``; none when a class
has a single image) scores every weight decay of ``WEIGHT_DECAYS`` (1e-4 .. 1e-1 in half-decade
steps) and imprinting. The best logistic decay wins (ties: the larger decay, the simpler model);
imprinting is chosen only when it scores strictly better than that, or when cross-validation is
impossible. In each fold the decays are fitted from the strongest to the weakest, the first from the
fold's imprinting head and each next one from the previous solution (the problem is convex, so this
changes the speed, 1.6-2.3x faster on synthetic 500-2,000 x 1,280 features, not the optimum).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from edgetl.core.errors import ConfigError, DataError

# The weight-decay grid searched by cross-validation: 1e-4 .. 1e-1 in half-decade steps.
WEIGHT_DECAYS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Imprinting's temperature when no class has two images (leave-one-out needs them): the usual scale
# of cosine classifiers.
DEFAULT_TEMPERATURE = 10.0
TEMPERATURES = np.geomspace(1.0, 100.0, 41)
# A feature's std is floored at this fraction of the mean std over features.
STD_FLOOR = 1e-2
# Principal axes whose squared singular value is below this fraction of the largest are dropped
# (rounding noise in float64).
AXIS_FLOOR = 1e-12
LBFGS_MEMORY = 10
# Gradient tolerance of the fits inside cross-validation: only their held-out argmax is used, and 1e-4
# changed a cross-validated top-1 by at most 0.25 pp against 1e-6 for 2.5-3x less time (synthetic 500
# and 2,000 x 1,280).
CV_TOL = 1e-4
ARMIJO = 1e-4


# --- checks and small helpers ---------------------------------------------------------------------


def check_data(X, y, n_classes: int, *, min_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Features as float64 (n, D) and labels as int64 (n,), every class present; else DataError
    (also :mod:`edgetl.device.familiarity`'s check, where one class is enough)."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < min_classes:
        raise ConfigError(f"n_classes must be an integer >= {min_classes}, got {n_classes!r}")
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"features must be a non-empty (n, D) array, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or not np.isfinite(X).all():
        raise DataError("features must be finite numbers; re-extract them (a NaN or inf came from the trunk)")
    if y.shape != (X.shape[0],):
        raise DataError(f"labels must have shape ({X.shape[0]},) to match the features, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise DataError(f"labels must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}")
    counts = np.bincount(y, minlength=n_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise DataError(f"class(es) {missing} have no images; add images for them or drop them from the labels")
    return X.astype(np.float64), y.astype(np.int64)


def _check_decay(weight_decay) -> float:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float, np.number)) or not weight_decay > 0:
        raise ConfigError(f"weight_decay must be a number > 0, got {weight_decay!r}")
    if not math.isfinite(weight_decay):
        raise ConfigError(f"weight_decay must be finite, got {weight_decay!r}")
    return float(weight_decay)


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts; rows are the true class, columns the predicted one."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return out


def top1(y_true, y_pred) -> float:
    """Fraction of predictions equal to the truth."""
    y_true = np.asarray(y_true)
    return float(np.mean(y_true == np.asarray(y_pred))) if len(y_true) else float("nan")


def standardisation(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and floored std (float64) that :func:`fit_logistic` standardises with.

    The floor is ``STD_FLOOR`` times the mean std over features (1 when every feature is constant).
    """
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    typical = float(std.mean())
    floor = STD_FLOOR * typical if typical > 0 else 1.0
    return mean, np.maximum(std, floor)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def logistic_objective(X, y, W, b, *, weight_decay: float) -> float:
    """The objective :func:`fit_logistic` minimises, for a head ``W, b`` on RAW features ``X``.

    ``mean CE + weight_decay / 2 * ||W_std||^2`` with ``W_std = W * std`` (the head's weights on the
    standardised features; ``std`` from :func:`standardisation` of ``X``).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    W = np.asarray(W, dtype=np.float64)
    _, std = standardisation(X)
    logp = _log_softmax(X @ W.T + np.asarray(b, dtype=np.float64))
    ce = -float(logp[np.arange(len(y)), y].mean())
    return ce + 0.5 * float(weight_decay) * float(np.sum((W * std) ** 2))


# --- weight imprinting ----------------------------------------------------------------------------


def _unit_rows(A: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    return A / np.where(norms > 0, norms, 1.0)


def _loo_temperature(U: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """The temperature minimising the leave-one-out cross-entropy of cosine logits (see the module doc)."""
    counts = np.bincount(y, minlength=n_classes)
    keep = counts[y] >= 2
    if not keep.any():
        return DEFAULT_TEMPERATURE
    sums = np.zeros((n_classes, U.shape[1]))
    np.add.at(sums, y, U)
    # Dot products with every class sum; an image's own class sum loses the image itself.
    dots = U @ sums.T
    rows = np.arange(len(y))
    own = sums[y] - U
    dots[rows, y] = np.einsum("ij,ij->i", U, own)
    norms = np.broadcast_to(np.linalg.norm(sums, axis=1), dots.shape).copy()
    norms[rows, y] = np.linalg.norm(own, axis=1)
    cos = dots / np.where(norms > 0, norms, 1.0)
    cos, labels = cos[keep], y[keep]
    losses = [-_log_softmax(t * cos)[np.arange(len(labels)), labels].mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def imprint(X, y, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight imprinting: ``W`` rows are scaled unit class-mean directions, ``b`` is zero (float32).

    Scale: ``T / median ||x||`` with ``T`` the leave-one-out temperature (see the module doc).
    """
    X, y = check_data(X, y, n_classes)
    U = _unit_rows(X)
    means = np.zeros((n_classes, X.shape[1]))
    np.add.at(means, y, U)
    directions = _unit_rows(means)
    norms = np.linalg.norm(X, axis=1)
    typical = float(np.median(norms))
    scale = _loo_temperature(U, y, n_classes) / (typical if typical > 0 else 1.0)
    return (scale * directions).astype(np.float32), np.zeros(n_classes, dtype=np.float32)


# --- logistic regression --------------------------------------------------------------------------


@dataclasses.dataclass
class _Problem:
    """The standardised rows in their principal axes, ready for any weight decay and init."""

    mean: np.ndarray  # (D,) of the raw features
    std: np.ndarray  # (D,) floored
    axes: np.ndarray  # (D, r) orthonormal principal axes of the standardised rows
    coords: np.ndarray  # (n, r) the standardised rows along the axes
    variance: np.ndarray  # (r,) mean square along each axis


def _problem(X: np.ndarray) -> _Problem:
    mean, std = standardisation(X)
    Z = (X - mean) / std
    n, d = Z.shape
    if n <= d:
        _, s, vt = np.linalg.svd(Z, full_matrices=False)
        power, axes = s**2, vt.T
    else:
        power, axes = np.linalg.eigh(Z.T @ Z)
        power, axes = power[::-1], axes[:, ::-1]
    top = float(power[0]) if len(power) else 0.0
    r = int(np.sum(power > AXIS_FLOOR * top)) if top > 0 else 0
    axes = np.ascontiguousarray(axes[:, :r])
    return _Problem(mean, std, axes, Z @ axes, power[:r] / n)


def _loss_grad(params: np.ndarray, A: np.ndarray, y: np.ndarray, wd: float, curvature: np.ndarray, k: int):
    """Objective and gradient in the preconditioned coordinates.

    ``params`` packs ``P`` (k, r) then ``b`` (k,); the weights along the axes are
    ``Q = P / sqrt(curvature)`` and ``A`` holds the rows along the axes already divided by
    ``sqrt(curvature)``, so the logits are ``A @ P.T + b`` and the penalty is
    ``wd / 2 * sum(P**2 / curvature)``.
    """
    r = A.shape[1]
    P = params[: k * r].reshape(k, r)
    b = params[k * r :]
    logp = _log_softmax(A @ P.T + b)
    n = len(y)
    rows = np.arange(n)
    penalty = P**2 / curvature
    f = -logp[rows, y].mean() + 0.5 * wd * penalty.sum()
    G = np.exp(logp)
    G[rows, y] -= 1.0
    G /= n
    gP = G.T @ A + wd * P / curvature
    return float(f), np.concatenate([gP.ravel(), G.sum(axis=0)])


def _lbfgs(fg, x: np.ndarray, gscale: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """Minimise ``fg`` (returns f, gradient) from ``x``: L-BFGS with backtracking Armijo steps.

    Stops when ``max |gradient * gscale| <= tol`` (the gradient in the caller's natural coordinates),
    after ``max_iter`` iterations, or when no step along the search direction lowers ``f`` (the
    optimum at float64 precision).
    """
    f, g = fg(x)
    s_list: list[np.ndarray] = []
    y_list: list[np.ndarray] = []
    for _ in range(max_iter):
        if np.max(np.abs(g * gscale)) <= tol:
            break
        # Two-loop recursion: d = -H g.
        q = g.copy()
        alphas = []
        for s, yv in zip(reversed(s_list), reversed(y_list), strict=True):
            rho = 1.0 / float(yv @ s)
            a = rho * float(s @ q)
            q -= a * yv
            alphas.append((rho, a))
        if s_list:
            q *= float(s_list[-1] @ y_list[-1]) / float(y_list[-1] @ y_list[-1])
        for (s, yv), (rho, a) in zip(zip(s_list, y_list, strict=True), reversed(alphas), strict=True):
            q += (a - rho * float(yv @ q)) * s
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction (rounding): restart from steepest descent
            s_list.clear()
            y_list.clear()
            d, slope = -g, -float(g @ g)
        step = 1.0 if s_list else min(1.0, 1.0 / max(float(np.max(np.abs(g))), 1e-300))
        for _ in range(40):
            x_new = x + step * d
            f_new, g_new = fg(x_new)
            if f_new <= f + ARMIJO * step * slope:
                break
            step *= 0.5
        else:
            break
        s, yv = x_new - x, g_new - g
        if float(s @ yv) > 1e-10 * float(np.linalg.norm(s) * np.linalg.norm(yv)):
            s_list.append(s)
            y_list.append(yv)
            if len(s_list) > LBFGS_MEMORY:
                s_list.pop(0)
                y_list.pop(0)
        converged = f - f_new <= 1e-15 * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if converged:
            break
    return x


def _solve(p: _Problem, y: np.ndarray, k: int, wd: float, init, max_iter: int, tol: float):
    """Fit on a prepared problem; returns float64 ``W, b`` on raw features."""
    r = p.coords.shape[1]
    curvature = p.variance / k + wd
    root = np.sqrt(curvature)
    A = p.coords / root
    if init is None:
        P0, b0 = np.zeros((k, r)), np.zeros(k)
    else:
        W0 = np.asarray(init[0], dtype=np.float64)
        b0 = np.asarray(init[1], dtype=np.float64)
        if W0.shape != (k, len(p.mean)) or b0.shape != (k,) or not (np.isfinite(W0).all() and np.isfinite(b0).all()):
            raise ConfigError(f"init must be finite (W, b) of shapes ({k}, {len(p.mean)}) and ({k},)")
        # Raw -> standardised head, then along the axes, then preconditioned.
        P0 = ((W0 * p.std) @ p.axes) * root
        b0 = b0 + W0 @ p.mean
    gscale = np.concatenate([np.broadcast_to(root, (k, r)).ravel(), np.ones(k)])
    x = _lbfgs(
        lambda v: _loss_grad(v, A, y, wd, curvature, k),
        np.concatenate([P0.ravel(), b0]),
        gscale,
        max_iter,
        tol,
    )
    Q = x[: k * r].reshape(k, r) / root
    W = (Q @ p.axes.T) / p.std
    return W, x[k * r :] - W @ p.mean


def fit_logistic(
    X, y, n_classes: int, *, weight_decay: float, init=None, max_iter: int = 300, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with L2 weight decay; ``W`` (C, D) and ``b`` (C,) float32 on raw features.

    The objective and solver are in the module doc. ``init`` is an optional ``(W, b)`` head on raw
    features to start from (e.g. :func:`imprint`'s); ``None`` starts from zeros. ``tol`` bounds the
    largest gradient component of the objective in standardised coordinates. Deterministic.
    """
    X, y = check_data(X, y, n_classes)
    wd = _check_decay(weight_decay)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    W, b = _solve(_problem(X), y, n_classes, wd, init, max_iter, float(tol))
    return W.astype(np.float32), b.astype(np.float32)


# --- cross-validation and the choice ------------------------------------------------------------


def stratified_folds(y, n_classes: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..folds-1) of every row: each class's rows shuffled and dealt round-robin.

    Each class starts dealing where the previous one stopped, so the folds' sizes differ by at most one.
    """
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    start = 0
    for c in range(n_classes):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold_of[rows] = (start + np.arange(len(rows))) % folds
        start = (start + len(rows)) % folds
    return fold_of


@dataclasses.dataclass
class CVResult:
    """What cross-validation measured and chose. ``possible`` is False when a class has a single image."""

    possible: bool
    reason: str | None  # why cross-validation was impossible, else None
    folds: int  # folds used (0 when impossible)
    weight_decays: list[float]
    logistic_top1: list[float]  # cross-validated top-1 per weight decay (aligned with weight_decays)
    imprint_top1: float | None
    method: str  # "logistic" or "imprinting"
    weight_decay: float | None  # the chosen decay (None for imprinting)
    top1: float | None  # cross-validated top-1 of the chosen method
    per_class: list[float] | None  # its held-out accuracy per class
    confusion: list[list[int]] | None  # its held-out confusion matrix, rows = true class

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_folds(folds, seed) -> None:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


def cross_validate(X, y, n_classes: int, *, folds: int = 5, weight_decays=WEIGHT_DECAYS, seed: int = 0) -> CVResult:
    """Stratified k-fold top-1 of logistic regression per weight decay and of imprinting; picks one.

    See the module doc for the fold count, the choice and the warm starts along each fold's decay path.
    """
    X, y = check_data(X, y, n_classes)
    _check_folds(folds, seed)
    decays = [_check_decay(wd) for wd in weight_decays]
    if not decays:
        raise ConfigError("weight_decays is empty; give at least one weight decay")
    smallest = int(np.bincount(y, minlength=n_classes).min())
    if smallest < 2:
        return CVResult(
            possible=False,
            reason=f"class {int(np.argmin(np.bincount(y, minlength=n_classes)))} has a single image: "
            "no fold could hold it out and train on it",
            folds=0,
            weight_decays=decays,
            logistic_top1=[],
            imprint_top1=None,
            method="imprinting",
            weight_decay=None,
            top1=None,
            per_class=None,
            confusion=None,
        )
    k = min(int(folds), smallest)
    fold_of = stratified_folds(y, n_classes, k, seed)
    logistic_pred = np.zeros((len(decays), len(y)), dtype=np.int64)
    imprint_pred = np.zeros(len(y), dtype=np.int64)
    for f in range(k):
        train, held = fold_of != f, fold_of == f
        init = imprint(X[train], y[train], n_classes)
        imprint_pred[held] = np.argmax(X[held] @ init[0].T.astype(np.float64), axis=1)
        problem = _problem(X[train])
        start = init
        for j in sorted(range(len(decays)), key=lambda j: -decays[j]):
            W, b = _solve(problem, y[train], n_classes, decays[j], start, 300, CV_TOL)
            logistic_pred[j, held] = np.argmax(X[held] @ W.T + b, axis=1)
            start = (W, b)
    scores = [top1(y, p) for p in logistic_pred]
    imprint_score = top1(y, imprint_pred)
    # Best score; ties go to the larger decay (scores are counts over the same rows: exact ties).
    best = max(range(len(decays)), key=lambda j: (scores[j], decays[j]))
    if imprint_score > scores[best]:
        method, chosen_decay, pred, score = "imprinting", None, imprint_pred, imprint_score
    else:
        method, chosen_decay, pred, score = "logistic", decays[best], logistic_pred[best], scores[best]
    cm = confusion(y, pred, n_classes)
    return CVResult(
        possible=True,
        reason=None,
        folds=k,
        weight_decays=decays,
        logistic_top1=scores,
        imprint_top1=imprint_score,
        method=method,
        weight_decay=chosen_decay,
        top1=score,
        per_class=(np.diag(cm) / cm.sum(axis=1)).tolist(),
        confusion=cm.tolist(),
    )


def train_head(X, y, n_classes: int, *, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cross-validate, then fit the chosen method on all rows: float32 ``W, b`` on raw features and a report.

    The report (JSON-friendly) holds ``method``, ``weight_decay``, ``cv_top1``, ``per_class``,
    ``confusion``, ``folds``, ``fallback`` (why imprinting was forced, else None) and ``cv`` (the
    whole :class:`CVResult`).
    """
    cv = cross_validate(X, y, n_classes, folds=folds, seed=seed)
    init = imprint(X, y, n_classes)
    if cv.method == "logistic":
        W, b = fit_logistic(X, y, n_classes, weight_decay=cv.weight_decay, init=init)
    else:
        W, b = init
    report = {
        "method": cv.method,
        "weight_decay": cv.weight_decay,
        "cv_top1": cv.top1,
        "per_class": cv.per_class,
        "confusion": cv.confusion,
        "folds": cv.folds,
        "fallback": None if cv.possible else f"imprinting: cross-validation impossible ({cv.reason})",
        "cv": cv.as_dict(),
    }
    return W, b, report
