"""Named devices: a small YAML inventory in the user's config folder, and names as targets.

The file (:func:`inventory_path`, normally ``~/.config/edgetl/devices.yaml``) maps a name to how
edgetl reaches the device (an ssh destination, the edgetl command there, ssh config and key), the
device profile, its groups, and what ``edgetl doctor`` found there. ``edgetl device add/remove`` and
``edgetl device setup`` edit it; people may too. It is read strictly: an unknown key, a value of the
wrong type or a bad name is refused with the file's path and line.

Where a command takes a device target, :func:`resolve_target` turns text into a
:class:`~edgetl.device.remote.Target` (see docs/devices.md for the rules):

* ``ssh://...`` and ``user@host:PATH`` are ssh targets, as before (a name never has ``@``);
* ``NAME:PATH`` is the named device with that bundle path when NAME is in the inventory, else
  ``NAME`` is an ssh host (alias) as before: the inventory shadows an ssh alias only in this form;
* ``NAME`` alone is the named device with its default bundle folder: for deploy
  ``<bundles_dir>/<bundle folder name>``, for bench and predict the last bundle deployed there;
* ``@GROUP`` is every device of a group (:func:`resolve_group`); ``@all`` is every device.

A local path that exists stays local (``is_remote`` semantics): see :func:`is_device_target`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgetl.core.atomic import write_text_atomic
from edgetl.core.errors import ConfigError, EdgetlError
from edgetl.device.remote import Target, is_remote, parse_target

FILE_NAME = "devices.yaml"
FORMAT_VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GROUP = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")  # also a valid Ansible group name
RESERVED_GROUPS = ("all", "ungrouped")  # Ansible's own groups; @all means every device
DEFAULT_BUNDLES_DIR = "edgetl-bundles"
LOCK_TIMEOUT_S = 30.0

HEADER = (
    "# edgetl's named devices (docs/devices.md). `edgetl device add/remove/setup` rewrite this file;\n"
    "# edits by hand are kept, comments are not.\n"
)


@dataclasses.dataclass
class Device:
    """One named device. ``target`` is an ssh destination without a path: ``user@host``, ``host``
    (an ssh config alias) or ``ssh://user@host:port``."""

    name: str
    target: str
    remote_edgetl: str | None = None  # the command that runs edgetl there (None: "edgetl" on its PATH)
    profile: str | None = None  # a device profile name (edgetl device profiles)
    bundles_dir: str = DEFAULT_BUNDLES_DIR  # where bundles go on the device (relative: the login's home)
    ssh_config: str | None = None  # ssh -F FILE
    identity: str | None = None  # ssh -i KEY
    groups: list[str] = dataclasses.field(default_factory=list)
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)  # what `edgetl doctor` found there
    venv: str | None = None  # the venv edgetl was installed into (edgetl device setup)
    edgetl_version: str | None = None  # edgetl's version there when last checked
    last_bundle: str | None = None  # the bundle path last deployed there (record_deploy)

    def __post_init__(self) -> None:
        check_name(self.name)
        self.groups = sorted(set(self.groups))
        for group in self.groups:
            check_group(group)
        device_target(self.target)  # raises for a malformed destination
        if not self.bundles_dir.strip():
            raise ConfigError(f"device {self.name}: bundles_dir must not be empty (default {DEFAULT_BUNDLES_DIR})")

    def to_dict(self) -> dict[str, Any]:
        """Every field, in the file's order (also the JSON record of ``edgetl device`` commands)."""
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def ssh_destination(self) -> Target:
        """The device as a :class:`Target` without a bundle path (``path`` is empty)."""
        return device_target(self.target)


FIELDS = {f.name: f for f in dataclasses.fields(Device)}
# The type each key must have in the file: "str" (any scalar, read as text), "str?" (also null),
# "groups" (a list of group names), "facts" (a mapping).
KINDS = {
    "target": "str",
    "remote_edgetl": "str?",
    "profile": "str?",
    "bundles_dir": "str",
    "ssh_config": "str?",
    "identity": "str?",
    "groups": "groups",
    "facts": "facts",
    "venv": "str?",
    "edgetl_version": "str?",
    "last_bundle": "str?",
}
assert set(KINDS) == set(FIELDS) - {"name"}


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(
            f"{name!r} is not a device name: use letters, digits, '_', '.', '-' (first a letter or digit, "
            "at most 64), e.g. pi4 or lab-nuc.2"
        )
    return name


def check_group(group: str) -> str:
    if not isinstance(group, str) or not GROUP.match(group) or group in RESERVED_GROUPS:
        raise ConfigError(
            f"{group!r} is not a group name: use letters, digits and '_' (first a letter, at most 64; "
            f"not {' or '.join(RESERVED_GROUPS)}), e.g. lab or line_2"
        )
    return group


def device_target(text: str) -> Target:
    """Parse a device's ssh destination (``user@host``, ``host``, ``ssh://user@host:port``) into a
    Target with an empty path; a destination with a bundle path is refused."""
    forms = "give user@host, host (an ssh config alias) or ssh://user@host:port, without a path"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"device target {text!r} is empty; {forms}")
    if text.startswith("ssh://"):
        rest = text[len("ssh://") :]
        if rest.endswith("/"):
            rest = rest[:-1]
        if "/" in rest:
            raise ConfigError(f"device target {text!r} has a path; {forms} (the bundle folder is --bundles-dir)")
        probe = f"ssh://{rest}/x"
    else:
        if ":" in text.replace("[", "").split("]")[-1] and not text.endswith("]"):
            raise ConfigError(
                f"device target {text!r} has a ':' (a path or a port); {forms} "
                "(a port: ssh://user@host:2222; the bundle folder: --bundles-dir)"
            )
        probe = f"{text}:x"
    try:
        parsed = parse_target(probe)
    except ConfigError:
        raise ConfigError(f"device target {text!r} is not an ssh destination; {forms}") from None
    return dataclasses.replace(parsed, path="")


# --- the file ------------------------------------------------------------------------------------------


def inventory_path() -> Path:
    """``$EDGETL_CONFIG_HOME/devices.yaml``, else ``$XDG_CONFIG_HOME/edgetl/devices.yaml``, else
    ``~/.config/edgetl/devices.yaml``."""
    home = os.environ.get("EDGETL_CONFIG_HOME")
    if home:
        return Path(home).expanduser() / FILE_NAME
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "edgetl" / FILE_NAME


def load_inventory(path: Path | None = None) -> dict[str, Device]:
    """The devices in the file, by name (sorted); a missing file is an empty inventory."""
    path = Path(path) if path is not None else inventory_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file; fix or remove it") from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the device inventory ({exc.strerror or exc}); fix its permissions or remove it"
        ) from None
    return parse_inventory(text, path)


def parse_inventory(text: str, path: Path | str = "<inventory>") -> dict[str, Device]:
    """Parse and validate an inventory's text; every refusal names ``path`` and a line."""
    import yaml

    def fail(node, message: str) -> ConfigError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return ConfigError(f"{path}{line}: {message}")

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({exc.problem or exc}); fix or remove the file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix or remove the file") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise fail(root, "expected a mapping with 'version' and 'devices'")
    top = _mapping(root, fail, "the file")
    unknown = sorted(set(top) - {"version", "devices"})
    if unknown:
        key, _ = top[unknown[0]]
        raise fail(key, f"unknown key {unknown[0]!r} (expected: version, devices)")
    if "version" in top:
        key, node = top["version"]
        version = loader.construct_object(node, deep=True)
        if version != FORMAT_VERSION:
            raise fail(
                node, f"version {version!r} is not one this edgetl reads ({FORMAT_VERSION}); upgrade edgetl or fix it"
            )
    if "devices" not in top:
        return {}
    _, devices_node = top["devices"]
    if _is_null(devices_node):
        return {}
    if not isinstance(devices_node, yaml.MappingNode):
        raise fail(devices_node, "'devices' must be a mapping of device names to devices")
    out: dict[str, Device] = {}
    for name, (key_node, node) in _mapping(devices_node, fail, "devices").items():
        if not NAME.match(name):
            raise fail(key_node, f"{name!r} is not a device name (letters, digits, '_', '.', '-'; at most 64)")
        if not isinstance(node, yaml.MappingNode):
            raise fail(node, f"device {name}: expected a mapping of its settings (target: user@host, ...)")
        fields = _mapping(node, fail, f"device {name}")
        values: dict[str, Any] = {}
        for key, (knode, vnode) in fields.items():
            kind = KINDS.get(key)
            if kind is None:
                raise fail(knode, f"device {name}: unknown key {key!r} (known: {', '.join(KINDS)})")
            values[key] = _value(loader, vnode, kind, fail, f"device {name}: {key}")
        if "target" not in values:
            raise fail(node, f"device {name}: no 'target' (the ssh destination, e.g. target: pi@raspberrypi.local)")
        try:
            out[name] = Device(name=name, **values)
        except ConfigError as exc:
            raise fail(node, str(exc)) from None
    return dict(sorted(out.items()))


def _is_null(node) -> bool:
    import yaml

    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _mapping(node, fail: Callable, what: str) -> dict[str, tuple[Any, Any]]:
    """A mapping node's keys (plain text) to (key node, value node); duplicates refused."""
    import yaml

    out: dict[str, tuple[Any, Any]] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            raise fail(key, f"{what}: keys must be plain names")
        if key.value in out:
            raise fail(key, f"{what}: {key.value!r} is given twice (line {out[key.value][0].start_mark.line + 1} too)")
        out[key.value] = (key, value)
    return out


def _value(loader, node, kind: str, fail: Callable, what: str) -> Any:
    import yaml

    if kind in ("str", "str?"):
        if _is_null(node):
            if kind == "str?":
                return None
            raise fail(node, f"{what} must not be empty")
        if not isinstance(node, yaml.ScalarNode):
            raise fail(
                node, f"{what} must be text, not a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}"
            )
        if any(c in node.value for c in "\0\n\r"):
            raise fail(node, f"{what} must be one line")
        return node.value
    if kind == "groups":
        if _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise fail(node, f"{what} must be a list of group names, e.g. [lab, line_2]")
        groups = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode) or not GROUP.match(item.value) or item.value in RESERVED_GROUPS:
                raise fail(item, f"{what}: {getattr(item, 'value', '?')!r} is not a group name (letters, digits, '_')")
            groups.append(item.value)
        return groups
    # facts: any mapping, as YAML reads it
    if _is_null(node):
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise fail(node, f"{what} must be a mapping (what `edgetl doctor` found on the device)")
    try:
        value = loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise fail(node, f"{what}: {exc}") from None
    if not all(isinstance(k, str) for k in value):
        raise fail(node, f"{what}: keys must be text")
    return value


def dump_inventory(devices: dict[str, Device]) -> str:
    """The file's text: devices sorted by name, each field in a fixed order, empty fields left out."""
    import yaml

    body: dict[str, Any] = {}
    for name in sorted(devices):
        d = devices[name].to_dict()
        del d["name"]
        body[name] = {
            k: v
            for k, v in d.items()
            if k == "target" or (v not in (None, [], {}) and not (k == "bundles_dir" and v == DEFAULT_BUNDLES_DIR))
        }
    text = yaml.safe_dump(
        {"version": FORMAT_VERSION, "devices": body}, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return HEADER + text


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold a lock on editing the inventory (``.devices.yaml.lock`` beside it): edits by two edgetl
    commands at once (a group deploy) are made one after the other, none lost."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"another edgetl command has held the device inventory {path} for {LOCK_TIMEOUT_S:.0f} s "
                        f"(lock {lock}); wait for it, or remove the lock file if no edgetl is running"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _write(path: Path, devices: dict[str, Device]) -> None:
    """Write the whole file atomically: a temporary file beside it, fsync, then os.replace. A failed
    write leaves the old file as it was."""
    text = dump_inventory(devices)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = None
    write_text_atomic(path, text, mode=mode)


def _edit(path: Path | None, change: Callable[[dict[str, Device]], Any]) -> Any:
    path = Path(path) if path is not None else inventory_path()
    with _locked(path):
        devices = load_inventory(path)
        result = change(devices)
        _write(path, devices)
    return result


def save_device(device: Device, path: Path | None = None) -> None:
    """Add ``device``, or replace the one of the same name."""
    device = Device(**device.to_dict())  # validated again: the caller may have changed fields

    def change(devices: dict[str, Device]) -> None:
        devices[device.name] = device

    _edit(path, change)


def update_device(name: str, path: Path | None = None, **changes: Any) -> Device:
    """Change some fields of the device ``name`` (or add it: ``target`` is then required) in one
    locked edit, keeping the others (groups, bundles_dir, last_bundle...): what ``device setup``
    uses to record what it installed. Returns the device as saved."""
    unknown = sorted(set(changes) - set(FIELDS) - {"name"})
    if unknown:
        raise ValueError(f"unknown Device fields: {unknown}")

    def change(devices: dict[str, Device]) -> Device:
        old = devices.get(check_name(name))
        if old is None and not changes.get("target"):
            raise ConfigError(f"device {name} is not in the inventory yet: give its target (user@host)")
        fields = old.to_dict() if old is not None else {"name": name}
        if old is not None and changes.get("target") not in (None, old.target):
            fields["last_bundle"] = None  # another machine: what was deployed to the old one is not there
        fields.update(changes)
        devices[name] = Device(**fields)
        return devices[name]

    return _edit(path, change)


def remove_device(name: str, path: Path | None = None) -> Device:
    """Remove the device ``name`` and return it (unknown: ConfigError listing the known names)."""

    def change(devices: dict[str, Device]) -> Device:
        return devices.pop(_known(name, devices, path).name)

    return _edit(path, change)


def get_device(name: str, path: Path | None = None) -> Device:
    """The device ``name`` (unknown: ConfigError listing the known names)."""
    return _known(name, load_inventory(path), path)


def record_deploy(name: str, bundle_path_on_device: str, path: Path | None = None) -> Device:
    """Remember the bundle last deployed to ``name`` (bench/predict with the name alone use it)."""

    def change(devices: dict[str, Device]) -> Device:
        device = _known(name, devices, path)
        device.last_bundle = bundle_path_on_device
        return device

    return _edit(path, change)


def _known(name: str, devices: dict[str, Device], path: Path | None) -> Device:
    if name in devices:
        return devices[name]
    where = path if path is not None else inventory_path()
    known = ", ".join(devices) or "none yet"
    raise ConfigError(
        f"no device named {name!r} in {where} (known: {known}); add it with: edgetl device add {name} user@host"
    )


# --- names and groups as targets ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a target text means: where (``target``, with the bundle path) and, for a name, the device."""

    target: Target
    device: Device | None = None

    @property
    def name(self) -> str | None:
        return self.device.name if self.device else None


def _split_name(text: str) -> tuple[str, str | None] | None:
    """``NAME`` or ``NAME:PATH`` split, when the part before the first ':' can be a device name."""
    name, colon, rest = text.partition(":")
    if not NAME.match(name):
        return None
    return name, (rest if colon else None)


def is_device_target(text: str, path: Path | None = None) -> bool:
    """True where ``text`` means a device, not a local path: what ``is_remote`` says (ssh targets and
    ``NAME:PATH``), plus a name of the inventory alone and ``@GROUP``, unless a local path of that
    name exists (a local path always stays local)."""
    if is_remote(text):
        return True
    if Path(text).exists():
        return False
    if text.startswith("@"):
        return True
    split = _split_name(text)
    if split is None or split[1] is not None:
        return False
    return split[0] in load_inventory(path)


def resolve_target(
    text: str,
    *,
    purpose: str = "bundle",
    bundle_name: str | None = None,
    path: Path | None = None,
) -> Resolved:
    """Turn a command's target text into a Target (and the named device, if it is one).

    ``purpose``: ``"deploy"`` (a name alone means ``<bundles_dir>/<bundle_name>``) or ``"bundle"``
    (bench/predict: a name alone means the bundle last deployed there). ``@GROUP`` is refused here:
    it is many devices (:func:`resolve_group`).
    """
    if purpose not in ("deploy", "bundle"):
        raise ValueError(purpose)
    if text.startswith("@"):
        raise ConfigError(
            f"{text} is a group of devices; this command takes one device (NAME, NAME:PATH or user@host:PATH)"
        )
    split = None if text.startswith("ssh://") else _split_name(text)
    if split is None:
        return Resolved(parse_target(text))
    name, bundle_path = split
    devices = load_inventory(path)
    device = devices.get(name)
    if device is None:
        if bundle_path is not None:
            return Resolved(parse_target(text))  # an ssh host or alias, as before
        where = path if path is not None else inventory_path()
        raise ConfigError(
            f"{text!r} is not a local path, a device target (user@host:PATH) or a device name in {where} "
            f"(known: {', '.join(devices) or 'none yet'}); add it with: edgetl device add {name} user@host"
        )
    if bundle_path is None:
        bundle_path = default_bundle_path(device, purpose, bundle_name)
    return Resolved(device_bundle_target(device, bundle_path), device)


def default_bundle_path(device: Device, purpose: str, bundle_name: str | None) -> str:
    """The bundle folder a device name alone means: ``<bundles_dir>/<bundle folder name>`` for deploy,
    else the bundle last deployed there by name."""
    if purpose == "deploy":
        if not bundle_name or bundle_name in (".", "..") or "/" in bundle_name:
            raise ConfigError(
                f"cannot name the bundle folder on {device.name} from {bundle_name!r}; give {device.name}:PATH"
            )
        return f"{device.bundles_dir.rstrip('/')}/{bundle_name}"
    if device.last_bundle:
        return device.last_bundle
    raise ConfigError(
        f"no bundle has been deployed to {device.name} by name yet; give the bundle as {device.name}:PATH "
        f"(e.g. {device.name}:{device.bundles_dir.rstrip('/')}/digits) or deploy one first"
    )


def device_bundle_target(device: Device, bundle_path: str) -> Target:
    """The Target for ``bundle_path`` on ``device`` (the path checked as ``parse_target`` checks it)."""
    base = device.ssh_destination
    host = base.host
    checked = parse_target(f"{host}:{bundle_path}")  # the same refusals as user@host:PATH
    return dataclasses.replace(base, path=checked.path)


def resolve_group(text: str, path: Path | None = None) -> list[Device]:
    """``@GROUP``: its devices, sorted by name; ``@all``: every device. Unknown or empty: ConfigError."""
    group = text[1:] if text.startswith("@") else text
    devices = load_inventory(path)
    where = path if path is not None else inventory_path()
    if group == "all":
        members = list(devices.values())
    else:
        if not GROUP.match(group):
            raise ConfigError(f"{text!r} is not a group (@NAME: letters, digits, '_')")
        members = [d for d in devices.values() if group in d.groups]
    if not members:
        groups = sorted({g for d in devices.values() for g in d.groups})
        raise ConfigError(
            f"no device in group {group!r} in {where} (groups: {', '.join(groups) or 'none yet'}); "
            f"add one with: edgetl device add NAME user@host --group {group}"
        )
    return sorted(members, key=lambda d: d.name)


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """One device's outcome in :func:`run_on_group`: ``value`` or ``error`` (one line)."""

    device: Device
    value: Any = None
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def run_on_group(devices: Sequence[Device], fn: Callable[[Device], Any], max_parallel: int = 4) -> list[GroupResult]:
    """Run ``fn(device)`` for each device, at most ``max_parallel`` at a time; results in the
    devices' order. A device whose call raises gets its error (one line) and does not stop the
    others; KeyboardInterrupt still ends everything."""
    if max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, not {max_parallel}")

    def one(device: Device) -> GroupResult:
        start = time.monotonic()
        try:
            value = fn(device)
        except EdgetlError as exc:
            return GroupResult(device, error=str(exc), error_type=type(exc).__name__, seconds=time.monotonic() - start)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            return GroupResult(
                device, error=f"{exc.strerror or exc}{where}", error_type="OSError", seconds=time.monotonic() - start
            )
        except Exception as exc:  # one device's bug must not hide the others' results
            return GroupResult(
                device,
                error=f"{type(exc).__name__}: {exc}",
                error_type=type(exc).__name__,
                seconds=time.monotonic() - start,
            )
        return GroupResult(device, value=value, seconds=time.monotonic() - start)

    if not devices:
        return []
    with ThreadPoolExecutor(max_workers=min(max_parallel, len(devices)), thread_name_prefix="edgetl-group") as pool:
        return list(pool.map(one, devices))


# --- facts from `edgetl doctor --json` ---------------------------------------------------------------------


def facts_from_doctor(document: dict[str, Any]) -> dict[str, Any]:
    """The facts kept in the inventory from a device's ``edgetl doctor --json`` document (of any
    edgetl version: missing keys are left out)."""
    results = document.get("results") or [{}]
    report = results[0] if isinstance(results[0], dict) else {}
    machine = report.get("machine") or {}
    runtimes = report.get("runtimes") or {}
    facts: dict[str, Any] = {}
    for key in ("arch", "cpu", "board", "logical_cores", "memory_mb", "os", "kernel", "python"):
        if machine.get(key) is not None:
            facts[key] = machine[key]
    if isinstance(facts.get("memory_mb"), float):
        facts["memory_mb"] = round(facts["memory_mb"])
    if machine.get("isa") is not None:
        facts["cpu_flags"] = list(machine["isa"])
    installed = {
        name: info.get("version") for name, info in runtimes.items() if isinstance(info, dict) and info.get("installed")
    }
    if installed:
        facts["runtimes"] = installed
    best = (report.get("profiles") or {}).get("best")
    if best:
        facts["profile"] = best
    if document.get("edgetl"):
        facts["edgetl"] = document["edgetl"]
    facts["checked"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return facts


# --- Ansible ----------------------------------------------------------------------------------------------


def ansible_inventory(devices: dict[str, Device]) -> dict[str, Any]:
    """The devices as an Ansible YAML inventory: each a host under ``all`` with ansible_host/port/user
    (and ssh -F / -i when set), edgetl_remote, edgetl_profile, edgetl_bundles_dir as host variables;
    each group a child group of ``all``."""
    hosts: dict[str, Any] = {}
    for name in sorted(devices):
        d = devices[name]
        t = d.ssh_destination
        host: dict[str, Any] = {"ansible_host": t.host.strip("[]")}
        if t.port:
            host["ansible_port"] = t.port
        if t.user:
            host["ansible_user"] = t.user
        if d.ssh_config:
            import shlex

            host["ansible_ssh_common_args"] = f"-F {shlex.quote(str(Path(d.ssh_config).expanduser()))}"
        if d.identity:
            host["ansible_ssh_private_key_file"] = str(Path(d.identity).expanduser())
        host["edgetl_remote"] = d.remote_edgetl or "edgetl"
        if d.profile:
            host["edgetl_profile"] = d.profile
        host["edgetl_bundles_dir"] = d.bundles_dir
        if d.venv:
            host["edgetl_venv"] = d.venv
        hosts[name] = host
    children: dict[str, Any] = {}
    for group in sorted({g for d in devices.values() for g in d.groups}):
        children[group] = {"hosts": {n: None for n in sorted(devices) if group in devices[n].groups}}
    out: dict[str, Any] = {"hosts": hosts}
    if children:
        out["children"] = children
    return {"all": out}


def dump_ansible(devices: dict[str, Device]) -> str:
    import yaml

    return "# edgetl device export-ansible: generated from edgetl's device inventory\n" + yaml.safe_dump(
        ansible_inventory(devices), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
