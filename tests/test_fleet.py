"""Groups of named devices (@GROUP) and the Ansible playbook, against two real loopback sshd.

The "lab" group holds two devices: ``a-up`` (the module's sshd of tests/test_deploy.py) and
``b-down`` (a second sshd, stopped before each test): every command must give one result and one
failure, in the devices' order, and exit 1. No mocked ssh: edgetl runs the system ssh, and the
"devices" run this venv's edgetl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from edgetl.cli.group_cmds import doctor as doctor_cmd
from edgetl.core.errors import ConfigError
from edgetl.device.fleet import (
    bench_group,
    check_parallel,
    deploy_group,
    doctor_group,
    failures,
    group_devices,
    parse_group_target,
)
from edgetl.device.inventory import Device, get_device, save_device
from tests import test_deploy
from tests.bundle_factory import build_bundle
from tests.schemas import validate_document
from tests.sshd import LoopbackSSHD

sshd = test_deploy.sshd  # a real OpenSSH server on loopback (skips without one, unless EDGETL_REQUIRE_SSHD=1)
DEVICE_EDGETL = str(Path(sys.executable).parent / "edgetl")  # this venv's edgetl, run "on the device"
FAST = ["--precision", "fp32", "--warmup", "0", "--iterations", "3", "--no-cold-start"]
PLAYBOOK = Path(__file__).resolve().parents[1] / "deploy" / "ansible" / "edgetl.yml"


def _wired() -> bool:
    """Whether deploy/bench take @GROUP and `edgetl device doctor` exists (the lead's wiring)."""
    from edgetl.cli import main

    device = main.commands.get("device")
    deploy = main.commands.get("deploy")
    return (
        isinstance(device, click.Group)
        and "doctor" in device.commands
        and deploy is not None
        and any(p.name == "parallel" for p in deploy.params)
    )


wired = pytest.mark.skipif(not _wired(), reason="@GROUP is not wired into deploy/bench/device yet")


@pytest.fixture
def lab(sshd, tmp_path, monkeypatch):
    """An inventory in $EDGETL_CONFIG_HOME with the group lab: a-up (running) and b-down (stopped)."""
    other = LoopbackSSHD(tmp_path / "sshd2").start()
    home = tmp_path / "config"
    monkeypatch.setenv("EDGETL_CONFIG_HOME", str(home))
    try:
        for name, server in (("a-up", sshd), ("b-down", other)):
            save_device(
                Device(
                    name=name,
                    target=f"ssh://{server.user}@127.0.0.1:{server.port}",
                    ssh_config=str(server.config),
                    remote_edgetl=DEVICE_EDGETL,
                    bundles_dir=str(tmp_path / f"{name}-bundles"),
                    groups=["lab"],
                )
            )
        other.stop()
        yield SimpleNamespace(up=sshd, down=other, root=tmp_path, home=home, bundle=build_bundle(tmp_path / "colours"))
    finally:
        other.stop()


def _one_ok_one_failed(records: list[dict], down_port: int) -> None:
    assert [r["device"] for r in records] == ["a-up", "b-down"]
    assert [r["ok"] for r in records] == [True, False]
    assert records[0]["error"] is None
    error = records[1]["error"]["message"]
    assert "\n" not in error and error


# --- targets and options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("@lab", ("@lab", None)), ("@lab:bundles/digits", ("@lab", "bundles/digits")), ("@all", ("@all", None))],
)
def test_parse_group_target(text, expected):
    assert parse_group_target(text) == expected


@pytest.mark.parametrize("text, message", [("lab", "not a group target"), ("@lab:", "empty bundle path")])
def test_parse_group_target_refuses(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_group_target(text)


def test_parallel_is_bounded():
    assert check_parallel(1) == 1
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="--parallel must be from 1 to 64"):
            check_parallel(bad)


def test_unknown_group_names_the_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_CONFIG_HOME", str(tmp_path))
    save_device(Device(name="pi4", target="pi@192.0.2.10", groups=["lab"]))
    with pytest.raises(ConfigError, match=r"no device in group 'line_2'.*groups: lab"):
        group_devices("@line_2")


# --- the library: deploy, bench, doctor on a group with one device down --------------------------------


def test_deploy_bench_doctor_on_a_group_with_one_device_down(lab):
    devices, _ = group_devices("@lab")
    seen = []
    records = deploy_group(lab.bundle, devices, check=True, on_done=lambda r: seen.append(r["device"]))
    _one_ok_one_failed(records, lab.down.port)
    assert sorted(seen) == ["a-up", "b-down"]  # each device told as it finished
    up = records[0]["deploy"]
    assert up["path"] == str(lab.root / "a-up-bundles" / "colours") and up["check"]["ok"]
    assert (lab.root / "a-up-bundles" / "colours" / "manifest.json").is_file()
    assert records[1]["deploy"] is None and f"127.0.0.1:{lab.down.port}" in records[1]["error"]["message"]
    assert get_device("a-up").last_bundle == up["path"]  # bench @lab finds it
    assert get_device("b-down").last_bundle is None
    assert failures(records) == "1 of 2 devices failed: b-down (each device's error is in its row)"

    records, benches = bench_group(group_devices("@lab")[0], FAST)
    _one_ok_one_failed(records, lab.down.port)
    assert records[0]["results"] and records[0]["results"][0]["precision"] == "fp32"
    assert benches[0] is not None and benches[1] is None
    assert "no bundle has been deployed to b-down" in records[1]["error"]["message"]
    assert records[1]["error"]["type"] == "ConfigError"

    # @GROUP:PATH: the same path on every device; the stopped one fails on the connection.
    records, _ = bench_group(devices, FAST, path=up["path"], parallel=1)
    _one_ok_one_failed(records, lab.down.port)
    assert records[1]["error"]["type"] == "RemoteError"
    assert f"127.0.0.1:{lab.down.port}" in records[1]["error"]["message"]

    records = doctor_group(devices)
    _one_ok_one_failed(records, lab.down.port)
    summary = records[0]["summary"]
    assert summary["arch"] and summary["runtimes"]["onnxruntime"] and summary["int8"]
    assert get_device("a-up").facts["arch"] == summary["arch"]  # recorded, as device add --check does
    assert get_device("b-down").facts == {}


def test_devices_run_in_parallel(lab, monkeypatch):
    """Two devices that each take 1 s take about 1 s with --parallel 2, 2 s with --parallel 1."""
    import edgetl.device.fleet as fleet

    def slow(remote, args):
        time.sleep(1.0)
        raise ConfigError("slow device")

    monkeypatch.setattr(fleet, "bench_one", slow)
    devices = group_devices("@lab")[0]
    start = time.monotonic()
    records, _ = bench_group(devices, FAST, path="x", parallel=2)
    both = time.monotonic() - start
    start = time.monotonic()
    bench_group(devices, FAST, path="x", parallel=1)
    one_by_one = time.monotonic() - start
    assert [r["error"]["message"] for r in records] == ["slow device", "slow device"]
    assert both < 1.8 <= one_by_one


# --- edgetl device doctor (runs without the lead's wiring: its own root group) ---------------------------


def _doctor_cli(*args):
    root = click.Group("edgetl", commands={"device": click.Group("device", commands={"doctor": doctor_cmd})})
    return CliRunner().invoke(root, ["device", "doctor", *map(str, args)])


def test_device_doctor_command(lab):
    r = _doctor_cli("@lab", "--json")
    assert r.exit_code == 1, r.output
    doc = validate_document(r.stdout, "device.doctor")
    assert doc["partial"] is True and doc["failed"] == 1 and doc["group"] == "@lab"
    assert doc["error"]["message"].startswith("1 of 2 devices failed: b-down")
    _one_ok_one_failed(doc["results"], lab.down.port)
    assert r.stderr.count("Error:") == 1 and "Traceback" not in r.stderr

    r = _doctor_cli("a-up", "--json", "--no-record")
    assert r.exit_code == 0, r.output
    doc = validate_document(r.stdout, "device.doctor")
    assert doc["group"] is None and [x["device"] for x in doc["results"]] == ["a-up"]

    r = _doctor_cli("@lab", "--format", "tsv", "--parallel", "1")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["device", "status", "arch", "cpu", "profile", "runtimes", "int8", "edgetl", "error"]
    assert [line.split("\t")[:2] for line in lines[1:]] == [["a-up", "ok"], ["b-down", "failed"]]
    assert "[2/2]" in r.stderr  # one progress line per device, on stderr

    for args, code, message in (
        (["@nothing"], 2, "no device in group 'nothing'"),
        (["ghost"], 2, "no device named 'ghost'"),
        (["@lab:x"], 2, "without a path"),
        (["@lab", "--parallel", "0"], 2, "--parallel"),
    ):
        r = _doctor_cli(*args)
        assert r.exit_code == code and message in r.stderr, (args, r.output)


# --- deploy BUNDLE @GROUP and bench @GROUP (the lead's wiring) -----------------------------------------


def _cli(*args):
    from edgetl.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@wired
def test_cli_group_deploy_and_bench(lab):
    r = _cli("deploy", lab.bundle, "@lab", "--check", "--json")
    assert r.exit_code == 1, r.output
    doc = validate_document(r.stdout, "deploy.group")
    _one_ok_one_failed(doc["results"], lab.down.port)
    assert doc["bundle"] == str(lab.bundle) and doc["failed"] == 1 and doc["partial"] is True
    assert doc["results"][0]["deploy"]["check"]["ok"]

    r = _cli("deploy", lab.bundle, "@lab", "--format", "tsv", "--parallel", "2")
    assert r.exit_code == 1
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert rows[0] == ["device", "status", "where", "path", "files", "bytes", "seconds", "check", "error"]
    assert [row[:2] for row in rows[1:]] == [["a-up", "ok"], ["b-down", "failed"]]
    assert "Error: 1 of 2 devices failed: b-down" in r.stderr

    r = _cli("bench", "@lab", *FAST, "--json")
    assert r.exit_code == 1, r.output
    doc = validate_document(r.stdout, "bench.group")
    _one_ok_one_failed(doc["results"], lab.down.port)
    assert doc["results"][0]["results"][0]["bundle"] == str(lab.root / "a-up-bundles" / "colours")

    r = _cli("bench", "--target", "@lab", *FAST, "--format", "tsv")
    assert r.exit_code == 1
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert rows[0] == ["device", "status", "variant", "p50_ms", "throughput_ips", "edgetl", "error"]
    assert rows[1][:2] == ["a-up", "ok"] and float(rows[1][3]) > 0
    assert rows[-1][:2] == ["b-down", "failed"] and "no bundle has been deployed" in rows[-1][-1]

    # Usage errors: a group goes alone; --parallel only with a group.
    r = _cli("bench", "@lab", "--target", "a-up", *FAST)
    assert r.exit_code == 2 and "benched alone" in r.stderr
    r = _cli("deploy", lab.bundle, "a-up", "--parallel", "2")
    assert r.exit_code == 2 and "--parallel is for a group" in r.stderr


# --- the Ansible playbook -------------------------------------------------------------------------------


def _ansible_playbook() -> str:
    found = shutil.which("ansible-playbook") or shutil.which("ansible-playbook", path=str(Path(sys.executable).parent))
    if found is None:
        message = "ansible-playbook is not installed (pip install ansible-core)"
        if os.environ.get("EDGETL_REQUIRE_ANSIBLE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@wired
def test_ansible_playbook_on_the_lab(lab):
    """export-ansible, then the shipped playbook (without its setup step) on both devices: a-up gets
    doctor, deploy and bench results; b-down fails in Ansible's recap (exit 2)."""
    playbook = _ansible_playbook()
    fleet = lab.root / "fleet.yaml"
    r = _cli("device", "export-ansible", "--out", fleet)
    assert r.exit_code == 0, r.output
    results = lab.root / "results"
    extra = {
        "edgetl": DEVICE_EDGETL,
        "edgetl_bundle": str(lab.bundle),
        "edgetl_bench_args": FAST,
        "edgetl_results": str(results),
    }
    env = {
        **os.environ,
        "ANSIBLE_LOCAL_TEMP": str(lab.root / "ansible-tmp"),
        "ANSIBLE_HOME": str(lab.root / "ansible-home"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
    }
    proc = subprocess.run(
        [playbook, "-i", str(fleet), str(PLAYBOOK), "--skip-tags", "setup", "-e", json.dumps(extra)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out  # a host failed
    recap = {line.split()[0]: line for line in out.split("PLAY RECAP")[-1].splitlines() if ":" in line}
    assert "failed=0" in recap["a-up"] and "unreachable=0" in recap["a-up"], out
    assert "failed=1" in recap["b-down"], out
    validate_document((results / "a-up.doctor.json").read_text(), "device.doctor")
    deploy = validate_document((results / "a-up.deploy.json").read_text(), "deploy")
    assert deploy["results"][0]["check"]["ok"]
    bench = validate_document((results / "a-up.bench.json").read_text(), "bench")
    assert bench["results"][0]["precision"] == "fp32"
    assert not list(results.glob("b-down.*"))


def test_ansible_playbook_setup_step_calls_edgetl_device_setup(lab):
    """The setup step (not run above: it installs edgetl) calls `edgetl device setup` on the control
    machine with each host's ssh destination, its name and its ssh config; here edgetl is a stub
    that records its arguments and answers as an up-to-date device would."""
    playbook = _ansible_playbook()
    fleet = lab.root / "fleet.yaml"
    r = _cli("device", "export-ansible", "--out", fleet)
    assert r.exit_code == 0, r.output
    calls = lab.root / "calls"
    calls.mkdir()
    stub = lab.root / "edgetl-stub"
    stub.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$CALLS/$$"\necho \'{"results": [{"action": "unchanged"}]}\'\n')
    stub.chmod(0o755)
    extra = {"edgetl": str(stub), "edgetl_results": str(lab.root / "results"), "edgetl_extras": "litert"}
    proc = subprocess.run(
        [playbook, "-i", str(fleet), str(PLAYBOOK), "--tags", "setup", "-e", json.dumps(extra)],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "CALLS": str(calls),
            "ANSIBLE_LOCAL_TEMP": str(lab.root / "ansible-tmp"),
            "ANSIBLE_HOME": str(lab.root / "ansible-home"),
            "ANSIBLE_NOCOLOR": "1",
        },
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argvs = sorted(p.read_text().splitlines() for p in calls.iterdir())
    expected = [
        [
            "device",
            "setup",
            f"ssh://{server.user}@127.0.0.1:{server.port}",
            "--name",
            name,
            "--json",
            "--extras",
            "litert",
            "--ssh-config",
            str(server.config),
        ]
        for name, server in (("a-up", lab.up), ("b-down", lab.down))
    ]
    assert argvs == sorted(expected)
    setup_task = proc.stdout.split("TASK [Install this edgetl")[1].split("TASK [")[0]
    assert "ok: [a-up -> localhost]" in setup_task  # "unchanged" is not a change
