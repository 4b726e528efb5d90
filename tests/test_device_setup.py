"""`edgetl device setup`: facts, checks, edgetl's wheel, the wheelhouse, and installs on a real device.

The "device" is this machine behind the loopback sshd of tests/sshd.py (x86_64, Python 3.11). A
device without an index is made by an ``ssh`` wrapper (:func:`no_index_ssh`) that starts every
command on the device with ``PIP_NO_INDEX=1``, an unroutable ``PIP_INDEX_URL`` and no pip
configuration file (``PIP_CONFIG_FILE=/dev/null``: no find-links or mirror from /etc/pip.conf): no
wheel can come from anywhere but what setup copied. Building an offline wheelhouse runs ``pip download``
against this machine's index (network, cached by pip afterwards): those tests are marked
``network`` and ``slow``; the default tests need neither.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from importlib.metadata import Distribution
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import edgetl.device.setup as setup_mod
from edgetl.cli.setup_cmd import setup as setup_command
from edgetl.core.errors import BackendError, ConfigError, RemoteError
from edgetl.device.remote import Remote
from edgetl.device.setup import (
    build_edgetl_wheel,
    build_wheelhouse,
    check_facts,
    device_facts,
    parse_facts,
    parse_host_target,
    platform_tags,
    setup_device,
    wheel_from_distribution,
    write_wheel,
)
from tests.bundle_factory import COLOURS, build_bundle
from tests.schemas import validate_document
from tests.sshd import ALIAS, LoopbackSSHD, require_sshd

network = pytest.mark.network


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    require_sshd()
    server = LoopbackSSHD(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


def no_index_ssh(folder: Path) -> str:
    """An ``ssh`` that runs every device command with no package index reachable."""
    path = folder / "ssh-no-index"
    path.write_text(
        "#!/bin/bash\n"
        'n=$#; cmd="${!n}"\n'
        'exec ssh "${@:1:n-1}" "export PIP_NO_INDEX=1 PIP_INDEX_URL=http://127.0.0.1:9/ '
        'PIP_CONFIG_FILE=/dev/null; $cmd"\n'
    )
    path.chmod(0o755)
    return str(path)


def remote(server: LoopbackSSHD, *, ssh: str = "ssh") -> Remote:
    return Remote(parse_host_target(ALIAS), ssh_config=str(server.config), ssh=ssh)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_edgetl_wheel(tmp_path_factory.mktemp("edgetl-wheel"))


def fake_version(wheel: Path, version: str, out_dir: Path) -> Path:
    """``wheel`` re-packed as edgetl ``version`` (dist-info, METADATA and ``__version__``)."""
    old = wheel.name.split("-")[1]
    files = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith("/RECORD"):
                continue
            data = zf.read(name)
            if name == "edgetl/__init__.py":
                data = data.replace(f'__version__ = "{old}"'.encode(), f'__version__ = "{version}"'.encode())
            if name.endswith(".dist-info/METADATA"):
                data = data.replace(f"\nVersion: {old}\n".encode(), f"\nVersion: {version}\n".encode())
            files[name.replace(f"edgetl-{old}.dist-info", f"edgetl-{version}.dist-info")] = data
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_wheel(out_dir / f"edgetl-{version}-py3-none-any.whl", files, f"edgetl-{version}.dist-info")


def use_wheel(monkeypatch, wheel: Path) -> None:
    """setup installs ``wheel`` instead of building this edgetl's."""

    def build(out_dir, progress=None):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        dest = Path(out_dir) / wheel.name
        dest.write_bytes(wheel.read_bytes())
        return dest

    monkeypatch.setattr(setup_mod, "build_edgetl_wheel", build)


def run_edgetl(venv_link: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([venv_link / "bin" / "edgetl", *args], capture_output=True, text=True, env=env, timeout=120)


# --- facts: canned device output ----------------------------------------------------------------------

GOOD = {
    "arch": "aarch64",
    "home": "/home/pi",
    "venv": "/home/pi/edgetl",
    "python": "/usr/bin/python3",
    "python_version": "3.11.2",
    "venv_ok": "yes",
    "glibc": "glibc 2.36",
    "free_kb": "20000000",
    "venv_state": "absent",
}


def canned(**changes: str | None) -> str:
    values = {**GOOD, **changes}
    body = [f"{k}={v}" for k, v in values.items() if v is not None]
    return "Welcome to Raspberry Pi OS\n__edgetl_facts_begin__\n" + "\n".join(body) + "\n__edgetl_facts_end__\n"


def test_facts_parse_a_raspberry_pi():
    facts = parse_facts(canned())
    assert facts["arch"] == "aarch64" and facts["python_version"] == "3.11.2" and facts["glibc"] == "2.36"
    assert facts["venv_ok"] and facts["free_bytes"] == 20000000 * 1024 and facts["installed"] is None
    check_facts(facts, need_bytes=150_000_000, where="pi")
    tags = platform_tags(facts)
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags and "manylinux2014_aarch64" in tags
    assert parse_facts(canned(glibc="ldd (Debian GLIBC 2.36-9+deb12u4) 2.36"))["glibc"] == "2.36"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"arch": "armv7l"}, r"ONNX Runtime has no 32-bit ARM wheels: install a 64-bit OS \(Raspberry Pi OS 64-bit\)"),
        ({"arch": "armv6l"}, "32-bit ARM"),
        ({"arch": "i686"}, "32-bit"),
        ({"arch": "riscv64"}, "aarch64 and x86_64"),
        ({"python_version": "3.9.2"}, "Python 3.9.2 .* needs 3.11 or newer"),
        ({"python": "", "python_version": None, "venv_ok": None}, "no python3"),
        ({"venv_ok": "no"}, r"ensurepip is not available\): sudo apt install python3-venv"),
        ({"glibc": "musl libc (aarch64)"}, "musl"),
        ({"venv_state": "other"}, "was not made by edgetl device setup"),
        ({"free_kb": "1000"}, "1 MB free .* needs about 150 MB"),
    ],
)
def test_facts_refuse_devices_edgetl_cannot_run_on(changes, message):
    facts = parse_facts(canned(**changes))
    with pytest.raises(RemoteError, match=message) as info:
        check_facts(facts, need_bytes=150_000_000, where="pi")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("arch=aarch64\n", "incomplete"),
        (canned().replace("__edgetl_facts_end__\n", ""), "incomplete"),
        (canned().replace("arch=aarch64", "arch=aarch64\nsurprise=1"), "unexpected line"),
        (canned().replace("arch=aarch64", "arch=aarch64\narch=x86_64"), "unexpected line"),
        (canned().replace("home=/home/pi\n", ""), "lack home"),
        (canned(free_kb="lots"), "df reported"),
        (canned(python_version="3.x"), "reported the version"),
    ],
)
def test_facts_are_parsed_strictly(text, message):
    with pytest.raises(RemoteError, match=message):
        parse_facts(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pi@raspberrypi.local", ("raspberrypi.local", "pi", None)),
        ("nuc", ("nuc", None, None)),
        ("ssh://me@nuc:2222", ("nuc", "me", 2222)),
        ("ssh://me@nuc:2222/", ("nuc", "me", 2222)),
        ("root@[::1]", ("[::1]", "root", None)),
    ],
)
def test_parse_host_target(text, expected):
    t = parse_host_target(text)
    assert (t.host, t.user, t.port) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("pi@rpi:bundles", "has a path or port"),
        ("ssh://pi@rpi/home/pi", "has a path"),
        ("-oProxyCommand=x", "not a host"),
        ("bad user@rpi", "not a device target"),
        ("ssh://rpi:0", "port"),
    ],
)
def test_parse_host_target_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_host_target(text)


# --- the facts script on a real device ---------------------------------------------------------------


def test_device_facts_over_ssh(sshd, tmp_path):
    facts = device_facts(remote(sshd), str(tmp_path / "dev" / "edgetl"))
    assert facts["arch"] == os.uname().machine and facts["venv"] == str(tmp_path / "dev" / "edgetl")
    assert re.fullmatch(r"3\.\d+\.\d+", facts["python_version"]) and facts["venv_ok"]
    assert facts["glibc"] and facts["free_bytes"] > 0 and facts["venv_state"] == "absent"
    check_facts(facts)
    relative = device_facts(remote(sshd), "edgetl-test-never-made")
    assert relative["venv"] == f"{relative['home']}/edgetl-test-never-made"


# --- edgetl's wheel -----------------------------------------------------------------------------------


def _record_ok(wheel: Path) -> dict[str, bytes]:
    """Every file of ``wheel`` is in its RECORD with the right hash and size; returns the files."""
    import base64
    import csv
    import hashlib

    with zipfile.ZipFile(wheel) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    (record,) = [n for n in files if n.endswith(".dist-info/RECORD")]
    rows = {r[0]: r for r in csv.reader(files[record].decode().splitlines())}
    assert set(rows) == set(files)
    for name, data in files.items():
        if name == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert rows[name][1:] == [f"sha256={digest}", str(len(data))], name
    return files


def test_wheel_from_the_checkout_holds_the_package(wheel):
    assert re.fullmatch(r"edgetl-[0-9.]+-py3-none-any\.whl", wheel.name)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "edgetl/device/setup.py" in names and any(n.startswith("edgetl/shipped/devices/") for n in names)
    assert not any("__pycache__" in n or n.startswith(("tests/", "runs/", ".venv")) for n in names)


def test_wheel_rebuilt_from_an_installed_distribution(wheel, tmp_path):
    """No source: an installed wheel is re-packed from its RECORD, and the result installs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    no_deps = ("--no-deps", "--no-index")

    def install(into: Path, whl: Path) -> Path:
        venv.create(into, with_pip=False)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(into / "bin" / "python"),
                "install",
                "-q",
                *no_deps,
                str(whl),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        (info,) = (into / "lib").glob("python3.*/site-packages/edgetl-*.dist-info")
        return info

    info = install(tmp_path / "a", wheel)
    rebuilt = wheel_from_distribution(Distribution.at(info), tmp_path / "out")
    assert rebuilt.name == wheel.name
    original, again = _record_ok(wheel), _record_ok(rebuilt)
    record = f"{info.name}/RECORD"
    assert set(again) == set(original)  # the console script comes back from entry_points.txt
    assert all(again[n] == original[n] for n in original if n != record)
    info2 = install(tmp_path / "b", rebuilt)
    assert (tmp_path / "b" / "bin" / "edgetl").is_file()
    assert (info2.parent / "edgetl" / "device" / "setup.py").read_bytes() == original["edgetl/device/setup.py"]


def test_wheelhouse_missing_a_wheel_is_named_before_anything_is_copied(wheel, tmp_path):
    """A prebuilt wheelhouse without numpy for the device: resolved here, offline, and refused."""
    house = tmp_path / "house"
    house.mkdir()
    (house / wheel.name).write_bytes(wheel.read_bytes())
    facts = parse_facts(canned())
    with pytest.raises(BackendError, match=r"has no wheel of numpy for Python 3\.11 \(cp311\) on aarch64"):
        build_wheelhouse(facts, [], house, wheel=wheel, download=False)


def test_setup_refuses_a_missing_wheel_before_copying(sshd, wheel, tmp_path, monkeypatch):
    use_wheel(monkeypatch, wheel)
    house = tmp_path / "house"
    house.mkdir()
    (house / wheel.name).write_bytes(wheel.read_bytes())
    dev = tmp_path / "dev"
    with pytest.raises(BackendError, match="has no wheel of numpy"):
        setup_device(remote(sshd), venv=str(dev / "edgetl"), offline=True, wheelhouse=house)
    assert not dev.exists()  # nothing reached the device


def test_failed_first_install_leaves_nothing(sshd, wheel, tmp_path, monkeypatch):
    """Online mode on a device whose index is unreachable: pip fails midway, nothing is left."""
    use_wheel(monkeypatch, wheel)
    dev = tmp_path / "dev"
    with pytest.raises(RemoteError, match=r"installing edgetl .* failed: .*(numpy|No matching distribution)") as info:
        setup_device(remote(sshd, ssh=no_index_ssh(tmp_path)), venv=str(dev / "edgetl"))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in dev.iterdir()) == []


def test_a_wheel_damaged_in_the_copy_is_refused(sshd, wheel, tmp_path, monkeypatch):
    """The device's sha256 of a copied file differs from this machine's: nothing is installed."""
    use_wheel(monkeypatch, wheel)
    monkeypatch.setattr(setup_mod, "sha256_of", lambda path: "0" * 64)
    dev = tmp_path / "dev"
    with pytest.raises(RemoteError, match=r"arrived damaged .* expected 0{64}\): nothing was installed"):
        setup_device(remote(sshd), venv=str(dev / "edgetl"))
    assert sorted(p.name for p in dev.iterdir()) == []


# --- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["pi@rpi:b"], "has a path or port"),
        (["pi@rpi", "--extras", "train"], "not a device extra"),
        (["pi@rpi", "--remote-edgetl", "x"], "does not apply to setup"),
        (["pi@rpi", "--wheelhouse", "."], "for --offline installs"),
    ],
)
def test_cli_usage_errors(args, message):
    result = CliRunner().invoke(setup_command, [*args, "--json"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- installs on the loopback device (pip download: network) -----------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory, wheel) -> Path:
    """The device's wheels, built once by pip download (network, then pip's cache)."""
    require_sshd()
    house = tmp_path_factory.mktemp("wheelhouse")
    facts = {"arch": os.uname().machine, "glibc": os.confstr("CS_GNU_LIBC_VERSION").split()[-1]}
    facts["python_version"] = ".".join(str(x) for x in sys.version_info[:3])
    build_wheelhouse(facts, [], house, wheel=wheel)
    return house


@network
@pytest.mark.slow
def test_offline_install_rerun_upgrade_and_failed_upgrade(sshd, wheel, wheelhouse, tmp_path, monkeypatch):
    device = remote(sshd, ssh=no_index_ssh(tmp_path))
    link = tmp_path / "dev" / "edgetl"
    monkeypatch.setenv("EDGETL_CONFIG_HOME", str(tmp_path / "config"))  # the inventory --name writes

    # (a) offline, with no index on the device: then predict from the new venv, through ssh
    record = setup_device(device, venv=str(link), offline=True, wheelhouse=wheelhouse)
    assert record["action"] == "installed" and record["mode"] == "offline" and record["files_copied"] >= 5
    assert link.is_symlink() and record["remote_edgetl"] == f"{link}/bin/edgetl"
    assert record["doctor"]["runtimes"].get("onnxruntime")
    first_dir = Path(record["venv_dir"])
    bundle = build_bundle(tmp_path / "colours")
    red = tmp_path / "red.png"
    Image.new("RGB", (40, 30), COLOURS["red"]).save(red)
    from edgetl.cli import main

    remote_edgetl = ("--remote-edgetl", record["remote_edgetl"], "--json")
    result = CliRunner().invoke(
        main,
        ["predict", f"{ALIAS}:{bundle}", str(red), "--ssh-config", str(sshd.config), *remote_edgetl],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["label"] for r in (doc["results"] if isinstance(doc, dict) else doc)] == ["red"]

    # (b) the same again, through the CLI: nothing to do
    options = ("--ssh-config", str(sshd.config), "--json", "--name", "loop")
    result = CliRunner().invoke(
        setup_command,
        [ALIAS, "--venv", str(link), "--offline", "--wheelhouse", str(wheelhouse), *options],
    )
    assert result.exit_code == 0, result.output
    (again,) = validate_document(result.stdout, "device.setup")["results"]
    assert again["action"] == "unchanged" and again["files_copied"] == 0 and again["venv_dir"] == str(first_dir)
    assert again["name"] == "loop" and "nothing to do" in result.stderr
    result = CliRunner().invoke(setup_command, [ALIAS, "--venv", str(link), *options[:2], "--format", "tsv"])
    assert result.exit_code == 0, result.output
    header, line = result.stdout.splitlines()
    row = dict(zip(header.split("\t"), line.split("\t"), strict=True))
    assert row["action"] == "unchanged" and row["remote_edgetl"] == f"{link}/bin/edgetl"

    # --name saved the device: the README's second step, deploy (with --check) and bench by name
    from edgetl.device.inventory import get_device

    saved = get_device("loop")
    assert saved.remote_edgetl == f"{link}/bin/edgetl" and saved.venv == str(link) and saved.ssh_config
    assert saved.edgetl_version == record["version"] and saved.facts["arch"] == record["facts"]["arch"]
    result = CliRunner().invoke(main, ["deploy", str(bundle), "loop", "--check", "--json"])
    assert result.exit_code == 0, result.output
    (deployed,) = json.loads(result.stdout)["results"]
    assert deployed["check"]["ok"] and get_device("loop").last_bundle == deployed["path"]
    result = CliRunner().invoke(
        main, ["bench", "loop", "--iterations", "5", "--warmup", "1", "--no-cold-start", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["latency_ms"]["p50"] > 0

    # (c) an upgrade that fails midway (online, the device's index unreachable): the old venv still works
    newer = fake_version(wheel, "99.0.0", tmp_path / "newer")
    use_wheel(monkeypatch, newer)
    with pytest.raises(
        RemoteError, match=r"installing edgetl 99\.0\.0 .* failed: .*; the installed edgetl .* unchanged"
    ):
        setup_device(device, venv=str(link))
    version = run_edgetl(link, "--version")
    assert version.returncode == 0 and version.stdout.split()[-1] == record["version"]
    assert sorted(p.name for p in (link.parent / ".edgetl.venvs").iterdir()) == [first_dir.name]

    # ... and the same upgrade offline succeeds: new venv, symlink switched, old one removed, command runs
    upgraded = setup_device(device, venv=str(link), offline=True, wheelhouse=wheelhouse)
    assert upgraded["action"] == "upgraded" and upgraded["previous_version"] == record["version"]
    assert upgraded["version"] == "99.0.0" and not first_dir.exists()
    assert os.readlink(link) == f".edgetl.venvs/{Path(upgraded['venv_dir']).name}"
    version = run_edgetl(link, "--version")
    assert version.returncode == 0 and version.stdout.split()[-1] == "99.0.0", version.stderr
    assert sorted(p.name for p in (link.parent / ".edgetl.venvs").iterdir()) == [Path(upgraded["venv_dir"]).name]


@network
@pytest.mark.slow
def test_online_install_from_the_devices_index(sshd, tmp_path):
    """Online: the device's pip resolves the dependencies from its own index (network)."""
    link = tmp_path / "dev" / "edgetl"
    record = setup_device(remote(sshd), venv=str(link))
    assert record["action"] == "installed" and record["mode"] == "online" and record["files_copied"] == 1
    version = run_edgetl(link, "--version")
    assert version.returncode == 0 and version.stdout.split()[-1] == record["version"]
    print(f"online setup: {record['seconds']}")


@network
@pytest.mark.slow
@pytest.mark.arm64
def test_aarch64_wheelhouse_built_here_installs_offline_on_arm64(wheel, tmp_path):
    """Debian bookworm arm64 under QEMU (scripts/arm64_userland.py, as tests/test_arm64.py): the facts
    script reads it, the aarch64 wheelhouse built on this x86 machine installs there with no index
    (the same device script as over ssh), and predict gives the x86 label. ~3 min, emulated."""
    import shutil
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import arm64_userland as arm64

    missing = arm64.missing_requirements()
    if missing:
        message = "arm64 userland needs: " + "; ".join(missing)
        if os.environ.get("EDGETL_REQUIRE_ARM64") == "1":
            pytest.fail(message)
        pytest.skip(message)
    root = arm64.DEFAULT_ROOT
    arm64.ensure_base(root)
    work = root / "opt" / f"setup-{tmp_path.name}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "upload").mkdir(parents=True)
    device = f"/opt/{work.name}"
    try:
        out = arm64.run_in(root, ["sh", "-c", setup_mod.FACTS_SCRIPT, "sh", f"{device}/edgetl"]).stdout
        facts = parse_facts(out)
        check_facts(facts, need_bytes=300_000_000)
        assert (facts["arch"], facts["python_version"][:4], facts["glibc"]) == ("aarch64", "3.11", "2.36")
        files = build_wheelhouse(facts, [], tmp_path / "house", wheel=wheel)
        assert any("aarch64" in f.name for f, _ in files) and not any("x86_64" in f.name for f, _ in files)
        for f, _ in files:
            shutil.copy2(f, work / "upload" / f.name)
        start = time.perf_counter()
        script_args = (
            "/usr/bin/python3",
            f"{device}/v",
            f"{device}/upload",
            f"{device}/upload/{wheel.name}",
            "1",
            "{}",
        )
        install = arm64.run_in(
            root,
            ["sh", "-c", setup_mod.INSTALL_SCRIPT, "sh", *script_args],
            timeout=1800,
            PIP_NO_INDEX="1",
            PIP_INDEX_URL="http://127.0.0.1:9/",
        )
        assert install.stdout.strip().splitlines()[-1].split()[-1] == wheel.name.split("-")[1]
        seconds = time.perf_counter() - start
        build_bundle(work / "bundle")
        Image.new("RGB", (40, 30), COLOURS["red"]).save(work / "red.png")
        predict = arm64.run_in(
            root, [f"{device}/v/bin/edgetl", "predict", f"{device}/bundle", f"{device}/red.png", "--json"]
        )
        records = json.loads(predict.stdout)["results"]
        assert [r["label"] for r in records] == ["red"]
        print(f"\narm64 offline install (EMULATED): {len(files)} wheels, {seconds:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
