"""Data-budget study: what does transfer learning buy on *this* dataset, at each amount of data?

For every data budget (images per class) and every strategy, one model is trained and scored on
**one** validation set: the data is split once by the seed, and only the training part is
subsampled. Budgets are nested (the 10-per-class images include the 5-per-class ones), so a
learning curve moves because of the data added, not because a different draw was made.

Strategies are those of :mod:`edgetl.workstation.train` on the pretrained trunk, plus ``scratch``: the same
architecture from random weights, everything trained (``full`` with ``weights="none"``): the
baseline that transfer learning has to beat.

Two policies keep rows comparable and are recorded in every row:

* epochs default per strategy (:data:`DEFAULT_EPOCHS`); ``scratch`` gets three times the epochs of
  ``full`` and trains its trunk at the head's learning rate (``trunk_lr_scale`` 1: there are no
  pretrained weights to protect), so the baseline is not beaten merely by being undertrained; a
  row whose best epoch is its last is flagged ``best_at_last_epoch`` (more epochs may help it);
* the batch is capped at ``train_images // 8`` (never below 8), so a 50-image budget gets several
  optimiser steps per epoch instead of one; at larger budgets the configured batch is used as is.

Feature-extraction rows share one trunk pass: features of every image (train and validation) are
put in the persistent cache before the first row (timed and reported as ``trunk_pass``), so their
``train_seconds`` are head training on cached features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.atomic import check_data_folders, output_lock, write_json_atomic
from edgetl.core.errors import ConfigError, OutputExistsError
from edgetl.core.imagefolder import Sample
from edgetl.workstation.options import (
    DEFAULT_BUDGETS,
    DEFAULT_EPOCHS,
    MAX_EPOCHS,
    STUDY_STRATEGIES,
    TrainConfig,
    budget_label,
)
from edgetl.workstation.prepare import PreparedData, prepare_data
from edgetl.workstation.study_result import (
    StudyResult,
    StudyRow,
    budget_sort_key,
    budget_text,
    is_study_plot,
    plot_format,
    plot_study,
    samples_digest,
)
from edgetl.workstation.train import train_model

log = logging.getLogger(__name__)

MIN_BATCH = 8
STEPS_PER_EPOCH = 8


def parse_budgets(text: str | Sequence[int | str | None]) -> list[int | None]:
    """``"5,10,all"`` -> ``[5, 10, None]`` (ascending, ``all`` last)."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    budgets: list[int | None] = []
    for item in items:
        if item is None or (isinstance(item, str) and item.lower() == "all"):
            value = None
        else:
            try:
                value = int(item)
            except (TypeError, ValueError):
                value = 0
            if value < 1 or isinstance(item, bool):
                raise ConfigError(
                    f"--samples-per-class takes integers >= 1 or 'all', comma-separated (e.g. 5,10,all), not {item!r}"
                )
        if value in budgets:
            raise ConfigError(f"--samples-per-class lists {budget_label(value)} twice")
        budgets.append(value)
    if not budgets:
        raise ConfigError("--samples-per-class is empty; e.g. 5,10,25,all")
    return sorted(budgets, key=budget_sort_key)


def parse_strategies(text: str | Sequence[str]) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text)
    for s in items:
        if s not in STUDY_STRATEGIES:
            raise ConfigError(f"unknown strategy {s!r} in --strategies; choose from {', '.join(STUDY_STRATEGIES)}")
    if len(set(items)) != len(items):
        raise ConfigError("--strategies lists a strategy twice")
    if not items:
        raise ConfigError(f"--strategies is empty; choose from {', '.join(STUDY_STRATEGIES)}")
    return items


def parse_epochs(value: int | str | Mapping[str, int] | None) -> dict[str, int]:
    """Epochs per strategy: None (defaults), one int for all, or ``"fine-tune=3,scratch=10"``."""
    epochs = dict(DEFAULT_EPOCHS)
    if value is None:
        return epochs
    if isinstance(value, int) and not isinstance(value, bool):
        return dict.fromkeys(epochs, value) if 1 <= value <= MAX_EPOCHS else _bad_epochs(value)
    if isinstance(value, str):
        if value.strip().isdigit():
            return parse_epochs(int(value))
        pairs = {}
        for part in value.split(","):
            name, sep, n = part.partition("=")
            if not sep or not n.strip().isdigit():
                _bad_epochs(value)
            pairs[name.strip()] = int(n)
        value = pairs
    for name, n in dict(value).items():
        if name not in STUDY_STRATEGIES:
            raise ConfigError(f"--epochs names unknown strategy {name!r}; choose from {', '.join(STUDY_STRATEGIES)}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_EPOCHS:
            _bad_epochs(f"{name}={n}")
        epochs[name] = n
    return epochs


def _bad_epochs(value) -> dict[str, int]:
    raise ConfigError(
        f"--epochs takes an integer in 1..{MAX_EPOCHS} for every strategy, or pairs like fine-tune=3,scratch=10, "
        f"not {value!r}"
    )


def nested_subsets(samples: list[Sample], budgets: Sequence[int | None], seed: int) -> dict[int | None, list[Sample]]:
    """Per budget, at most ``n`` samples per class; a smaller budget's images are inside every larger one.

    Each class is shuffled once by ``seed`` and a budget takes a prefix; the original order is kept.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    order = {label: [idx[j] for j in rng.permutation(len(idx))] for label, idx in sorted(by_class.items())}
    subsets = {}
    for n in budgets:
        keep = {i for idx in order.values() for i in (idx if n is None else idx[:n])}
        subsets[n] = [s for i, s in enumerate(samples) if i in keep]
    return subsets


def study_batch_size(n_train: int, batch_size: int) -> int:
    """The configured batch, capped so that an epoch has about 8 steps (never fewer than 8 images)."""
    return max(1, min(batch_size, max(MIN_BATCH, n_train // STEPS_PER_EPOCH)))


def row_config(base: TrainConfig, strategy: str, *, epochs: int, batch_size: int) -> TrainConfig:
    """The TrainConfig of one study row (``scratch`` is ``full`` from random weights)."""
    changes: dict[str, Any] = {"epochs": epochs, "batch_size": batch_size}
    if strategy == "scratch":
        changes.update(strategy="full", weights="none", trunk_lr_scale=1.0)
    else:
        changes["strategy"] = strategy
    if strategy == "feature-extraction":
        changes.update(mixup=0.0, cutmix=0.0)  # a recipe's image mixing does not apply to cached features
    return dataclasses.replace(base, **changes)


def _check_outputs(out: Path | None, plot: Path | None, force: bool) -> None:
    if plot is not None:
        plot_format(plot)
    for path in (out / "study.json" if out else None, plot):
        if path is not None and path.exists() and not force:
            raise OutputExistsError(
                f"{path} already exists; pass --force to replace it, or choose another --out/--plot"
            )
    if plot is not None and (plot.exists() or plot.is_symlink()) and not is_study_plot(plot):
        raise OutputExistsError(
            f"--force replaces only a plot a study wrote, and {plot} is not one; choose another --plot or "
            "remove it yourself"
        )
    if out is not None and out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; it must be a folder (study.json and study.png go in it)")


@contextlib.contextmanager
def _locked_outputs(out: Path | None, plot: Path | None) -> Iterator[None]:
    """Hold the output lock of ``out`` (the folder) and of ``plot`` when it is elsewhere, for the whole
    study: a second study writing the same folder fails at once instead of interleaving its files."""
    with contextlib.ExitStack() as stack:
        if out is not None:
            stack.enter_context(output_lock(out))
        if plot is not None and (out is None or plot.resolve().parent != out.resolve()):
            stack.enter_context(output_lock(plot))
        yield


def _check_weights_available(spec, weights: str) -> None:
    from edgetl.core.errors import WeightsError
    from edgetl.workstation.weights import find_imagenet_weights

    if weights == "imagenet":
        find_imagenet_weights(spec)
    elif not Path(weights).is_file():
        raise WeightsError(f"--weights {weights}: no such file (use imagenet or a path to a .pth file)")


def _warm_feature_cache(prepared: PreparedData, cfg: TrainConfig, *, progress: bool, cache_dir) -> dict:
    """One trunk pass over every image, into the cache that the feature-extraction rows read."""
    from edgetl.workstation.backbones import get_backbone
    from edgetl.workstation.export.common import progress_bar
    from edgetl.workstation.features import FeatureSettings, backbone_features
    from edgetl.workstation.prepare import select_device
    from edgetl.workstation.train import searched

    spec = get_backbone(cfg.backbone)
    pp = spec.preprocessing(cfg.img_size)
    settings = FeatureSettings(select_device(cfg.device), cfg.batch_size, cache_dir=cache_dir)
    samples = list(prepared.train) + list(prepared.val)
    # The features the rows' heads will see (train.use_features): every block's on the searched path.
    row = row_config(cfg, "feature-extraction", epochs=cfg.epochs, batch_size=cfg.batch_size)
    blocks = row.features == "blocks" or (row.features == "auto" and searched(row, False))
    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        _, stats, _ = backbone_features(
            spec,
            cfg.weights,
            samples,
            pp,
            settings,
            progress=bar,
            description="trunk features (all images)",
            blocks=blocks,
        )
    return {"images": len(samples), "seconds": round(time.perf_counter() - t0, 3), "cache": stats.to_dict()}


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """What a study trains besides its base TrainConfig, and how it reports.

    ``strategies`` and ``samples_per_class`` take lists or the command line's comma-separated text;
    ``epochs`` is per strategy (see :func:`parse_epochs`).
    """

    strategies: Sequence[str] | str = STUDY_STRATEGIES
    samples_per_class: Sequence[int | None] | str = DEFAULT_BUDGETS
    epochs: int | str | Mapping[str, int] | None = None
    progress: bool = True
    cache_dir: str | Path | None = None


def run_study(
    data: str | Path,
    *,
    config: TrainConfig | None = None,
    options: StudyOptions | None = None,
    val_dir: str | Path | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    force: bool = False,
) -> StudyResult:
    """Train every (strategy, budget) of ``options`` on ``data`` and score each on the same validation set.

    ``config`` supplies the backbone, pretrained weights, image size, seed, split and hyperparameters;
    its ``strategy`` and ``epochs`` are replaced per row (``options.epochs``: see :func:`parse_epochs`).
    With ``out``, ``out/study.json`` is written, and the plot goes to ``plot`` (default
    ``out/study.png``). Nothing else is written except the feature cache. The outputs' locks are held
    for the whole study (:func:`edgetl.core.atomic.output_lock`): a second study writing the same
    ``out`` or ``plot`` fails at once (:class:`OutputBusyError`); both files are written atomically.
    """
    cfg = config or TrainConfig()
    opts = options or StudyOptions()
    strategy_list = parse_strategies(opts.strategies)
    budgets = parse_budgets(opts.samples_per_class)
    epochs_by_strategy = parse_epochs(opts.epochs)
    if cfg.weights == "none":
        raise ConfigError(
            "a study compares pretrained strategies with scratch; --weights none would make every row "
            "scratch (give imagenet or a weights file, and list 'scratch' in --strategies)"
        )
    out_dir = Path(out) if out is not None else None
    plot_path = Path(plot) if plot is not None else (out_dir / "study.png" if out_dir is not None else None)
    check_data_folders([out_dir, plot_path], data, val_dir)
    _check_outputs(out_dir, plot_path, force)
    progress, cache_dir = opts.progress, opts.cache_dir

    from edgetl.workstation.backbones import get_backbone

    with _locked_outputs(out_dir, plot_path):
        _check_outputs(out_dir, plot_path, force)  # again, under the lock: the first check only fails fast
        spec = get_backbone(cfg.backbone)
        cfg = spec.train_config(cfg)  # the backbone's --unfreeze, in the study's record too
        if any(s != "scratch" for s in strategy_list):
            _check_weights_available(spec, cfg.weights)  # before minutes of scratch rows, not after
        prepared = prepare_data(data, cfg, val_dir=val_dir)
        subsets = nested_subsets(prepared.train, budgets, cfg.seed)
        log.info(
            "study on %s: %d training images (subsampled per budget), %d validation images (the same for every row)",
            prepared.root,
            len(prepared.train),
            len(prepared.val),
        )

        trunk_pass = None
        if "feature-extraction" in strategy_list and cfg.feature_cache:
            trunk_pass = _warm_feature_cache(prepared, cfg, progress=progress, cache_dir=cache_dir)
            log.info(
                "trunk pass over %d images in %.1fs (shared by the feature-extraction rows)",
                trunk_pass["images"],
                trunk_pass["seconds"],
            )

        rows: list[StudyRow] = []
        weights_source: dict | None = None
        plan = [(s, b) for s in strategy_list for b in budgets]
        for i, (strategy, budget) in enumerate(plan, 1):
            train = subsets[budget]
            batch = study_batch_size(len(train), cfg.batch_size)
            row_cfg = row_config(cfg, strategy, epochs=epochs_by_strategy[strategy], batch_size=batch)
            part = PreparedData(prepared.labels, train, prepared.val, prepared.skipped, prepared.root, prepared.val_dir)
            log.info(
                "[%d/%d] %s, %s: %d training images, batch %d, %d epochs",
                i,
                len(plan),
                strategy,
                budget_text(budget),
                len(train),
                batch,
                row_cfg.epochs,
            )
            outcome = train_model(part, row_cfg, progress=progress, cache_dir=cache_dir)
            pretrained = outcome.weights_source.kind != "none"
            if pretrained and weights_source is None:
                weights_source = outcome.weights_source.to_dict()
            row = StudyRow(
                strategy=strategy,
                pretrained=pretrained,
                samples_per_class=budget,
                train_images=len(train),
                batch_size=batch,
                trunk_lr_scale=row_cfg.trunk_lr_scale,
                epochs=row_cfg.epochs,
                epochs_run=len(outcome.history),
                best_epoch=outcome.best_epoch,
                best_at_last_epoch=outcome.best_epoch == row_cfg.epochs,
                val_top1=float(outcome.metrics["val_top1"]),
                train_seconds=round(outcome.train_seconds, 3),
                feature_cache=outcome.feature_cache,
            )
            rows.append(row)
            log.info(
                "[%d/%d] %s, %s: val top-1 %.4f in %.1fs",
                i,
                len(plan),
                strategy,
                budget_text(budget),
                row.val_top1,
                row.train_seconds,
            )
            if row.best_at_last_epoch and row.epochs > 1:
                log.warning(
                    "%s, %s: the best epoch was the last (%d); more epochs may help (--epochs %s=N)",
                    strategy,
                    budget_text(budget),
                    row.epochs,
                    strategy,
                )

        result = StudyResult(
            rows=rows,
            data=prepared.root,
            backbone=spec.name,
            weights=weights_source,
            img_size=spec.preprocessing(cfg.img_size).input_size,
            seed=cfg.seed,
            val_split=None if val_dir is not None else cfg.val_split,
            labels=list(prepared.labels),
            train_images=len(prepared.train),
            val_images=len(prepared.val),
            val_digest=samples_digest(prepared.val),
            trunk_pass=trunk_pass,
            epochs={s: epochs_by_strategy[s] for s in strategy_list},
            config={k: v for k, v in cfg.to_dict().items() if k not in ("strategy", "epochs")},
            json_path=str(out_dir / "study.json") if out_dir is not None else None,
            plot_path=str(plot_path) if plot_path is not None else None,
        )
        if plot_path is not None:
            plot_study(result, plot_path)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out_dir / "study.json", result.to_dict())
        return result
