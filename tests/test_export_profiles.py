"""Export profiles (export/*.yaml): shipped ones are valid, unknown keys fail, options override them."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core import shipped as profiles
from edgetl.core.errors import ConfigError
from edgetl.workstation.export import ExportProfile, check_options, load_profile, resolve_options

SHIPPED = {"default", "onnx-int8", "openvino-int8", "fp32-only", "all"}


def test_shipped_profiles_are_valid_and_documented():
    assert set(profiles.list_shipped("export-profile")) >= SHIPPED
    for name in SHIPPED:
        values, path = load_profile(name)
        assert "description" in profiles.read_yaml(path, "export-profile"), name
        options = check_options(**values)
        assert options.formats and options.precisions


@pytest.mark.parametrize(
    "name, formats, precisions",
    [
        ("default", ("onnx", "openvino"), ("fp32", "int8")),
        ("onnx-int8", ("onnx",), ("int8",)),
        ("openvino-int8", ("openvino",), ("int8",)),
        ("fp32-only", ("onnx", "openvino"), ("fp32",)),
        ("all", ("onnx", "openvino"), ("fp32", "fp16", "bf16", "int8")),
    ],
)
def test_profiles_say_what_they_export(name, formats, precisions):
    options = resolve_options(name)
    assert (options.formats, options.precisions) == (formats, precisions)
    assert options.merged is (name == "all")


def test_options_override_the_profile_and_a_named_format_is_required(monkeypatch):
    options = resolve_options("all", precisions=["fp32"], calib_size=16, max_drop=0.5, merged=False)
    assert (options.precisions, options.calib_size, options.max_drop, options.merged) == (("fp32",), 16, 0.5, False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    # default: everything available -> OpenVINO is left out with a warning; named: it is an error.
    assert resolve_options().formats == ("onnx",)
    with pytest.raises(
        ConfigError,
        match=r"--format openvino needs openvino, which is not installed \(pip install 'edgetl\[openvino\]'\)",
    ):
        resolve_options(formats=["onnx", "openvino"])
    with pytest.raises(ConfigError, match="--format openvino needs openvino"):
        resolve_options("openvino-int8")


def test_profile_files_by_path_with_unknown_keys_and_bad_values(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("description: mine\nformats: onnx\nprecisions: [fp32, fp16]\nmax_drop: 0.25\n")
    assert resolve_options(str(good)) == ExportProfile(("onnx",), ("fp32", "fp16"), 200, 0.25, False, False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("formats: [onnx]\ncalib: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'calib'"):
        resolve_options(str(bad))
    bad.write_text("merged: yes please\n")
    with pytest.raises(ConfigError, match="merged must be true or false"):
        resolve_options(str(bad))
    bad.write_text("calib_size: 0\n")
    with pytest.raises(ConfigError, match="--calib-size must be"):
        resolve_options(str(bad))
    with pytest.raises(ConfigError, match="unknown export-profile 'nope'; choose one of: .*default"):
        resolve_options("nope")


def test_cli_profile_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("precision: [int8]\n")
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--profile", str(bad)]
    )
    assert result.exit_code == 1 and "unknown key 'precision'" in result.stderr and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run")])
    assert result.exit_code == 1 and "export needs --out BUNDLE" in result.stderr
