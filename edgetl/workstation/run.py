"""The run directory: everything ``finetune`` produced, enough to evaluate, export or train again.

::

    RUN/config.json    resolved training config, data description, backbone, weights source, preprocessing
    RUN/labels.json    class names, in label order
    RUN/split.json     the exact train / validation files (path, label)
    RUN/model.pt       weights-only checkpoint {"trunk": state_dict, "head": state_dict}
                       ({"head": state_dict} only for a head trained with ``finetune --trunk-from BUNDLE``)
    RUN/history.json   one record per epoch (losses, accuracies, train/val gap, learning rate, seconds)
    RUN/metrics.json   best-epoch validation metrics (top-1, per class, confusion matrix)
    RUN/history.png    loss and accuracy curves (runs of two epochs or more: a searched head is one fit)

:func:`write_run` is the one writer of this layout (training, ``finetune --trunk-from`` and the test
fixtures all go through it); training writes it in two steps, :func:`start_run` before the first
epoch (so ``--resume`` can read the config and split back) and :func:`finish_run` after the last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl import __version__
from edgetl.core.atomic import write_json_atomic
from edgetl.core.errors import RunError
from edgetl.core.imagefolder import Sample, class_counts
from edgetl.core.metrics import classification_report
from edgetl.core.preprocess import Preprocessing
from edgetl.core.runfiles import run_files_problem
from edgetl.workstation.backbones import BackboneSpec, get_backbone

if TYPE_CHECKING:
    from edgetl.workstation.options import TrainConfig
    from edgetl.workstation.prepare import PreparedData

log = logging.getLogger(__name__)

RUN_FILES = ("config.json", "labels.json", "split.json", "model.pt", "metrics.json")


@dataclasses.dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]
    labels: list[str]
    train_samples: list[Sample]
    val_samples: list[Sample]
    metrics: dict[str, Any]

    @property
    def spec(self) -> BackboneSpec:
        """The run's backbone; its ``feature_dim`` is what the run's head sees (the tapped size for a
        run on multi-layer features)."""
        spec = get_backbone(self.config["backbone"])
        if self.taps:
            spec = dataclasses.replace(spec, feature_dim=int(self.config["features"]["dim"]))
        return spec

    @property
    def taps(self) -> list[int]:
        """The trunk's taps (multi-layer features; empty: the last feature map), see Trunk.set_taps."""
        features = self.config.get("features") or {}
        return list(features.get("taps") or []) if features.get("mode") == "blocks" else []

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.config["preprocessing"])

    @property
    def dropout(self) -> float:
        return float(self.config["train"]["dropout"])

    @property
    def trunk_from(self) -> dict[str, Any] | None:
        """For a head trained on a bundle's trunk (``finetune --trunk-from``): ``{bundle, trunk,
        sha256, backbone, feature_dim}``; such a run's model.pt holds the head only."""
        return self.config.get("trunk_from")

    @property
    def feature_dim(self) -> int:
        return int(self.trunk_from["feature_dim"]) if self.trunk_from else self.spec.feature_dim

    def build_head(self):
        """The trained Head (torch), in eval mode; works for every run, head-only or not."""
        import torch

        from edgetl.workstation.model import Head

        head = Head(self.feature_dim, len(self.labels), dropout=self.dropout)
        try:
            state = torch.load(self.path / "model.pt", map_location="cpu", weights_only=True)
            head.load_state_dict(state["head"])
        except Exception as exc:
            from edgetl.workstation.weights import load_failure

            raise RunError(f"run {self.path}: cannot load the head from model.pt ({load_failure(exc)})") from None
        return head.eval()

    def build_model(self):
        """The trained TransferModel (torch), in eval mode."""
        import torch

        from edgetl.workstation.model import Head, TransferModel, build_trunk

        if self.trunk_from:
            raise RunError(
                f"run {self.path} holds only a head, trained on the trunk of bundle {self.trunk_from['bundle']}; "
                f"use that bundle (`edgetl export {self.path} --add-to BUNDLE --head NAME` adds the head to it)"
            )
        spec = self.spec
        try:
            trunk = build_trunk(spec, taps=self.taps)
        except ValueError as exc:  # taps that do not fit this backbone: an edited config.json
            raise RunError(f"run {self.path} is damaged or was edited: config.json's features: {exc}") from None
        if trunk.feature_dim != spec.feature_dim:
            raise RunError(
                f"run {self.path} is damaged or was edited: config.json's features.dim is {spec.feature_dim}, "
                f"its taps give {trunk.feature_dim}"
            )
        head = Head(spec.feature_dim, len(self.labels), dropout=self.dropout)
        try:
            state = torch.load(self.path / "model.pt", map_location="cpu", weights_only=True)
            trunk.load_state_dict(state["trunk"])
            head.load_state_dict(state["head"])
        except Exception as exc:
            from edgetl.workstation.weights import load_failure

            raise RunError(f"run {self.path}: cannot load model.pt ({load_failure(exc)})") from None
        return TransferModel(trunk, head).eval()


def read_json(path: Path) -> Any:
    """A run file's JSON; a file that cannot be read or parsed is one-line :class:`RunError`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None


def is_run(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "model.pt").is_file()


def split_samples(split: dict[str, Any]) -> tuple[list[Sample], list[Sample]]:
    """The train and validation samples of a split.json checked by :func:`run_files_problem`."""
    return (
        [Sample(path, label) for path, label in split["train"]],
        [Sample(path, label) for path, label in split["val"]],
    )


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"run folder {path} does not exist (make one with `edgetl finetune DATA --out {path}`)")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise RunError(f"{path} is not a complete run: missing {', '.join(missing)}")
    config = read_json(path / "config.json")
    labels = read_json(path / "labels.json")
    split = read_json(path / "split.json")
    problem = run_files_problem(config, labels, split)
    if problem:
        raise RunError(f"run {path} is damaged or was edited: {problem}; train it again")
    train, val = split_samples(split)
    if not config.get("trunk_from"):  # a head-only run needs no registered backbone
        try:
            get_backbone(config["backbone"])
        except Exception as exc:
            raise RunError(f"run {path} is inconsistent: {exc}") from None
    return Run(path, config, list(labels), train, val, read_json(path / "metrics.json"))


# --- the one writer ---------------------------------------------------------------------------------


def start_run(
    folder: str | Path, *, config: dict[str, Any], labels: list[str], train: list[Sample], val: list[Sample]
) -> Path:
    """Write what is known before training: config.json, labels.json, split.json (``folder`` is created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "config.json", config)
    write_json_atomic(folder / "labels.json", list(labels))
    write_json_atomic(
        folder / "split.json", {"train": [[s.path, s.label] for s in train], "val": [[s.path, s.label] for s in val]}
    )
    return folder


def finish_run(
    folder: str | Path,
    *,
    model_state: dict[str, Any],
    history: list[dict],
    metrics: dict[str, Any],
    config_update: dict[str, Any] | None = None,
    plot: bool = True,
) -> Path:
    """Write what training produced into a folder :func:`start_run` began: model.pt (weights only:
    ``{"trunk": ..., "head": ...}`` or ``{"head": ...}``), history.json, metrics.json, history.png;
    ``config_update`` is merged into config.json (facts known only after training, e.g. the weights)."""
    import torch

    folder = Path(folder)
    if config_update:
        config = read_json(folder / "config.json")
        config.update(config_update)
        write_json_atomic(folder / "config.json", config)
    torch.save(model_state, folder / "model.pt")
    write_json_atomic(folder / "history.json", history)
    write_json_atomic(folder / "metrics.json", metrics)
    if plot and len(history) > 1:  # one point is not a curve (and matplotlib costs a searched run ~1.5 s)
        plot_history(history, folder / "history.png")
    return folder


def write_run(
    folder: str | Path,
    *,
    config: dict[str, Any],
    labels: list[str],
    train: list[Sample],
    val: list[Sample],
    model_state: dict[str, Any],
    history: list[dict],
    metrics: dict[str, Any],
    plot: bool = True,
) -> Path:
    """Write a whole run folder in one go (:func:`start_run` then :func:`finish_run`).

    Keyword-only, not an options dataclass: each argument is one file's content, not a setting.
    """
    start_run(folder, config=config, labels=labels, train=train, val=val)
    return finish_run(folder, model_state=model_state, history=history, metrics=metrics, plot=plot)


# --- what goes in config.json and metrics.json ------------------------------------------------------


def run_config(cfg: TrainConfig, prepared: PreparedData, pp: Preprocessing, device: str) -> dict[str, Any]:
    """A run's config.json as training starts (the weights are added when known, see :func:`finish_run`)."""
    import torch

    return {
        "edgetl_version": __version__,
        "torch_version": torch.__version__,
        "backbone": cfg.backbone,
        "train": cfg.to_dict(),
        "preprocessing": pp.to_dict(),
        "device": device,
        "data": {
            "root": prepared.root,
            "val_dir": prepared.val_dir,
            "classes": prepared.labels,
            "train_counts": class_counts(prepared.train, len(prepared.labels)),
            "val_counts": class_counts(prepared.val, len(prepared.labels)),
            "skipped": [{"path": p, "reason": r} for p, r in prepared.skipped],
        },
    }


@dataclasses.dataclass(frozen=True)
class FitRecord:
    """What a training loop reports besides the model: its history, best epoch and timings."""

    history: list[dict]
    best_epoch: int
    train_seconds: float
    feature_seconds: float
    feature_cache: dict | None = None  # {"status", "hits", "misses"} when features came from the cache


def run_metrics(val_logits, yval, labels: list[str], cfg: TrainConfig, fit: FitRecord) -> dict[str, Any]:
    """A run's metrics.json from the best epoch's validation logits (torch tensors) and the history:
    top-1, loss (unweighted, with the run's label smoothing), per class, confusion, train/val gap."""
    import torch

    report = classification_report(yval.numpy(), val_logits.argmax(1).numpy(), labels)
    history = fit.history
    last = history[-1]
    return {
        "val_top1": report["top1"],
        "val_loss": float(torch.nn.functional.cross_entropy(val_logits, yval, label_smoothing=cfg.label_smoothing)),
        "n_val": report["n"],
        "best_epoch": fit.best_epoch,
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.epochs,
        "train_top1_last": last["train_top1"],
        "gap_top1_last": last["gap_top1"],
        "gap_top1_max": max(h["gap_top1"] for h in history),
        "train_seconds": round(fit.train_seconds, 3),
        "feature_seconds": round(fit.feature_seconds, 3),
        "feature_cache": fit.feature_cache,
        "per_class": report["per_class"],
        "confusion": report["confusion"],
    }


def warn_overfitting(metrics: dict[str, Any]) -> None:
    if metrics["gap_top1_last"] > 0.1:
        log.warning(
            "train top-1 exceeds validation top-1 by %.1f pp at the last epoch: the head may be overfitting",
            100 * metrics["gap_top1_last"],
        )


def plot_history(history: list[dict], path: Path) -> None:
    """Loss and top-1 per epoch (train and validation) as a PNG: a run's history.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no history plot")
        return
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((a, "loss", "loss"), (b, "top1", "top-1")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
