"""On-device learning math (edgetl.device.learning, edgetl.device.familiarity), cross-checked with sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from edgetl.core.errors import BundleError, ConfigError, DataError
from edgetl.device import familiarity, learning


def _trunk_like(n: int, d: int, c: int, seed: int = 0, noise: float = 1.5):
    """Non-negative, correlated, clipped features (like pooled ReLU6 activations) of c classes."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, 24))
    mix = rng.normal(size=(24, d)) / 5
    y = np.arange(n) % c
    latent = centers[y] + rng.normal(size=(n, 24)) * noise
    X = np.clip(latent @ mix + rng.normal(size=(n, d)) * 0.3 - 0.2, 0, 6).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def _sklearn_head(X, y, weight_decay):
    """sklearn's multinomial L-BFGS fit with the equivalent C on our standardised features, folded back to raw."""
    mean, std = learning.standardisation(X)
    model = LogisticRegression(C=1.0 / (weight_decay * len(y)), max_iter=10_000, tol=1e-10)
    model.fit((X - mean) / std, y)
    W = model.coef_ / std
    return W, model.intercept_ - W @ mean


@pytest.mark.parametrize("data", ["synthetic", "digits"])
def test_fit_logistic_matches_sklearn(data, digits):
    if data == "digits":
        X, y = digits
        weight_decay, k = 1e-3, 10
    else:
        X, y = _trunk_like(300, 120, 4, noise=3.0)
        weight_decay, k = 1e-2, 4
    W, b = learning.fit_logistic(X, y, k, weight_decay=weight_decay)
    assert W.shape == (k, X.shape[1]) and b.shape == (k,) and W.dtype == np.float32
    W_sk, b_sk = _sklearn_head(X, y, weight_decay)
    ours = np.argmax(X @ W.T + b, axis=1)
    theirs = np.argmax(X @ W_sk.T + b_sk, axis=1)
    assert np.mean(ours == theirs) >= 0.99
    f_ours = learning.logistic_objective(X, y, W, b, weight_decay=weight_decay)
    f_sk = learning.logistic_objective(X, y, W_sk, b_sk, weight_decay=weight_decay)
    assert abs(f_ours - f_sk) <= 1e-4 * f_sk
    # Not a trivial fit: the synthetic classes overlap.
    if data == "synthetic":
        assert 0.5 < np.mean(ours == y) < 1.0


def test_fit_logistic_is_deterministic_and_uses_init(digits):
    X, y = digits
    W1, b1 = learning.fit_logistic(X, y, 10, weight_decay=1e-2)
    W2, b2 = learning.fit_logistic(X, y, 10, weight_decay=1e-2)
    assert np.array_equal(W1, W2) and np.array_equal(b1, b2)
    # From the imprinting head, the same optimum (convex problem).
    W3, b3 = learning.fit_logistic(X, y, 10, weight_decay=1e-2, init=learning.imprint(X, y, 10))
    f1 = learning.logistic_objective(X, y, W1, b1, weight_decay=1e-2)
    f3 = learning.logistic_objective(X, y, W3, b3, weight_decay=1e-2)
    assert abs(f1 - f3) <= 1e-6 * f1
    # Few iterations stop early, above the optimum.
    W4, b4 = learning.fit_logistic(X, y, 10, weight_decay=1e-2, max_iter=2)
    assert learning.logistic_objective(X, y, W4, b4, weight_decay=1e-2) > f1 * 1.01


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    n, r, k, wd = 30, 7, 4, 3e-2
    A = rng.normal(size=(n, r))
    y = rng.integers(0, k, size=n)
    curvature = rng.uniform(0.5, 2.0, size=r)
    x = rng.normal(size=k * r + k)
    f, g = learning._loss_grad(x, A, y, wd, curvature, k)
    eps = 1e-6
    numeric = np.array(
        [
            (
                learning._loss_grad(x + eps * e, A, y, wd, curvature, k)[0]
                - learning._loss_grad(x - eps * e, A, y, wd, curvature, k)[0]
            )
            / (2 * eps)
            for e in np.eye(len(x))
        ]
    )
    assert np.allclose(g, numeric, rtol=1e-6, atol=1e-8)
    # And the value is the documented objective: mean CE + wd/2 * ||Q||^2 with Q = P / sqrt(curvature).
    P, b = x[: k * r].reshape(k, r), x[k * r :]
    logits = A @ P.T + b
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -logp[np.arange(n), y].mean() + wd / 2 * np.sum((P / np.sqrt(curvature)) ** 2)
    assert f == pytest.approx(expected, rel=1e-12)


def test_imprint_separates_blobs_and_ignores_scale():
    rng = np.random.default_rng(2)
    centers = rng.uniform(0, 5, size=(5, 40))
    y = np.repeat(np.arange(5), 20)
    X = np.abs(centers[y] + rng.normal(size=(100, 40)) * 0.3)
    W, b = learning.imprint(X, y, 5)
    assert np.all(b == 0)
    pred = np.argmax(X @ W.T + b, axis=1)
    assert np.mean(pred == y) == 1.0
    scaled = X * rng.uniform(0.1, 10.0, size=(100, 1))
    assert np.array_equal(np.argmax(scaled @ W.T, axis=1), pred)
    # Rows are scaled unit class-mean directions (one shared scale).
    norms = np.linalg.norm(W, axis=1)
    assert np.allclose(norms, norms[0], rtol=1e-5)


def test_imprint_temperature_is_calibrated_not_extreme():
    X, y = _trunk_like(200, 64, 4, seed=3, noise=3.0)
    W, b = learning.imprint(X, y, 4)
    logits = X @ W.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence = p.max(1).mean()
    accuracy = np.mean(p.argmax(1) == y)
    assert abs(confidence - accuracy) < 0.15


def test_stratified_folds_cover_every_row_once():
    y = np.array([0] * 7 + [1] * 5 + [2] * 9)
    fold_of = learning.stratified_folds(y, 3, 4, seed=5)
    assert fold_of.shape == y.shape and set(fold_of.tolist()) == {0, 1, 2, 3}
    sizes = np.bincount(fold_of, minlength=4)
    assert sizes.sum() == len(y) and sizes.max() - sizes.min() <= 1
    for c in range(3):  # stratified: each class spread as evenly as possible
        per_fold = np.bincount(fold_of[y == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(fold_of, learning.stratified_folds(y, 3, 4, seed=5))


def test_cross_validate_chooses_from_grid_and_reports():
    X, y = _trunk_like(60, 200, 3, seed=4, noise=3.0)
    cv = learning.cross_validate(X, y, 3, folds=5)
    assert cv.possible and cv.folds == 5
    assert len(cv.logistic_top1) == len(learning.WEIGHT_DECAYS)
    assert cv.method in ("logistic", "imprinting")
    if cv.method == "logistic":
        assert cv.weight_decay in learning.WEIGHT_DECAYS
        best = max(cv.logistic_top1)
        assert cv.top1 == best and cv.weight_decay == max(
            wd for wd, s in zip(cv.weight_decays, cv.logistic_top1, strict=True) if s == best
        )
        assert cv.imprint_top1 <= best
    cm = np.array(cv.confusion)
    assert cm.shape == (3, 3) and cm.sum() == len(y)
    assert np.trace(cm) / len(y) == pytest.approx(cv.top1)
    assert np.allclose(cv.per_class, np.diag(cm) / cm.sum(1))
    d = cv.as_dict()
    import json

    assert json.loads(json.dumps(d)) == d


def test_cross_validate_folds_limited_by_smallest_class():
    X, y = _trunk_like(40, 30, 2, seed=5)
    y = y.copy()
    y[np.flatnonzero(y == 1)[3:]] = 0  # class 1 keeps 3 images
    cv = learning.cross_validate(X, y, 2, folds=5)
    assert cv.possible and cv.folds == 3


def test_single_image_class_makes_cv_impossible_and_train_head_falls_back():
    X, y = _trunk_like(21, 30, 3, seed=6)
    y = np.array([0] * 10 + [1] * 10 + [2])
    cv = learning.cross_validate(X, y, 3)
    assert not cv.possible and cv.method == "imprinting" and "class 2" in cv.reason
    W, b, report = learning.train_head(X, y, 3)
    assert report["method"] == "imprinting" and report["fallback"]
    W_imp, b_imp = learning.imprint(X, y, 3)
    assert np.array_equal(W, W_imp) and np.array_equal(b, b_imp)


def test_train_head_refits_the_chosen_logistic(digits):
    X, y = digits
    X, y = X[:300], y[:300]
    W, b, report = learning.train_head(X, y, 10, folds=3)
    assert report["folds"] == 3 and report["fallback"] is None
    assert report["cv_top1"] > 0.85
    if report["method"] == "logistic":
        W_ref, b_ref = learning.fit_logistic(
            X, y, 10, weight_decay=report["weight_decay"], init=learning.imprint(X, y, 10)
        )
        assert np.array_equal(W, W_ref) and np.array_equal(b, b_ref)


def test_bad_inputs_are_refused():
    X = np.ones((4, 3))
    with pytest.raises(DataError, match="no images"):
        learning.fit_logistic(X, np.array([0, 0, 1, 1]), 3, weight_decay=1e-3)
    with pytest.raises(DataError, match="finite"):
        learning.imprint(np.full((4, 3), np.nan), np.array([0, 0, 1, 1]), 2)
    with pytest.raises(DataError, match="0..1"):
        learning.imprint(X, np.array([0, 0, 1, 2]), 2)
    with pytest.raises(ConfigError, match="weight_decay"):
        learning.fit_logistic(X, np.array([0, 0, 1, 1]), 2, weight_decay=0.0)
    with pytest.raises(ConfigError, match="folds"):
        learning.cross_validate(X, np.array([0, 0, 1, 1]), 2, folds=1)


# --- familiarity ----------------------------------------------------------------------------------


def _dense_score(model: familiarity.Familiarity, X) -> np.ndarray:
    """Brute force: the dense shrunk Sigma, inverted."""
    V = model.basis.astype(np.float64)
    d = V.shape[0]
    S_k = V @ np.diag(model.eigvals.astype(np.float64)) @ V.T + model.residual * (np.eye(d) - V @ V.T)
    sigma = (1 - model.shrinkage) * S_k + model.shrinkage * model.scale * np.eye(d)
    inv = np.linalg.inv(sigma)
    diffs = X[:, None, :].astype(np.float64) - model.means[None].astype(np.float64)
    return np.einsum("ncd,de,nce->nc", diffs, inv, diffs).min(axis=1) / d


@pytest.mark.parametrize("n", [30, 200])  # fewer rows than dimensions (SVD) and more (eigh)
def test_familiarity_score_equals_dense_computation(n):
    X, y = _trunk_like(n, 40, 3, seed=7)
    model = familiarity.fit(X, y, 3, rank=8, shrinkage=0.1)
    assert model.basis.shape == (40, 8) and model.means.shape == (3, 40)
    assert np.allclose(model.basis.T @ model.basis, np.eye(8), atol=1e-5)
    # The eigenvalues are those of the pooled within-class covariance; residual keeps its trace.
    R = X.astype(np.float64) - model.means[y]
    S = R.T @ R / (n - 3)
    top = np.sort(np.linalg.eigvalsh(S))[::-1][:8]
    assert np.allclose(model.eigvals, top, rtol=1e-5)
    assert model.scale == pytest.approx(np.trace(S) / 40, rel=1e-9)
    assert model.eigvals.sum() + 32 * model.residual == pytest.approx(np.trace(S), rel=1e-5)
    probe = np.concatenate([X[:10], np.random.default_rng(8).uniform(0, 3, size=(10, 40))])
    assert np.allclose(model.score(probe), _dense_score(model, probe), rtol=1e-6)


def test_familiarity_with_means_adds_classes():
    X, y = _trunk_like(90, 40, 3, seed=9)
    model = familiarity.fit(X[y < 2], y[y < 2], 2, rank=8)
    extra = X[y == 2].mean(0, keepdims=True)
    bigger = model.with_means(extra)
    assert bigger.means.shape == (3, 40) and np.array_equal(bigger.basis, model.basis)
    third = X[y == 2]
    assert np.all(bigger.score(third) <= model.score(third))
    assert np.allclose(bigger.score(third), _dense_score(bigger, third), rtol=1e-6)


def test_auroc_equals_sklearn():
    rng = np.random.default_rng(10)
    s_in = np.round(rng.normal(size=200), 1)  # rounded: many ties
    s_out = np.round(rng.normal(0.7, 1.0, size=150), 1)
    labels = np.r_[np.zeros(200), np.ones(150)]
    assert familiarity.auroc(s_in, s_out) == pytest.approx(roc_auc_score(labels, np.r_[s_in, s_out]), abs=1e-12)
    assert familiarity.auroc([1.0, 2.0], [3.0]) == 1.0
    assert familiarity.auroc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="NaN"):
        familiarity.auroc([1.0, np.nan], [2.0])


def test_threshold_accepts_at_least_the_fraction():
    rng = np.random.default_rng(11)
    for scores in (rng.exponential(size=101), np.round(rng.exponential(size=57), 1), np.ones(20)):
        for acceptance in (0.5, 0.9, 0.95, 1.0):
            t = familiarity.threshold_for(scores, acceptance)
            accepted = np.mean(scores <= t)
            assert accepted >= acceptance
            # The smallest such threshold: anything lower accepts too few.
            below = scores[scores < t]
            if len(below):
                assert np.mean(scores <= below.max()) < acceptance


def test_familiarity_on_digits_tells_unseen_digits_and_noise(digits):
    X, y = digits
    rng = np.random.default_rng(12)
    inside = np.flatnonzero(y < 5)
    rng.shuffle(inside)
    train, held = inside[: len(inside) // 2], inside[len(inside) // 2 :]
    model = familiarity.fit(X[train], y[train], 5, rank=16, shrinkage=0.1)
    s_in = model.score(X[held])
    s_digits = model.score(X[y >= 5])
    s_noise = model.score(rng.uniform(0, 16, size=(300, 64)))
    auc_digits = familiarity.auroc(s_in, s_digits)
    auc_noise = familiarity.auroc(s_in, s_noise)
    print(f"digits 0-4 in vs 5-9 AUROC {auc_digits:.4f}, vs uniform noise {auc_noise:.4f}")
    assert auc_digits > 0.85
    assert auc_noise > 0.99
    t = familiarity.threshold_for(s_in, 0.95)
    assert np.mean(s_in <= t) >= 0.95
    assert 0.3 < np.median(s_in) < 3  # divided by D: about 1 in distribution


def test_familiarity_arrays_round_trip_and_refuse_damage(tmp_path):
    X, y = _trunk_like(60, 40, 3, seed=13)
    model = familiarity.fit(X, y, 3, rank=8)
    path = tmp_path / "fam.npz"
    np.savez(path, **model.to_arrays())
    with np.load(path, allow_pickle=False) as f:
        loaded = familiarity.Familiarity.from_arrays(dict(f))
    assert np.array_equal(loaded.score(X), model.score(X))
    good = model.to_arrays()
    for change, match in [
        ({"means": np.full_like(good["means"], np.nan)}, "NaN"),
        ({"basis": good["basis"][:, :4]}, "eigvals"),
        ({"basis": good["basis"][:-1]}, "basis must have shape"),
        ({"basis": good["basis"] * 2}, "orthonormal"),
        ({"eigvals": -good["eigvals"]}, ">= 0"),
        ({"shrinkage": np.array(1.5)}, "shrinkage"),
        ({"scale": np.array([1.0, 2.0])}, "scalar"),
        ({"means": good["means"].astype(np.int64)}, "float"),
    ]:
        with pytest.raises(BundleError, match=match):
            familiarity.Familiarity.from_arrays({**good, **change})
    with pytest.raises(BundleError, match="missing"):
        familiarity.Familiarity.from_arrays({k: v for k, v in good.items() if k != "scale"})


def test_familiarity_refuses_bad_fits():
    X, y = _trunk_like(3, 10, 3)
    with pytest.raises(DataError, match="single image"):
        familiarity.fit(X, y, 3)
    X, y = _trunk_like(30, 10, 3)
    with pytest.raises(ConfigError, match="shrinkage"):
        familiarity.fit(X, y, 3, shrinkage=2.0)


def test_familiarity_rank_stops_at_the_within_class_rank():
    X, y = _trunk_like(12, 40, 3, seed=14)  # 12 rows, 3 classes: S has rank 9
    model = familiarity.fit(X, y, 3, rank=64)
    assert model.basis.shape == (40, 9) and (model.eigvals > 0).all()
    assert np.allclose(model.score(X), _dense_score(model, X), rtol=1e-6)
