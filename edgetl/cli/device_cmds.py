"""`edgetl devices` and `edgetl doctor`: device profiles, and what this machine is.

See edgetl.device.profiles and edgetl.device.doctor."""

from __future__ import annotations

import click

from edgetl.cli._common import emit_json, handle_errors, json_option


@click.command()
@click.argument("name", required=False, metavar="[NAME|PATH]")
@json_option
@handle_errors
def devices(name: str | None, as_json: bool) -> None:
    """List the shipped device profiles, or show one in full.

    A profile sets runtime, provider or OpenVINO device, threads, streams, precision and batch
    size for `bench` and `predict` (--device-profile NAME|PATH; options given on the command line
    win). `edgetl doctor` says which one fits this machine.

    \b
    Example:
      edgetl devices
      edgetl devices rpi5
      edgetl bench bundles/digits --device-profile rpi5
    """
    from edgetl.device.profiles import list_profiles, load_profile, profile_label

    if name is not None:
        p = load_profile(name)
        if as_json:
            emit_json(p.to_dict())
            return
        click.echo(f"{p.name}: {p.description}")
        if p.hardware:
            click.echo(f"  hardware:  {p.hardware}")
        click.echo(f"  settings:  {profile_label(p)}")
        if p.provider_options:
            click.echo(f"  provider options: {', '.join(f'{k}={v}' for k, v in p.provider_options.items())}")
        click.echo(f"  file:      {p.path}")
        if p.notes:
            import textwrap

            click.echo("\n" + textwrap.fill(p.notes.strip(), width=96, initial_indent="  ", subsequent_indent="  "))
        return
    profiles = list_profiles()
    if as_json:
        emit_json([p.to_dict() for p in profiles])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Device profiles (edgetl devices NAME for details)")
    for col in ("name", "device", "settings"):
        table.add_column(col, overflow="fold")
    for p in profiles:
        table.add_row(p.name, p.description, profile_label(p))
    Console().print(table)


@click.command()
@click.argument("bundle", required=False, type=click.Path())
@json_option
@handle_errors
def doctor(bundle: str | None, as_json: bool) -> None:
    """What this machine is and what it can run: CPU and the features that decide int8 speed,
    runtimes, ONNX Runtime providers, OpenVINO devices, the device profile that fits, and warnings.

    With BUNDLE, also measures int8 against fp32 here (a few seconds), for each runtime that the
    bundle has both precisions for.

    \b
    Example:
      edgetl doctor
      edgetl doctor bundles/digits --json
    """
    from edgetl.device.doctor import diagnose

    report = diagnose(bundle)
    if as_json:
        emit_json(report.to_dict())
        return
    _print_doctor(report)


def _print_doctor(r) -> None:
    m, rt = r.machine, r.runtimes
    cores = f"{m['logical_cores']} logical"
    if m["physical_cores"]:
        cores += f", {m['physical_cores']} physical"
    if m["usable_cores"] != m["logical_cores"]:
        cores += f", {m['usable_cores']} usable"
    click.echo(f"machine   {m['cpu']}" + (f" ({m['board']})" if m["board"] and m["board"] != m["cpu"] else ""))
    click.echo(
        f"          {m['arch']}, {cores} cores"
        + (f" ({', '.join(m['cpu_cores'])})" if m["cpu_cores"] else "")
        + (f", {m['memory_mb'] / 1024:.1f} GB" if m["memory_mb"] else "")
        + (", virtual machine" if m["virtualized"] else "")
    )
    click.echo(f"          {m['os']} {m['kernel']}, python {m['python']}, governor {m['governor'] or 'n/a'}")
    if m["isa"] is None:
        click.echo("CPU       features unknown on this platform")
    else:
        click.echo("CPU       " + (", ".join(m["isa_meaning"].values()) or "none of the features edgetl checks"))
        if m["isa_missing"]:
            click.echo(f"          absent: {', '.join(m['isa_missing'])}")
    ort, ov = rt["onnxruntime"], rt["openvino"]
    click.echo(
        "runtimes  onnxruntime "
        + (
            f"{ort['version']}: providers {', '.join(ort['providers']) or 'none'}"
            if ort["installed"]
            else "not installed (pip install onnxruntime)"
        )
    )
    if ov["installed"]:
        devs = ", ".join(f"{d['name']} ({', '.join(d['capabilities'])})" for d in ov["devices"]) or "none"
        click.echo(f"          openvino {ov['version']}: devices {devs}")
    else:
        click.echo("          openvino not installed (pip install 'edgetl[openvino]')")
    best = r.profiles["best"]
    if best:
        first = r.profiles["fits"][0]
        click.echo(f"profile   {best} ({'; '.join(first['reasons'])}): edgetl bench BUNDLE --device-profile {best}")
    else:
        click.echo("profile   none of the shipped profiles fits (edgetl devices lists them)")
    i = r.int8
    click.echo(f"int8      {i['hardware']}: {i['expect']}. {i['reason']}")
    for row in i.get("measured", []):
        if "speedup" in row:
            click.echo(
                f"          measured {row['runtime']}: int8 {row['speedup']:.2f}x fp32 "
                f"(p50 {row['int8_p50_ms']:.2f} vs {row['fp32_p50_ms']:.2f} ms, batch {row['batch_size']})"
            )
        else:
            click.echo(f"          measured {row['runtime']}: {row['error']}")
    for w in r.warnings:
        click.echo(f"warning   {w}")


COMMANDS = [devices, doctor]
