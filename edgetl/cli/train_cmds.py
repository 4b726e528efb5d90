"""`edgetl finetune` and `edgetl evaluate`."""

from __future__ import annotations

import click

from edgetl.cli._common import common_options, handle_errors
from edgetl.cli._output import clean, emit_json, emit_table, envelope, format_option, resolve_format
from edgetl.cli._runtime_options import head_option, runtime_option
from edgetl.core.formats import PRECISIONS
from edgetl.workstation.options import CROP_MODES, FEATURE_MODES, STRATEGIES, TrainConfig

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
@click.option(
    "--backbone",
    default=_D.backbone,
    show_default=True,
    help="A name from `edgetl backbones` (e.g. efficientnet_lite0), or any timm classifier as timm:<name>.",
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default=_D.strategy,
    show_default=True,
    help="feature-extraction: frozen trunk + new head; fine-tune: last --unfreeze blocks too; full: everything; "
    "auto: feature extraction, or fine-tune when it wins on held-out training images by 1 pp and significantly "
    "(sign test p < 0.05; says why).",
)
@click.option(
    "--head-search/--no-head-search",
    default=_D.head_search,
    show_default=True,
    help="Choose the head's settings by --folds cross-validation on the training split (never the validation "
    "split). Off when feature extraction is given --lr, --weight-decay, --label-smoothing, --epochs, "
    "--patience or --dropout: the head then trains with those, early-stopped on the validation split. A "
    "fine-tune searches its head again after its last epoch, on the tuned trunk's features; without the "
    "search it fine-tunes end to end.",
)
@click.option(
    "--folds", type=int, default=_D.folds, show_default=True, help="Cross-validation folds of the head search."
)
@click.option(
    "--crop",
    type=click.Choice(CROP_MODES),
    default=_D.crop,
    show_default=True,
    help="center: the backbone's resize + centre crop; none: resize the shorter side to the input size; compare: "
    "cross-validate both; auto: compare when the images are no larger than the resize, else center.",
)
@click.option(
    "--features",
    type=click.Choice(FEATURE_MODES),
    default=_D.features,
    show_default=True,
    help="What a searched head sees. blocks: every trunk block's output, pooled and concatenated "
    "(multi-layer features); last: the last feature map only; auto: blocks for the searched feature-extraction "
    "head and for the head a cached fine-tune searches again after training its blocks, last otherwise.",
)
@click.option(
    "--views",
    type=int,
    default=None,
    help="Views of each training image, computed once: the plain one + VIEWS-1 random crops with colour "
    "jitter (flips with --hflip). Default: 1 for the feature-extraction head, 4 for the fine-tune.",
)
@click.option(
    "--unfreeze",
    type=int,
    default=None,
    help="Trunk blocks to unfreeze (fine-tune). Default: the backbone's (mobilenet_v2: 2, the others: 3).",
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
@format_option
@common_options
@click.pass_context
@handle_errors
def finetune(
    ctx, data, out, recipe, resume_run, trunk_from, val_dir, force, no_progress, output_format, as_json, **options
) -> None:
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

    fmt = resolve_format(output_format, as_json)
    explicit = {
        k: v
        for k, v in options.items()
        if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    try:
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
    except KeyboardInterrupt:
        if resume_run or out:
            _say_how_to_resume(resume_run or out)
        raise
    doc = result.to_dict()
    doc["skipped"] = [{"path": p, "reason": r} for p, r in result.skipped]
    if fmt == "json":
        emit_json(envelope("finetune", [doc], run=result.run_dir, data=_data_root(data, result.run_dir)))
        return
    origin = "pretrained" if result.pretrained else "RANDOM INIT (no transfer)"
    cache = f", feature cache {result.feature_cache['status']}" if result.feature_cache else ""
    resumed = f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    click.echo(
        f"{result.strategy} on {result.backbone} ({origin}): val top-1 {result.val_top1:.4f} "
        f"(best epoch {result.best_epoch}/{result.epochs_run}) in {result.train_seconds:.1f}s{cache}{resumed} "
        f"-> {result.run_dir}"
    )
    _echo_choices(result)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} unreadable image(s):")
        for _path, reason in result.skipped:
            click.echo(f"  {clean(reason)}")


def _say_how_to_resume(out: str) -> None:
    """After Ctrl-C: where the run so far is, when it got as far as a checkpoint (before one,
    nothing is kept and the command starts afresh next time)."""
    from pathlib import Path

    from edgetl.workstation.train import partial_dir

    partial = Path(out) if str(out).endswith(".partial") else partial_dir(out)
    if (partial / "checkpoint.pt").is_file():
        run = str(out).removesuffix(".partial")
        click.echo(
            f"The run so far is in {clean(partial)}; continue it with `edgetl finetune --resume {clean(run)}`.",
            err=True,
        )


def _echo_choices(result) -> None:
    """What the run chose on its training split: the strategy (auto), the crop, the head's settings.

    On stderr (stdout keeps the one summary line a script reads), and not with -q.
    """
    import functools
    import logging

    if logging.getLogger("edgetl").getEffectiveLevel() > logging.INFO:  # -q
        return
    echo = functools.partial(click.echo, err=True)
    choice = getattr(result, "strategy_choice", None)
    if choice:
        echo(f"strategy auto -> {choice['chosen']}: {choice['why']}")
    crop = getattr(result, "crop", None)
    if crop:
        scores = ", ".join(f"{r['crop']} {r['cv_top1']:.4f}" for r in crop["table"])
        echo(f"crop {crop['chosen']}: {crop['why']}" + (f" (cross-validated top-1: {scores})" if scores else ""))
    search = getattr(result, "head_search", None)
    if search:
        rows = search["table"][:5]
        echo(
            f"head search ({search['folds']}-fold cross-validation on the training split, {search['seconds']:.1f}s; "
            f"best {min(5, len(search['table']))} of {len(search['table'])}):"
        )
        keys = [k for k in rows[0] if k not in ("cv_top1", "cv_top1_std", "cv_loss", "seconds", "evaluations")]
        echo("  " + "  ".join([*keys, "cv top-1", "cv loss"]))
        for r in rows:
            values = [f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
            loss = f"{r['cv_loss']:.4f}" if isinstance(r.get("cv_loss"), (int, float)) else "-"
            echo("  " + "  ".join([*values, f"{r['cv_top1']:.4f}", loss]))
        if search.get("fallback"):
            echo(f"  note: {search['fallback']}")


def _data_root(data: str | None, run_dir: str) -> str | None:
    """DATA as given, or (``--resume``) the data folder the run recorded."""
    if data:
        return str(data)
    from pathlib import Path

    from edgetl.core.errors import EdgetlError
    from edgetl.core.jsonio import read_json

    try:
        root = read_json(Path(run_dir) / "config.json", what="config.json").get("data", {}).get("root")
    except (EdgetlError, OSError, AttributeError):
        return None
    return root if isinstance(root, str) else None


@click.command()
@click.argument("model", type=click.Path())
@click.argument("data", type=click.Path(), required=False)
@click.option(
    "--split",
    type=click.Choice(["val", "train", "all"]),
    default=None,
    help="Runs: score exactly the files the run recorded in split.json (validation, training or both) instead of DATA.",
)
@click.option(
    "--include-train",
    is_flag=True,
    help="Also score the images of DATA the model was trained on (left out by default: they inflate the figure).",
)
@runtime_option
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Bundles: the variant's precision. Default: fp32, else the bundle's only one.",
)
@head_option
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),  # edgetl.device.limits.MAX_BATCH_SIZE (not imported: workstation CLI)
    default=64,
    show_default=True,
    help="Images per inference call (memory holds one batch).",
)
@click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    help="Runs: torch device: auto (default: CUDA when there is one), cpu, cuda or cuda:N.",
)
@format_option
@common_options
@handle_errors
def evaluate(
    model, data, split, include_train, runtime, precision, head, batch_size, device, output_format, as_json
) -> None:
    """Top-1, per-class accuracy and confusion matrix of a run or a bundle on DATA (DATA/<class>/<images>).

    Images the model was trained on are left out and counted: a run knows its training files
    (split.json; copies elsewhere are recognised by their bytes), a bundle records their hashes.
    DATA may hold any subset of the model's classes: it is scored on those, and the others are listed
    as missing. A class folder the model does not know is an error.

    \b
    Example:
      edgetl evaluate runs/digits data/digits          # the run's training images left out
      edgetl evaluate runs/digits --split val          # exactly the run's validation files
      edgetl evaluate bundles/digits data/digits-test --precision int8 --json
    """
    from edgetl.core.bundle import is_bundle

    fmt = resolve_format(output_format, as_json)
    if data is not None and split is not None:
        raise click.UsageError("give DATA or --split, not both (--split scores the run's recorded files)")
    if include_train and split is not None:
        raise click.UsageError("--include-train applies to DATA; --split train or all scores training files already")
    if is_bundle(model):
        if split is not None:
            raise click.UsageError(
                "--split applies to runs: a bundle records only hashes of its training images, not its split "
                "files; give DATA (its training images are left out)"
            )
        if device is not None:
            raise click.UsageError("--device is the torch device for runs; a bundle runs on --runtime")
        if data is None:
            raise click.UsageError("give DATA, an image folder with one sub-folder per class")
        from edgetl.device.evaluate import evaluate_bundle

        doc = evaluate_bundle(
            model,
            data,
            runtime=runtime,
            precision=precision,
            head=head,
            batch_size=batch_size,
            include_train=include_train,
        )
    else:
        given = [flag for flag, value in (("--runtime", runtime), ("--precision", precision)) if value is not None]
        if given:
            raise click.UsageError(
                f"{given[0]} applies to bundles; a run is evaluated in PyTorch (fp32): export it to choose one"
            )
        if head not in (None, "all", "default"):
            raise click.UsageError(f"--head {head}: a run has one head, 'default'")
        if data is None and split is None:
            raise click.UsageError("give DATA (an image folder) or --split val|train|all")
        from edgetl.workstation.evaluate import evaluate_run

        doc = evaluate_run(
            model, data, split=split, include_train=include_train, batch_size=batch_size, device=device or "auto"
        )
    results = doc.pop("results")
    if fmt == "json":
        emit_json(envelope("evaluate", results, **doc))
        return
    _print_results(fmt, doc, results)


_SUMMARY = ("head", "variant", "top1", "n", "excluded_train", "included_train", "missing", "skipped")


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _print_results(fmt: str, doc: dict, results: list[dict]) -> None:
    """Three tables whatever the number of heads: summary, per class, confusion."""
    from edgetl.cli._output import console, plain

    variant = doc["variant"] or f"{doc['runtime']}-{doc['precision']}"
    emit_table(
        fmt,
        _SUMMARY,
        [
            [
                r["head"],
                variant,
                _cell(r["top1"]),
                r["n"],
                _cell(r["excluded_train"]),
                _cell(r["included_train"]),
                len(r["missing_classes"]),
                len(r["skipped"]),
            ]
            for r in results
        ],
        title=f"{doc['kind']} {doc['model']} on {doc['data'] or 'its ' + doc['split'] + ' split'}",
        right=("top1", "n", "excluded_train", "included_train", "missing", "skipped"),
    )
    missing = results[0]["missing_classes"]
    if fmt == "table" and missing:
        console().print(plain(f"not in DATA (scored on the other classes): {', '.join(missing)}"))
    click.echo()
    emit_table(
        fmt,
        ["head", "class", "accuracy", "n"],
        [
            [r["head"], name, _cell(rec["accuracy"], 3), rec["n"]]
            for r in results
            for name, rec in r["per_class"].items()
        ],
        title="per class",
        right=("accuracy", "n"),
    )
    click.echo()
    first = results[0]
    other = ["(other)"] if first["missing_classes"] else []
    emit_table(
        fmt,
        ["head", "true", *first["labels"], *other],
        [
            [r["head"], name, *row, *([extra] if other else [])]
            for r in results
            for name, row, extra in zip(r["labels"], r["confusion"], r["confusion_other"], strict=True)
        ],
        title="confusion (rows: true, columns: predicted" + ("; (other): a class not in DATA)" if other else ")"),
    )


COMMANDS = [finetune, evaluate]
