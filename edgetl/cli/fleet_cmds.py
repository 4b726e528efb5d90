"""`edgetl device ...`: the user's named devices (the inventory) and the shipped device profiles.

See edgetl.device.inventory and docs/devices.md. ``make_remote_for`` is how a command turns a
target text (a name, ``NAME:PATH``, ``user@host:PATH``, ``ssh://...``) into a Remote.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgetl.cli._common import common_options, handle_errors
from edgetl.cli._output import clean, console, emit_json, emit_table, envelope, format_option, plain, resolve_format
from edgetl.cli.group_cmds import doctor

DEVICE_COLUMNS = ("name", "target", "profile", "groups", "remote_edgetl", "edgetl_version", "last_bundle")


# --- names as targets (wired into _common.make_remote by the lead) ----------------------------------------


def _given(name: str, value) -> bool:
    """Whether the user gave option ``name`` on the command line (not its default or an environment
    variable); without a click context: whether it differs from the default."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is not None and name in ctx.params:
        return ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    return value is not None and not (name == "remote_edgetl" and value == "edgetl")


def resolve_remote(
    target: str,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str | None,
    *,
    purpose: str = "bundle",
    bundle: str | None = None,
    inventory: Path | None = None,
):
    """``(Remote, Resolved)`` for a command's TARGET text: a device name or ``NAME:PATH`` takes its
    ssh config, key and edgetl command from the inventory unless the command line gives them; an
    ssh target is used as before. ``purpose="deploy"`` with ``bundle`` (the local bundle folder)
    makes a name alone mean ``<bundles_dir>/<bundle folder name>``."""
    from edgetl.device.inventory import resolve_target
    from edgetl.device.remote import Remote

    bundle_name = Path(bundle).resolve().name if bundle else None
    resolved = resolve_target(target, purpose=purpose, bundle_name=bundle_name, path=inventory)
    device = resolved.device
    if device is not None:
        if not _given("identity", identity):
            identity = device.identity or identity
        if not _given("ssh_config", ssh_config):
            ssh_config = device.ssh_config or ssh_config
        if not _given("remote_edgetl", remote_edgetl):
            remote_edgetl = device.remote_edgetl or remote_edgetl
        for what, value, stored in (
            ("identity", identity, device.identity),
            ("ssh_config", ssh_config, device.ssh_config),
        ):
            if value is not None and value == stored and not Path(value).expanduser().is_file():
                from edgetl.core.errors import ConfigError

                raise ConfigError(
                    f"device {device.name}: its {what} {value} (from the device inventory) is not a file any more; "
                    f"fix it with: edgetl device add {device.name} {device.target} --force ..."
                )
    remote = Remote(resolved.target, identity=identity, ssh_config=ssh_config, edgetl=remote_edgetl or "edgetl")
    return remote, resolved


def make_remote_for(
    target: str,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str | None,
    *,
    purpose: str = "bundle",
    bundle: str | None = None,
    inventory: Path | None = None,
):
    """The Remote for a command's TARGET text (see :func:`resolve_remote`)."""
    return resolve_remote(
        target, identity, ssh_config, remote_edgetl, purpose=purpose, bundle=bundle, inventory=inventory
    )[0]


# --- the commands -----------------------------------------------------------------------------------------


@click.group(short_help="Your devices (named, set up over ssh) and the shipped device profiles.")
def device() -> None:
    """Your devices (named, set up over ssh) and the shipped device profiles.

    A named device is reached by its name wherever a command takes a device target:
    `edgetl deploy BUNDLE pi4`, `edgetl bench pi4`, `edgetl predict pi4:PATH IMAGES`. The names live
    in ~/.config/edgetl/devices.yaml ($EDGETL_CONFIG_HOME or $XDG_CONFIG_HOME/edgetl instead); see
    docs/devices.md.

    \b
    Example:
      edgetl device add pi4 pi@raspberrypi.local --remote-edgetl '~/edgetl/bin/edgetl' --group lab --check
      edgetl device list
      edgetl deploy bundles/digits pi4 --check
      edgetl bench pi4
    """


def _inventory_file() -> Path:
    from edgetl.device.inventory import inventory_path

    return inventory_path()


@device.command("list", short_help="List your named devices.")
@click.option("--group", "group", default=None, metavar="GROUP", help="Only the devices of this group.")
@format_option
@common_options
@handle_errors
def list_devices(group: str | None, output_format: str | None, as_json: bool) -> None:
    """List your named devices (the inventory), sorted by name.

    \b
    Output: a table on a terminal, tab-separated lines in a pipe (name, target, profile, groups,
    remote_edgetl, edgetl_version, last_bundle), or --json: {"schema": "edgetl.device.list",
    "inventory": FILE, "results": [device, ...]}.

    \b
    Example:
      edgetl device list
      edgetl device list --group lab --json
    """
    from edgetl.device.inventory import check_group, load_inventory

    fmt = resolve_format(output_format, as_json)
    path = _inventory_file()
    devices = list(load_inventory(path).values())
    if group is not None:
        check_group(group)
        devices = [d for d in devices if group in d.groups]
    if fmt == "json":
        emit_json(envelope("device.list", [d.to_dict() for d in devices], inventory=str(path)))
        return
    rows = [
        (
            d.name,
            d.target,
            d.profile or "",
            ",".join(d.groups),
            d.remote_edgetl or "",
            d.edgetl_version or "",
            d.last_bundle or "",
        )
        for d in devices
    ]
    if fmt == "table" and not rows:
        click.echo(f"No named devices in {clean(path)}; add one with: edgetl device add NAME user@host", err=True)
        return
    emit_table(fmt, DEVICE_COLUMNS, rows, title=f"Devices ({path})", whole=("name",))


@device.command("show", short_help="Show one named device in full.")
@click.argument("name")
@format_option
@common_options
@handle_errors
def show_device(name: str, output_format: str | None, as_json: bool) -> None:
    """Show the named device NAME: how it is reached, its profile and groups, and the facts
    `edgetl doctor` found there.

    \b
    Output: labelled lines on a terminal, key/value tab-separated lines in a pipe, or --json:
    {"schema": "edgetl.device.show", "inventory": FILE, "results": [device]}.

    \b
    Example:
      edgetl device show pi4
    """
    from edgetl.device.inventory import get_device

    fmt = resolve_format(output_format, as_json)
    path = _inventory_file()
    d = get_device(name, path)
    if fmt == "json":
        emit_json(envelope("device.show", [d.to_dict()], inventory=str(path)))
        return
    rows = _device_rows(d)
    if fmt == "tsv":
        emit_table(fmt, ("key", "value"), rows)
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {clean(value)}")


def _device_rows(d) -> list[tuple[str, str]]:
    import json

    rows = [
        ("name", d.name),
        ("target", d.target),
        ("remote_edgetl", d.remote_edgetl or "edgetl (on the device's PATH)"),
        ("profile", d.profile or ""),
        ("bundles_dir", d.bundles_dir),
        ("ssh_config", d.ssh_config or ""),
        ("identity", d.identity or ""),
        ("groups", ",".join(d.groups)),
        ("venv", d.venv or ""),
        ("edgetl_version", d.edgetl_version or ""),
        ("last_bundle", d.last_bundle or ""),
    ]
    for key, value in d.facts.items():
        rows.append((f"facts.{key}", value if isinstance(value, str) else json.dumps(value, sort_keys=True)))
    return rows


@device.command("add", short_help="Add (or with --force replace) a named device.")
@click.argument("name")
@click.argument("target", metavar="TARGET")
@click.option(
    "--remote-edgetl",
    "remote_edgetl",
    default=None,
    metavar="CMD",
    help="How to run edgetl on the device when it is not on its PATH, e.g. '~/edgetl/bin/edgetl'.",
)
@click.option("--profile", "profile", default=None, metavar="NAME", help="Its device profile (edgetl device profiles).")
@click.option(
    "--ssh-config", "ssh_config", type=click.Path(dir_okay=False), default=None, metavar="FILE", help="ssh -F FILE."
)
@click.option(
    "--identity", "-i", "identity", type=click.Path(dir_okay=False), default=None, metavar="KEY", help="ssh -i KEY."
)
@click.option("--group", "groups", multiple=True, metavar="GROUP", help="A group it belongs to (repeatable).")
@click.option(
    "--bundles-dir",
    "bundles_dir",
    default=None,
    metavar="DIR",
    help="Where deploy puts bundles on the device (relative: the login's home). Default: edgetl-bundles.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Run `edgetl doctor --json` on the device now and keep its facts (architecture, Python, CPU "
    "features, runtimes, the profile that fits, edgetl's version); the device is added only if it answers.",
)
@click.option("--force", is_flag=True, help="Replace a device of the same name.")
@format_option
@common_options
@handle_errors
def add_device(
    name: str,
    target: str,
    remote_edgetl: str | None,
    profile: str | None,
    ssh_config: str | None,
    identity: str | None,
    groups: tuple[str, ...],
    bundles_dir: str | None,
    check: bool,
    force: bool,
    output_format: str | None,
    as_json: bool,
) -> None:
    """Add the device NAME, reached over ssh as TARGET (user@host, host, or ssh://user@host:port;
    no bundle path).

    --ssh-config and --identity are kept as absolute paths. Without --profile, --check sets the
    profile that `edgetl doctor` finds fitting.

    \b
    Output: one line on a terminal, key/value tab-separated lines in a pipe, or --json:
    {"schema": "edgetl.device.add", "inventory": FILE, "replaced": BOOL, "results": [device]}.

    \b
    Example:
      edgetl device add pi4 pi@raspberrypi.local --remote-edgetl '~/edgetl/bin/edgetl' --check
      edgetl device add nuc ssh://me@nuc.lan:2222 --group lab --profile intel-nuc
    """
    from edgetl.core.errors import ConfigError, RemoteError
    from edgetl.device.inventory import DEFAULT_BUNDLES_DIR, Device, check_name, load_inventory, save_device

    fmt = resolve_format(output_format, as_json)
    check_name(name)
    path = _inventory_file()
    files = {}
    for what, value in (("--ssh-config", ssh_config), ("--identity", identity)):
        if value is not None:
            p = Path(value).expanduser()
            if not p.is_file():
                raise ConfigError(f"{what} {value} does not exist or is not a file")
            files[what] = str(p.resolve())
    if profile is not None:
        from edgetl.device.profiles import load_profile

        load_profile(profile)  # an unknown profile is refused now, not at the first bench
    new = Device(
        name=name,
        target=target,
        remote_edgetl=remote_edgetl,
        profile=profile,
        bundles_dir=bundles_dir or DEFAULT_BUNDLES_DIR,
        ssh_config=files.get("--ssh-config"),
        identity=files.get("--identity"),
        groups=list(groups),
    )
    existing = load_inventory(path).get(name)
    if existing is not None and not force:
        raise ConfigError(
            f"a device named {name} is already in {path} ({existing.target}); pass --force to replace it, "
            f"or remove it first: edgetl device remove {name}"
        )
    if existing is not None and existing.target == new.target:
        new.last_bundle = existing.last_bundle  # the same device: what was deployed there is still there
    if check:
        try:
            _check_device(new)
        except RemoteError as exc:
            raise RemoteError(f"{exc} (the device was not added; add it without --check to keep it anyway)") from None
    save_device(new, path)
    doc = new.to_dict()
    if fmt == "json":
        emit_json(envelope("device.add", [doc], inventory=str(path), replaced=existing is not None))
    elif fmt == "tsv":
        emit_table(fmt, ("key", "value"), _device_rows(new))
    else:
        facts = new.facts
        summary = (
            f": {facts.get('arch', '?')}, python {facts.get('python', '?')}, edgetl {new.edgetl_version or '?'}"
            + (f", profile {new.profile}" if new.profile else "")
            if facts
            else ""
        )
        verb = "Replaced" if existing is not None else "Added"
        console().print(plain(f"{verb} {name} ({new.target}){summary} in {path}"))


def _check_device(new) -> None:
    """``edgetl doctor --json`` on the device; its facts, version and (unless given) profile into ``new``."""
    import dataclasses

    from edgetl.device.inventory import facts_from_doctor
    from edgetl.device.remote import Remote

    target = dataclasses.replace(new.ssh_destination, path=new.bundles_dir)
    remote = Remote(target, identity=new.identity, ssh_config=new.ssh_config, edgetl=new.remote_edgetl or "edgetl")
    document = remote.json("doctor", what="edgetl doctor", echo_stderr=False)
    if not isinstance(document, dict):
        from edgetl.core.errors import RemoteError

        raise RemoteError(f"edgetl doctor on {target.where} printed no JSON document")
    new.facts = facts_from_doctor(document)
    new.edgetl_version = document.get("edgetl") or None
    if new.profile is None:
        new.profile = new.facts.get("profile")


@device.command("remove", short_help="Remove a named device from the inventory.")
@click.argument("name")
@format_option
@common_options
@handle_errors
def remove_device_cmd(name: str, output_format: str | None, as_json: bool) -> None:
    """Remove the device NAME from the inventory (nothing on the device is touched).

    \b
    Output: one line on a terminal, key/value lines in a pipe, or --json:
    {"schema": "edgetl.device.remove", "inventory": FILE, "results": [device removed]}.

    \b
    Example:
      edgetl device remove pi4
    """
    from edgetl.device.inventory import remove_device

    fmt = resolve_format(output_format, as_json)
    path = _inventory_file()
    removed = remove_device(name, path)
    if fmt == "json":
        emit_json(envelope("device.remove", [removed.to_dict()], inventory=str(path)))
    elif fmt == "tsv":
        emit_table(fmt, ("key", "value"), _device_rows(removed))
    else:
        console().print(plain(f"Removed {name} ({removed.target}) from {path}"))


@device.command("profiles", short_help="List the shipped device profiles, or show one.")
@click.argument("name", required=False, metavar="[NAME|PATH]")
@format_option
@common_options
@handle_errors
def profiles(name: str | None, output_format: str | None, as_json: bool) -> None:
    """List the shipped device profiles, or show one in full (the same as `edgetl devices`).

    \b
    Output: as `edgetl devices`; --json: {"schema": "edgetl.device.profiles", ..., "results":
    [profile, ...]} (one profile with NAME).

    \b
    Example:
      edgetl device profiles
      edgetl device profiles rpi5
    """
    from edgetl.cli.device_cmds import show_profiles

    show_profiles(name, resolve_format(output_format, as_json), "device.profiles", "edgetl device profiles")


@device.command("export-ansible", short_help="Write the named devices as an Ansible inventory.")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Write the inventory to FILE (replaced atomically). Default: stdout.",
)
@format_option
@common_options
@handle_errors
def export_ansible(out: str | None, output_format: str | None, as_json: bool) -> None:
    """Write the named devices as an Ansible YAML inventory: one host per device (ansible_host,
    ansible_port, ansible_user; ssh -F and -i when set), host variables edgetl_remote,
    edgetl_profile, edgetl_bundles_dir, and each edgetl group as an Ansible group.

    \b
    Output: the YAML on stdout (without --out), or one line saying what was written; --json:
    {"schema": "edgetl.device.export-ansible", "inventory": FILE, "results": [{"out", "hosts",
    "groups", "ansible": INVENTORY}]}.

    \b
    Example:
      edgetl device export-ansible --out fleet.yaml
      ansible-inventory -i fleet.yaml --list
      ansible lab -i fleet.yaml -m command -a '{{ edgetl_remote }} doctor'
    """
    from edgetl.device.inventory import ansible_inventory, dump_ansible, load_inventory

    fmt = resolve_format(output_format, as_json)
    path = _inventory_file()
    devices = load_inventory(path)
    text = dump_ansible(devices)
    if out is not None:
        _write_text_atomic(Path(out), text)
    groups = sorted({g for d in devices.values() for g in d.groups})
    if fmt == "json":
        record = {"out": out, "hosts": len(devices), "groups": groups, "ansible": ansible_inventory(devices)}
        emit_json(envelope("device.export-ansible", [record], inventory=str(path)))
    elif out is None:
        click.echo(text, nl=False)
    elif fmt == "tsv":
        emit_table(fmt, ("out", "hosts", "groups"), [(out, len(devices), ",".join(groups))])
    else:
        console().print(plain(f"Wrote {len(devices)} hosts and {len(groups)} groups to {out}"))


def _write_text_atomic(path: Path, text: str) -> None:
    from edgetl.core.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def _add_setup() -> None:
    """``edgetl device setup`` (edgetl/cli/setup_cmd.py) joins this group when it is there."""
    try:
        from edgetl.cli.setup_cmd import setup
    except ModuleNotFoundError as exc:
        if exc.name != "edgetl.cli.setup_cmd":
            raise
        return
    device.add_command(setup)


_add_setup()
device.add_command(doctor)  # edgetl device doctor NAME|@GROUP (edgetl/cli/group_cmds.py)

COMMANDS = [device]
