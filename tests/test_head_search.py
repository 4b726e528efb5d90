"""The searched linear head (edgetl.workstation.head_search): choice, folding, folds, fallbacks, errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from edgetl.core.errors import ConfigError
from edgetl.workstation.head_search import DEFAULT_SPACE, HeadSpace, load_into, search_head


def blobs(n_per_class: int, k: int, dim: int, *, informative: int, sep: float, seed: int):
    """Gaussian classes that differ only in the first ``informative`` dimensions."""
    rng = np.random.default_rng(seed)
    centers = np.zeros((k, dim), np.float32)
    centers[:, :informative] = rng.normal(0, sep, (k, informative))
    y = np.repeat(np.arange(k), n_per_class)
    x = centers[y] + rng.normal(0, 1, (len(y), dim)).astype(np.float32)
    return x.astype(np.float32), y


def top1(result, x, y) -> float:
    return float(((x @ result.weight.T + result.bias).argmax(1) == y).mean())


def digits_pixels():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def test_search_beats_a_fixed_weak_setting_where_regularisation_matters():
    # As many rows as dimensions: a weakly regularised fit of smoothed targets interpolates them
    # (on the patches' MobileNet features that setting lost 20 pp); unsmoothed it is about right.
    x, y = blobs(20, 4, 80, informative=10, sep=1.0, seed=1)
    x_test, y_test = blobs(300, 4, 80, informative=10, sep=1.0, seed=1)  # same centers, fresh noise
    searched = search_head(x, y, 4)
    weak = dataclasses.replace(DEFAULT_SPACE, weight_decays=(1e-4,), label_smoothings=(0.1,), max_iter=200)
    unsmoothed = dataclasses.replace(weak, label_smoothings=(0.0,))
    assert searched.chosen["weight_decay"] > 1e-4
    assert top1(searched, x_test, y_test) >= top1(search_head(x, y, 4, space=weak), x_test, y_test) + 0.1
    assert top1(searched, x_test, y_test) >= top1(search_head(x, y, 4, space=unsmoothed), x_test, y_test) - 0.02
    assert len(searched.table) >= 2
    assert searched.table[0]["cv_top1"] >= max(r["cv_top1"] for r in searched.table) - 1e-9


@pytest.mark.parametrize("wide", [False, True], ids=["rows>dims", "rows<dims"])
def test_weight_and_bias_act_on_raw_features_like_a_refit_sklearn_model(wide):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = digits_pixels()  # raw pixels 0..16, some dimensions constant
    x, y = x[:600] * 3.0 + 5.0, y[:600]  # an offset and a scale the folding must undo
    if wide:  # fewer rows than dimensions: the basis comes from the rows' Gram matrix
        rng = np.random.default_rng(0)
        x = np.concatenate([x[:40], x[:40, :30] * 0.5 + rng.normal(0, 1, (40, 30)).astype(np.float32)], 1)
        y = y[:40]
    wd = 3e-2
    space = HeadSpace(weight_decays=(wd,), label_smoothings=(0.0,), max_iter=3000, tol=1e-7)
    result = search_head(x, y, 10, space=space, folds=2)
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=1 / (wd * len(x)), max_iter=10000, tol=1e-10).fit(scaler.transform(x), y)
    p_ref = ref.predict_proba(scaler.transform(x))
    logits = x @ result.weight.T + result.bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert result.weight.dtype == np.float32 and result.bias.dtype == np.float32
    assert result.weight.shape == (10, x.shape[1]) and result.bias.shape == (10,)
    assert np.abs(p - p_ref).max() < 2e-3
    assert (p.argmax(1) == p_ref.argmax(1)).mean() == 1.0


def test_rows_of_one_group_never_straddle_folds():
    # Each image has 4 identical views and a random label: the labels carry no signal, so a
    # held-out view is predictable only if a copy of it was trained on (leakage).
    rng = np.random.default_rng(0)
    images, views, k = 80, 4, 2
    feats = rng.normal(0, 1, (images, 200)).astype(np.float32)
    labels = np.tile(np.arange(k), images // k)
    x = np.repeat(feats, views, axis=0)
    y = np.repeat(labels, views)
    groups = np.repeat(np.arange(images), views)
    weak = HeadSpace(weight_decays=(1e-4,), label_smoothings=(0.0,))
    leaky = search_head(x, y, k, space=weak)  # no groups: views of one image in several folds
    grouped = search_head(x, y, k, groups=groups, space=weak)
    assert leaky.table[0]["cv_top1"] > 0.9  # the test can see leakage...
    assert grouped.table[0]["cv_top1"] < 0.75  # ...and grouped folds have none (chance is 0.5)


def test_folds_are_stratified_group_whole_and_seeded():
    from edgetl.workstation.head_search import _splits

    rng = np.random.default_rng(1)
    per_class = {0: 7, 1: 5, 2: 23}  # uneven classes, 3 views per image
    labels = np.concatenate([np.full(n, c) for c, n in per_class.items()])
    y = np.repeat(labels, 3)
    groups = np.repeat(rng.permutation(len(labels)) + 1000, 3)  # group ids need not be 0..n-1
    folds = _splits(y, groups, 5, seed=3)
    rows = np.sort(np.concatenate(folds))
    assert np.array_equal(rows, np.arange(len(y)))  # every row held out exactly once
    for held in folds:
        assert set(np.unique(y[held])) == {0, 1, 2}  # every class in every fold
        for c, n in per_class.items():  # as even as the counts allow
            assert n // 5 <= len(np.unique(groups[held][y[held] == c])) <= -(-n // 5)
    fold_of = {g: f for f, held in enumerate(folds) for g in groups[held]}
    assert all(len({fold_of[g] for g in groups[groups == g]}) == 1 for g in np.unique(groups))
    same = _splits(y, groups, 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, same, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, _splits(y, groups, 5, seed=4), strict=True))
    plain = _splits(labels, None, 5, seed=0)  # no groups: each row its own
    assert sorted(np.concatenate(plain).tolist()) == list(range(len(labels)))


def test_the_search_does_not_import_scikit_learn():
    code = (
        "import sys, numpy as np\n"
        "from edgetl.workstation.head_search import search_head\n"
        "x = np.random.default_rng(0).normal(size=(60, 8)).astype('float32'); y = np.arange(60) % 3\n"
        "search_head(x, y, 3)\n"
        "print(any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # 0.8-1.0 s of every run's start-up


def test_only_scored_rows_count():
    # Clean rows are separable; the extra ("augmented") rows are noise near the origin with labels
    # of their own: scoring every held-out row counts about two thirds of them wrong, scoring the
    # clean rows only does not.
    x_clean, y = blobs(40, 3, 20, informative=20, sep=4.0, seed=2)
    rng = np.random.default_rng(5)
    x_noise = rng.normal(0, 0.3, (60, 20)).astype(np.float32)
    x = np.concatenate([x_clean, x_noise])
    y_all = np.concatenate([y, np.arange(60) % 3])
    scored = np.r_[np.ones(120, bool), np.zeros(60, bool)]
    space = HeadSpace(weight_decays=(1e-2,), label_smoothings=(0.0,))
    everything = search_head(x, y_all, 3, space=space)
    clean_only = search_head(x, y_all, 3, scored=scored, space=space)
    assert clean_only.table[0]["cv_top1"] == 1.0
    assert everything.table[0]["cv_top1"] < 0.9


def test_same_seed_same_choice_and_weights():
    x, y = digits_pixels()
    a = search_head(x[:500], y[:500], 10, seed=3)
    b = search_head(x[:500], y[:500], 10, seed=3)
    assert a.chosen == b.chosen
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a.table] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in b.table
    ]
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)


def test_fewer_images_than_folds_uses_fewer_folds_and_says_so():
    x, y = blobs(3, 3, 10, informative=10, sep=3.0, seed=0)
    result = search_head(x, y, 3, folds=5)
    assert result.folds == 3
    assert result.fallback is not None and "3 folds" in result.fallback and "\n" not in result.fallback
    assert result.table[0]["cv_top1"] is not None


def test_augmented_views_count_as_one_image_when_planning_folds():
    x, y = blobs(3, 2, 10, informative=10, sep=3.0, seed=0)
    x = np.repeat(x, 4, axis=0)
    y = np.repeat(y, 4)
    groups = np.repeat(np.arange(6), 4)  # 12 rows per class, but 3 images
    result = search_head(x, y, 2, groups=groups, folds=5)
    assert result.folds == 3 and "3 folds" in result.fallback


def test_a_class_with_a_single_image_fits_the_default_setting():
    x, y = blobs(4, 3, 10, informative=10, sep=3.0, seed=0)
    keep = np.r_[np.arange(8), 8]  # class 2 keeps one image
    result = search_head(x[keep], y[keep], 3)
    assert result.folds == 0
    assert "single image" in result.fallback
    assert result.chosen["weight_decay"] == DEFAULT_SPACE.default_weight_decay
    assert result.chosen["label_smoothing"] == DEFAULT_SPACE.default_label_smoothing
    assert np.isfinite(result.weight).all() and result.weight.shape == (3, 10)
    json.dumps(result.to_dict())


def test_nan_features_are_a_one_line_config_error():
    x, y = blobs(10, 2, 5, informative=5, sep=2.0, seed=0)
    x[3, 1] = np.nan
    with pytest.raises(ConfigError, match="features contain NaN") as err:
        search_head(x, y, 2)
    assert "\n" not in str(err.value)
    x[3, 1] = np.inf
    with pytest.raises(ConfigError, match="features contain NaN"):
        search_head(x, y, 2)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"weight_decays": ()}, "weight-decay grid is empty"),
        ({"label_smoothings": ()}, "label-smoothing grid is empty"),
        ({"weight_decays": (1e-3, -1e-4)}, "weight decay -0.0001"),
        ({"weight_decays": (0.0,)}, "weight decay 0.0"),
        ({"weight_decays": (float("nan"),)}, "weight decay nan"),
        ({"label_smoothings": (1.0,)}, "label smoothing 1.0"),
        ({"default_weight_decay": -1.0}, "weight decay -1.0"),
        ({"max_iter": 0}, "max_iter 0"),
        ({"tol": 0.0}, "tol 0.0"),
    ],
)
def test_an_invalid_space_is_a_problem_line(change, words):
    space = dataclasses.replace(DEFAULT_SPACE, **change)
    line = space.problem()
    assert line is not None and line.startswith("no valid configuration: ") and words in line
    assert "\n" not in line
    x, y = blobs(10, 2, 5, informative=5, sep=2.0, seed=0)
    with pytest.raises(ConfigError, match="no valid configuration"):
        search_head(x, y, 2, space=space)


def test_default_space_is_valid():
    assert DEFAULT_SPACE.problem() is None


def test_bad_inputs_are_one_line_config_errors():
    x, y = blobs(10, 2, 5, informative=5, sep=2.0, seed=0)
    for call in (
        lambda: search_head(x, y[:-1], 2),
        lambda: search_head(x, y, 1),
        lambda: search_head(x, y + 5, 2),
        lambda: search_head(x, y, 2, folds=1),
        lambda: search_head(x, y, 2, scored=np.zeros(len(y), bool)),
        lambda: search_head(x, y, 2, groups=np.zeros(len(y), int)),  # one group, two labels
    ):
        with pytest.raises(ConfigError) as err:
            call()
        assert "\n" not in str(err.value)


def test_table_and_result_are_json_ready():
    x, y = blobs(15, 3, 8, informative=8, sep=2.0, seed=0)
    result = search_head(x, y, 3)
    doc = json.loads(json.dumps(result.to_dict()))
    assert set(doc) == {"chosen", "table", "folds", "fallback", "seconds"}
    assert doc["chosen"]["kind"] == "logistic"
    row = doc["table"][0]
    for key in ("weight_decay", "label_smoothing", "cv_top1", "cv_top1_std", "cv_loss", "seconds"):
        assert key in row
    assert {k: row[k] for k in ("weight_decay", "label_smoothing")} == {
        k: doc["chosen"][k] for k in ("weight_decay", "label_smoothing")
    }


def test_progress_gets_one_head_search_task():
    from rich.progress import Progress

    x, y = blobs(15, 3, 8, informative=8, sep=2.0, seed=0)
    with Progress(disable=True) as bar:
        search_head(x, y, 3, progress=bar)
        (task,) = bar.tasks
    assert task.description == "head search" and task.completed == task.total


def test_load_into_makes_a_head_give_the_same_logits():
    torch = pytest.importorskip("torch")
    from edgetl.workstation.model import Head

    x, y = digits_pixels()
    result = search_head(x[:300], y[:300], 10)
    head = Head(64, 10).eval()
    load_into(head, result)
    with torch.no_grad():
        got = head(torch.from_numpy(x[300:400])).numpy()
    np.testing.assert_allclose(got, x[300:400] @ result.weight.T + result.bias, rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="this head is"):
        load_into(Head(32, 10), result)


def test_imports_and_runs_without_torch():
    code = (
        "import sys\n"
        "class BlockTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'torch':\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, BlockTorch())\n"
        "import numpy as np\n"
        "from edgetl.workstation.head_search import search_head\n"
        "rng = np.random.default_rng(0); y = np.arange(40) % 2\n"
        "x = (rng.normal(0, 1, (40, 6)) + y[:, None]).astype(np.float32)\n"
        "print(search_head(x, y, 2).chosen['kind'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "logistic"
    assert "torch" not in out.stderr


@pytest.mark.slow
def test_budget_1000_rows_1280_dims():
    x, y = blobs(100, 10, 1280, informative=64, sep=0.5, seed=0)
    x = np.maximum(x, 0)  # non-negative like pooled ReLU features
    search_head(x[::20], y[::20], 10, folds=2)  # imports
    t = time.perf_counter()
    search_head(x, y, 10)
    assert time.perf_counter() - t < 6.0  # the bar is 2 s on a quiet 2-core machine; loaded CI gets slack
