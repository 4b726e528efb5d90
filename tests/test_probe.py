"""`edgetl probe`: an informative trunk ranks above a useless one; a second probe costs no trunk pass."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.errors import ConfigError, DataError, WeightsError
from edgetl.workstation.backbones import register_backbone, unregister_backbone
from edgetl.workstation.probe import (
    Candidate,
    ProbeOptions,
    linear_probe_score,
    logme_score,
    parse_candidates,
    probe_backbones,
)
from tests.helpers import tiny_spec
from tests.schemas import validate_document

CONST = "constant_test"


class _Constant(nn.Module):
    """Ignores the image: every input gets the same feature map (a trunk that transfers nothing)."""

    def forward(self, x):
        return torch.ones(x.shape[0], 8, 2, 2)


def _build_constant(state_dict=None):
    body = nn.Sequential(_Constant())
    return body, [body]


def _probe(data, candidates, *, max_per_class=None, **options):
    """probe_backbones with the ProbeOptions fields as keywords."""
    return probe_backbones(data, candidates, options=ProbeOptions(**options), max_per_class=max_per_class)


@pytest.fixture
def constant_backbone():
    register_backbone(tiny_spec(CONST, _build_constant, feature_dim=8))
    yield CONST
    unregister_backbone(CONST)


def test_informative_trunk_ranks_above_a_useless_one(image_folder, constant_backbone):
    result = _probe(image_folder, [f"{CONST}:none", "tiny_test:none"], folds=3, progress=False)
    best, worst = result.rows
    assert (best.candidate, worst.candidate) == ("tiny_test:none", f"{CONST}:none")
    assert best.score == best.linear_top1 >= 0.9  # colours are linearly separable even in random conv features
    assert worst.linear_top1 <= 0.4  # chance is 1/3: constant features predict one class
    assert best.logme > worst.logme and np.isfinite(worst.logme)
    assert (best.feature_dim, worst.feature_dim) == (16, 8) and not best.pretrained
    assert best.feature_cache == {"status": "miss", "hits": 0, "misses": 48}
    assert best.seconds >= best.feature_seconds > 0
    doc = result.to_dict()
    assert (
        json.loads(json.dumps(doc)) == doc
        and doc["images"] == 48
        and doc["chance_top1"] == pytest.approx(1 / 3, abs=1e-3)
    )
    by_logme = _probe(image_folder, [f"{CONST}:none", "tiny_test:none"], folds=3, metric="logme", progress=False)
    assert [r.candidate for r in by_logme.rows] == ["tiny_test:none", f"{CONST}:none"]
    assert by_logme.rows[0].score == by_logme.rows[0].logme


def test_second_probe_reads_the_feature_cache(image_folder, monkeypatch):
    from edgetl.workstation.model import Trunk

    first = _probe(image_folder, "tiny_test:none", folds=3, progress=False)
    monkeypatch.setattr(Trunk, "forward", lambda self, x: pytest.fail("the trunk ran on a warm cache"))
    second = _probe(image_folder, "tiny_test:none", folds=3, progress=False)
    assert second.rows[0].feature_cache == {"status": "hit", "hits": 48, "misses": 0}
    assert second.rows[0].linear_top1 == first.rows[0].linear_top1 and second.rows[0].logme == first.rows[0].logme


def test_weights_per_candidate(image_folder, tmp_path):
    from tests.helpers import _build_tiny

    torch.manual_seed(5)
    body, _ = _build_tiny()
    path = tmp_path / "tiny.pth"
    torch.save(body.state_dict(), path)
    result = _probe(image_folder, f"tiny_test:none,tiny_test:{path}", folds=3, progress=False)
    rows = {r.candidate: r for r in result.rows}
    assert rows[f"tiny_test:{path}"].pretrained and rows[f"tiny_test:{path}"].weights == str(path)
    assert not rows["tiny_test:none"].pretrained


def test_parse_candidates():
    assert parse_candidates("mobilenet_v2, resnet18:none,tiny_test:/w/x:y.pth") == [
        Candidate("mobilenet_v2", "imagenet"),
        Candidate("resnet18", "none"),
        Candidate("tiny_test", "/w/x:y.pth"),
    ]
    assert Candidate("resnet18", "none").label == "resnet18:none" and Candidate("resnet18").label == "resnet18"
    with pytest.raises(ConfigError, match="unknown backbone"):
        parse_candidates("mobilenet_v2,nonet")
    with pytest.raises(ConfigError, match="twice"):
        parse_candidates("resnet18:none,resnet18:none")
    for bad in ("", ",", "resnet18:", ":none"):
        with pytest.raises(ConfigError):
            parse_candidates(bad)


def test_unavailable_weights_fail_before_any_trunk_pass(image_folder, tmp_path, monkeypatch):
    from edgetl.workstation.model import Trunk

    monkeypatch.setattr(Trunk, "forward", lambda self, x: pytest.fail("the trunk ran"))
    with pytest.raises(WeightsError, match="tiny_test:none for random init"):
        _probe(image_folder, "tiny_test:none,tiny_test", progress=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # no hub cache; only mobilenet_v2 has a package
    with pytest.raises(
        WeightsError, match="candidate mobilenet_v3_small: ImageNet weights for mobilenet_v3_small are not"
    ):
        _probe(image_folder, "tiny_test:none,mobilenet_v3_small", progress=False)
    with pytest.raises(WeightsError, match="does not exist"):
        _probe(image_folder, f"tiny_test:{tmp_path / 'missing.pth'}", progress=False)
    with pytest.raises(DataError, match="fewer than --folds 20"):
        _probe(image_folder, "tiny_test:none", folds=20, progress=False)
    with pytest.raises(ConfigError, match="--metric"):
        _probe(image_folder, "tiny_test:none", metric="auc", progress=False)


def test_scores_on_synthetic_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    informative = np.eye(4)[y] * 3 + rng.normal(0, 1, (120, 4))
    informative = np.hstack([informative, rng.normal(0, 1, (120, 12))])
    noise = rng.normal(0, 1, (120, 16))
    top1, std = linear_probe_score(informative, y, folds=5, seed=0)
    assert top1 >= 0.8 and 0 <= std < 0.1
    assert linear_probe_score(noise, y, folds=5, seed=0)[0] <= 0.45
    assert logme_score(informative, y) > logme_score(noise, y)
    assert np.isfinite(logme_score(np.zeros((120, 16)), y))


def test_cli_probe_json_table_and_tsv(image_folder, constant_backbone):
    args = ["probe", str(image_folder), "--backbones", f"{CONST}:none,tiny_test:none", "--folds", "3", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "probe")
    assert [(r["rank"], r["backbone"]) for r in doc["results"]] == [(1, "tiny_test"), (2, CONST)]
    assert {"backbone", "score", "seconds", "weights", "feature_dim", "logme"} <= set(doc["results"][0])
    assert (doc["images"], doc["folds"], doc["max_per_class"], doc["metric"]) == (48, 3, None, "linear")
    table = CliRunner().invoke(main, [*args, "--format", "table"])
    assert table.exit_code == 0 and "tiny_test:none" in table.stdout and "hit" in table.stdout
    assert "chance top-1 0.333" in table.stdout
    tsv = CliRunner().invoke(main, args)  # CliRunner's stdout is not a terminal: tsv
    assert tsv.exit_code == 0, tsv.output
    lines = tsv.stdout.splitlines()
    assert lines[0].split("\t")[:6] == ["rank", "candidate", "backbone", "weights", "pretrained", "score"]
    assert [line.split("\t")[:2] for line in lines[1:]] == [["1", "tiny_test:none"], ["2", f"{CONST}:none"]]
    assert {len(line.split("\t")) for line in lines} == {13} and lines[1].split("\t")[11] == "hit"
    assert "chance top-1" in tsv.stderr and "chance" not in tsv.stdout
    bad = CliRunner().invoke(main, ["probe", str(image_folder), "--backbones", "nonet"])
    assert (
        bad.exit_code == 2 and bad.stderr.startswith("Error: unknown backbone 'nonet'") and bad.stderr.count("\n") == 1
    )
    help_text = " ".join(CliRunner().invoke(main, ["probe", "--help"]).output.split())
    assert "Example:" in help_text and "Torch device: auto, cpu, cuda or cuda:N." in help_text
    assert "--max-per-class N" in help_text and "--samples-per-class" not in help_text


def test_cli_probe_max_per_class_and_its_old_name(image_folder):
    args = ["probe", str(image_folder), "--backbones", "tiny_test:none", "--folds", "2", "--no-progress", "--json"]
    result = CliRunner().invoke(main, [*args, "--max-per-class", "3"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "probe")
    assert (doc["images"], doc["max_per_class"]) == (9, 3) and "Warning" not in result.stderr
    old = CliRunner().invoke(main, [*args, "--samples-per-class", "3"])
    assert old.exit_code == 0, old.output
    assert "--samples-per-class is deprecated" in old.stderr and "--max-per-class" in old.stderr
    assert json.loads(old.stdout)["results"][0]["linear_top1"] == doc["results"][0]["linear_top1"]
    assert (
        probe_backbones(
            image_folder, "tiny_test:none", options=ProbeOptions(folds=2, progress=False), samples_per_class=3
        ).images
        == 9
    )  # the library's old keyword too
    with pytest.raises(ConfigError, match="--max-per-class must be an integer >= 2"):
        _probe(image_folder, "tiny_test:none", max_per_class=1, progress=False)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-per-class", "1"], "Invalid value for '--max-per-class': 1 is not in the range x>=2"),
        (["--samples-per-class", "x"], "Invalid value for '--samples-per-class'"),
        (["--folds", "1"], "Invalid value for '--folds'"),
        (["--folds", "101"], "--folds must be an integer in 2..100"),
        (["--img-size", "99999"], "Invalid value for '--img-size'"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["--seed", "-2"], "Invalid value for '--seed'"),
        (["--metric", "auc"], "Invalid value for '--metric'"),
    ],
)
def test_cli_probe_usage_errors_exit_2(image_folder, monkeypatch, extra, message):
    from edgetl.workstation.model import Trunk

    monkeypatch.setattr(Trunk, "forward", lambda self, x: pytest.fail("the trunk ran"))
    result = CliRunner().invoke(main, ["probe", str(image_folder), "--backbones", "tiny_test:none", *extra])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def _logme_reference(f, y):
    """The published LogME algorithm as written (eigenbasis of the D x D matrix F^T F), for comparison."""
    f = f.astype(np.float64)
    n, d = f.shape
    v, s, vh = np.linalg.svd(f.T @ f)
    evidences = []
    for k in range(int(y.max()) + 1):
        t = (y == k).astype(np.float64)
        alpha, beta, lam, eps = 1.0, 1.0, 1.0, 1e-5
        tmp = vh @ (f.T @ t)
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + eps)
            beta_de = ((t - f @ m) ** 2).sum()
            beta = (n - gamma) / (beta_de + eps)
            if abs(alpha / beta - lam) / lam < 0.01:
                break
            lam = alpha / beta
        evidences.append(
            (
                d / 2 * np.log(alpha)
                + n / 2 * np.log(beta)
                - 0.5 * np.log(alpha + beta * s).sum()
                - beta / 2 * (beta_de + eps)
                - alpha / 2 * (alpha_de + eps)
                - n / 2 * np.log(2 * np.pi)
            )
            / n
        )
    return float(np.mean(evidences))


@pytest.mark.parametrize("n,d", [(300, 40), (40, 300), (120, 120)])
def test_logme_matches_the_published_algorithm(n, d):
    rng = np.random.default_rng(n + d)
    y = rng.integers(0, 5, n)
    f = rng.normal(0, 1, (n, d)) + np.eye(5)[y] @ rng.normal(0, 1, (5, d))
    assert logme_score(f, y) == pytest.approx(_logme_reference(f, y), rel=1e-9, abs=1e-9)


def _build_tiny_scaled(state_dict=None):
    """The tiny trunk with its output scaled by 1e-9: informative, but too small for a head to learn from."""
    from tests.helpers import _build_tiny

    body, blocks = _build_tiny(state_dict)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x) * 1e-9

    return Scaled(), blocks


def test_degenerate_features_rank_last_and_really_do_not_train(image_folder):
    from edgetl.workstation.options import TrainConfig
    from edgetl.workstation.prepare import prepare_data
    from edgetl.workstation.train import train_model

    register_backbone(tiny_spec("tiny_scaled_test", _build_tiny_scaled))
    try:
        result = _probe(image_folder, "tiny_scaled_test:none,tiny_test:none", folds=3, progress=False)
        scaled = result.rows[-1]
        assert scaled.candidate == "tiny_scaled_test:none" and scaled.degenerate and scaled.feature_std < 1e-8
        assert scaled.linear_top1 >= 0.9  # standardised, the features separate the classes...
        assert not result.rows[0].degenerate and result.rows[0].feature_std > 1e-3
        # ...but a head trained on them by gradient steps stays near chance (1/3). (The searched head
        # standardises its features and would learn; the export's fp16 and int8 trunks would not keep them.)
        cfg = TrainConfig(
            backbone="tiny_scaled_test", weights="none", epochs=15, lr=3e-2, batch_size=16, head_search=False
        )
        fe = train_model(prepare_data(image_folder, cfg), cfg, progress=False)
        assert fe.metrics["val_top1"] <= 0.5
    finally:
        unregister_backbone("tiny_scaled_test")
