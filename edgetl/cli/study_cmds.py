"""`edgetl study` (accuracy and time per data budget and strategy) and `edgetl probe` (rank backbones)."""

from __future__ import annotations

import click

from edgetl.cli._common import common_options, handle_errors, renamed_option
from edgetl.cli._output import format_option
from edgetl.workstation.options import (
    _FLOAT_RANGES,
    _INT_RANGES,
    DEFAULT_BUDGETS,
    DEFAULT_EPOCHS,
    STUDY_STRATEGIES,
    TrainConfig,
    budget_label,
)

_D = TrainConfig()
_EPOCHS_HELP = ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
DEVICE_HELP = "Torch device: auto, cpu, cuda or cuda:N."


def _int_range(name: str) -> click.IntRange:
    """The bounds TrainConfig checks (edgetl.workstation.options), refused when the command line is parsed."""
    return click.IntRange(*_INT_RANGES[name])


def _float_range(name: str) -> click.FloatRange:
    low, high, low_open, high_open, _ = _FLOAT_RANGES[name]
    return click.FloatRange(low, high, min_open=low_open, max_open=high_open)


def _note(fmt: str, text: str) -> None:
    """A summary line under a table; in a pipe (tsv) it goes to stderr, so stdout stays lines of cells.
    Paths and names in it are shown as text (no markup; control characters escaped)."""
    from edgetl.cli._output import console, plain

    if fmt == "tsv":
        click.echo(str(plain(text)), err=True)
    else:
        console().print(plain(text))


@click.command()
@click.argument("data", type=click.Path())
@click.option(
    "--samples-per-class",
    "budgets",
    default=",".join(str(budget_label(b)) for b in DEFAULT_BUDGETS),
    show_default=True,
    metavar="N[,N...]",
    help="Data budgets: training images per class (nested subsets of one split), or 'all'.",
)
@click.option(
    "--strategies",
    default=",".join(STUDY_STRATEGIES),
    show_default=True,
    metavar="S[,S...]",
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
@click.option(
    "--backbone",
    default=_D.backbone,
    show_default=True,
    help="A name from `edgetl backbones` (e.g. efficientnet_lite0), or any timm classifier as timm:<name>.",
)
@click.option(
    "--weights",
    default=_D.weights,
    show_default=True,
    help="Pretrained weights of the non-scratch rows: imagenet or a .pth file.",
)
@click.option(
    "--img-size", type=_int_range("img_size"), default=None, help="Input size (default: the backbone's, e.g. 224)."
)
@click.option(
    "--unfreeze",
    type=_int_range("unfreeze"),
    default=None,
    help="Trunk blocks trained by fine-tune. Default: the backbone's (mobilenet_v2: 2, the others: 3).",
)
@click.option(
    "--batch-size",
    type=_int_range("batch_size"),
    default=_D.batch_size,
    show_default=True,
    help="Largest batch; small budgets use train images / 8 (at least 8) so an epoch has several steps.",
)
@click.option(
    "--lr",
    type=_float_range("lr"),
    default=_D.lr,
    show_default=True,
    help="Head learning rate (trunk: x trunk-lr-scale).",
)
@click.option(
    "--seed", type=_int_range("seed"), default=_D.seed, show_default=True, help="Split, subsets and training."
)
@click.option(
    "--val-split",
    type=_float_range("val_split"),
    default=_D.val_split,
    show_default=True,
    help="Validation fraction, split once for every row.",
)
@click.option("--val-dir", type=click.Path(), default=None, help="Use this image folder for validation instead.")
@click.option("--device", default=_D.device, show_default=True, help=DEVICE_HELP)
@click.option("--out", type=click.Path(), default=None, help="Folder for study.json and study.png.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Plot of top-1 vs images per class: .png, .svg, .pdf or .jpg (default: OUT/study.png).",
)
@click.option("--force", is_flag=True, help="Replace an existing study.json / plot.")
@format_option
@common_options
@click.pass_context
@handle_errors
def study(
    ctx,
    data,
    budgets,
    strategies,
    epochs,
    recipe,
    val_dir,
    out,
    plot,
    force,
    output_format,
    as_json,
    no_progress,
    **options,
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

    from edgetl.cli._output import resolve_format
    from edgetl.workstation.recipes import make_config
    from edgetl.workstation.study import StudyOptions, run_study

    explicit = {
        k: v
        for k, v in options.items()
        if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    fmt = resolve_format(output_format, as_json)
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
    if fmt == "json":
        from edgetl.cli._output import emit_json, envelope

        doc = result.to_dict()
        emit_json(envelope("study", doc.pop("rows"), **doc))
        return
    _print_study(fmt, result)


STUDY_TSV_COLUMNS = (
    "strategy",
    "pretrained",
    "samples_per_class",
    "train_images",
    "epochs",
    "epochs_run",
    "best_epoch",
    "best_at_last_epoch",
    "val_top1",
    "train_seconds",
)


def _print_study(fmt: str, result) -> None:
    """A table (strategies x budgets) on a terminal; in a pipe one line per row, the columns of
    :data:`STUDY_TSV_COLUMNS` (the same whatever the number of budgets), notes on stderr."""
    from edgetl.cli._output import emit_table

    budgets = result.budgets()
    if fmt == "tsv":
        emit_table(fmt, STUDY_TSV_COLUMNS, ([r.to_dict()[c] for c in STUDY_TSV_COLUMNS] for r in result.rows))
    else:
        rows = []
        for strategy in result.strategies():
            name = strategy + (" (random init)" if strategy == "scratch" else "")
            cells = []
            for b in budgets:
                r = result.row(strategy, b)
                more = "+" if r.best_at_last_epoch and r.epochs > 1 else ""
                cells.append(f"{r.val_top1:.3f}{more} ({r.train_seconds:.0f}s)")
            rows.append([name, *cells])
        columns = ["strategy", *(f"{budget_label(b)}/class" for b in budgets)]
        emit_table(
            fmt,
            columns,
            rows,
            title=f"{result.backbone} at {result.img_size}px: validation top-1 (train seconds); "
            f"{result.val_images} validation images, the same for every cell",
            right=columns[1:],
        )
    gains = result.transfer_gain_pp()
    for strategy in (s for s in result.strategies() if s != "scratch"):
        if gains:
            parts = ", ".join(f"{g[strategy]:+.1f} pp at {b}" for b, g in gains.items())
            _note(fmt, f"{strategy} vs scratch: {parts}")
    if any(r.best_at_last_epoch and r.epochs > 1 for r in result.rows):
        _note(fmt, "+ best epoch was the last one: still improving, more epochs (--epochs STRATEGY=N) may raise it")
    if result.trunk_pass:
        tp = result.trunk_pass
        _note(
            fmt,
            f"feature extraction: one trunk pass over {tp['images']} images in {tp['seconds']:.1f}s "
            f"(cache {tp['cache']['status']}), not included in its rows' seconds",
        )
    _note(
        fmt,
        f"chance: {1 / len(result.labels):.3f}; train images per class at 'all': "
        f"{result.train_images / len(result.labels):.0f}",
    )
    for what, path in (("results", result.json_path), ("plot", result.plot_path)):
        if path:
            _note(fmt, f"{what}: {path}")


PROBE_TSV_COLUMNS = (
    "rank",
    "candidate",
    "backbone",
    "weights",
    "pretrained",
    "score",
    "linear_top1",
    "linear_top1_std",
    "logme",
    "feature_dim",
    "seconds",
    "feature_cache",
    "degenerate",
)


@click.command()
@click.argument("data", type=click.Path())
@click.option(
    "--backbones",
    "candidates",
    required=True,
    metavar="NAME[:WEIGHTS],...",
    help="Candidates; WEIGHTS is imagenet (default), none (random init) or a .pth path, "
    "e.g. mobilenet_v2,efficientnet_lite0,resnet18:none,timm:resnet18.a1_in1k:my.pth.",
)
@click.option(
    "--img-size",
    type=_int_range("img_size"),
    default=None,
    help="Input size for every candidate (default: each backbone's).",
)
@click.option(
    "--metric",
    type=click.Choice(["linear", "logme"]),
    default="linear",
    show_default=True,
    help="Ranking score: cross-validated linear-probe top-1, or LogME evidence (both are reported).",
)
@click.option(
    "--folds",
    type=click.IntRange(min=2),
    default=5,
    show_default=True,
    help="Stratified folds of the linear probe (every class needs at least this many images).",
)
@click.option(
    "--max-per-class",
    "max_per_class",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Probe at most N images per class, chosen by --seed (faster on big folders). Default: every image.",
)
@renamed_option("--samples-per-class", "max_per_class", "--max-per-class", type=click.IntRange(min=2))
@click.option("--seed", type=_int_range("seed"), default=0, show_default=True, help="Folds and --max-per-class.")
@click.option(
    "--batch-size", type=_int_range("batch_size"), default=64, show_default=True, help="Trunk inference batch."
)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@format_option
@common_options
@handle_errors
def probe(
    data,
    candidates,
    img_size,
    metric,
    folds,
    max_per_class,
    seed,
    batch_size,
    device,
    output_format,
    as_json,
    no_progress,
) -> None:
    """Rank candidate backbones for DATA by a linear probe on frozen trunk features (fast).

    One trunk pass per candidate (kept in the feature cache: probing again costs none) and a
    k-fold logistic regression; LogME is reported beside it. It ranks candidates; it does not
    predict fine-tuned top-1. See docs/transfer.md.

    \b
    Example:
      edgetl probe data/digits --backbones mobilenet_v2,efficientnet_lite0 --img-size 96
      edgetl probe data/digits --backbones mobilenet_v2,mobilenet_v3_small:none,resnet18:none --img-size 96
      edgetl probe data/digits --backbones mobilenet_v2,mobilenet_v2:none --metric logme --json
    """
    from edgetl.cli._output import resolve_format
    from edgetl.workstation.probe import ProbeOptions, probe_backbones

    fmt = resolve_format(output_format, as_json)
    options = ProbeOptions(
        img_size=img_size,
        folds=folds,
        seed=seed,
        metric=metric,
        device=device,
        batch_size=batch_size,
        progress=not no_progress,
    )
    result = probe_backbones(data, candidates, options=options, max_per_class=max_per_class)
    doc = result.to_dict()
    rows = [{"rank": i, **row} for i, row in enumerate(doc.pop("rows"), 1)]
    doc["max_per_class"] = max_per_class
    if fmt == "json":
        from edgetl.cli._output import emit_json, envelope

        emit_json(envelope("probe", rows, **doc))
        return
    from edgetl.cli._output import emit_table

    if fmt == "tsv":
        cells = (
            [r["feature_cache"]["status"] if c == "feature_cache" else r[c] for c in PROBE_TSV_COLUMNS] for r in rows
        )
        emit_table(fmt, PROBE_TSV_COLUMNS, cells)
    else:
        columns = ("#", "candidate", "linear top-1", "LogME", "features", "seconds", "cache")
        emit_table(
            fmt,
            columns,
            (
                [
                    str(r["rank"]),
                    r["candidate"],
                    f"{r['linear_top1']:.3f} ± {r['linear_top1_std']:.3f}",
                    f"{r['logme']:.3f}",
                    str(r["feature_dim"]),
                    f"{r['seconds']:.1f}",
                    r["feature_cache"]["status"],
                ]
                for r in rows
            ),
            title=f"{result.images} images, {len(result.labels)} classes: ranked by "
            f"{'linear-probe top-1' if metric == 'linear' else 'LogME'} ({result.folds} folds)",
            right=("#", "linear top-1", "LogME", "features", "seconds", "cache"),
        )
    _note(
        fmt,
        f"chance top-1 {1 / len(result.labels):.3f}; total {result.seconds:.1f}s. "
        "A ranking for choosing what to fine-tune, not a prediction of its top-1.",
    )


COMMANDS = [study, probe]
