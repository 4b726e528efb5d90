"""Ship a bundle to a device and use it there from the workstation: deploy, check, bench, predict.

``deploy`` verifies and packs the bundle, streams the archive over one ssh session into a
temporary file beside the target folder, then runs ``edgetl unpack --force --sha256`` on the
device: the archive's checksum and every file's checksum are verified there, the bundle is built
in a temporary folder and renamed over the old one only once it is complete. An interrupted copy
or a failed check leaves the device's previous bundle as it was (and the partial upload is
removed when the device can still be reached). ``check_fit`` reads ``edgetl doctor BUNDLE --json``
from the device and says whether its runtimes, int8 speed and device profile suit the bundle.

Bench and predict on the device from the workstation: :mod:`edgetl.device.remote_bench`. Nothing
here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from edgetl.core import envinfo
from edgetl.core.bundle import MANIFEST_NAME, read_manifest
from edgetl.core.errors import RemoteError
from edgetl.core.formats import format_of, runtime_of, variant_name
from edgetl.device.bundle_loading import warn_saturation
from edgetl.device.remote import Remote, envelope_record, version_skew

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
    version = remote.compatible_version()  # connection, host key, login and edgetl there, before any work
    log.info("%s: edgetl %s", target.where, version)
    made_by = str(manifest.get("edgetl_version") or "")
    problem = version_skew(version, made_by) if made_by else None
    if problem:  # a bundle written by a newer edgetl than the device's
        raise RemoteError(
            f"{bundle} was written by edgetl {made_by} (bundle schema {manifest.get('schema_version')}) and "
            f"{target.where} runs edgetl {version}, which may not read it; install this edgetl there with: "
            f"edgetl device setup {target.destination}"
        )
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
    unpack = remote.edgetl_command("unpack")
    unpack_options = f"--force --json --sha256 {packed['sha256']}"
    script = (
        'tmp="$1"; dest="$2"; '
        f'if [ -e "$dest" ] && [ ! -f "$dest/{MANIFEST_NAME}" ]; then rm -f -- "$tmp"; '
        'echo "Error: $dest exists on the device and is not an edgetl bundle; refusing to replace it '
        '(deploy to another path, or remove it there)" >&2; exit 3; fi; '
        # `unpack --out DEST` where the device's edgetl has it; older ones take DEST as an argument.
        + f"if {remote.edgetl_command('unpack', '--help')} 2>/dev/null | grep -q -e --out; then "
        + f'{unpack} "$tmp" --out "$dest" {unpack_options}; else {unpack} "$tmp" "$dest" {unpack_options}; fi; '
        + 'rc=$?; rm -f -- "$tmp"; exit $rc'
    )
    command = f"sh -c {shlex.quote(script)} sh {shlex.quote(upload)} {shlex.quote(target.path)}"
    result = remote.check(remote.run(command, echo_stderr=True), "unpacking the bundle")
    try:
        unpacked = envelope_record(json.loads(result.stdout), f"edgetl unpack on {target.where}")
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
        doctor = envelope_record(remote.json("doctor", target.path, what="edgetl doctor"), "edgetl doctor")
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
    machine = doctor.get("machine", {})
    isa = machine.get("isa")
    saturates = bool(envinfo.int8_saturates(isa, machine.get("arch"))) if isinstance(isa, list) else False
    for name in runnable:
        message = warn_saturation(name, variants[name], saturates)
        if message:
            checks.append(_check("int8 accuracy", "warn", message))
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
    # A profile's runtimes in order of preference: the first whose format the bundle holds.
    held = {v["format"] for v in manifest["variants"].values()}
    runtime = next((r for r in profile.runtimes if format_of(r) in held), profile.runtimes[0])
    fmt = format_of(runtime)
    wanted = (
        [variant_name(fmt, profile.precision)]
        if profile.precision
        else [n for n, v in manifest["variants"].items() if v["format"] == fmt]
    )
    have = [n for n in wanted if n in manifest["variants"]]
    settings = f"{runtime}" + (f" {profile.precision}" if profile.precision else "")
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
        f"--model-format {fmt} --precision {profile.precision or 'fp32'}",
    )


__all__ = ["check_fit", "deploy"]
