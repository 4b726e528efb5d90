"""Bench and predict on a device from the workstation, over ssh (after ``edgetl deploy``).

Remote ``bench`` runs edgetl's own bench on the device (its stderr streamed here) and brings the
JSON back; several targets are benched one at a time and make one comparison. Remote ``predict``
streams the device's output here as it comes. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from edgetl.core.errors import ConfigError, DataError, RemoteError
from edgetl.device.remote import Remote, Target, envelope_record

if TYPE_CHECKING:
    from edgetl.device.bench import BenchReport

log = logging.getLogger(__name__)

# What `edgetl bench` does here with a device's result; never forwarded to the device (it is always
# asked for --json and --samples; --format only shapes what is printed here; --compare reads files
# here and never goes with targets).
LOCAL_BENCH_OPTIONS = ("targets", "save", "save_dir", "plot", "samples", "as_json", "output_format", "compare")


def bench_targets(bundle: str | None, targets: Sequence[str]) -> list[str]:
    """The devices ``edgetl bench BUNDLE --target ...`` runs on: a remote BUNDLE, then the targets.
    Empty: bench runs here, on the local BUNDLE. Local and remote together are refused."""
    from edgetl.device.inventory import is_device_target

    remote = ([bundle] if bundle is not None and is_device_target(bundle) else []) + list(targets)
    if remote and bundle is not None and not is_device_target(bundle):
        raise ConfigError(f"give a local BUNDLE or device targets, not both ({bundle} is local)")
    if not remote and bundle is None:
        raise ConfigError("give a BUNDLE (a folder here, or user@host:PATH on a device) or --target")
    return remote


def fingerprint(machine: dict[str, Any]) -> str:
    """A short id of the device's hardware (CPU, board, cores, features, memory to the GB): the same
    board gives the same id across OS and runtime updates, which are recorded beside it."""
    keys = ("cpu", "board", "arch", "logical_cores", "cpu_cores", "isa")
    facts = {k: machine.get(k) for k in keys}
    facts["memory_gb"] = round((machine.get("memory_mb") or 0) / 1024)
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class RemoteBench:
    """One target's bench report (as the device printed it) and who the device is."""

    target: Target
    edgetl_version: str
    report: dict[str, Any]  # the device's `edgetl bench --json --samples` document (of any edgetl version)
    machine: dict[str, Any]
    profile_fit: str | None  # the shipped profile doctor says fits the device

    @property
    def device(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "where": self.target.where,
            "edgetl": self.edgetl_version,
            "fingerprint": fingerprint(self.machine),
            "machine": self.machine,
            "profile_fit": self.profile_fit,
        }

    def bench_report(self) -> BenchReport:
        """The device's results, each saying where it ran (``target``, ``remote``)."""
        from edgetl.device.bench import BenchReport, BenchResult
        from edgetl.device.bench.results import result_dicts_of

        what = f"edgetl bench on {self.target.where}"
        try:
            records = result_dicts_of(self.report, what=what)
        except DataError as exc:
            raise RemoteError(f"{exc} (is edgetl there a different version? it says {self.edgetl_version})") from None
        device, target = self.device, str(self.target)
        results = [BenchResult.from_dict({**d, "target": target, "remote": device}) for d in records]
        skipped = [s for s in self.report.get("skipped") or [] if isinstance(s, dict)]
        return BenchReport.of(results, skipped=skipped, mode="remote")

    def profile_folder(self) -> str:
        applied = self.bench_report().profile
        if applied and isinstance(applied.get("name"), str):
            return applied["name"]
        return self.profile_fit or f"unknown-{self.machine.get('arch', 'device')}"


def bench_remote(remote: Remote, bench_args: Sequence[str]) -> RemoteBench:
    """Run ``edgetl bench PATH ARGS --json --samples`` on the device, its progress on stderr here."""
    t = remote.target
    version = remote.compatible_version()
    doctor = envelope_record(remote.json("doctor", what="edgetl doctor", echo_stderr=False), "edgetl doctor")
    log.info("benchmarking %s on %s (edgetl %s, %s)", t.path, t.where, version, doctor["machine"].get("cpu"))
    report = remote.json("bench", t.path, *bench_args, "--samples", what="edgetl bench")
    rb = RemoteBench(t, version, report, doctor.get("machine", {}), doctor.get("profiles", {}).get("best"))
    rb.bench_report()  # a document this edgetl cannot read is one error here, naming the device
    return rb


def predict_remote(
    remote: Remote, images: Sequence[str], predict_args: Sequence[str], *, on_stdout: Callable[[bytes], None]
) -> None:
    """Run ``edgetl predict PATH IMAGES ARGS`` on the device (IMAGES are device paths); its stdout
    goes to ``on_stdout`` as it comes (a million results cost no memory here), its stderr to ours."""
    remote.compatible_version()  # connection, host key and edgetl there, with clear errors, before streaming
    command = remote.edgetl_command("predict", remote.target.path, *images, *predict_args)
    remote.check(remote.run(command, on_stdout=on_stdout, echo_stderr=True), "edgetl predict")


def save_remote(rb: RemoteBench, save_dir: str | os.PathLike | None = None) -> Path:
    """Write a device's bench result, every sample and the device's fingerprint included, under
    ``devices/<profile>/results/`` (the same place `bench --save` on the device would use), as the
    bench document (docs/schemas/bench.json)."""
    from edgetl.device.bench import save_report

    name = (PurePosixPath(rb.target.path).name or "bundle") + "-" + rb.target.host.strip("[]").replace(":", "_")
    return save_report(rb.bench_report(), profile_name=rb.profile_folder(), save_dir=save_dir, name=name)


def bench_devices(
    remotes: Sequence[Remote],
    bench_args: Sequence[str],
    *,
    save: bool = False,
    save_dir: str | os.PathLike | None = None,
    on_saved: Callable[[Path], None] | None = None,
) -> list[RemoteBench]:
    """Bench on each device in turn (one at a time, so that they do not share the workstation's
    network or ssh); ``save`` (implied by ``save_dir``) stores each result as it arrives."""
    save = save or save_dir is not None
    benches = []
    for remote in remotes:
        rb = bench_remote(remote, bench_args)
        benches.append(rb)
        if save:
            path = save_remote(rb, save_dir)
            if on_saved is not None:
                on_saved(path)
    return benches


def remote_report(benches: Sequence[RemoteBench]) -> BenchReport:
    """One report of every device's results (in order), with the ratios within each device and,
    for several devices, every result against the first one."""
    from edgetl.device.bench import combine

    return combine([rb.bench_report() for rb in benches], mode="remote")


__all__ = [
    "LOCAL_BENCH_OPTIONS",
    "RemoteBench",
    "bench_devices",
    "bench_remote",
    "bench_targets",
    "fingerprint",
    "predict_remote",
    "remote_report",
    "save_remote",
]
