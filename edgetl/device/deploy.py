"""Ship a bundle to a device and use it there from the workstation: deploy, check, bench, predict.

``deploy`` verifies and packs the bundle, streams the archive over one ssh session into a
temporary file beside the target folder, then runs ``edgetl unpack --force --sha256`` on the
device: the archive's checksum and every file's checksum are verified there, the bundle is built
in a temporary folder and renamed over the old one only once it is complete. An interrupted copy
or a failed check leaves the device's previous bundle as it was (and the partial upload is
removed when the device can still be reached). ``check_fit`` reads ``edgetl doctor BUNDLE --json``
from the device and says whether its runtimes, int8 speed and device profile suit the bundle.

Remote ``bench`` runs edgetl's own bench on the device (its stderr streamed here) and brings the
JSON back; several targets make one comparison. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import secrets
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from edgetl.core.bundle import MANIFEST_NAME, read_manifest
from edgetl.core.errors import RemoteError
from edgetl.core.formats import format_of, runtime_of, variant_name
from edgetl.device.remote import Remote, Target

log = logging.getLogger(__name__)

INT8_WORTH = 1.05  # below this measured speed-up, int8 buys no speed worth its accuracy risk (as doctor says)


def _upload_name(path: str) -> str:
    p = PurePosixPath(path)
    return str(p.parent / f".{p.name}.upload-{secrets.token_hex(4)}.tar.gz")


def deploy(
    bundle: str | os.PathLike,
    remote: Remote,
    *,
    check: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Copy ``bundle`` to ``remote.target`` and verify it there; returns what happened, with timings.

    ``on_progress(stage, done, total)`` is called while copying (bytes) for a progress bar.
    """
    from edgetl.device.pack import pack_bundle

    bundle = Path(bundle)
    target = remote.target
    t_start = time.perf_counter()
    manifest = read_manifest(bundle)
    version = remote.version()  # connection, host key, login and edgetl there, before any work
    log.info("%s: edgetl %s", target.where, version)
    with tempfile.TemporaryDirectory(prefix="edgetl-deploy-") as tmp:
        archive = Path(tmp) / f"{bundle.resolve().name}.tar.gz"
        packed = pack_bundle(bundle, archive)  # verifies every checksum here first
        upload = _upload_name(target.path)
        total = packed["archive_bytes"]
        done = 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress("copy", done, total)

        t_copy = time.perf_counter()
        try:
            remote.upload(archive, upload, on_bytes=on_bytes)
        except (RemoteError, KeyboardInterrupt):
            removed = remote.remove(upload)
            log.info("partial upload %s %s", upload, "removed" if removed else "left (device unreachable)")
            raise
        copy_s = time.perf_counter() - t_copy
    t_unpack = time.perf_counter()
    script = (
        'tmp="$1"; dest="$2"; '
        f'if [ -e "$dest" ] && [ ! -f "$dest/{MANIFEST_NAME}" ]; then rm -f -- "$tmp"; '
        'echo "Error: $dest exists on the device and is not an edgetl bundle; refusing to replace it '
        '(deploy to another path, or remove it there)" >&2; exit 3; fi; '
        + remote.edgetl_command("unpack")
        + ' "$tmp" "$dest" --force --json --sha256 '
        + packed["sha256"]
        + '; rc=$?; rm -f -- "$tmp"; exit $rc'
    )
    command = f"sh -c {shlex.quote(script)} sh {shlex.quote(upload)} {shlex.quote(target.path)}"
    result = remote.check(remote.run(command, echo_stderr=True), "unpacking the bundle")
    try:
        unpacked = json.loads(result.stdout)
    except ValueError:
        raise RemoteError(
            f"unpacking on {target.where} printed no JSON: is edgetl there older than 0.1? (it says {version})"
        ) from None
    doc: dict[str, Any] = {
        "bundle": str(bundle),
        "target": str(target),
        "where": target.where,
        "path": target.path,
        "remote_edgetl": version,
        "files": unpacked["files"],
        "bytes": unpacked["bytes"],
        "archive_bytes": total,
        "sha256": packed["sha256"],
        "variants": unpacked["variants"],
        "heads": unpacked["heads"],
        "copy_seconds": round(copy_s, 3),
        "copy_mb_per_s": round(total / 1e6 / copy_s, 2) if copy_s > 0 else None,
        "unpack_seconds": round(time.perf_counter() - t_unpack, 3),
    }
    if check:
        doctor = remote.json("doctor", target.path, what="edgetl doctor")
        doc["check"] = check_fit(manifest, doctor)
    doc["seconds"] = round(time.perf_counter() - t_start, 3)
    return doc


# --- does the device fit the bundle? -----------------------------------------------------------------


def check_fit(manifest: dict[str, Any], doctor: dict[str, Any]) -> dict[str, Any]:
    """Checks of a bundle against a device's ``edgetl doctor BUNDLE --json``: runtime, precision,
    profile; each ``ok``, ``warn`` or ``fail``, with what to do. ``ok`` overall unless one fails."""
    variants = manifest["variants"]
    runtimes = doctor.get("runtimes", {})

    def usable(runtime: str) -> bool:
        rt = runtimes.get(runtime, {})
        return bool(rt.get("installed")) and not rt.get("error")

    runnable = [n for n, v in variants.items() if usable(runtime_of(v["format"]) or "")]
    checks = []
    if runnable:
        names = sorted({runtime_of(variants[n]["format"]) for n in runnable})
        versions = ", ".join(f"{r} {runtimes[r].get('version', '?')}" for r in names)
        checks.append(
            _check(
                "runtime",
                "ok",
                f"{len(runnable)} of {len(variants)} variants can run ({versions}): {', '.join(runnable)}",
            )
        )
    else:
        needed = sorted({runtime_of(v["format"]) or v["format"] for v in variants.values()})
        checks.append(
            _check(
                "runtime",
                "fail",
                f"no runtime on the device can run this bundle: it needs "
                f"{' or '.join(needed)} (pip install {needed[0]} on the device)",
            )
        )
    checks.append(_precision_check(manifest, doctor, runnable))
    checks.append(_profile_check(manifest, doctor))
    for warning in doctor.get("warnings", []):
        if "int8" not in warning:  # the precision check has already said it
            checks.append(_check("device", "warn", warning))
    return {
        "ok": all(c["status"] != "fail" for c in checks),
        "profile": doctor.get("profiles", {}).get("best"),
        "checks": checks,
        "machine": doctor.get("machine", {}),
    }


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"check": name, "status": status, "detail": detail}


def _precision_check(manifest: dict[str, Any], doctor: dict[str, Any], runnable: list[str]) -> dict[str, str]:
    int8 = doctor.get("int8", {})
    has_int8 = any(manifest["variants"][n]["precision"] == "int8" for n in runnable)
    measured = [row for row in int8.get("measured", []) if "speedup" in row]
    if measured:
        parts = [
            f"{r['runtime']} int8 {r['speedup']:.2f}x fp32 (p50 {r['int8_p50_ms']:.2f} vs {r['fp32_p50_ms']:.2f} ms)"
            for r in measured
        ]
        slow = [r for r in measured if r["speedup"] < INT8_WORTH]
        if slow:
            return _check(
                "precision",
                "warn",
                "measured on the device: "
                + "; ".join(parts)
                + ": int8 buys no speed here; run fp32 (--precision fp32), or the other runtime",
            )
        return _check("precision", "ok", "measured on the device: " + "; ".join(parts))
    outlook = f"{int8.get('hardware', 'unknown')}: int8 expected {int8.get('expect', 'unknown')}"
    if has_int8:
        return _check(
            "precision",
            "ok" if int8.get("expect") == "faster" else "warn",
            f"{outlook} (the bundle has no fp32 to measure against on the device)",
        )
    if int8.get("expect") == "faster":
        return _check(
            "precision",
            "warn",
            f"{outlook}, but the bundle has no int8 variant a runtime here can run: export with --precision fp32,int8",
        )
    return _check("precision", "ok", f"{outlook}; fp32 is the right choice")


def _profile_check(manifest: dict[str, Any], doctor: dict[str, Any]) -> dict[str, str]:
    from edgetl.core.errors import EdgetlError
    from edgetl.device.profiles import load_profile

    best = doctor.get("profiles", {}).get("best")
    if not best:
        return _check(
            "profile",
            "warn",
            "no shipped device profile fits the device; bench with explicit options "
            "or write a profile (devices/*.yaml)",
        )
    try:
        profile = load_profile(best)
    except EdgetlError:
        return _check(
            "profile", "warn", f"the device fits profile {best!r}, which this edgetl does not ship (versions differ?)"
        )
    fmt = format_of(profile.runtime)
    wanted = (
        [variant_name(fmt, profile.precision)]
        if profile.precision
        else [n for n, v in manifest["variants"].items() if v["format"] == fmt]
    )
    have = [n for n in wanted if n in manifest["variants"]]
    settings = f"{profile.runtime}" + (f" {profile.precision}" if profile.precision else "")
    if have:
        return _check(
            "profile",
            "ok",
            f"the device fits {best}, which runs {settings}: the bundle has {have[0]} "
            f"(edgetl bench ... --device-profile {best})",
        )
    return _check(
        "profile",
        "warn",
        f"the device fits {best}, which runs {settings}, but the bundle has no "
        f"{wanted[0] if wanted else fmt + ' variant'}: export it with "
        f"--format {fmt} --precision {profile.precision or 'fp32'}",
    )


# --- bench and predict on the device ----------------------------------------------------------------


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


__all__ = [
    "RemoteBench",
    "bench_remote",
    "check_fit",
    "comparison_rows",
    "deploy",
    "fingerprint",
    "predict_remote",
    "save_remote",
]
