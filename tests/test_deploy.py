"""`edgetl deploy`, and bench/predict on a device, against a real OpenSSH server on loopback.

No mocked SSH: tests/sshd.py starts Debian's sshd with a throwaway host key; the "device" is
this machine, reached as ``edgetl-device`` through a client config that holds exactly that key.
The device runs edgetl as ``python -m edgetl`` (--remote-edgetl), as a user with a venv would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.core.bundle import read_manifest, sha256_file, verify_files
from edgetl.core.errors import ConfigError
from edgetl.device.deploy import check_fit
from edgetl.device.remote import Remote, is_remote, parse_target
from edgetl.device.remote_bench import fingerprint
from tests.bundle_factory import COLOURS, build_bundle
from tests.schemas import validate_document
from tests.sshd import ALIAS, LoopbackSSHD, keygen, require_sshd

REMOTE_EDGETL = f"{sys.executable} -m edgetl"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    require_sshd()
    server = LoopbackSSHD(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def ssh_args(server: LoopbackSSHD, config: Path | None = None) -> list[str]:
    return ["--ssh-config", str(config or server.config), "--remote-edgetl", REMOTE_EDGETL]


def _left_beside(dest: Path) -> list[str]:
    """What is in ``dest``'s folder (no temporary folder or output lock may be left)."""
    return sorted(p.name for p in dest.parent.iterdir())


def deploy(server, bundle: Path, dest: Path, *extra: str, config: Path | None = None):
    return cli("deploy", str(bundle), f"{ALIAS}:{dest}", *ssh_args(server, config), "--json", *extra)


# --- targets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pi@raspberrypi.local:/home/pi/b", ("raspberrypi.local", "/home/pi/b", "pi", None)),
        ("pi@rpi:bundles/digits", ("rpi", "bundles/digits", "pi", None)),
        ("rpi:~/bundles/digits/", ("rpi", "bundles/digits", None, None)),
        ("ssh://me@nuc:2222/opt/models/d", ("nuc", "/opt/models/d", "me", 2222)),
        ("ssh://nuc/~/models/d", ("nuc", "models/d", None, None)),
        ("ssh://root@[::1]:22/tmp/b", ("[::1]", "/tmp/b", "root", 22)),
        ("pi@[fe80::1]:b", ("[fe80::1]", "b", "pi", None)),
    ],
)
def test_parse_target(text, expected):
    t = parse_target(text)
    assert (t.host, t.path, t.user, t.port) == expected
    assert parse_target(str(t)) == t  # the canonical form reads back the same


@pytest.mark.parametrize(
    "text, message",
    [
        ("pi@rpi:", "bundle's own folder"),
        ("ssh://rpi", "no bundle path"),
        ("ssh://rpi:99999/b", "port"),
        ("ssh://rpi:x/b", "port"),
        ("-oProxyCommand=evil:b", "not a host"),
        ("ssh://-oProxyCommand=x/b", "not a host"),
        ("bad user@rpi:b", "not a device target"),
        ("rpi:/", "bundle's own folder"),
        ("rpi:b\nrm -rf", "control characters"),
        ("file:///tmp/deployed", "file:// URL, which edgetl does not copy to"),
        ("https://host/b", "https:// URL"),
    ],
)
def test_parse_target_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_target(text)


def test_is_remote_prefers_existing_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_remote("ssh://h/b") and is_remote("pi@rpi:b") and is_remote("rpi:b")
    assert not is_remote("bundles/digits") and not is_remote("./a:b") and not is_remote("/x/a:b")
    Path("rpi:b").mkdir()
    assert not is_remote("rpi:b")


def test_ssh_command_never_weakens_host_key_checking(tmp_path):
    key = tmp_path / "k"
    key.write_text("x")
    argv = Remote(parse_target("ssh://pi@rpi:2222/b"), identity=str(key)).ssh_argv("edgetl --version")
    assert argv[:1] == ["ssh"] and ["-i", str(key)] == argv[1:3] and "-p" in argv and "-l" in argv
    assert argv[-3:] == ["--", "rpi", "edgetl --version"]
    assert not any("StrictHostKeyChecking" in a or "UserKnownHostsFile" in a for a in argv)
    with pytest.raises(ConfigError, match="--identity"):
        Remote(parse_target("rpi:b"), identity=str(tmp_path / "missing"))


# --- deploy ------------------------------------------------------------------------------------------


def test_deploy_then_predict_and_bench_on_the_device(sshd, tmp_path):
    bundle = build_bundle(tmp_path / "colours")
    dest = tmp_path / "device" / "my $HOME; bundles" / "colours"  # quoted for the device's shell, never run
    result = deploy(sshd, bundle, dest)
    assert result.exit_code == 0, result.output
    envelope = validate_document(result.stdout, "deploy")
    assert envelope["bundle"] == str(bundle) and envelope["target"].endswith(str(dest))
    (doc,) = envelope["results"]
    assert doc["where"] == ALIAS and doc["path"] == str(dest) and doc["files"] == 4
    verify_files(dest, read_manifest(dest))  # complete and every checksum right on the "device"
    assert _left_beside(dest) == ["colours"]  # no upload or temp left behind

    red = tmp_path / "device" / "red.png"
    Image.new("RGB", (40, 30), COLOURS["red"]).save(red)
    result = cli("predict", f"{ALIAS}:{dest}", str(red), *ssh_args(sshd), "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    records = records["results"] if isinstance(records, dict) else records  # the predict envelope
    assert [r["label"] for r in records] == ["red"]

    save_dir = tmp_path / "saved"
    result = cli(
        "bench",
        f"{ALIAS}:{dest}",
        *ssh_args(sshd),
        "--precision",
        "fp32",
        "--warmup",
        "1",
        "--iterations",
        "5",
        "--no-cold-start",
        "--json",
        "--save-dir",
        str(save_dir),
    )
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    assert doc["mode"] == "remote" and doc["bundle"].endswith(str(dest))
    (rep,) = doc["results"]
    assert rep["precision"] == "fp32" and rep["iterations"] == 5 and rep["latency_ms"]["p50"] > 0
    assert rep["target"] == doc["bundle"] and rep["bundle"] == str(dest)
    assert rep["remote"]["where"] == ALIAS and len(rep["remote"]["fingerprint"]) == 16
    assert "samples_ms" not in rep
    saved_file = next(save_dir.glob("*.json"))
    saved = validate_document(saved_file.read_text(), "bench")  # the same envelope, every sample in it
    assert len(saved["results"][0]["samples_ms"]) == 5
    assert saved["results"][0]["remote"]["fingerprint"] == rep["remote"]["fingerprint"]
    assert saved["results"][0]["remote"]["machine"]["arch"] == rep["env"]["machine"]
    # Read back offline: the device's result beside nothing else, no ssh.
    back = cli("bench", "--compare", str(saved_file), "--json")
    assert back.exit_code == 0, back.output
    compared = validate_document(back.stdout, "bench")["results"][0]
    assert compared["latency_ms"] == rep["latency_ms"] and compared["remote"]["where"] == ALIAS
    # One device on a terminal: the local table, then the device's line.
    args = ["--precision", "fp32", "--warmup", "0", "--iterations", "3", "--no-cold-start", "--format", "table"]
    table = cli("bench", f"{ALIAS}:{dest}", *ssh_args(sshd), *args)
    assert table.exit_code == 0, table.output
    assert "latency p50 ms" in table.stdout and f"Device {ALIAS}: edgetl" in table.stdout


def test_bench_several_targets_gives_one_comparison(sshd, tmp_path):
    a = build_bundle(tmp_path / "a")
    b = build_bundle(tmp_path / "b", feature_dim=64)
    for src, dst in ((a, tmp_path / "dev" / "a"), (b, tmp_path / "dev" / "b")):
        assert deploy(sshd, src, dst).exit_code == 0
    ssh_form = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{tmp_path / 'dev' / 'b'}"
    args = [
        "bench",
        "--target",
        f"{ALIAS}:{tmp_path / 'dev' / 'a'}",
        "--target",
        ssh_form,
        *ssh_args(sshd),
        "--precision",
        "fp32",
        "--warmup",
        "1",
        "--iterations",
        "4",
        "--no-cold-start",
    ]
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "bench")
    assert doc["mode"] == "remote" and doc["bundle"] is None and len(doc["results"]) == 2
    a, b = doc["results"]
    assert a["target"].endswith("/dev/a") and b["target"].endswith("/dev/b") and b["target"].startswith("ssh://")
    assert a["remote"]["fingerprint"] == b["remote"]["fingerprint"]  # the same machine, reached twice
    (row,) = doc["comparison"]
    assert (row["kind"], row["result"], row["baseline_result"]) == ("first", 1, 0) and row["speedup_p50"] > 0
    table = cli(*args, "--plot", str(tmp_path / "devices.png"), "--format", "table")
    assert table.exit_code == 0, table.output
    assert "Devices compared" in table.stdout and "127.0.0.1" in table.stdout and "1.00x" in table.stdout
    assert (tmp_path / "devices.png").stat().st_size > 1000
    tsv = cli(*args)  # a pipe: one line per device and configuration
    assert tsv.exit_code == 0, tsv.output
    lines = tsv.stdout.splitlines()
    assert (
        len(lines) == 3
        and lines[1].split("\t")[0] == ALIAS
        and lines[2].split("\t")[0] == f"{sshd.user}@127.0.0.1:{sshd.port}"
    )


def test_redeploy_replaces_and_an_interrupted_copy_keeps_the_old_bundle(sshd, tmp_path):
    old = build_bundle(tmp_path / "old")
    dest = tmp_path / "device" / "model"
    assert deploy(sshd, old, dest).exit_code == 0
    before = sha256_file(dest / "manifest.json")

    # A bundle of a few MB, copied through a relay that pulls the cable after 256 kB.
    new = build_bundle(tmp_path / "new", heads=("colour", "brightness"), feature_dim=150_000)
    cut = sshd.write_client_config(relay_limit=256 * 1024, name="ssh_config_cut")
    result = deploy(sshd, new, dest, config=cut)
    assert result.exit_code == 1
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert sha256_file(dest / "manifest.json") == before
    verify_files(dest, read_manifest(dest))
    assert list(read_manifest(dest)["heads"]) == ["colour"]
    assert _left_beside(dest) == ["model"]  # the partial upload was removed

    result = deploy(sshd, new, dest)
    assert result.exit_code == 0, result.output
    assert list(read_manifest(dest)["heads"]) == ["colour", "brightness"]
    verify_files(dest, read_manifest(dest))


def test_wrong_or_unknown_host_key_is_refused(sshd, tmp_path):
    bundle = build_bundle(tmp_path / "b")
    dest = tmp_path / "device" / "b"
    impostor = keygen(tmp_path / "impostor")
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {impostor}\n")
    result = deploy(sshd, bundle, dest, config=sshd.write_client_config(known_hosts=wrong, name="cfg_wrong"))
    assert result.exit_code == 1
    assert "does not match the one in known_hosts" in result.stderr and "SHA256:" in result.stderr
    assert f'-R "[127.0.0.1]:{sshd.port}"' in result.stderr  # ssh's own advice, for the right known_hosts line
    assert len(result.stderr.strip().splitlines()) == 1 and not dest.exists()

    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    result = deploy(sshd, bundle, dest, config=sshd.write_client_config(known_hosts=empty, name="cfg_unknown"))
    assert result.exit_code == 1 and "not in known_hosts" in result.stderr and not dest.exists()
    assert not empty.read_text()  # nothing was accepted on the user's behalf


def test_deploy_errors_are_one_line(sshd, tmp_path):
    bundle = build_bundle(tmp_path / "b")
    precious = tmp_path / "device" / "notes"
    precious.mkdir(parents=True)
    (precious / "todo.txt").write_text("keep me")
    result = deploy(sshd, bundle, precious)
    assert result.exit_code == 1 and "is not an edgetl bundle" in result.stderr
    assert [p.name for p in precious.iterdir()] == ["todo.txt"]
    assert sorted(p.name for p in precious.parent.iterdir()) == ["notes"]

    result = cli(
        "deploy",
        str(bundle),
        f"{ALIAS}:{tmp_path / 'x'}",
        "--ssh-config",
        str(sshd.config),
        "--remote-edgetl",
        "/nonexistent/edgetl",
    )
    assert result.exit_code == 1 and "is not found there" in result.stderr

    result = cli("deploy", str(tmp_path / "missing"), f"{ALIAS}:{tmp_path / 'x'}", *ssh_args(sshd))
    assert result.exit_code == 1 and "Traceback" not in result.output

    result = CliRunner(env={"EDGETL_REMOTE_EDGETL": "/nonexistent/edgetl-from-env"}).invoke(
        main, ["deploy", str(bundle), f"{ALIAS}:{tmp_path / 'x'}", "--ssh-config", str(sshd.config)]
    )
    assert result.exit_code == 1 and "/nonexistent/edgetl-from-env" in result.stderr


def test_deploy_check_reads_doctor_on_the_device(sshd, tmp_path):
    bundle = build_bundle(tmp_path / "b")
    result = deploy(sshd, bundle, tmp_path / "device" / "b", "--check")
    assert result.exit_code == 0, result.output
    check = validate_document(result.stdout, "deploy")["results"][0]["check"]
    by_name = {c["check"]: c for c in check["checks"]}
    assert check["ok"] and by_name["runtime"]["status"] == "ok" and "onnxruntime" in by_name["runtime"]["detail"]
    assert "measured on the device" in by_name["precision"]["detail"]  # doctor BUNDLE timed int8 vs fp32 there
    assert {"runtime", "precision", "profile"} <= set(by_name)
    human = cli(
        "deploy", str(bundle), f"{ALIAS}:{tmp_path / 'device' / 'b'}", *ssh_args(sshd), "--check", "--format", "table"
    )
    assert human.exit_code == 0, human.output
    assert "Deployed 4 files" in human.stdout and "runtime" in human.stdout and "Device:" in human.stdout
    tsv = cli("deploy", str(bundle), f"{ALIAS}:{tmp_path / 'device' / 'b'}", *ssh_args(sshd), "--check", "-q")
    assert tsv.exit_code == 0, tsv.output
    header, line = tsv.stdout.splitlines()  # a pipe: a header and one line; the checks on stderr
    row = dict(zip(header.split("\t"), line.split("\t"), strict=True))
    assert row["files"] == "4" and row["check"] in ("ok", "warn") and len(row["sha256"]) == 64
    assert "Device:" in tsv.stderr


def test_a_failed_check_is_one_json_document_with_the_error(sshd, tmp_path, monkeypatch):
    from edgetl.device import deploy as deploy_mod

    def no_runtime(manifest, doctor):
        return {
            "ok": False,
            "profile": None,
            "checks": [{"check": "runtime", "status": "fail", "detail": "no runtime on the device"}],
            "machine": doctor.get("machine", {}),
        }

    monkeypatch.setattr(deploy_mod, "check_fit", no_runtime)
    result = deploy(sshd, build_bundle(tmp_path / "b"), tmp_path / "device" / "b", "--check")
    assert result.exit_code == 1
    doc = validate_document(result.stdout, "deploy")  # one document: the deploy's record, then the error
    assert doc["partial"] is True and doc["results"][0]["files"] == 4
    assert doc["error"]["type"] == "RemoteError" and "cannot use the bundle" in doc["error"]["message"]
    assert result.stderr.strip().splitlines()[-1].startswith("Error: deployed, but the device cannot use the bundle")


# --- fit checks without a device ----------------------------------------------------------------------


def _manifest(*variants: str) -> dict:
    return {"variants": {v: {"format": v.split("-")[0], "precision": v.split("-")[1]} for v in variants}}


def _doctor(**kw) -> dict:
    doc = {
        "machine": {"cpu": "Cortex-A72", "arch": "aarch64"},
        "runtimes": {"onnxruntime": {"installed": True, "version": "1.20"}, "openvino": {"installed": False}},
        "profiles": {"best": "rpi4"},
        "int8": {"hardware": "NEON without dot product", "expect": "not-faster"},
        "warnings": [],
    }
    doc.update(kw)
    return doc


def test_check_fit_fails_without_a_runtime_for_the_bundle():
    fit = check_fit(_manifest("openvino-fp32"), _doctor())
    assert not fit["ok"] and "pip install openvino" in fit["checks"][0]["detail"]


def test_check_fit_warns_when_int8_is_measured_slow_and_when_the_profile_variant_is_missing():
    measured = {
        "hardware": "x",
        "expect": "uncertain",
        "measured": [{"runtime": "onnxruntime", "speedup": 0.7, "int8_p50_ms": 3.0, "fp32_p50_ms": 2.1}],
    }
    fit = check_fit(_manifest("onnx-fp32", "onnx-int8"), _doctor(int8=measured, profiles={"best": "rpi5"}))
    by_name = {c["check"]: c for c in fit["checks"]}
    assert fit["ok"] and by_name["precision"]["status"] == "warn" and "0.70x" in by_name["precision"]["detail"]
    fit = check_fit(_manifest("onnx-fp32"), _doctor(profiles={"best": "rpi5"}))
    by_name = {c["check"]: c for c in fit["checks"]}
    assert by_name["profile"]["status"] in ("ok", "warn") and "rpi5" in by_name["profile"]["detail"]


def test_fingerprint_ignores_software_versions():
    m = {
        "cpu": "Cortex-A76",
        "board": "Raspberry Pi 5",
        "arch": "aarch64",
        "logical_cores": 4,
        "memory_mb": 8000,
        "os": "Linux",
        "kernel": "6.6",
        "python": "3.11.2",
    }
    assert fingerprint(m) == fingerprint({**m, "kernel": "6.12", "python": "3.13"})
    assert fingerprint(m) != fingerprint({**m, "logical_cores": 2})


@pytest.mark.parametrize(
    "device, here, refused",
    [
        ("0.1.0", "0.1.0", False),
        ("0.1.3", "0.1.0", False),  # another patch release
        ("0.2.0", "0.1.0", False),  # a newer device reads older bundles
        ("0.0.9", "0.1.0", True),
        ("0.9.1", "1.0.0", True),
        ("unknown", "0.1.0", True),
        ("0.2.0rc1", "0.2.0", False),
    ],
)
def test_version_skew(device, here, refused):
    from edgetl.device.remote import version_skew

    assert (version_skew(device, here) is not None) is refused


def test_a_device_with_an_older_edgetl_is_refused_before_any_work(sshd, tmp_path):
    """Version skew: deploy and bench on a device whose edgetl is older than this one stop at once
    with one line that says to run the set-up again; nothing is copied."""
    old = tmp_path / "old-edgetl"
    old.write_text("#!/bin/sh\necho 'edgetl 0.0.1'\n")
    old.chmod(0o755)
    bundle = build_bundle(tmp_path / "colours")
    dest = tmp_path / "device" / "colours"
    args = ["--ssh-config", str(sshd.config), "--remote-edgetl", str(old)]
    for argv in (["deploy", str(bundle), f"{ALIAS}:{dest}", *args], ["bench", f"{ALIAS}:{dest}", *args]):
        result = cli(*argv)
        assert result.exit_code == 1, result.output
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
        assert "runs edgetl 0.0.1, older than this edgetl" in line and f"edgetl device setup {ALIAS}" in line
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "device").exists()


def test_a_bundle_newer_than_the_device_s_edgetl_is_refused(sshd, tmp_path):
    """A bundle written by a newer edgetl (its manifest's edgetl_version) than the device runs."""
    import json

    bundle = build_bundle(tmp_path / "colours")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["edgetl_version"] = "9.0.0"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = deploy(sshd, bundle, tmp_path / "device" / "colours")
    assert result.exit_code == 1, result.output
    assert "was written by edgetl 9.0.0" in result.stderr and "edgetl device setup" in result.stderr
    assert not (tmp_path / "device").exists()


# --- deploy to a device that serves ------------------------------------------------------------------


def test_deploy_to_a_serving_device_swaps_the_model_without_a_failed_request(sshd, tmp_path):
    """`edgetl serve` on the "device" while `edgetl deploy` replaces its bundle over SSH: clients
    keep posting throughout, every answer is 200, and the server ends up on the new version."""
    pytest.importorskip("uvicorn")
    import threading
    import time

    from tests.test_serve import Server, version_of

    old = build_bundle(tmp_path / "old", heads=("colour", "brightness"), precisions=("fp32",))
    new = build_bundle(tmp_path / "new", heads=("colour",), precisions=("fp32",))
    dest = tmp_path / "dev" / "b"
    assert deploy(sshd, old, dest).exit_code == 0
    old_version, new_version = version_of(dest), version_of(new)
    assert old_version != new_version
    red = tmp_path / "red.png"
    Image.new("RGB", (40, 48), COLOURS["red"]).save(red)
    data = red.read_bytes()
    with Server(dest, "--watch-interval", "0.2") as server:
        stop, answers = threading.Event(), []

        def client() -> None:
            with server.client() as c:
                while not stop.is_set():
                    a = c.post("/v1/predict", content=data)
                    ok = a.status_code == 200
                    answers.append((a.status_code, a.json()["model"]["version"] if ok else a.text, ok and a.json()))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            result = deploy(sshd, new, dest)
            assert result.exit_code == 0, result.output
            deadline = time.monotonic() + 15
            while server.get("/v1/model").json()["version"] != new_version and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert answers and {code for code, _, _ in answers} == {200}, [a[:2] for a in answers if a[0] != 200][:3]
        assert {v for _, v, _ in answers} == {old_version, new_version}
        assert all(body["records"][0]["label"] == "red" for _, _, body in answers)
        health = server.get("/v1/health").json()
        assert health["model"]["version"] == new_version and health["pending"] is None
    assert server.proc.returncode == 0, server.stderr()
