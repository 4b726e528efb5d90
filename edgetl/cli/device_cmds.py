"""`edgetl devices` and `edgetl doctor`: device profiles, and what this machine is.

See edgetl.device.profiles and edgetl.device.doctor."""

from __future__ import annotations

import click

from edgetl.cli._common import common_options, handle_errors
from edgetl.cli._output import clean, emit_json, emit_table, envelope, format_option, resolve_format


@click.command()
@click.argument("name", required=False, metavar="[NAME|PATH]")
@format_option
@common_options
@handle_errors
def devices(name: str | None, output_format: str | None, as_json: bool) -> None:
    """List the shipped device profiles, or show one in full.

    A profile sets runtime, provider or OpenVINO device, threads, streams, precision and batch
    size for `bench` and `predict` (--device-profile NAME|PATH; options given on the command line
    win). `edgetl doctor` says which one fits this machine.

    \b
    Output: a table on a terminal, tab-separated lines in a pipe (name, device, settings; with
    NAME: key, value), or --json: {"schema": "edgetl.devices", ..., "results": [profile, ...]}
    (one profile with NAME).

    \b
    Example:
      edgetl devices
      edgetl devices rpi5
      edgetl bench bundles/digits --device-profile rpi5
    """
    show_profiles(name, resolve_format(output_format, as_json), "devices", "edgetl devices")


def show_profiles(name: str | None, fmt: str, schema: str, command: str) -> None:
    """The shipped device profiles (or profile ``name`` in full) in ``fmt``, as ``edgetl devices``
    and ``edgetl device profiles`` print them (their JSON named ``edgetl.<schema>``)."""
    from edgetl.device.profiles import list_profiles, load_profile, profile_label

    if name is not None:
        p = load_profile(name)
        if fmt == "json":
            emit_json(envelope(schema, [p.to_dict()]))
        elif fmt == "tsv":
            rows = [
                ("name", p.name),
                ("description", p.description),
                ("hardware", p.hardware),
                ("settings", profile_label(p)),
                ("provider_options", ", ".join(f"{k}={v}" for k, v in p.provider_options.items())),
                ("file", p.path),
                ("notes", " ".join(p.notes.split())),
            ]
            emit_table(fmt, ("key", "value"), rows)
        else:
            _print_profile(p, profile_label(p))
        return
    profiles = list_profiles()
    if fmt == "json":
        emit_json(envelope(schema, [p.to_dict() for p in profiles]))
        return
    emit_table(
        fmt,
        ("name", "device", "settings"),
        [(p.name, p.description, profile_label(p)) for p in profiles],
        title=f"Device profiles ({command} NAME for details)",
    )


def _print_profile(p, settings: str) -> None:
    import textwrap

    click.echo(f"{clean(p.name)}: {clean(p.description)}")
    if p.hardware:
        click.echo(f"  hardware:  {clean(p.hardware)}")
    click.echo(f"  settings:  {clean(settings)}")
    if p.provider_options:
        click.echo(f"  provider options: {clean(', '.join(f'{k}={v}' for k, v in p.provider_options.items()))}")
    click.echo(f"  file:      {clean(p.path)}")
    if p.notes:
        notes = clean(" ".join(p.notes.split()))
        click.echo("\n" + textwrap.fill(notes, width=96, initial_indent="  ", subsequent_indent="  "))


@click.command()
@click.argument("bundle", required=False, type=click.Path())
@format_option
@common_options
@handle_errors
def doctor(bundle: str | None, output_format: str | None, as_json: bool) -> None:
    """What this machine is and what it can run: CPU and the features that decide int8 speed,
    runtimes, ONNX Runtime providers, OpenVINO devices, the device profile that fits, and warnings.

    With BUNDLE, also measures int8 against fp32 here (a few seconds), for each runtime that the
    bundle has both precisions for.

    \b
    Output: labelled lines (the same on a terminal and in a pipe, never wrapped), or --json:
    {"schema": "edgetl.doctor", ..., "bundle": BUNDLE or null, "results": [report]}.

    \b
    Example:
      edgetl doctor
      edgetl doctor bundles/digits --json
    """
    from edgetl.device.doctor import diagnose

    fmt = resolve_format(output_format, as_json)
    report = diagnose(bundle)
    if fmt == "json":
        emit_json(envelope("doctor", [report.to_dict()], bundle=bundle))
        return
    for line in doctor_lines(report):
        click.echo(clean(line))


def doctor_lines(r) -> list[str]:
    """The report as labelled lines (``machine``, ``CPU``, ``runtimes``, ``profile``, ``int8``,
    ``warning``), each one line however long."""
    lines: list[str] = []
    m, rt = r.machine, r.runtimes
    cores = f"{m['logical_cores']} logical"
    if m["physical_cores"]:
        cores += f", {m['physical_cores']} physical"
    if m["usable_cores"] != m["logical_cores"]:
        cores += f", {m['usable_cores']} usable"
    lines.append(f"machine   {m['cpu']}" + (f" ({m['board']})" if m["board"] and m["board"] != m["cpu"] else ""))
    lines.append(
        f"          {m['arch']}, {cores} cores"
        + (f" ({', '.join(m['cpu_cores'])})" if m["cpu_cores"] else "")
        + (f", {m['memory_mb'] / 1024:.1f} GB" if m["memory_mb"] else "")
        + (", virtual machine" if m["virtualized"] else "")
    )
    lines.append(f"          {m['os']} {m['kernel']}, python {m['python']}, governor {m['governor'] or 'n/a'}")
    if m["isa"] is None:
        lines.append("CPU       features unknown on this platform")
    else:
        lines.append("CPU       " + (", ".join(m["isa_meaning"].values()) or "none of the features edgetl checks"))
        if m["isa_missing"]:
            lines.append(f"          absent: {', '.join(m['isa_missing'])}")
    ort, ov = rt["onnxruntime"], rt["openvino"]
    lines.append(
        "runtimes  onnxruntime "
        + (
            f"{ort['version']}: providers {', '.join(ort['providers']) or 'none'}"
            if ort["installed"]
            else "not installed (pip install onnxruntime)"
        )
    )
    if ov["installed"]:
        devs = ", ".join(f"{d['name']} ({', '.join(d['capabilities'])})" for d in ov["devices"]) or "none"
        lines.append(f"          openvino {ov['version']}: devices {devs}")
    else:
        lines.append("          openvino not installed (pip install 'edgetl[openvino]')")
    lite, nc = rt["litert"], rt["ncnn"]
    if lite["installed"]:
        lines.append(f"          litert {lite['version']}: {lite.get('delegate') or lite.get('error', '')}")
    else:
        lines.append("          litert not installed (pip install 'edgetl[litert]')")
    if nc["installed"]:
        cpu = nc.get("cpu") or {}
        lines.append(
            f"          ncnn {nc['version']}: "
            + (
                f"{cpu['threads']} threads, fp16 arithmetic {'yes' if cpu['arm_fp16_arithmetic'] else 'no'}"
                if cpu
                else nc.get("error", "")
            )
        )
    else:
        lines.append("          ncnn not installed (pip install 'edgetl[ncnn]')")
    best = r.profiles["best"]
    if best:
        first = r.profiles["fits"][0]
        lines.append(f"profile   {best} ({'; '.join(first['reasons'])}): edgetl bench BUNDLE --device-profile {best}")
    else:
        lines.append("profile   none of the shipped profiles fits (edgetl devices lists them)")
    i = r.int8
    lines.append(f"int8      {i['hardware']}: {i['expect']}. {i['reason']}")
    for row in i.get("measured", []):
        if "speedup" in row:
            lines.append(
                f"          measured {row['runtime']}: int8 {row['speedup']:.2f}x fp32 "
                f"(p50 {row['int8_p50_ms']:.2f} vs {row['fp32_p50_ms']:.2f} ms, batch {row['batch_size']})"
            )
        else:
            lines.append(f"          measured {row['runtime']}: {row['error']}")
    if r.fastest is not None:
        f = r.fastest
        if f.get("variant"):
            others = ", ".join(f"{m['variant']} {m['p50_ms']:.2f}" for m in f["measured"])
            lines.append(f"fastest   {f['variant']} ({f['p50_ms']:.2f} ms p50, batch 1, measured here; {others})")
        else:
            lines.append(f"fastest   not measured: {f['error']}")
    lines.extend(f"warning   {w}" for w in r.warnings)
    return lines


COMMANDS = [devices, doctor]
