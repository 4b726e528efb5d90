"""A linear head chosen by cross-validation on the training split, then fitted on all of it.

On frozen-trunk features (cached, so a head costs no trunk pass) the default run does not train one
fixed head configuration: it searches the head's hyperparameters by stratified k-fold
cross-validation on the TRAINING split only and fits the winner on the whole training split. The
validation split is never used to choose; it stays a held-out measurement.

What is searched (``DEFAULT_SPACE``), and why
---------------------------------------------
One family: multinomial logistic regression on standardised features, with an L2 penalty
(``weight_decay``) and label smoothing (``label_smoothing``), fitted full-batch with L-BFGS. The
objective of a fit on n rows is::

    mean_i CE(softmax(W z_i + b), (1 - s) onehot(y_i) + s / K)  +  weight_decay / 2 * ||W||^2

with z the standardised features, s the label smoothing and K the number of classes; the bias is
not penalised. ``weight_decay`` is per row, so one value means the same on a fold (4/5 of the rows)
and on the final fit. The grid: ``weight_decay`` 3e-2 .. 1e-4 in half-decade steps x
``label_smoothing`` {0, 0.1}; 15 L-BFGS iterations per fit along each penalty path.

Measured on MobileNetV2 features (96 px, ImageNet weights, edgetl's preprocessing) of the patches,
faces, digits and mnist5k sets (``benchmarks/head_search.py``; validation top-1 of the searched head
against the plain script's head, AdamW lr 1e-2, wd 1e-4, 100 epochs, batch 64): patches 0.945 vs
0.944, faces 0.99 vs 0.97, digits 0.959 vs 0.957, mnist5k 0.949 vs 0.937.

* Label smoothing is worth searching: with it the digits gain about 1 pp of cross-validated top-1
  at a moderate penalty; on the patches it costs 2-3 pp at every penalty. Cross-validation told
  the two apart on both sets (it chose 0.1 on the digits and mnist5k, 0 on the patches).
* The L2 strength matters most at its ends (1e-1 lost 3-5 pp on the patches and was never chosen,
  so the grid starts at 3e-2; 1e-4 with label smoothing lost up to 20 pp on the patches, where the
  fit interpolates the smoothed targets); in between the curve is flat within the noise, so
  half-decade steps are fine enough.
* Per-dimension standardisation against centring only (one global scale, what the script's raw
  features amount to): no consistent winner (digits: centring +0.5-1 pp on validation,
  standardising +0.5 pp in cross-validation; patches: the reverse). Not searched (it would double
  the cost); features are standardised.
* An AdamW mini-batch family (lr {1e-3, 1e-2} x weight decay {1e-4, 1e-1} x label smoothing
  {0, 0.1}, epochs 10/30/100 chosen by cross-validation) did not beat the logistic family beyond
  the noise (best cross-validated top-1: digits 0.966 vs 0.966, patches 0.947 vs 0.939, fold std
  about 0.01) and cost 7-14 s per configuration on 2 cores against 1-2 s for the whole L-BFGS
  search: dropped.
* 15 iterations per fit: 25 gave the same choices and validation top-1 within 0.1 pp for 1.3x the
  time; 10 lost 0.4 pp on the patches and mnist5k.

How it is fast
--------------
Measured on this 2-core machine (whole search: all candidates x 5 folds + the final fit): 1,000 x
1,280 features, 10 classes: 1.0-1.1 s when the machine is quiet, 2.1 s at load average 5 (other
sessions); 5,000 x 1,280: 3.4-3.6 s quiet, 6 s at load 5; the digits (899 rows) 1.3-1.4 s, the
patches (1,200 rows, 12 classes) 1.3-1.5 s.

* Solver: sklearn's ``LogisticRegression`` (lbfgs) took 0.5 s for ONE fit of 1,200 x 1,280
  features (98 iterations, one thread) and has no label smoothing; ``torch.optim.LBFGS`` took
  2.3-2.8 s (340 iterations); scipy's L-BFGS-B spent 8-30 ms per iteration on its own bookkeeping
  at 10^4-10^5 parameters. All of them optimise in the original coordinates, where standardised
  MobileNet features are badly conditioned. Here the features are rotated once into their
  principal axes (an exact change of basis: every axis with variance above 1e-5 of the largest is
  kept) and each axis is scaled by the inverse square root of its curvature
  (``variance / K + weight_decay``); a short numpy L-BFGS (``_lbfgs``) then makes progress from
  the first iteration.
* The k folds of one configuration are fitted together as one problem (the sum of the folds'
  objectives; their parameters do not interact): one pass over the feature matrix computes every
  fold's logits, a 5x wider matrix product instead of five thin ones (about twice the throughput).
* Along each penalty path (strong to weak) a fit starts from the previous one's solution, and the
  path stops once ``patience`` weaker penalties in a row score below its best. The two label
  smoothings' paths run in two threads.
* The final fit on all rows starts from the mean of the chosen configuration's fold solutions.
* BLAS runs single-threaded inside the search: on this loaded 2-core machine two OpenBLAS threads
  made these products 5-20x slower; one thread also makes the result independent of the machine's
  thread count (determinism).

The standardisation statistics and the principal axes are computed from all training rows,
labels unused; the folds' held-out rows share them (an unsupervised transform: the optimum of a
fold's fit does not depend on it, only the optimiser's path does).

Rows, groups and scoring
------------------------
Rows may be several (augmented) views of one image: ``groups`` gives each row's image, and the
rows of one image always fall in the same fold (``StratifiedGroupKFold``); ``scored`` marks the rows
that count when a held-out fold is scored (the un-augmented views). When a class has fewer images
than ``folds``, fewer folds are used (at least 2) and ``fallback`` says so; when a class has a single
image no cross-validation is possible and the space's default setting is fitted (and said).

Ranking: mean cross-validated top-1; ties (within 1e-9) by the lower mean held-out cross-entropy
(unsmoothed), then by the stronger regularisation (larger weight decay, then larger label smoothing).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import Any

import numpy as np

from edgetl.core.errors import ConfigError

TIE = 1e-9
# Axes whose variance is below this fraction of the largest are dropped: at float32 precision (the
# eigendecomposition runs in float32, twice as fast as float64) they are rounding noise.
EIGEN_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class HeadSpace:
    """What is searched: a grid of L2 strengths x label smoothings for the logistic head."""

    weight_decays: tuple[float, ...] = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
    label_smoothings: tuple[float, ...] = (0.0, 0.1)
    default_weight_decay: float = 3e-3  # used when k-fold is impossible (a class with one image)
    default_label_smoothing: float = 0.0
    max_iter: int = 15  # L-BFGS iterations per fit (each fit starts from the previous one on the path)
    tol: float = 1e-4  # L-BFGS: stop when the largest gradient component is below this
    patience: int = 2  # a path stops after this many weaker penalties in a row below its best

    def problem(self) -> str | None:
        """None if the space is usable, else one line saying what is wrong."""

        def bad_number(v) -> bool:
            return isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)

        pre = "no valid configuration: "
        if len(self.weight_decays) == 0:
            return pre + "the weight-decay grid is empty"
        if len(self.label_smoothings) == 0:
            return pre + "the label-smoothing grid is empty"
        for v in (*self.weight_decays, self.default_weight_decay):
            if bad_number(v) or v <= 0:
                return pre + f"weight decay {v!r} must be a finite number > 0"
        for v in (*self.label_smoothings, self.default_label_smoothing):
            if bad_number(v) or not 0 <= v < 1:
                return pre + f"label smoothing {v!r} must be a number in [0, 1)"
        if len(set(self.weight_decays)) != len(self.weight_decays):
            return pre + "the weight-decay grid lists a value twice"
        if len(set(self.label_smoothings)) != len(self.label_smoothings):
            return pre + "the label-smoothing grid lists a value twice"
        for name in ("max_iter", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return pre + f"{name} {v!r} must be an integer >= 1"
        if bad_number(self.tol) or self.tol <= 0:
            return pre + f"tol {self.tol!r} must be a finite number > 0"
        return None


DEFAULT_SPACE = HeadSpace()


@dataclasses.dataclass
class HeadSearchResult:
    chosen: dict[str, Any]
    table: list[dict]
    folds: int
    fallback: str | None
    weight: np.ndarray  # float32 (num_classes, dim), on RAW features
    bias: np.ndarray  # float32 (num_classes,)
    seconds: float

    def to_dict(self) -> dict:
        return {
            "chosen": dict(self.chosen),
            "table": [dict(r) for r in self.table],
            "folds": self.folds,
            "fallback": self.fallback,
            "seconds": self.seconds,
        }


# --- the preconditioned basis and the joint fit -------------------------------------------------


@dataclasses.dataclass
class _Basis:
    mean: np.ndarray  # (d,) float64
    scale: np.ndarray  # (d,) float64: per-dimension std (1 where constant)
    coords: np.ndarray  # (n, r) float32: the rows along the principal axes of the standardised features
    variance: np.ndarray  # (r,) float64: variance along each axis
    # the axes (d, r) are axes_left.T @ axes_right: (identity, axes) when rows >= dims, else
    # (u / sqrt(eigenvalue), standardised rows), never formed (a (d, r) product saved)
    axes_left: np.ndarray | None
    axes_right: np.ndarray

    def standardised_weight(self, a: np.ndarray) -> np.ndarray:
        """(K, r) weights along the axes -> (K, d) weights on standardised features."""
        a = a.astype(np.float64)
        if self.axes_left is None:
            return a @ self.axes_right.T.astype(np.float64)
        return (a @ self.axes_left.T) @ self.axes_right.astype(np.float64)


def _basis(x: np.ndarray) -> _Basis:
    # numpy's eigh is LAPACK's divide-and-conquer (syevd), as scipy's driver="evd"; importing
    # scipy.linalg cost every run 0.1 s.
    x64 = x.astype(np.float64)
    mean = x64.mean(0)
    std = x64.std(0)
    scale = np.where(std > 1e-12 * max(float(std.max()), 1e-30), std, 1.0)
    z = ((x64 - mean) / scale).astype(np.float32)
    n, d = z.shape
    if n < d:  # the smaller Gram matrix: rows x rows
        w, u = np.linalg.eigh(z @ z.T)
        w, u = w.astype(np.float64), u.astype(np.float64)
        keep = w > max(float(w.max()), 0.0) * EIGEN_FLOOR
        w, u = w[keep][::-1], u[:, keep][:, ::-1]
        left, right = u / np.sqrt(w), z  # axes = z.T @ (u / sqrt(w))
        coords = (u * np.sqrt(w)).astype(np.float32)
    else:
        w, v = np.linalg.eigh(z.T @ z)
        w = w.astype(np.float64)
        keep = w > max(float(w.max()), 0.0) * EIGEN_FLOOR
        w, v = w[keep][::-1], v[:, keep][:, ::-1]
        left, right = None, np.ascontiguousarray(v, dtype=np.float32)
        coords = z @ right
    if len(w) == 0:  # every feature constant: one dummy axis, a bias-only model
        left, right = None, np.zeros((d, 1), np.float32)
        coords = np.zeros((n, 1), np.float32)
        w = np.ones(1)
    return _Basis(mean, scale, np.ascontiguousarray(coords), w / n, left, right)


def _fit_joint(
    coords: np.ndarray,
    targets: np.ndarray,
    masks: np.ndarray,
    num_classes: int,
    weight_decay: float,
    variance: np.ndarray,
    start: tuple[np.ndarray, np.ndarray] | None,
    space: HeadSpace,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit F independent heads at once; fold f trains on the rows where ``masks[:, f] > 0``.

    ``targets`` (n, K): the (smoothed) target distributions. ``masks`` (n, F): 1/n_f on fold f's
    training rows, 0 elsewhere. ``start``: (A (F, K, r), b (F, K)) in axis coordinates, or None.
    Returns (A, b, function evaluations), A such that logits = coords @ A[f].T + b[f].
    """
    n, r = coords.shape
    k = num_classes
    f_count = masks.shape[1]
    h = variance / k + weight_decay  # the curvature along each axis, roughly
    sq = (1.0 / np.sqrt(h)).astype(np.float32)
    pt = coords * sq
    pen = (weight_decay / h).astype(np.float32)
    nw = f_count * k * r

    def fg(q: np.ndarray):
        a = q[:nw].astype(np.float32).reshape(f_count * k, r)
        b = q[nw:].astype(np.float32)
        s = (pt @ a.T + b).reshape(n, f_count, k)
        s -= s.max(2, keepdims=True)
        e = np.exp(s)
        se = e.sum(2, keepdims=True)
        per_row = np.log(se[:, :, 0]) - np.einsum("nfk,nk->nf", s, targets)
        loss = float((per_row * masks).sum()) + 0.5 * float((a.reshape(f_count, k, r) ** 2 * pen).sum())
        g = ((e / se - targets[:, None, :]) * masks[:, :, None]).reshape(n, f_count * k)
        ga = g.T @ pt + (a.reshape(f_count, k, r) * pen).reshape(f_count * k, r)
        return loss, np.concatenate([ga.ravel(), g.sum(0)]).astype(np.float64)

    if start is None:
        q0 = np.zeros(nw + f_count * k)
    else:
        a0, b0 = start
        q0 = np.concatenate([(np.asarray(a0, np.float64) / sq).ravel(), np.asarray(b0, np.float64).ravel()])
    q, evaluations = _lbfgs(fg, q0, space.max_iter, space.tol)
    a = (q[:nw].reshape(f_count, k, r) * sq).astype(np.float32)
    b = q[nw:].reshape(f_count, k).astype(np.float32)
    return a, b, evaluations


def _lbfgs(fg, x: np.ndarray, max_iter: int, tol: float, memory: int = 6) -> tuple[np.ndarray, int]:
    """Minimise a smooth convex function by L-BFGS with a backtracking (Armijo) line search.

    Returns (x, function evaluations). Stops when the largest gradient component is <= ``tol``,
    when an iteration lowers the objective by less than 1e-9 relative, or after ``max_iter``
    iterations. Written out because scipy's L-BFGS-B spent 8-30 ms per iteration of bookkeeping on
    these 10^4-10^5 parameters, 5-10x the cost of the function itself.
    """
    f, g = fg(x)
    evaluations = 1
    history: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(max_iter):
        if float(np.abs(g).max()) <= tol:
            break
        q = g.copy()
        alphas = []
        for s, y, rho in reversed(history):
            alpha = rho * float(s @ q)
            q -= alpha * y
            alphas.append(alpha)
        if history:
            s, y, _ = history[-1]
            q *= float(s @ y) / float(y @ y)
        else:
            q *= 1.0 / max(1.0, float(np.linalg.norm(g)))
        for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
            q += s * (alpha - rho * float(y @ q))
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from the gradient
            history.clear()
            d = -g / max(1.0, float(np.linalg.norm(g)))
            slope = float(g @ d)
        step = 1.0
        while True:
            x_new = x + step * d
            f_new, g_new = fg(x_new)
            evaluations += 1
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
            if step < 1e-10:
                return x, evaluations
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-12 * float(y @ y):
            history.append((s, y, 1.0 / sy))
            if len(history) > memory:
                history.pop(0)
        done = f - f_new <= 1e-9 * max(abs(f), abs(f_new), 1.0)
        x, f, g = x_new, f_new, g_new
        if done:
            break
    return x, evaluations


def _smoothed(y: np.ndarray, k: int, s: float) -> np.ndarray:
    t = np.full((len(y), k), s / k, np.float32)
    t[np.arange(len(y)), y] += 1 - s
    return t


# --- folds ------------------------------------------------------------------------------------


def _plan_folds(y: np.ndarray, groups: np.ndarray, num_classes: int, folds: int) -> tuple[int, str | None]:
    """(folds to use, fallback line); 0 folds: k-fold impossible."""
    per_class = []
    for c in range(num_classes):
        g = groups[y == c]
        per_class.append(len(np.unique(g)))
    present = [(c, m) for c, m in enumerate(per_class) if m > 0]
    c_min, m_min = min(present, key=lambda t: t[1])
    if m_min >= folds:
        return folds, None
    if m_min >= 2:
        return m_min, (
            f"class {c_min} has only {m_min} image(s), fewer than {folds} folds: "
            f"cross-validated with {m_min} folds instead"
        )
    return 0, (
        f"class {c_min} has a single image: k-fold cross-validation is impossible; "
        "fitted the default setting without a search"
    )


def _splits(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out row indices of each fold: stratified k-fold over groups (an image and its views, or
    its fp32 and int8 features, are one group and stay in one fold; a group's class is its first
    row's). Each class's groups, in a seeded random order, are dealt to the folds in turn, the deal
    going on from class to class, so every fold holds every class when it has >= ``folds`` groups
    (what :func:`_plan_folds` ensures).

    Written here rather than taken from scikit-learn's StratifiedGroupKFold: importing
    ``sklearn.model_selection`` costs 0.8-1.0 s, a tenth of a small run's wall time, and this is
    all the search needs of it (one label per group)."""
    rng = np.random.default_rng(seed)
    group_of_row = np.arange(len(y)) if groups is None else np.asarray(groups)
    ids, first_row = np.unique(group_of_row, return_index=True)
    group_label = np.asarray(y)[first_row]
    fold_of_group = np.empty(len(ids), dtype=np.int64)
    dealt = 0
    for c in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == c))
        fold_of_group[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    fold_of_row = fold_of_group[np.searchsorted(ids, group_of_row)]
    return [np.flatnonzero(fold_of_row == f) for f in range(folds)]


# --- the search -------------------------------------------------------------------------------


def _check_inputs(x, y, num_classes, groups, scored, folds, seed, space):
    problem = space.problem() if isinstance(space, HeadSpace) else "no valid configuration: space is not a HeadSpace"
    if problem:
        raise ConfigError(problem)
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) == 0 or x.shape[1] == 0:
        raise ConfigError(f"head search needs features of shape (rows, dim), not {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"head search needs one integer label per feature row: {y.shape} for {len(x)} rows")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ConfigError(f"head search needs num_classes >= 2, not {num_classes!r}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ConfigError(f"labels must lie in 0..{num_classes - 1}; found {int(y.min())}..{int(y.max())}")
    if len(np.unique(y)) < 2:
        raise ConfigError("head search needs rows of at least 2 classes")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise ConfigError(
            f"features contain NaN or inf ({bad} of {len(x)} rows): check the weights file and the images"
        )
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2, not {folds!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, not {seed!r}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (len(x),):
            raise ConfigError(f"groups needs one image id per row: {groups.shape} for {len(x)} rows")
        pairs = np.unique(np.stack([groups, y]), axis=1)  # distinct (group, label)
        ids, counts = np.unique(pairs[0], return_counts=True)
        if (counts > 1).any():
            g = ids[counts > 1][0]
            raise ConfigError(f"group {g} has rows of different labels; the views of one image share its label")
    if scored is not None:
        scored = np.asarray(scored, dtype=bool)
        if scored.shape != (len(x),):
            raise ConfigError(f"scored needs one flag per row: {scored.shape} for {len(x)} rows")
        if not scored.any():
            raise ConfigError("scored marks no row: at least the un-augmented views must be scored")
    return x, y.astype(np.int64), groups, scored


def _raw_head(basis: _Basis, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold the standardisation and the axes into a head on raw features."""
    weight = basis.standardised_weight(a) / basis.scale
    bias = b.astype(np.float64) - weight @ basis.mean
    return weight.astype(np.float32), bias.astype(np.float32)


def _settings(wd: float, ls: float) -> dict[str, Any]:
    return {"kind": "logistic", "weight_decay": float(wd), "label_smoothing": float(ls), "standardize": True}


def _compare(r1: dict, r2: dict) -> int:
    """Best first: higher cv_top1; within TIE the lower cv_loss; then the stronger regularisation."""
    if abs(r1["cv_top1"] - r2["cv_top1"]) > TIE:
        return -1 if r1["cv_top1"] > r2["cv_top1"] else 1
    if abs(r1["cv_loss"] - r2["cv_loss"]) > TIE:
        return -1 if r1["cv_loss"] < r2["cv_loss"] else 1
    k1 = (r1["weight_decay"], r1["label_smoothing"])
    k2 = (r2["weight_decay"], r2["label_smoothing"])
    return -1 if k1 > k2 else (1 if k1 < k2 else 0)


def _path(p, y, one_hot, masks, held_out, scored_mask, k, variance, space, bar, ls):
    """One label smoothing's penalty path, strong to weak, each fit starting from the previous one."""
    progress, task = bar
    targets = _smoothed(y, k, ls)
    wds = sorted(space.weight_decays, reverse=True)
    rows, solutions = [], {}
    start = None
    best, below = -math.inf, 0
    for i, wd in enumerate(wds):
        t0 = time.perf_counter()
        a, b, evaluations = _fit_joint(p, targets, masks, k, wd, variance, start, space)
        start = (a, b)
        top1s, losses = [], []
        for f, te in enumerate(held_out):
            scored_rows = te[scored_mask[te]]
            if len(scored_rows) == 0:
                continue
            logits = p[scored_rows] @ a[f].T + b[f]
            logits = logits - logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            top1s.append(float((logits.argmax(1) == y[scored_rows]).mean()))
            losses.append(float(-(logp * one_hot[scored_rows]).sum(1).mean()))
        row = {
            **_settings(wd, ls),
            "cv_top1": round(float(np.mean(top1s)), 6),
            "cv_top1_std": round(float(np.std(top1s)), 6),
            "cv_loss": round(float(np.mean(losses)), 6),
            "seconds": round(time.perf_counter() - t0, 4),
            "evaluations": evaluations,  # of the k folds' joint objective
        }
        rows.append(row)
        solutions[(wd, ls)] = (a, b)
        if task is not None:
            progress.update(task, advance=1, status=f"top-1 {row['cv_top1']:.3f}")
        if row["cv_top1"] > best + TIE:
            best, below = row["cv_top1"], 0
        elif row["cv_top1"] < best - TIE:
            below += 1
            if below >= space.patience:
                if task is not None and i + 1 < len(wds):
                    progress.update(task, advance=len(wds) - i - 1)
                break
    return rows, solutions


def search_head(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    groups: np.ndarray | None = None,
    scored: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    space: HeadSpace = DEFAULT_SPACE,
    progress=None,
) -> HeadSearchResult:
    """Choose the head's settings by k-fold cross-validation on (x, y), then fit them on all rows.

    See the module docstring. Deterministic given ``seed``. Raises ConfigError (one line) for an
    invalid space or input; never a traceback for too few images (see ``fallback``).
    """
    from threadpoolctl import threadpool_limits

    t_all = time.perf_counter()
    x, y, groups, scored = _check_inputs(x, y, num_classes, groups, scored, folds, seed, space)
    k = int(num_classes)
    n = len(x)
    group_ids = groups if groups is not None else np.arange(n)
    scored_mask = scored if scored is not None else np.ones(n, bool)
    used, fallback = _plan_folds(y, group_ids, k, int(folds))
    n_configs = len(space.weight_decays) * len(space.label_smoothings)
    task = None
    if progress is not None:
        task = progress.add_task("head search", total=(n_configs if used else 0) + 1, status="")

    with threadpool_limits(limits=1, user_api="blas"):
        basis = _basis(x)
        p = basis.coords
        table: list[dict] = []
        fold_solutions: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        if used:
            held_out = _splits(y, groups, used, int(seed))
            masks = np.zeros((n, used), np.float32)
            for f, te in enumerate(held_out):
                train = np.ones(n, bool)
                train[te] = False
                masks[train, f] = 1.0 / train.sum()
            one_hot = np.eye(k, dtype=np.float32)[y]
            run = functools.partial(
                _path, p, y, one_hot, masks, held_out, scored_mask, k, basis.variance, space, (progress, task)
            )
            # The label-smoothing paths are independent: two threads (BLAS releases the GIL; each
            # thread's products are single-threaded, so the result does not depend on the scheduling).
            workers = max(1, min(2, len(space.label_smoothings), os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                for rows, solutions in pool.map(run, space.label_smoothings):
                    table.extend(rows)
                    fold_solutions.update(solutions)
            table.sort(key=functools.cmp_to_key(_compare))
            chosen_wd, chosen_ls = table[0]["weight_decay"], table[0]["label_smoothing"]
            fa, fb = fold_solutions[(chosen_wd, chosen_ls)]
            start = (fa.mean(0, keepdims=True), fb.mean(0, keepdims=True))
        else:
            chosen_wd, chosen_ls = space.default_weight_decay, space.default_label_smoothing
            start = None
        # the final fit: all rows, the chosen setting
        all_rows = np.full((n, 1), 1.0 / n, np.float32)
        a, b, _ = _fit_joint(p, _smoothed(y, k, chosen_ls), all_rows, k, chosen_wd, basis.variance, start, space)
        weight, bias = _raw_head(basis, a[0], b[0])
        if task is not None:
            progress.update(task, advance=1, status="fitted")
    if not used:
        table = [
            {
                **_settings(chosen_wd, chosen_ls),
                "cv_top1": None,
                "cv_top1_std": None,
                "cv_loss": None,
                "seconds": 0.0,
                "evaluations": 0,
            }
        ]
    return HeadSearchResult(
        chosen=_settings(chosen_wd, chosen_ls),
        table=table,
        folds=used,
        fallback=fallback,
        weight=weight,
        bias=bias,
        seconds=round(time.perf_counter() - t_all, 4),
    )


def load_into(head, result: HeadSearchResult) -> None:
    """Copy weight/bias into an edgetl.workstation.model.Head (its .fc), as torch tensors."""
    import torch

    fc = head.fc
    want = (fc.out_features, fc.in_features)
    if tuple(result.weight.shape) != want:
        raise ConfigError(
            f"the searched head is {result.weight.shape[0]} classes x {result.weight.shape[1]} features; "
            f"this head is {want[0]} x {want[1]}"
        )
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(result.weight, dtype=np.float32)))
        fc.bias.copy_(torch.from_numpy(np.ascontiguousarray(result.bias, dtype=np.float32)))
