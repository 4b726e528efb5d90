"""`edgetl study` (accuracy and time per data budget and strategy) and `edgetl probe` (rank backbones)."""

from __future__ import annotations

import click

from edgetl.cli._common import emit_json, handle_errors, json_option
from edgetl.workstation.options import DEFAULT_BUDGETS, DEFAULT_EPOCHS, STUDY_STRATEGIES, TrainConfig, budget_label

_D = TrainConfig()
_EPOCHS_HELP = ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())


@click.command()
@click.argument("data", type=click.Path())
@click.option(
    "--samples-per-class",
    "budgets",
    default=",".join(str(budget_label(b)) for b in DEFAULT_BUDGETS),
    show_default=True,
    help="Data budgets: training images per class (nested subsets of one split), or 'all'.",
)
@click.option(
    "--strategies",
    default=",".join(STUDY_STRATEGIES),
    show_default=True,
    help="feature-extraction, fine-tune, full (pretrained) and scratch (same architecture, random init, all trained).",
)
@click.option(
    "--epochs",
    default=None,
    metavar="N|STRATEGY=N,...",
    help=f"Epochs for every strategy, or per strategy (fine-tune=3,scratch=10). Default: {_EPOCHS_HELP}.",
)
@click.option(
    "--recipe",
    default=None,
    help="Hyperparameters from a recipe name, .yaml or run (its strategy and epochs are not used).",
)
@click.option("--backbone", default=_D.backbone, show_default=True, help="See `edgetl backbones`.")
@click.option(
    "--weights",
    default=_D.weights,
    show_default=True,
    help="Pretrained weights of the non-scratch rows: imagenet or a .pth file.",
)
@click.option("--img-size", type=int, default=None, help="Input size (default: the backbone's, e.g. 224).")
@click.option("--unfreeze", type=int, default=_D.unfreeze, show_default=True, help="Trunk blocks trained by fine-tune.")
@click.option(
    "--batch-size",
    type=int,
    default=_D.batch_size,
    show_default=True,
    help="Largest batch; small budgets use train images / 8 (at least 8) so an epoch has several steps.",
)
@click.option(
    "--lr", type=float, default=_D.lr, show_default=True, help="Head learning rate (trunk: x trunk-lr-scale)."
)
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="Split, subsets and training.")
@click.option(
    "--val-split",
    type=float,
    default=_D.val_split,
    show_default=True,
    help="Validation fraction, split once for every row.",
)
@click.option("--val-dir", type=click.Path(), default=None, help="Use this image folder for validation instead.")
@click.option("--device", default=_D.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", type=click.Path(), default=None, help="Folder for study.json and study.png.")
@click.option(
    "--plot", type=click.Path(), default=None, help="PNG of top-1 vs images per class (default: OUT/study.png)."
)
@click.option("--force", is_flag=True, help="Replace an existing study.json / plot.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@json_option
@click.pass_context
@handle_errors
def study(
    ctx, data, budgets, strategies, epochs, recipe, val_dir, out, plot, force, no_progress, as_json, **options
) -> None:
    """Train every strategy at every data budget on DATA; compare top-1 and time on one validation set.

    The data is split once (--seed, --val-split); each budget subsamples only the training part, so
    every row is scored on the same validation images. `scratch` is the baseline transfer learning
    must beat. Feature-extraction rows share one trunk pass (reported separately). See docs/transfer.md.

    \b
    Example:
      edgetl study data/digits --img-size 96 --samples-per-class 5,10,25,all --out studies/digits
      edgetl study data/digits --img-size 96 --strategies feature-extraction,scratch --epochs scratch=15 --json
    """
    from click.core import ParameterSource

    from edgetl.workstation.recipes import make_config
    from edgetl.workstation.study import StudyOptions, run_study

    explicit = {
        k: v
        for k, v in options.items()
        if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    config = make_config(recipe, explicit)
    result = run_study(
        data,
        config=config,
        options=StudyOptions(strategies=strategies, samples_per_class=budgets, epochs=epochs, progress=not no_progress),
        val_dir=val_dir,
        out=out,
        plot=plot,
        force=force,
    )
    if as_json:
        emit_json(result.to_dict())
        return
    _print_study(result)


def _print_study(result) -> None:
    from rich.console import Console
    from rich.table import Table

    budgets = result.budgets()
    table = Table(
        title=f"{result.backbone} at {result.img_size}px: validation top-1 (train seconds); "
        f"{result.val_images} validation images, the same for every cell"
    )
    table.add_column("strategy")
    for b in budgets:
        table.add_column(f"{budget_label(b)}/class", justify="right")
    for strategy in result.strategies():
        name = strategy + (" (random init)" if strategy == "scratch" else "")
        cells = []
        for b in budgets:
            r = result.row(strategy, b)
            more = "+" if r.best_at_last_epoch and r.epochs > 1 else ""
            cells.append(f"{r.val_top1:.3f}{more} ({r.train_seconds:.0f}s)")
        table.add_row(name, *cells)
    console = Console()
    console.print(table)
    gains = result.transfer_gain_pp()
    for strategy in (s for s in result.strategies() if s != "scratch"):
        if gains:
            parts = ", ".join(f"{g[strategy]:+.1f} pp at {b}" for b, g in gains.items())
            console.print(f"{strategy} vs scratch: {parts}")
    if any(r.best_at_last_epoch and r.epochs > 1 for r in result.rows):
        console.print("+ best epoch was the last one: still improving, more epochs (--epochs STRATEGY=N) may raise it")
    if result.trunk_pass:
        tp = result.trunk_pass
        console.print(
            f"feature extraction: one trunk pass over {tp['images']} images in {tp['seconds']:.1f}s "
            f"(cache {tp['cache']['status']}), not included in its rows' seconds"
        )
    console.print(
        f"chance: {1 / len(result.labels):.3f}; train images per class at 'all': "
        f"{result.train_images / len(result.labels):.0f}"
    )
    for what, path in (("results", result.json_path), ("plot", result.plot_path)):
        if path:
            console.print(f"{what}: {path}")


@click.command()
@click.argument("data", type=click.Path())
@click.option(
    "--backbones",
    "candidates",
    required=True,
    metavar="NAME[:WEIGHTS],...",
    help="Candidates; WEIGHTS is imagenet (default), none (random init) or a .pth path, "
    "e.g. mobilenet_v2,resnet18:none,efficientnet_b0:my.pth.",
)
@click.option("--img-size", type=int, default=None, help="Input size for every candidate (default: each backbone's).")
@click.option(
    "--metric",
    type=click.Choice(["linear", "logme"]),
    default="linear",
    show_default=True,
    help="Ranking score: cross-validated linear-probe top-1, or LogME evidence (both are reported).",
)
@click.option("--folds", type=int, default=5, show_default=True, help="Stratified folds of the linear probe.")
@click.option(
    "--samples-per-class",
    type=int,
    default=None,
    help="Probe at most this many images per class (faster on big folders).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Trunk inference batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@json_option
@handle_errors
def probe(
    data, candidates, img_size, metric, folds, samples_per_class, seed, batch_size, device, no_progress, as_json
) -> None:
    """Rank candidate backbones for DATA by a linear probe on frozen trunk features (fast).

    One trunk pass per candidate (kept in the feature cache: probing again costs none) and a
    k-fold logistic regression; LogME is reported beside it. It ranks candidates; it does not
    predict fine-tuned top-1. See docs/transfer.md.

    \b
    Example:
      edgetl probe data/digits --backbones mobilenet_v2,mobilenet_v3_small:none,resnet18:none --img-size 96
      edgetl probe data/digits --backbones mobilenet_v2,mobilenet_v2:none --metric logme --json
    """
    from edgetl.workstation.probe import ProbeOptions, probe_backbones

    options = ProbeOptions(
        img_size=img_size,
        folds=folds,
        seed=seed,
        metric=metric,
        device=device,
        batch_size=batch_size,
        progress=not no_progress,
    )
    result = probe_backbones(data, candidates, options=options, samples_per_class=samples_per_class)
    if as_json:
        emit_json(result.to_dict())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result.images} images, {len(result.labels)} classes: ranked by "
        f"{'linear-probe top-1' if metric == 'linear' else 'LogME'} ({result.folds} folds)"
    )
    for col in ("#", "candidate", "linear top-1", "LogME", "features", "seconds", "cache"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for i, r in enumerate(result.rows, 1):
        table.add_row(
            str(i),
            r.candidate,
            f"{r.linear_top1:.3f} ± {r.linear_top1_std:.3f}",
            f"{r.logme:.3f}",
            str(r.feature_dim),
            f"{r.seconds:.1f}",
            r.feature_cache["status"],
        )
    console = Console()
    console.print(table)
    console.print(
        f"chance top-1 {1 / len(result.labels):.3f}; total {result.seconds:.1f}s. "
        "A ranking for choosing what to fine-tune, not a prediction of its top-1."
    )


COMMANDS = [study, probe]
