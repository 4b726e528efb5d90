"""`edgetl learn`: a new head, or new classes of a head, learned on the device (see edgetl.device.learn)."""

from __future__ import annotations

import click

from edgetl.cli._common import common_options, handle_errors
from edgetl.cli._output import clean, emit_json, envelope, format_option, resolve_format, tsv_line
from edgetl.cli._runtime_options import precision_option, profile_option, runtime_option, threads_option


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("data", type=click.Path())
@click.option(
    "--head", "head", required=True, metavar="NAME", help="Name of the head to write (letters, digits, - and _)."
)
@click.option(
    "--extend",
    default=None,
    metavar="HEAD",
    help="Add the classes of DATA to this head (its old classes come from the bundle's stored features; "
    "--head HEAD replaces it, another name keeps both).",
)
@runtime_option
@precision_option
@threads_option
@profile_option
@click.option("--folds", type=click.IntRange(2, 20), default=5, show_default=True, help="Cross-validation folds.")
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 100),
    default=2.0,
    show_default=True,
    help="--extend: refuse if the old classes lose more top-1 than this (pp, on the stored validation features).",
)
@click.option(
    "--acceptance",
    type=click.FloatRange(0.5, 0.999),
    default=0.95,
    show_default=True,
    help="Share of familiar images the unfamiliar threshold accepts.",
)
@click.option("--force", is_flag=True, help="Replace a head of that name (other than --extend's).")
@format_option
@common_options
@handle_errors
def learn(
    bundle: str,
    data: str,
    head: str,
    extend: str | None,
    runtime: str | None,
    precision: str | None,
    threads: int | None,
    device_profile: str | None,
    folds: int,
    max_drop: float,
    acceptance: float,
    force: bool,
    output_format: str | None,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Teach the bundle BUNDLE a new head from the images in DATA (DATA/<class>/<images>), on the device.

    No torch: features come from the trunk of the variant this device runs (--runtime/--precision,
    or the device profile's), the head is fitted in numpy (logistic regression with its weight decay
    chosen by cross-validation; weight imprinting when a class has fewer images than --folds), and
    it is written for every variant of the bundle and checked through each runtime. The bundle is
    replaced only when all of that succeeded; the trunk files never change. The new head also gets
    an unfamiliar-input threshold: `predict` then says which images look like nothing it learned.

    \b
    Example:
      edgetl learn bundles/parts photos/ --head parts-v2
      edgetl learn bundles/digits new-digits/ --head default --extend default --precision int8
      edgetl predict bundles/parts img.jpg --head all
    """
    from edgetl.cli.predict_cmd import with_profile
    from edgetl.core.progress import progress_bar
    from edgetl.device.bundle_loading import LoadOptions
    from edgetl.device.learn import LearnOptions
    from edgetl.device.learn import learn as learn_head

    fmt = resolve_format(output_format, as_json)
    options = LearnOptions(extend=extend, folds=folds, max_drop=max_drop, acceptance=acceptance, force=force)
    load, _ = with_profile(device_profile, LoadOptions(runtime=runtime, precision=precision, threads=threads))
    with progress_bar(not no_progress) as bar:
        doc = learn_head(bundle, data, head, options, load=load, progress=bar)
    if fmt == "json":
        emit_json(envelope("learn", [doc], bundle=bundle))
        return
    _print(doc, fmt)


def _print(doc: dict, fmt: str) -> None:
    learned = doc["learn"]
    rows = [
        ("head", doc["head"]),
        ("extends", doc["extends"] or "-"),
        ("classes", len(doc["labels"])),
        ("images", doc["images"]),
        ("trunk variant", doc["trunk_variant"]),
        (
            "method",
            learned["method"] + (f" (weight decay {learned['weight_decay']:g})" if learned.get("weight_decay") else ""),
        ),
        ("cv top-1", "-" if learned.get("cv_top1") is None else f"{learned['cv_top1']:.4f}"),
    ]
    per_class = learned.get("per_class")
    if per_class:  # cross-validated, held-out accuracy per class (the confusion matrix is in --json)
        rows.append(
            ("per class", ", ".join(f"{label} {acc:.2f}" for label, acc in zip(doc["labels"], per_class, strict=True)))
        )
    if learned.get("fallback"):
        rows.append(("note", learned["fallback"]))
    old = learned.get("old_classes")
    if old:
        rows.append(
            (
                "old classes",
                f"{old['top1_before']:.4f} -> {old['top1_after']:.4f} top-1 "
                f"({old['images']} stored validation images, --max-drop {old['max_drop']:g} pp)",
            )
        )
    rows += [
        (
            "unfamiliar",
            f"threshold {doc['familiarity']['threshold']:.4g} (accepts {doc['familiarity']['acceptance']:.0%})"
            if doc["familiarity"]
            else "no check (every class has a single image)",
        ),
        ("variants", ", ".join(doc["variants"])),
        ("left out", "; ".join(f"{k}: {v}" for k, v in doc["left_out"].items()) or "-"),
        ("bytes added", doc["bytes_added"]),
        ("seconds", f"{doc['seconds']['total']:.1f}"),
    ]
    if fmt == "tsv":
        for key, value in rows:
            click.echo(tsv_line([key, value]))
        return
    for key, value in rows:
        click.echo(f"{key:<14} {clean(value)}")


COMMANDS = [learn]
