"""Device profiles (devices/*.yaml): schema, matching, merging with options, `edgetl devices`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.errors import ConfigError
from edgetl.core.shipped import list_shipped
from edgetl.device.profiles import (
    DeviceProfile,
    best_fit,
    fit,
    list_profiles,
    load_profile,
    merge_settings,
    profile_from_dict,
)
from tests.schemas import validate_document

REQUIRED = {"rpi4", "rpi5", "intel-nuc", "x86-server", "jetson-orin-nano"}

# What doctor would report on each board (as its /proc files and runtimes say).
MACHINES = {
    "rpi4": {
        "arch": "aarch64",
        "cpu": "Raspberry Pi 4 Model B Rev 1.5",
        "board": "Raspberry Pi 4 Model B Rev 1.5",
        "cpu_cores": ["4x Cortex-A72"],
        "isa": ["asimd"],
        "providers": ["cpu"],
        "ov_devices": [],
    },
    "rpi5": {
        "arch": "aarch64",
        "cpu": "Raspberry Pi 5 Model B Rev 1.0",
        "board": "Raspberry Pi 5 Model B Rev 1.0",
        "cpu_cores": ["4x Cortex-A76"],
        "isa": ["asimd", "asimdhp", "asimddp"],
        "providers": ["cpu"],
        "ov_devices": [],
    },
    "jetson-orin-nano": {
        "arch": "aarch64",
        "cpu": "NVIDIA Jetson Orin Nano Developer Kit",
        "board": "NVIDIA Jetson Orin Nano Developer Kit",
        "cpu_cores": ["6x Cortex-A78AE"],
        "isa": ["asimd", "asimddp"],
        "providers": ["tensorrt", "cuda", "cpu"],
        "ov_devices": [],
    },
    "intel-nuc": {
        "arch": "x86_64",
        "cpu": "13th Gen Intel(R) Core(TM) i7-1360P",
        "board": None,
        "cpu_cores": [],
        "isa": ["avx2", "fma", "avx_vnni"],
        "providers": ["cpu"],
        "ov_devices": ["CPU", "GPU"],
    },
    "x86-server": {
        "arch": "x86_64",
        "cpu": "Intel(R) Xeon(R) Platinum 8480+",
        "board": None,
        "cpu_cores": [],
        "isa": ["avx2", "avx512f", "avx512_vnni", "amx_int8"],
        "providers": ["cpu"],
        "ov_devices": ["CPU"],
    },
}


def test_shipped_profiles_cover_the_issue_and_load():
    assert set(list_shipped("device-profile")) >= REQUIRED
    for p in list_profiles():
        assert p.description and p.hardware and p.notes.strip(), p.name
        assert p.runtimes and set(p.runtimes) <= {"onnxruntime", "openvino", "litert", "ncnn"}
        assert p.match.arch, f"{p.name} must say which architecture it is for"
        assert p.settings()["batch_size"] >= 1


@pytest.mark.parametrize("board", sorted(MACHINES))
def test_each_board_is_recognised_as_its_profile(board):
    fits = best_fit(MACHINES[board])
    assert fits and fits[0].profile == board, [f.to_dict() for f in fits]
    assert not fits[0].missing


def test_fallback_and_requirements():
    desktop = {"arch": "x86_64", "cpu": "AMD Ryzen 7 5800X", "isa": ["avx2"], "providers": ["cpu"], "ov_devices": []}
    fits = best_fit(desktop)
    assert [f.profile for f in fits] == ["x86-server"] and "fallback" in fits[0].reasons[-1]
    unknown_arm = {"arch": "aarch64", "cpu": "Some SoC", "cpu_cores": ["4x Cortex-A53"], "isa": ["asimd"]}
    assert best_fit(unknown_arm) == []
    # A Pi 5 board string with a CPU that lacks dot product does not fit rpi5 (isa is required).
    no_dot = dict(MACHINES["rpi5"], isa=["asimd"])
    assert "rpi5" not in [f.profile for f in best_fit(no_dot)]
    # A NUC without the GPU runtime still fits intel-nuc, and says what is missing.
    nuc = fit(load_profile("intel-nuc"), dict(MACHINES["intel-nuc"], ov_devices=["CPU"]))
    assert nuc is not None and nuc.missing == ("OpenVINO device GPU",)


def test_profile_by_path_and_unknown_keys(tmp_path):
    path = tmp_path / "my-board.yaml"
    path.write_text("description: mine\nthreads: 2\nmatch:\n  arch: aarch64\n")
    p = load_profile(str(path))
    assert (p.name, p.threads, p.match.arch, p.path) == ("my-board", 2, ("aarch64",), str(path))
    path.write_text("description: mine\nthread: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'thread'.*valid keys:.*threads"):
        load_profile(str(path))
    path.write_text("description: mine\nmatch:\n  boards: [x]\n")
    with pytest.raises(ConfigError, match=r"match: unknown key 'boards'"):
        load_profile(str(path))
    with pytest.raises(ConfigError, match=r"unknown device-profile 'rpi9'; choose one of: .*rpi5"):
        load_profile("rpi9")


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "'description' is required"),
        ({"description": "x", "runtime": "tflite"}, "runtime 'tflite' is not one of"),
        ({"description": "x", "precision": "int4"}, "precision 'int4' is not one of"),
        ({"description": "x", "threads": 0}, "threads must be an integer >= 1"),
        ({"description": "x", "batch_size": "8"}, "batch_size must be an integer"),
        ({"description": "x", "streams": 2}, "ov_device and streams apply to runtime openvino"),
        ({"description": "x", "runtime": "openvino", "provider": "cuda"}, "provider and provider_options apply"),
        ({"description": "x", "name": "y"}, "'name' is not a profile key"),
        ({"description": "x", "runtime": []}, "runtime must name at least one runtime"),
        ({"description": "x", "runtime": ["litert", "tflite"]}, "runtime 'tflite' is not one of"),
        ({"description": "x", "runtime": ["litert", 3]}, "runtime must be a string or a list of strings"),
        ({"description": "x", "runtime": ["litert", "ncnn"], "provider": "cuda"}, "provider and provider_options"),
        ({"description": "x", "match": {"cpu": "("}}, "is not a regular expression"),
    ],
)
def test_invalid_profiles(data, message):
    with pytest.raises(ConfigError, match=message):
        profile_from_dict(data, name="t")


def test_merge_settings_options_win_and_sources_are_recorded():
    p = load_profile("rpi5")
    merged, source = merge_settings(p, {"threads": 2, "precision": None})
    assert merged["threads"] == 2 and source["threads"] == "option"
    assert merged["precision"] == "int8" and source["precision"] == "profile"
    nuc = load_profile("intel-nuc")
    merged, source = merge_settings(nuc, {"runtime": "onnxruntime"})
    # The profile's OpenVINO settings do not leak into an ONNX Runtime run.
    assert merged["runtime"] == "onnxruntime" and merged["ov_device"] is None and merged["streams"] is None
    assert "ov_device" not in source
    merged, source = merge_settings(None, {})
    assert all(v is None for v in merged.values()) and source == {}


def test_profile_settings_and_dict():
    p = load_profile("jetson-orin-nano")
    assert p.settings()["provider"] == "tensorrt" and p.settings()["provider_options"]["trt_fp16_enable"] is True
    d = p.to_dict()
    json.dumps(d)
    assert d["match"]["providers"] == ["tensorrt", "cuda"]
    assert isinstance(p, DeviceProfile)


def test_cli_devices_list_show_and_json(tmp_path):
    runner = CliRunner()
    listing = runner.invoke(main, ["devices"])  # in a pipe: a header and one tab-separated line per profile
    assert listing.exit_code == 0, listing.output
    rows = [line.split("\t") for line in listing.stdout.splitlines()]
    assert rows[0] == ["name", "device", "settings"] and {len(r) for r in rows} == {3}
    assert {r[0] for r in rows[1:]} == {p.name for p in list_profiles()} >= REQUIRED
    table = runner.invoke(main, ["devices", "--format", "table"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "Device profiles" in table.stdout
    for name in REQUIRED:
        assert name in table.stdout
    shown = runner.invoke(main, ["devices", "rpi4", "--format", "table"])
    assert shown.exit_code == 0 and "Cortex-A72" in shown.stdout
    assert "litert/cpu or ncnn/cpu or onnxruntime/cpu, 4 threads" in shown.stdout
    shown_tsv = runner.invoke(main, ["devices", "rpi4"])
    pairs = [line.split("\t") for line in shown_tsv.stdout.splitlines()]
    assert pairs[0] == ["key", "value"] and {len(p) for p in pairs} == {2}
    assert ["settings", "litert/cpu or ncnn/cpu or onnxruntime/cpu, 4 threads, fp32, batch 1"] in pairs
    assert pairs[-1][0] == "notes"
    doc = validate_document(runner.invoke(main, ["devices", "--json"]).stdout, "devices")
    assert {p["name"] for p in doc["results"]} >= REQUIRED
    one = validate_document(runner.invoke(main, ["devices", "x86-server", "--json"]).stdout, "devices")
    assert len(one["results"]) == 1  # still a list, of one
    assert one["results"][0]["name"] == "x86-server" and one["results"][0]["match"]["fallback"] is True
    help_ = runner.invoke(main, ["devices", "--help"])
    assert "Example:" in help_.output


def test_cli_devices_errors_and_untrusted_text(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["devices", "nope"])
    assert bad.exit_code == 2 and bad.stderr.startswith("Error: unknown device-profile 'nope'") and bad.stdout == ""
    bad_json = runner.invoke(main, ["devices", "nope", "--json"])
    assert bad_json.exit_code == 2
    assert validate_document(bad_json.stdout, "devices")["error"]["type"] == "ConfigError"
    path = tmp_path / "odd.yaml"
    path.write_text('description: "tab\\there, \\e[31mred\\e[0m"\nnotes: "two\\nlines"\n')
    tsv = runner.invoke(main, ["devices", str(path)])
    assert tsv.exit_code == 0, tsv.output
    assert ["description", "tab\\there, \\x1b[31mred\\x1b[0m"] in [line.split("\t") for line in tsv.stdout.splitlines()]
    table = runner.invoke(main, ["devices", str(path), "--format", "table"])
    assert table.exit_code == 0 and "odd: tab\\x09here, \\x1b[31mred\\x1b[0m" in table.stdout
    assert "\x1b" not in table.stdout


def test_pi_profiles_prefer_litert_then_ncnn_then_onnxruntime(tmp_path):
    """rpi4/rpi5 name their runtimes in order of preference: the first this machine has installed
    and the bundle holds is used; an ONNX-only bundle still runs with ONNX Runtime."""
    from edgetl.core.errors import BackendError
    from edgetl.device.bundle_loading import open_bundle
    from tests.bundle_factory import build_bundle

    for name in ("rpi4", "rpi5"):
        assert load_profile(name).runtimes == ("litert", "ncnn", "onnxruntime")
    bundle = open_bundle(build_bundle(tmp_path / "b"))  # onnx fp32 + int8 only
    assert bundle.pick_runtime(("litert", "ncnn", "onnxruntime")) == "onnxruntime"
    assert bundle.pick_runtime(("openvino", "onnxruntime"), "int8") == "onnxruntime"
    with pytest.raises(BackendError, match=r"none of the runtimes litert, ncnn can run .*litert: the bundle has no"):
        bundle.pick_runtime(("litert", "ncnn"))
    predictor = bundle.load(runtime=("litert", "ncnn", "onnxruntime"), precision="int8", provider="cpu")
    assert predictor.runtime == "onnxruntime" and predictor.precision == "int8"
    # predict with the profile: ONNX Runtime for this bundle, and the JSON says the profile chose it.
    result = CliRunner().invoke(
        main, ["predict", str(bundle.path), str(_one_image(tmp_path)), "--device-profile", "rpi4", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["runtime"] == "onnxruntime" and doc["device_profile"]["applied"]["runtime"] == [
        "litert",
        "ncnn",
        "onnxruntime",
    ]


def _one_image(tmp_path):
    from PIL import Image

    path = tmp_path / "one.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    return path
