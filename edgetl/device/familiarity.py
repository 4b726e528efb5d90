"""How unfamiliar an image's features are to the classes a head was trained on (numpy only).

The score is the squared Mahalanobis distance to the nearest class mean under one covariance shared
by all classes: the pooled within-class covariance ``S`` of the training features, shrunk toward a
scaled identity::

    Sigma = (1 - a) * S_k + a * scale * I,      scale = tr(S) / D
    S_k   = V diag(l) V^T + residual * (I - V V^T)

``V`` (D, k) holds the top-k eigenvectors of ``S`` and ``l`` their eigenvalues; ``residual`` is the
mean eigenvalue of ``S`` outside them (PPCA-style), so ``S_k`` keeps ``S``'s trace. Trunk features
are highly correlated and ``S`` is close to singular (there are fewer images than dimensions): the
unshrunk distance measured AUROC about 0.6 on MobileNetV2 features, 10% shrinkage about 0.9998. The
low rank keeps it small in a bundle: for D=1280 and k=64 the basis is 320 KB in float32, where a full
covariance would be 6.5 MB.

``Sigma`` has eigenvalues ``(1-a) l_j + a scale`` along ``V`` and ``(1-a) residual + a scale``
outside, so the distance is computed from projections, never from a D x D matrix:
``d^2 = ||x - m||^2 / c_out + sum_j (v_j . (x - m))^2 (1/c_j - 1/c_out)``.

Scores are divided by D: for features that follow the fitted Gaussian the mean score is then about 1,
whatever the trunk. Higher is more unfamiliar; :func:`threshold_for` turns in-distribution scores
into a threshold (familiar iff ``score <= threshold``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from edgetl.core.errors import BundleError, ConfigError, DataError
from edgetl.device.learning import check_data

# Rows scored at once: bounds the (rows, classes, rank) block of projections differences to ~32 MB.
_BLOCK_ELEMENTS = 4_000_000
# Eigenvalues below this fraction of the largest are rounding noise (a null direction of S).
NULL_EIGENVALUE = 1e-10
ARRAY_KEYS = ("means", "basis", "eigvals", "residual", "shrinkage", "scale")


@dataclasses.dataclass(frozen=True)
class Familiarity:
    """A fitted familiarity model: class means and the low-rank shrunk shared covariance."""

    means: np.ndarray  # (C, D) float32
    basis: np.ndarray  # (D, k) float32, orthonormal columns
    eigvals: np.ndarray  # (k,) float32, eigenvalues of S along the basis
    residual: float  # mean eigenvalue of S outside the basis
    shrinkage: float  # a in [0, 1]
    scale: float  # tr(S) / D

    def _variances(self) -> tuple[np.ndarray, float]:
        """Eigenvalues of Sigma: along the basis, and the one outside it."""
        a = self.shrinkage
        inside = (1 - a) * self.eigvals.astype(np.float64) + a * self.scale
        return inside, (1 - a) * self.residual + a * self.scale

    @functools.cached_property
    def _terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """What :meth:`score` needs besides the features, computed once per model (a server scores
        one image at a time): means and basis in float64, the means' squared norms and projections,
        the per-direction weights and the variance outside the basis."""
        M = self.means.astype(np.float64)
        V = self.basis.astype(np.float64)
        inside, outside = self._variances()
        return M, V, np.einsum("ij,ij->i", M, M), M @ V, 1.0 / inside - 1.0 / outside, outside

    def score(self, X) -> np.ndarray:
        """(n,) float64: min over classes of the squared Mahalanobis distance under Sigma, divided by D."""
        X = np.asarray(X)
        d = self.means.shape[1]
        if X.ndim != 2 or X.shape[1] != d:
            raise DataError(f"features must have shape (n, {d}) for this familiarity model, got {X.shape}")
        X = X.astype(np.float64)
        M, V, m_sq, m_proj, weights, outside = self._terms
        block = max(1, _BLOCK_ELEMENTS // max(1, M.shape[0] * V.shape[1]))
        out = np.empty(X.shape[0])
        for start in range(0, X.shape[0], block):
            x = X[start : start + block]
            sq = np.einsum("ij,ij->i", x, x)[:, None] - 2.0 * (x @ M.T) + m_sq[None, :]
            diff = (x @ V)[:, None, :] - m_proj[None, :, :]  # (rows, C, k)
            dist = np.maximum(sq, 0.0) / outside + np.einsum("rck,k->rc", diff**2, weights)
            out[start : start + block] = dist.min(axis=1)
        return out / d

    def with_means(self, extra_means) -> Familiarity:
        """The same covariance with more class means appended (for classes added later)."""
        extra = np.asarray(extra_means)
        d = self.means.shape[1]
        if extra.ndim != 2 or extra.shape[1] != d or extra.shape[0] == 0:
            raise DataError(f"extra means must have shape (m, {d}) with m >= 1, got {extra.shape}")
        if not np.issubdtype(extra.dtype, np.number) or not np.isfinite(extra).all():
            raise DataError("extra means must be finite numbers")
        means = np.concatenate([self.means, extra.astype(np.float32)])
        return dataclasses.replace(self, means=means)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain float arrays for an .npz (loadable with ``allow_pickle=False``)."""
        return {
            "means": self.means.astype(np.float32),
            "basis": self.basis.astype(np.float32),
            "eigvals": self.eigvals.astype(np.float32),
            "residual": np.array(self.residual, dtype=np.float64),
            "shrinkage": np.array(self.shrinkage, dtype=np.float64),
            "scale": np.array(self.scale, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays) -> Familiarity:
        """Rebuild from :meth:`to_arrays`'s arrays (e.g. read from a file), checked; BundleError if bad."""
        pre = "familiarity model: "
        missing = [k for k in ARRAY_KEYS if k not in arrays]
        if missing:
            raise BundleError(pre + f"arrays {missing} are missing; re-create the bundle")
        values = {}
        for key in ARRAY_KEYS:
            v = np.asarray(arrays[key])
            if not np.issubdtype(v.dtype, np.floating):
                raise BundleError(pre + f"{key} must be a float array, got dtype {v.dtype}; re-create the bundle")
            if not np.isfinite(v).all():
                raise BundleError(pre + f"{key} holds NaN or inf; the file is damaged, re-create the bundle")
            values[key] = v
        means, basis, eigvals = values["means"], values["basis"], values["eigvals"]
        if means.ndim != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise BundleError(pre + f"means must have shape (classes, D), got {means.shape}")
        d = means.shape[1]
        if basis.ndim != 2 or basis.shape[0] != d or basis.shape[1] > d:
            raise BundleError(pre + f"basis must have shape ({d}, k) with k <= {d}, got {basis.shape}")
        k = basis.shape[1]
        if eigvals.shape != (k,):
            raise BundleError(pre + f"eigvals must have shape ({k},) to match the basis, got {eigvals.shape}")
        for key in ("residual", "shrinkage", "scale"):
            if values[key].shape != ():
                raise BundleError(pre + f"{key} must be a scalar, got shape {values[key].shape}")
        if k and not np.allclose(basis.T.astype(np.float64) @ basis, np.eye(k), atol=1e-3):
            raise BundleError(pre + "basis columns are not orthonormal; the file is damaged, re-create the bundle")
        try:
            return _build(
                means, basis, eigvals, float(values["residual"]), float(values["shrinkage"]), float(values["scale"])
            )
        except ConfigError as e:
            raise BundleError(pre + str(e)) from None


def _build(means, basis, eigvals, residual: float, shrinkage: float, scale: float) -> Familiarity:
    """A Familiarity whose Sigma is positive definite, else ConfigError (one line)."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
    if (eigvals < 0).any() or residual < 0 or not scale > 0:
        raise ConfigError("eigvals and residual must be >= 0 and scale > 0")
    model = Familiarity(
        means=np.ascontiguousarray(means, dtype=np.float32),
        basis=np.ascontiguousarray(basis, dtype=np.float32),
        eigvals=np.ascontiguousarray(eigvals, dtype=np.float32),
        residual=float(residual),
        shrinkage=float(shrinkage),
        scale=float(scale),
    )
    inside, outside = model._variances()
    if not (outside > 0 and (inside > 0).all()):
        raise ConfigError("the shrunk covariance is singular; use a shrinkage > 0")
    return model


def fit(X, y, n_classes: int, *, rank: int = 64, shrinkage: float = 0.1) -> Familiarity:
    """Fit class means and the shared within-class covariance, shrunk, kept in rank ``rank``.

    ``S`` pools the rows' deviations from their class means over ``n - C`` degrees of freedom; its
    eigenvectors come from an SVD of the (n, D) deviations when n <= D, else from ``eigh`` of ``S``.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ConfigError(f"rank must be an integer >= 0, got {rank!r}")
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float, np.number)) or not 0 <= shrinkage <= 1:
        raise ConfigError(f"shrinkage must be a number in [0, 1], got {shrinkage!r}")
    X, y = check_data(X, y, n_classes, min_classes=1)
    counts = np.bincount(y, minlength=n_classes)
    n, d = X.shape
    dof = n - n_classes
    if dof < 1:
        raise DataError("every class has a single image: the within-class spread is unknown; add a second image")
    means = np.zeros((n_classes, d))
    np.add.at(means, y, X)
    means /= counts[:, None]
    R = X - means[y]
    total = float(np.sum(R**2)) / dof  # tr(S)
    if not total > 0:
        raise DataError("the images of every class have identical features: the within-class spread is zero")
    if n <= d:
        _, s, vt = np.linalg.svd(R, full_matrices=False)
        eig, vecs = s**2 / dof, vt.T
    else:
        eig, vecs = np.linalg.eigh(R.T @ R / dof)
        eig, vecs = eig[::-1], vecs[:, ::-1]
    # Only directions with variance: an SVD of n <= D rows also returns up to C arbitrary null directions.
    k = min(int(rank), int(np.sum(eig > NULL_EIGENVALUE * eig[0])))
    eig = eig[:k]
    residual = max(total - float(eig.sum()), 0.0) / (d - k) if d > k else 0.0
    return _build(means, vecs[:, :k], eig, residual, float(shrinkage), total / d)


def _scores_1d(name: str, scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{name} holds NaN; score finite features")
    return s


def threshold_for(scores_in, acceptance: float = 0.95) -> float:
    """The smallest threshold with at least ``acceptance`` of ``scores_in`` familiar (``score <= threshold``).

    It is the ``ceil(acceptance * n)``-th smallest score: ties with it are accepted too, so the
    accepted fraction of ``scores_in`` is never below ``acceptance``.
    """
    if isinstance(acceptance, bool) or not isinstance(acceptance, (int, float, np.number)) or not 0 < acceptance <= 1:
        raise ValueError(f"acceptance must be in (0, 1], got {acceptance!r}")
    s = np.sort(_scores_1d("scores_in", scores_in))
    rank = min(len(s), max(1, math.ceil(acceptance * len(s) - 1e-9)))
    return float(s[rank - 1])


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve for telling ``scores_out`` (positives, higher) from ``scores_in``.

    Rank-based (Mann-Whitney): the probability that an out score exceeds an in score, ties counted half.
    """
    s_in = _scores_1d("scores_in", scores_in)
    s_out = _scores_1d("scores_out", scores_out)
    both = np.concatenate([s_in, s_out])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    # Average ranks (1-based) over runs of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(both)]
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    n_out, n_in = len(s_out), len(s_in)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_out * n_in))
