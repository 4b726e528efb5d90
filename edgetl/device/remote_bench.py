"""Bench and predict on a device from the workstation, over ssh (after ``edgetl deploy``).

Remote ``bench`` runs edgetl's own bench on the device (its stderr streamed here) and brings the
JSON back; several targets are benched one at a time and make one comparison. Remote ``predict``
streams the device's output here as it comes. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from edgetl.core.errors import ConfigError
from edgetl.device.remote import Remote, Target, is_remote

log = logging.getLogger(__name__)

# What `edgetl bench` does here with a device's result; never forwarded to the device (--json and
# --samples are always asked of it).
LOCAL_BENCH_OPTIONS = ("targets", "save", "save_dir", "plot", "samples", "as_json")


def bench_targets(bundle: str | None, targets: Sequence[str]) -> list[str]:
    """The devices ``edgetl bench BUNDLE --target ...`` runs on: a remote BUNDLE, then the targets.
    Empty: bench runs here, on the local BUNDLE. Local and remote together are refused."""
    remote = ([bundle] if bundle is not None and is_remote(bundle) else []) + list(targets)
    if remote and bundle is not None and not is_remote(bundle):
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
    report: dict[str, Any]  # the device's `edgetl bench --json --samples` document
    machine: dict[str, Any]
    profile_fit: str | None  # the shipped profile doctor says fits the device

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.report.get("results", [self.report])

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

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        report = self.report if samples else _without_samples(self.report)
        return {**report, "device": self.device}

    def profile_folder(self) -> str:
        applied = self.report.get("profile") or self.results[0].get("profile")
        if applied:
            return applied["name"]
        return self.profile_fit or f"unknown-{self.machine.get('arch', 'device')}"


def _without_samples(report: dict[str, Any]) -> dict[str, Any]:
    if "results" in report:
        return {**report, "results": [{k: v for k, v in r.items() if k != "samples_ms"} for r in report["results"]]}
    return {k: v for k, v in report.items() if k != "samples_ms"}


def bench_remote(remote: Remote, bench_args: Sequence[str]) -> RemoteBench:
    """Run ``edgetl bench PATH ARGS --json --samples`` on the device, its progress on stderr here."""
    t = remote.target
    version = remote.version()
    doctor = remote.json("doctor", what="edgetl doctor", echo_stderr=False)
    log.info("benchmarking %s on %s (edgetl %s, %s)", t.path, t.where, version, doctor["machine"].get("cpu"))
    report = remote.json("bench", t.path, *bench_args, "--samples", what="edgetl bench")
    return RemoteBench(t, version, report, doctor.get("machine", {}), doctor.get("profiles", {}).get("best"))


def predict_remote(
    remote: Remote, images: Sequence[str], predict_args: Sequence[str], *, on_stdout: Callable[[bytes], None]
) -> None:
    """Run ``edgetl predict PATH IMAGES ARGS`` on the device (IMAGES are device paths); its stdout
    goes to ``on_stdout`` as it comes (a million results cost no memory here), its stderr to ours."""
    remote.version()  # connection, host key and edgetl there, with clear errors, before streaming
    command = remote.edgetl_command("predict", remote.target.path, *images, *predict_args)
    remote.check(remote.run(command, on_stdout=on_stdout, echo_stderr=True), "edgetl predict")


def save_remote(rb: RemoteBench, save_dir: str | os.PathLike | None = None) -> Path:
    """Write a device's bench result, every sample and the device's fingerprint included, under
    ``devices/<profile>/results/`` (the same place `bench --save` on the device would use)."""
    from edgetl.core.atomic import write_json_atomic
    from edgetl.device.bench import results_dir

    folder = results_dir(rb.profile_folder(), save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = PurePosixPath(rb.target.path).name or "bundle"
    path = folder / f"{stamp}-{name}-{rb.target.host.strip('[]').replace(':', '_')}.json"
    report = rb.report if "results" in rb.report else {"results": [rb.report], "comparison": []}
    write_json_atomic(path, {**report, "device": rb.device, "saved_utc": stamp, "profile_folder": rb.profile_folder()})
    return path


def comparison_rows(benches: Sequence[RemoteBench]) -> list[dict[str, Any]]:
    """One row per (target, configuration), with the speed-up against the first row."""
    rows = []
    for rb in benches:
        for r in rb.results:
            rows.append(
                {
                    "target": rb.target.where,
                    "cpu": rb.machine.get("cpu"),
                    "variant": r["variant"],
                    "runtime": r["runtime"],
                    "batch_size": r["batch_size"],
                    "threads": r["threads"],
                    "p50_ms": r["latency_ms"]["p50"],
                    "p99_ms": r["latency_ms"]["p99"],
                    "throughput_ips": r["throughput_ips"],
                    "cold_start_ms": r["cold_start_ms"].get("total") or r["cold_start_ms"].get("load"),
                    "peak_rss_mb": r["peak_rss_mb"],
                    "model_bytes": r["model_bytes"],
                    "fingerprint": fingerprint(rb.machine),
                }
            )
    if rows:
        base = rows[0]["p50_ms"]
        for row in rows:
            row["speedup_vs_first"] = base / row["p50_ms"] if row["p50_ms"] else None
    return rows


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


def benches_doc(benches: Sequence[RemoteBench], *, samples: bool = False) -> dict[str, Any]:
    """The ``--json`` document: one device's report, or every device's and their comparison."""
    if len(benches) == 1:
        return benches[0].to_dict(samples=samples)
    return {"targets": [rb.to_dict(samples=samples) for rb in benches], "comparison": comparison_rows(benches)}


__all__ = [
    "LOCAL_BENCH_OPTIONS",
    "RemoteBench",
    "bench_devices",
    "bench_remote",
    "bench_targets",
    "benches_doc",
    "comparison_rows",
    "fingerprint",
    "predict_remote",
    "save_remote",
]
