"""Deploy, bench and doctor on every device of a group (``@GROUP``), a few devices at a time.

Each device gets one record: ``ok``, its one-line ``error`` when it failed, its time, and what the
command found there (the deploy record, the bench results, the doctor report). One device failing
does not stop the others (:func:`edgetl.device.inventory.run_on_group`); nothing a device prints is
echoed while the others run, so the caller prints one table at the end. Nothing here imports torch.

Targets: ``@GROUP`` (``@all``: every device), optionally ``@GROUP:PATH`` (the same bundle path on
every device). Without a path, deploy puts the bundle in each device's ``<bundles_dir>/<bundle
folder name>`` and bench uses the bundle last deployed to each device by name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgetl.core.errors import ConfigError, RemoteError
from edgetl.device.inventory import (
    Device,
    GroupResult,
    default_bundle_path,
    device_bundle_target,
    record_deploy,
    resolve_group,
    run_on_group,
    update_device,
)
from edgetl.device.remote import Remote, envelope_record

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4
MAX_PARALLEL = 64


@dataclasses.dataclass(frozen=True)
class SshOverrides:
    """What the command line gave for every device (None: each device's own, from the inventory)."""

    identity: str | None = None
    ssh_config: str | None = None
    remote_edgetl: str | None = None


def is_group_target(text: str | None) -> bool:
    return bool(text) and text.startswith("@")


def parse_group_target(text: str) -> tuple[str, str | None]:
    """``@GROUP`` or ``@GROUP:PATH`` split into ``("@GROUP", PATH or None)``."""
    if not is_group_target(text):
        raise ConfigError(f"{text!r} is not a group target: give @GROUP (e.g. @lab) or @GROUP:PATH")
    group, colon, path = text.partition(":")
    if colon and not path.strip():
        raise ConfigError(f"{text!r} has an empty bundle path after ':'; give @GROUP or @GROUP:PATH")
    return group, (path if colon else None)


def group_devices(text: str, inventory: Path | None = None) -> tuple[list[Device], str | None]:
    """The devices of ``@GROUP[:PATH]`` (sorted by name) and the PATH (None: each device's default)."""
    group, path = parse_group_target(text)
    return resolve_group(group, inventory), path


def check_parallel(parallel: int) -> int:
    if not isinstance(parallel, int) or not 1 <= parallel <= MAX_PARALLEL:
        raise ConfigError(f"--parallel must be from 1 to {MAX_PARALLEL}, not {parallel!r}")
    return parallel


class QuietRemote(Remote):
    """A Remote that never echoes the device's stderr while it runs (several devices run at once:
    their lines would mix); the tail is kept for the one-line error as usual."""

    def run(self, command: str, **kwargs: Any):
        kwargs["echo_stderr"] = False
        return super().run(command, **kwargs)


def remote_for(device: Device, bundle_path: str, overrides: SshOverrides = SshOverrides()) -> Remote:
    """The Remote for ``bundle_path`` on ``device``: the command line's ssh settings, else the device's."""
    ssh_config = overrides.ssh_config or device.ssh_config
    identity = overrides.identity or device.identity
    for what, value in (("ssh_config", ssh_config), ("identity", identity)):
        if value is not None and not Path(value).expanduser().is_file():
            raise ConfigError(
                f"device {device.name}: its {what} {value} is not a file; "
                f"fix it with: edgetl device add {device.name} {device.target} --force ..."
            )
    return QuietRemote(
        device_bundle_target(device, bundle_path),
        identity=identity,
        ssh_config=ssh_config,
        edgetl=overrides.remote_edgetl or device.remote_edgetl or "edgetl",
    )


def deploy_path(device: Device, bundle: str | os.PathLike, path: str | None) -> str:
    """Where deploy puts ``bundle`` on ``device``: PATH, else ``<bundles_dir>/<bundle folder name>``."""
    return path if path is not None else default_bundle_path(device, "deploy", Path(bundle).resolve().name)


def bench_path(device: Device, path: str | None) -> str:
    """The bundle bench uses on ``device``: PATH, else the one last deployed there by name."""
    if path is not None:
        return path
    if device.last_bundle:
        return device.last_bundle
    raise ConfigError(
        f"no bundle has been deployed to {device.name} by name yet: deploy one to the group first "
        f"(edgetl deploy BUNDLE @GROUP), or give @GROUP:PATH"
    )


def _fan_out(
    devices: Sequence[Device],
    fn: Callable[[Device], Any],
    parallel: int,
    on_done: Callable[[GroupResult], None] | None,
) -> list[GroupResult]:
    """run_on_group, telling ``on_done`` about each device as it finishes (one call at a time)."""
    check_parallel(parallel)
    if on_done is None:
        return run_on_group(devices, fn, max_parallel=parallel)
    lock = threading.Lock()
    results: dict[str, GroupResult] = {}

    def reporting(device: Device) -> None:
        # The device's call runs in a run_on_group of one (the same error handling), so that its
        # outcome is known, and told, as soon as it is done.
        [r] = run_on_group([device], fn, max_parallel=1)
        with lock:
            results[device.name] = r
            on_done(r)

    run_on_group(devices, reporting, max_parallel=parallel)
    return [results[d.name] for d in devices]


def _base(r: GroupResult, target: str | None) -> dict[str, Any]:
    return {
        "device": r.device.name,
        "target": target,
        "ok": r.ok,
        "error": None if r.ok else {"type": r.error_type or "Error", "message": r.error},
        "seconds": round(r.seconds, 3),
    }


def _target_text(device: Device, path: str | None) -> str | None:
    try:
        return str(device_bundle_target(device, path)) if path else str(device.ssh_destination)
    except ConfigError:
        return None


# --- deploy --------------------------------------------------------------------------------------------


def check_status(check: dict | None) -> str:
    """A deploy --check's overall status: ok, warn, fail, or empty without --check."""
    if check is None:
        return ""
    statuses = {c["status"] for c in check["checks"]}
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"


def deploy_group(
    bundle: str | os.PathLike,
    devices: Sequence[Device],
    *,
    path: str | None = None,
    check: bool = False,
    overrides: SshOverrides = SshOverrides(),
    parallel: int = DEFAULT_PARALLEL,
    inventory: Path | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Deploy ``bundle`` to every device; one record per device, in the devices' order.

    A device whose --check fails keeps its deploy record and is failed (the bundle is there, but no
    runtime there can run it). Each device deployed by name remembers the bundle (bench @GROUP).
    """
    from edgetl.core.bundle import read_manifest
    from edgetl.device.deploy import deploy

    read_manifest(Path(bundle))  # a bad bundle is one error here, not one per device

    def one(device: Device) -> dict[str, Any]:
        where = deploy_path(device, bundle, path)
        remote = remote_for(device, where, overrides)
        doc = deploy(bundle, remote, check=check)
        record_deploy(device.name, remote.target.path, inventory)
        return doc

    def record(r: GroupResult) -> dict[str, Any]:
        doc = r.value
        rec = _base(r, doc["target"] if doc else _target_text(r.device, _safe(deploy_path, r.device, bundle, path)))
        rec["deploy"] = doc
        if doc is not None and "check" in doc and not doc["check"]["ok"]:
            failed = "; ".join(c["detail"] for c in doc["check"]["checks"] if c["status"] == "fail")
            rec["ok"] = False
            rec["error"] = {
                "type": "RemoteError",
                "message": f"deployed, but the device cannot use the bundle: {failed}",
            }
        return rec

    return _collect(devices, one, record, parallel, on_done)


def _safe(fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except ConfigError:
        return None


def _collect(
    devices: Sequence[Device],
    one: Callable[[Device], Any],
    record: Callable[[GroupResult], dict[str, Any]],
    parallel: int,
    on_done: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}

    def done(r: GroupResult) -> None:
        records[r.device.name] = record(r)
        if on_done is not None:
            on_done(records[r.device.name])

    _fan_out(devices, one, parallel, done)
    return [records[d.name] for d in devices]


# --- bench ---------------------------------------------------------------------------------------------


def bench_one(remote: Remote, bench_args: Sequence[str]):
    """``edgetl bench PATH ARGS --json --samples`` on one device, its output kept (not echoed: the
    other devices run at the same time). Returns a :class:`~edgetl.device.remote_bench.RemoteBench`."""
    from edgetl.device.remote_bench import RemoteBench

    t = remote.target
    version = remote.compatible_version()
    doctor = envelope_record(remote.json("doctor", what="edgetl doctor", echo_stderr=False), "edgetl doctor")
    report = remote.json("bench", t.path, *bench_args, "--samples", what="edgetl bench", echo_stderr=False)
    rb = RemoteBench(t, version, report, doctor.get("machine", {}), doctor.get("profiles", {}).get("best"))
    rb.bench_report()  # a document this edgetl cannot read is this device's error
    return rb


def bench_group(
    devices: Sequence[Device],
    bench_args: Sequence[str],
    *,
    path: str | None = None,
    overrides: SshOverrides = SshOverrides(),
    parallel: int = DEFAULT_PARALLEL,
    samples: bool = False,
    save_dir: str | os.PathLike | None = None,
    save: bool = False,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Bench on every device at once (at most ``parallel``): each device times its own CPU, so they
    do not disturb one another; only the ssh sessions share this machine. Returns one record per
    device and the devices' :class:`RemoteBench` (None for a failed one), in order. ``save`` (or
    ``save_dir``) stores each device's result as ``bench --save`` does."""
    from edgetl.device.remote_bench import save_remote

    save = save or save_dir is not None

    def one(device: Device) -> tuple[Any, str | None]:
        rb = bench_one(remote_for(device, bench_path(device, path), overrides), bench_args)
        saved = str(save_remote(rb, save_dir)) if save else None
        return rb, saved

    def record(r: GroupResult) -> dict[str, Any]:
        rb, saved = r.value if r.value is not None else (None, None)
        rec = _base(r, str(rb.target) if rb else _target_text(r.device, _safe(bench_path, r.device, path)))
        if rb is not None:
            d = rb.device
            rec.update(
                edgetl=d["edgetl"],
                fingerprint=d["fingerprint"],
                profile_fit=d["profile_fit"],
                results=rb.bench_report().result_dicts(samples=samples),
                saved=saved,
            )
        else:
            rec.update(edgetl=None, fingerprint=None, profile_fit=None, results=[], saved=None)
        rec["_bench"] = rb
        return rec

    records = _collect(devices, one, record, parallel, on_done)
    benches = [rec.pop("_bench") for rec in records]
    return records, benches


# --- doctor --------------------------------------------------------------------------------------------


def doctor_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few facts of a device's doctor report that a fleet table shows."""
    machine = report.get("machine") or {}
    runtimes = report.get("runtimes") or {}
    int8 = report.get("int8") or {}
    return {
        "arch": machine.get("arch"),
        "cpu": machine.get("cpu"),
        "cores": machine.get("logical_cores"),
        "python": machine.get("python"),
        "profile": (report.get("profiles") or {}).get("best"),
        "runtimes": {
            name: info.get("version")
            for name, info in sorted(runtimes.items())
            if isinstance(info, dict) and info.get("installed")
        },
        "int8": int8.get("expect"),
        "int8_hardware": int8.get("hardware"),
        "warnings": [w for w in report.get("warnings") or [] if isinstance(w, str)],
    }


def doctor_group(
    devices: Sequence[Device],
    *,
    overrides: SshOverrides = SshOverrides(),
    parallel: int = DEFAULT_PARALLEL,
    record_facts: bool = True,
    inventory: Path | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``edgetl doctor --json`` on every device; ``record_facts`` keeps each answer's facts (and
    edgetl's version there) in the inventory, as ``edgetl device add --check`` does."""
    from edgetl.device.inventory import facts_from_doctor

    def one(device: Device) -> tuple[str, dict[str, Any]]:
        remote = remote_for(device, device.bundles_dir, overrides)
        document = remote.json("doctor", what="edgetl doctor", echo_stderr=False)
        report = envelope_record(document, f"edgetl doctor on {remote.target.where}")
        version = document.get("edgetl") if isinstance(document, dict) else None
        if not isinstance(version, str):
            raise RemoteError(f"edgetl doctor on {remote.target.where} printed a document without edgetl's version")
        if record_facts:
            update_device(device.name, inventory, facts=facts_from_doctor(document), edgetl_version=version)
        return version, report

    def record(r: GroupResult) -> dict[str, Any]:
        rec = _base(r, _target_text(r.device, None))
        if r.value is not None:
            version, report = r.value
            rec.update(edgetl=version, summary=doctor_summary(report), doctor=report)
        else:
            rec.update(edgetl=None, summary=None, doctor=None)
        return rec

    return _collect(devices, one, record, parallel, on_done)


def failures(records: Sequence[dict[str, Any]]) -> str | None:
    """One line naming the failed devices (None: none failed)."""
    failed = [r["device"] for r in records if not r["ok"]]
    if not failed:
        return None
    return f"{len(failed)} of {len(records)} devices failed: {', '.join(failed)} (each device's error is in its row)"


__all__ = [
    "DEFAULT_PARALLEL",
    "SshOverrides",
    "bench_group",
    "bench_one",
    "check_parallel",
    "deploy_group",
    "doctor_group",
    "doctor_summary",
    "failures",
    "group_devices",
    "is_group_target",
    "parse_group_target",
    "remote_for",
]
