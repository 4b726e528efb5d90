"""Policy that lives in the library, not the CLI: which options travel to a device, and how a device
profile meets the command line (one function for predict and bench)."""

from __future__ import annotations

import click
from click.testing import CliRunner

from edgetl.cli._common import forwarded_args
from edgetl.cli.bench_cmd import bench
from edgetl.cli.predict_cmd import predict
from edgetl.device.profiles import SETTINGS, load_profile, resolve_settings


def _forwarded(command: click.Command, args: list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """The words forwarded for ``args``, read from a copy of ``command`` whose callback only records."""
    seen: list[list[str]] = []

    @click.pass_context
    def record(ctx, **_):
        seen.append(forwarded_args(ctx, exclude=exclude))

    probe = click.Command(command.name, params=command.params, callback=record)
    result = CliRunner().invoke(probe, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_only_options_given_on_the_command_line_travel():
    words = _forwarded(predict, ["b", "img.png", "--top-k", "3", "--precision", "int8"])
    assert words == ["--precision", "int8", "--top-k", "3"] or sorted(words) == sorted(
        ["--top-k", "3", "--precision", "int8"]
    )
    assert "--runtime" not in words  # a default is the device's own default, not ours


def test_every_bench_option_is_forwarded_without_a_hand_written_list():
    """Each option of `bench` (but SSH and local-only ones) reaches the device when given: a new
    option travels without anyone editing a list."""
    from edgetl.cli._runtime_options import SSH_OPTIONS
    from edgetl.device.remote_bench import LOCAL_BENCH_OPTIONS

    local = {*SSH_OPTIONS, *LOCAL_BENCH_OPTIONS}
    for param in bench.params:
        if not isinstance(param, click.Option) or param.name in local or param.name is None:
            continue
        flag = next(o for o in param.opts if o.startswith("--"))
        if param.is_flag:
            args = [flag]
        elif param.name in ("runtime",):
            args = [flag, "openvino"]
        elif param.name == "precision":
            args = [flag, "int8"]
        elif param.name in ("provider",):
            args = [flag, "cpu"]
        elif param.name in ("ov_device",):
            args = [flag, "CPU"]
        elif param.name in ("device_profile",):
            args = [flag, "rpi5"]
        elif param.name in ("head",):
            args = [flag, "default"]
        else:
            args = [flag, "2"]
        words = _forwarded(bench, ["b", *args], exclude=tuple(local))
        assert words and words[0].split("/")[0] in (flag, *param.secondary_opts), (param.name, words)


def test_switches_say_which_side_and_lists_join():
    words = _forwarded(bench, ["b", "--no-cold-start", "--threads", "1,2"])
    assert "--no-cold-start" in words
    assert words[words.index("--threads") + 1] == "1,2"


def test_device_profile_meets_the_command_line_in_one_place():
    profile = load_profile("rpi5")
    settings = resolve_settings(profile, dict.fromkeys(SETTINGS) | {"threads": 2})
    assert settings.values["threads"] == 2 and settings.source["threads"] == "option"
    assert settings.values["precision"] == "int8" and settings.source["precision"] == "profile"
    assert settings.profile_doc()["overridden"] == ["threads"]
    # An explicit runtime drops the profile's settings for the other runtime.
    ov = resolve_settings("rpi5", dict.fromkeys(SETTINGS) | {"runtime": "openvino"})
    assert ov.runtime == "openvino" and ov.values["provider"] is None
    assert resolve_settings(None, dict.fromkeys(SETTINGS)).runtime == "onnxruntime"


def test_predict_load_options_go_over_the_device_profile():
    """`predict --device-profile` in the library: options given win, the profile fills the rest."""
    from edgetl.device.bundle_loading import LoadOptions
    from edgetl.device.profiles import apply_profile

    o = apply_profile("rpi5", LoadOptions(threads=2, heads="all"))
    # rpi5's runtimes in order of preference: Bundle.load picks the first the bundle and machine have.
    assert (o.runtime, o.precision, o.threads, o.provider, o.heads) == (
        ("litert", "ncnn", "onnxruntime"),
        "int8",
        2,
        "cpu",
        "all",
    )
    assert apply_profile(None, LoadOptions()) == LoadOptions(runtime="onnxruntime")
    # The profile's ONNX Runtime provider is dropped when --runtime openvino is given.
    assert apply_profile("rpi5", LoadOptions(runtime="openvino")).provider is None
