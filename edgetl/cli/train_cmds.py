"""`edgetl finetune` and `edgetl evaluate`."""

from __future__ import annotations

import click

from edgetl.cli._common import emit_json, handle_errors, json_option
from edgetl.workstation.options import STRATEGIES, TrainConfig

# Defaults come from TrainConfig (numpy- and torch-free at import) so the CLI and the library cannot drift.
_D = TrainConfig()


@click.command()
@click.argument("data", type=click.Path(), required=False)
@click.option("--out", "out", type=click.Path(), help="Run directory to write.")
@click.option(
    "--recipe", default=None, help="A recipe name (see models/), a recipe .yaml, or a run directory to repeat."
)
@click.option(
    "--resume",
    "resume_run",
    type=click.Path(),
    default=None,
    help="Continue the interrupted run RUN from its last epoch checkpoint.",
)
@click.option(
    "--trunk-from",
    "trunk_from",
    type=click.Path(),
    default=None,
    metavar="BUNDLE",
    help="Train only a new head, on the features of this bundle's fp32 trunk (run through ONNX Runtime "
    "with its preprocessing); then `edgetl export RUN --add-to BUNDLE --head NAME`.",
)
@click.option("--backbone", default=_D.backbone, show_default=True, help="See `edgetl backbones`.")
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default=_D.strategy,
    show_default=True,
    help="Frozen trunk + new head; last N blocks unfrozen; or everything trained.",
)
@click.option(
    "--unfreeze", type=int, default=_D.unfreeze, show_default=True, help="Trunk blocks to unfreeze (fine-tune)."
)
@click.option("--epochs", type=int, default=_D.epochs, show_default=True)
@click.option(
    "--batch-size", type=int, default=_D.batch_size, show_default=True, help="Global batch (split over processes)."
)
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="Head learning rate (AdamW, cosine schedule).")
@click.option(
    "--trunk-lr-scale",
    type=float,
    default=_D.trunk_lr_scale,
    show_default=True,
    help="Trunk learning rate = lr x this.",
)
@click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True)
@click.option(
    "--dropout", type=float, default=_D.dropout, show_default=True, help="Dropout before the head's linear layer."
)
@click.option("--label-smoothing", type=float, default=_D.label_smoothing, show_default=True)
@click.option(
    "--patience",
    type=int,
    default=_D.patience,
    show_default=True,
    help="Early stopping: epochs without a better val top-1.",
)
@click.option(
    "--augment/--no-augment",
    default=_D.augment,
    show_default=True,
    help="Light augmentation (fine-tune, full, or with --no-feature-cache).",
)
@click.option(
    "--hflip/--no-hflip", default=_D.hflip, show_default=True, help="Random horizontal flips when augmenting."
)
@click.option(
    "--mixup",
    type=float,
    default=_D.mixup,
    show_default=True,
    help="Mixup Beta alpha, e.g. 0.2 (fine-tune, full; 0 = off).",
)
@click.option(
    "--cutmix",
    type=float,
    default=_D.cutmix,
    show_default=True,
    help="CutMix Beta alpha, e.g. 1.0 (fine-tune, full; 0 = off).",
)
@click.option(
    "--balance", is_flag=True, default=_D.balance, help="Weight the loss by inverse class frequency (imbalanced data)."
)
@click.option(
    "--feature-cache/--no-feature-cache",
    default=_D.feature_cache,
    show_default=True,
    help="Feature extraction: reuse trunk features from the on-disk cache, or run the trunk every epoch.",
)
@click.option("--img-size", type=int, default=None, help="Input size (default: the backbone's, e.g. 224).")
@click.option(
    "--val-split",
    type=float,
    default=_D.val_split,
    show_default=True,
    help="Stratified validation fraction (by --seed).",
)
@click.option("--val-dir", type=click.Path(), default=None, help="Use this image folder for validation instead.")
@click.option("--seed", type=int, default=_D.seed, show_default=True)
@click.option("--device", default=_D.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--amp",
    type=click.Choice(["auto", "off", "bf16", "fp16"]),
    default=_D.amp,
    show_default=True,
    help="Mixed precision: auto = bf16 on CUDA when supported, else fp16 with loss scaling; off on the CPU.",
)
@click.option(
    "--workers", type=int, default=None, help="DataLoader worker processes (default: 4 on CUDA, 0 on the CPU)."
)
@click.option("--weights", default=_D.weights, show_default=True, help="imagenet, none (random init) or a .pth file.")
@click.option("--on-bad-image", type=click.Choice(["skip", "fail"]), default=_D.on_bad_image, show_default=True)
@click.option("--force", is_flag=True, help="Replace RUN (and any interrupted RUN.partial) if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@json_option
@click.pass_context
@handle_errors
def finetune(ctx, data, out, recipe, resume_run, trunk_from, val_dir, force, no_progress, as_json, **options) -> None:
    """Adapt a pretrained backbone to the image folder DATA (one sub-folder per class).

    Options given on the command line override the --recipe, which overrides the defaults shown.
    Several GPUs: torchrun --nproc_per_node N -m edgetl finetune DATA --out RUN ...

    \b
    Example:
      edgetl finetune data/digits --out runs/digits --img-size 96
      edgetl finetune data/digits --out runs/digits-ft --strategy fine-tune --unfreeze 3 --epochs 3 --img-size 96
      edgetl finetune data/digits --out runs/digits-r --recipe mobilenet_v2-fine-tune
      edgetl finetune --resume runs/digits-ft
      edgetl finetune data/parts --out runs/parts-head --trunk-from bundles/digits   # a second head, same trunk
    """
    from click.core import ParameterSource

    from edgetl.core.errors import ConfigError
    from edgetl.workstation.recipes import make_config
    from edgetl.workstation.train import finetune as run_finetune
    from edgetl.workstation.train import resume

    explicit = {
        k: v
        for k, v in options.items()
        if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    if trunk_from:
        from edgetl.workstation.heads import finetune_head, head_config

        config = head_config(explicit, recipe=recipe, resume=resume_run)
        if not data or not out:
            raise ConfigError("finetune --trunk-from BUNDLE needs DATA and --out RUN")
        result = finetune_head(
            data, out, trunk_from=trunk_from, config=config, val_dir=val_dir, force=force, progress=not no_progress
        )
    elif resume_run:
        if data or recipe:
            raise ConfigError("--resume RUN takes the data and options from the run; drop DATA and --recipe")
        result = resume(resume_run, progress=not no_progress, overrides=explicit)
    else:
        if not data or not out:
            raise ConfigError("finetune needs DATA and --out RUN (or --resume RUN)")
        config = make_config(recipe, explicit)
        result = run_finetune(data, out, config=config, val_dir=val_dir, force=force, progress=not no_progress)
    doc = result.to_dict()
    doc["skipped"] = [{"path": p, "reason": r} for p, r in result.skipped]
    if as_json:
        emit_json(doc)
        return
    origin = "pretrained" if result.pretrained else "RANDOM INIT (no transfer)"
    cache = f", feature cache {result.feature_cache['status']}" if result.feature_cache else ""
    resumed = f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    click.echo(
        f"{result.strategy} on {result.backbone} ({origin}): val top-1 {result.val_top1:.4f} "
        f"(best epoch {result.best_epoch}/{result.epochs_run}) in {result.train_seconds:.1f}s{cache}{resumed} "
        f"-> {result.run_dir}"
    )
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} unreadable image(s):")
        for _path, reason in result.skipped:
            click.echo(f"  {reason}")


@click.command()
@click.argument("model", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--runtime", default="onnxruntime", show_default=True, help="For bundles: onnxruntime.")
@click.option("--precision", default=None, help="For bundles: fp32, int8 (default fp32).")
@click.option("--head", default=None, help="For bundles with several heads: a head name, or all (each scored).")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),  # edgetl.device.limits.MAX_BATCH_SIZE (not imported: workstation CLI)
    default=64,
    show_default=True,
    help="Images per inference call (memory holds one batch).",
)
@json_option
@handle_errors
def evaluate(model, data, runtime, precision, head, batch_size, as_json) -> None:
    """Top-1, per-class accuracy and confusion matrix of a run or a bundle on DATA.

    \b
    Example:
      edgetl evaluate runs/digits data/digits-test
      edgetl evaluate bundles/digits data/digits-test --precision int8 --json
    """
    from edgetl.core.bundle import is_bundle

    if is_bundle(model):
        from edgetl.device.evaluate import evaluate_bundle

        report = evaluate_bundle(model, data, runtime=runtime, precision=precision, head=head, batch_size=batch_size)
    else:
        from edgetl.workstation.evaluate import evaluate_run

        report = evaluate_run(model, data, batch_size=batch_size)
    if as_json:
        emit_json(report)
        return
    from rich.console import Console

    console = Console()
    for rep in (report.get("heads") or {"": report}).values():
        _print_report(console, rep)


def _print_report(console, report) -> None:
    from rich.table import Table

    console.print(f"{report['kind']}: top-1 [bold]{report['top1']:.4f}[/bold] on {report['n']} images")
    table = Table(title="per class")
    table.add_column("class")
    table.add_column("accuracy")
    table.add_column("n")
    for name, rec in report["per_class"].items():
        acc = "-" if rec["accuracy"] is None else f"{rec['accuracy']:.3f}"
        table.add_row(name, acc, str(rec["n"]))
    console.print(table)
    confusion = Table(title="confusion (rows: true, columns: predicted)")
    confusion.add_column("")
    for name in report["labels"]:
        confusion.add_column(name)
    for name, row in zip(report["labels"], report["confusion"], strict=False):
        confusion.add_row(name, *[str(v) for v in row])
    console.print(confusion)
    if report["skipped"]:
        console.print(f"skipped {len(report['skipped'])} unreadable image(s)")


COMMANDS = [finetune, evaluate]
