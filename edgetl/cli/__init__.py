"""The ``edgetl`` command line: a thin layer that parses options, calls one library function, prints."""

from __future__ import annotations

import itertools
import sys

import click

from edgetl import __version__
from edgetl.cli._common import EXIT_USAGE, setup_logging

# One line each in `edgetl --help` (Click would cut the first sentence of each command's help).
SHORT_HELP = {
    "data": "Write an offline demo dataset (scikit-learn digits) as an image folder.",
    "backbones": "List the supported backbones and their weights.",
    "finetune": "Adapt a pretrained backbone to an image folder (a run).",
    "evaluate": "Score a run or a bundle on labelled images, leaving training images out.",
    "study": "Compare strategies and scratch at several data budgets.",
    "probe": "Rank backbones for your data by a fast linear probe.",
    "export": "Export a run to a checked bundle (ONNX, OpenVINO; fp32, fp16, bf16, int8).",
    "info": "Show what a bundle or run holds: variants, heads, preprocessing, lineage, checksums.",
    "pack": "Pack a bundle into one reproducible .tar.gz for a device.",
    "unpack": "Unpack and verify a packed bundle.",
    "deploy": "Copy a bundle to a device over SSH and verify it there.",
    "predict": "Classify images with a bundle (no torch needed).",
    "bench": "Measure latency, throughput, cold start and memory of a bundle.",
    "devices": "List the device profiles, or show one.",
    "doctor": "Say what this machine can run and how fast int8 is here.",
    "serve": "Serve a bundle over HTTP: predict API, web page, metrics, hot swap.",
    "learn": "Teach a bundle a new head or new classes on the device (no torch).",
}


class EdgetlGroup(click.Group):
    """Usage errors as one line (``Error: ... (see 'edgetl predict --help')``), exit code 2, and under
    ``--json`` also as a JSON error document on stdout."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            _usage_error(exc, argv)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            from edgetl.cli._common import quiet_broken_pipe

            quiet_broken_pipe()
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _usage_error(exc: click.UsageError, argv: list[str]) -> None:
    from edgetl.cli._common import command_name
    from edgetl.cli._output import clean, emit_json, error_document

    path = exc.ctx.command_path if exc.ctx is not None else "edgetl"
    message = exc.format_message()
    click.echo(f"Error: {clean(message)} (see '{path} --help')", err=True)
    wants_json = (
        "--json" in argv
        or "--format=json" in argv
        or any(a == "--format" and b == "json" for a, b in itertools.pairwise(argv))
    )
    if wants_json:
        emit_json(error_document(command_name(exc.ctx), "UsageError", message, EXIT_USAGE))
    sys.exit(EXIT_USAGE)


@click.group(cls=EdgetlGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetl")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr (also after the command).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only on stderr (also after the command).")
def main(verbose: bool, quiet: bool) -> None:
    """Transfer learning from ImageNet backbones to your images, exported and benchmarked for edge devices.

    \b
    A day with edgetl:
      edgetl data digits --out data/digits           # offline demo data
      edgetl finetune data/digits --out runs/digits  # on the workstation
      edgetl export runs/digits --out bundles/digits
      edgetl info bundles/digits                     # what the bundle holds
      edgetl predict bundles/digits img.png          # on the device (no torch needed)
      edgetl bench bundles/digits
      edgetl deploy bundles/digits pi@raspberrypi.local:bundles/digits --check
      edgetl bench pi@raspberrypi.local:bundles/digits   # on the device, from the workstation

    \b
    Every command that prints results takes --json (one JSON document, docs/json.md) and
    --format table|tsv|json (tab-separated lines when stdout is not a terminal). Exit codes:
    0 done, 1 failed, 2 usage error, 130 interrupted. Shell completion (bash):
      eval "$(_EDGETL_COMPLETE=bash_source edgetl)"     # zsh: zsh_source, fish: fish_source
    """
    setup_logging(verbose, quiet)


def _register() -> None:
    # Each module adds its commands; modules import heavy libraries only inside command bodies.
    import importlib

    modules = (
        "data_cmds",
        "train_cmds",
        "study_cmds",
        "export_cmd",
        "info_cmd",
        "pack_cmds",
        "deploy_cmds",
        "predict_cmd",
        "bench_cmd",
        "device_cmds",
        "fleet_cmds",
        "serve_cmd",
        "learn_cmd",
    )
    for name in modules:
        try:
            module = importlib.import_module(f"edgetl.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgetl.cli.{name}":
                raise
            continue
        for command in module.COMMANDS:
            if command.short_help is None and command.name in SHORT_HELP:
                command.short_help = SHORT_HELP[command.name]
            main.add_command(command)


_register()
