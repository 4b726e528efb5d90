"""The real path: ImageNet MobileNetV2 on the digits data, finetune -> export -> predict -> bench.

Slow (a few minutes on 2 CPU cores); CI runs it. The quality bars are docs/design.md's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main

pytestmark = pytest.mark.slow

COMMON = ["--img-size", "96", "--seed", "0", "--val-split", "0.2", "--no-progress", "--json"]


def edgetl(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return edgetl("data", "digits", "--out", tmp_path_factory.mktemp("data") / "digits", "--json")["results"][0]["path"]


@pytest.fixture(scope="module")
def fine_tuned(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ft"
    return edgetl(
        "finetune", digits, "--out", out, "--strategy", "fine-tune", "--unfreeze", "3", "--epochs", "3", *COMMON
    )["results"][0]


@pytest.fixture(scope="module")
def bundle(fine_tuned, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "digits"
    return edgetl("export", fine_tuned["run_dir"], "--out", out, "--json")


def test_feature_extraction_meets_the_demo_bar(digits, tmp_path):
    doc = edgetl("finetune", digits, "--out", tmp_path / "fe", "--epochs", "10", *COMMON)["results"][0]
    assert doc["backbone"] == "mobilenet_v2" and doc["pretrained"] is True
    assert doc["val_top1"] >= 0.93, doc


def test_fine_tune_meets_the_demo_bar(fine_tuned):
    assert fine_tuned["val_top1"] >= 0.96, fine_tuned


def test_export_parity_and_int8_drop(bundle, fine_tuned):
    variants = {r["name"]: r for r in bundle["results"]}
    fp32, int8 = variants["onnx-fp32"], variants["onnx-int8"]
    assert fp32["max_abs_diff"] <= 1e-3 and fp32["top1_agreement"] == 1.0
    assert abs(fp32["val_top1"] - fine_tuned["val_top1"]) < 1e-9
    assert fp32["val_top1"] - int8["val_top1"] <= 0.01 + 1e-9
    assert int8["bytes"] < fp32["bytes"] / 2


def _entry_point() -> str:
    return str(Path(sys.executable).with_name("edgetl"))


def test_predict_and_bench_through_the_installed_entry_point(bundle, digits):
    image = sorted(Path(digits, "7").glob("*.png"))[0]
    out = subprocess.run(
        [_entry_point(), "predict", bundle["bundle"], str(image), "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["label"] == "7"
    out = subprocess.run(
        [_entry_point(), "bench", bundle["bundle"], "--precision", "int8", "--iterations", "20", "--json"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)["results"][0]
    assert doc["precision"] == "int8" and doc["latency_ms"]["p50"] > 0


def test_serve_page_classifies_a_digit(bundle, digits, tmp_path):
    """The trained digits bundle behind `edgetl serve`, its page in a real browser (Debian's chromium
    driven by Playwright, as tests/test_serve_page.py): type the token, upload a 7, see "7" appear."""
    from tests.test_serve import Server
    from tests.test_serve_page import _require_serve_extra, chromium

    _require_serve_extra()
    image = sorted(Path(digits, "7").glob("*.png"))[0]  # the image the test above predicts as "7"
    token = "digits-page-token-0123456789abcdef"
    (tmp_path / "token").write_text(token)
    with Server(Path(bundle["bundle"]), "--token-file", str(tmp_path / "token")) as server, chromium() as browser:
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.goto(server.url + "/")
        page.fill("#token", token)
        page.wait_for_function("() => document.querySelectorAll('#head option').length >= 1")
        page.set_input_files("#file", str(image))
        page.wait_for_function("() => { const e = document.querySelector('#result li .label'); return !!e; }")
        label = page.locator("#result li").first.locator(".label").text_content()
        latency = page.locator("#latency").text_content()
    assert label == "7" and "inference" in latency, (label, latency)
    assert server.proc.returncode == 0, server.stderr()


def test_evaluate_bundle_matches_export_figures(bundle, digits):
    report = edgetl("evaluate", bundle["bundle"], digits, "--precision", "int8", "--json")
    [rec] = report["results"]
    # the bundle records its training images: they are left out, the validation images are scored
    assert rec["n"] + rec["excluded_train"] == 1797 and rec["excluded_train"] > 1000 and rec["top1"] > 0.9


def test_tampered_bundle_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle["bundle"], copy)
    head = next((copy / "onnx").glob("head.*.onnx"))
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["predict", str(copy), str(next(Path(bundle["bundle"]).rglob("*.onnx")))])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert head.name in result.stderr and "sha256" in result.stderr


def test_runtime_only_install_has_no_torch(bundle, digits, tmp_path):
    """`pip install .` (no extras) in a fresh venv: predict and bench run, torch is not there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(root)], capture_output=True, text=True, env=env
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert check.stdout.strip() == "True", "torch got installed by the runtime-only install"
    image = sorted(Path(digits, "3").glob("*.png"))[0]
    exe = str(venv / "bin" / "edgetl")
    out = subprocess.run(
        [exe, "predict", bundle["bundle"], str(image), "--json"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["label"] == "3"
    out = subprocess.run(
        [exe, "bench", bundle["bundle"], "--iterations", "10", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
