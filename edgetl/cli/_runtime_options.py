"""Options that `edgetl predict`, `edgetl serve` and `edgetl bench` share (defaults are the library's, see
edgetl.device.profiles); this module imports click and the format table only, so `--help` stays fast."""

from __future__ import annotations

import click

from edgetl.cli._common import renamed_option
from edgetl.core.formats import DEFAULT_RUNTIME, PRECISIONS
from edgetl.core.formats import RUNTIMES as _RUNTIMES
from edgetl.device.limits import MAX_THREADS

# From the format table (edgetl.core.formats imports nothing, so `--help` stays fast).
RUNTIMES = tuple(_RUNTIMES)
# How to reach the device: used here, never forwarded to the edgetl that runs there.
SSH_OPTIONS = ("identity", "ssh_config", "remote_edgetl")

runtime_option = click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default=None,
    help=f"Inference library; the bundle must hold files for it. Default: the profile's, else {DEFAULT_RUNTIME}.",
)
# One variant's precision (predict, serve; bench takes a list).
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Variant precision. Default: the profile's, else fp32 if the bundle has it.",
)
threads_option = click.option(
    "--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="Intra-op threads (default: the runtime's)."
)
head_option = click.option(
    "--head",
    default=None,
    metavar="NAME|all",
    help="Head (task) to run; `all` runs every head on one trunk pass. Default: the bundle's default head.",
)
provider_option = click.option(
    "--provider",
    default=None,
    metavar="NAME",
    help="ONNX Runtime execution provider: cpu (default), cuda, tensorrt, openvino, coreml, xnnpack ... "
    "(`edgetl doctor` lists the installed ones).",
)


def ov_device_option(func):
    """``--openvino-device`` (was ``--ov-device``, still accepted with a warning)."""
    func = renamed_option("--ov-device", "ov_device", "--openvino-device")(func)
    return click.option(
        "--openvino-device",
        "ov_device",
        default=None,
        metavar="DEVICE",
        help="OpenVINO device: CPU (default), GPU, NPU, AUTO (with --runtime openvino, or --provider openvino).",
    )(func)


profile_option = click.option(
    "--device-profile",
    default=None,
    metavar="NAME|PATH",
    help="Apply a device profile (`edgetl devices`); options given here win over its values.",
)
