"""The ``edgetl`` command line: a thin layer that parses options, calls one library function, prints."""

from __future__ import annotations

import click

from edgetl import __version__
from edgetl.cli._common import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetl")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def main(verbose: bool) -> None:
    """Transfer learning from ImageNet backbones to your images, exported and benchmarked for edge devices.

    \b
    A day with edgetl:
      edgetl data digits data/digits                 # offline demo data
      edgetl finetune data/digits --out runs/digits  # on the workstation
      edgetl export runs/digits --out bundles/digits
      edgetl predict bundles/digits img.png          # on the device (no torch needed)
      edgetl bench bundles/digits
      edgetl deploy bundles/digits pi@raspberrypi.local:bundles/digits --check
      edgetl bench pi@raspberrypi.local:bundles/digits   # on the device, from the workstation
    """
    setup_logging(verbose)


def _register() -> None:
    # Each module adds its commands; modules import heavy libraries only inside command bodies.
    from edgetl.cli import (
        bench_cmd,
        data_cmds,
        deploy_cmds,
        device_cmds,
        export_cmd,
        pack_cmds,
        predict_cmd,
        study_cmds,
        train_cmds,
    )

    modules = (data_cmds, train_cmds, study_cmds, export_cmd, pack_cmds, deploy_cmds, predict_cmd, bench_cmd)
    for module in (*modules, device_cmds):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
