"""Reaching a device over SSH with the system OpenSSH client: targets, commands, copies, clear errors.

edgetl never speaks SSH itself: it runs the ``ssh`` program the user already trusts, so
``~/.ssh/config``, keys, agents, jump hosts and ``known_hosts`` work as they do for ``ssh pi``.
edgetl adds ``-F`` (``--ssh-config``), ``-i`` (``--identity``), ``-p``/``-l`` from the target, and
``BatchMode=yes`` when no one is at the terminal to answer a prompt. It never turns host-key
checking off: an unknown or changed host key ends the command with a message that says what to do.
Passwords never appear on command lines; a prompt, when there is a terminal, is ssh's own.

Remote commands are built from quoted words (``shlex.quote``) and run by the device's shell; only
``--remote-edgetl`` is used as written, since it is the user's own command for their device.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from edgetl.core.errors import ConfigError, RemoteError

SSH_FAILED = 255  # ssh's own exit code for connection, authentication and host-key failures
NOT_FOUND = 127  # the shell's "command not found"
CHUNK = 1 << 20

_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.%a-zA-Z]+\]|[A-Za-z0-9_.%-]+)$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
# scp's rule: ``[user@]host:path`` is remote when a colon comes before any slash.
_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/:\s]+)@)?(?P<host>\[[^\]/]+\]|[^/:\s\[\]]+):(?P<path>.*)$", re.S)


@dataclasses.dataclass(frozen=True)
class Target:
    """A bundle location on a device: ``[user@]host:path`` or ``ssh://[user@]host[:port]/path``.

    ``path`` is as the device's shell sees it: absolute, or relative to the login's home folder
    (``~/x`` is stored as ``x``).
    """

    host: str
    path: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def where(self) -> str:
        """``user@host`` or ``user@host:port``: how messages name the device."""
        return self.destination + (f":{self.port}" if self.port else "")

    @property
    def known_hosts_name(self) -> str:
        """The host as known_hosts and ``ssh-keygen -R`` spell it."""
        host = self.host.strip("[]")
        return f"[{host}]:{self.port}" if self.port and self.port != 22 else host

    def __str__(self) -> str:
        path = self.path if self.path.startswith("/") else f"/~/{self.path}"
        return f"ssh://{self.destination}" + (f":{self.port}" if self.port else "") + path


def parse_target(text: str) -> Target:
    """Parse a target; a malformed one is a ConfigError naming the expected forms."""
    forms = "expected user@host:/path or ssh://user@host[:port]/path"
    if any(c in text for c in "\0\n\r"):
        raise ConfigError(f"target {text!r} contains control characters; {forms}")
    scheme, sep, _ = text.partition("://")
    if sep and scheme.lower() != "ssh":
        raise ConfigError(
            f"target {text!r} is a {scheme}:// URL, which edgetl does not copy to; {forms} (on this machine, "
            "`edgetl pack` then `edgetl unpack`, or cp -r)"
        )
    if text.startswith("ssh://"):
        authority, slash, path = text[len("ssh://") :].partition("/")
        if not slash or not path:
            raise ConfigError(f"target {text!r} has no bundle path; {forms}")
        user, at, hostport = authority.rpartition("@")
        host, port = _split_port(hostport, text)
        path = "/" + path
    else:
        m = _SCP_LIKE.match(text)
        if not m:
            raise ConfigError(f"{text!r} is not a device target; {forms}")
        user, at, host, port, path = m["user"] or "", m["user"] is not None, m["host"], None, m["path"]
    if path.startswith("/~/") or path.startswith("~/"):
        path = path.split("~/", 1)[1]
    path = path.rstrip("/") if path not in ("/", "") else path
    if path in ("", "/", "~", "/~", ".", ".."):
        raise ConfigError(
            f"target {text!r}: give the bundle's own folder on the device, e.g. "
            f"{host}:bundles/digits (not the home or root folder)"
        )
    if path.startswith("-"):
        # The path reaches commands on the device (unpack, predict) as a word: "-rf" would be an option.
        raise ConfigError(
            f"target {text!r}: the device path {path!r} starts with '-' and would be read as an option; "
            f"write it as ./{path} or give an absolute path"
        )
    if not _HOST.match(host) or host.startswith("-"):
        raise ConfigError(f"target {text!r}: {host!r} is not a host name or address; {forms}")
    if at and (not user or not _USER.match(user)):
        raise ConfigError(f"target {text!r}: {user!r} is not a user name; {forms}")
    return Target(host=host, path=path, user=user or None, port=port)


def _split_port(hostport: str, text: str) -> tuple[str, int | None]:
    if hostport.startswith("["):  # [IPv6]:port
        host, _, rest = hostport.partition("]")
        host += "]"
        port_text = rest[1:] if rest.startswith(":") else None
    else:
        host, colon, port_text = hostport.partition(":")
        port_text = port_text if colon else None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"target {text!r}: port {port_text!r} must be a number from 1 to 65535")
    return host, int(port_text)


def is_remote(text: str) -> bool:
    """``ssh://...`` or scp-style ``[user@]host:path``, unless a local path of that name exists."""
    if text.startswith("ssh://"):
        return True
    return bool(_SCP_LIKE.match(text)) and not Path(text).exists()


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr_tail: list[str]


@dataclasses.dataclass(frozen=True)
class Remote:
    """A device reached with the system ssh, and how to run edgetl there."""

    target: Target
    identity: str | None = None  # -i FILE
    ssh_config: str | None = None  # -F FILE
    edgetl: str = "edgetl"  # the command that runs edgetl on the device, used as written
    ssh: str = "ssh"

    def __post_init__(self) -> None:
        for what, path in (("--identity", self.identity), ("--ssh-config", self.ssh_config)):
            if path is not None and not Path(path).expanduser().is_file():
                raise ConfigError(f"{what} {path} does not exist or is not a file")
        if not self.edgetl.strip():
            raise ConfigError("--remote-edgetl must not be empty (e.g. '~/edgetl-venv/bin/edgetl')")

    def ssh_argv(self, command: str) -> list[str]:
        argv = [self.ssh]
        if self.ssh_config:
            argv += ["-F", str(Path(self.ssh_config).expanduser())]
        if self.identity:
            argv += ["-i", str(Path(self.identity).expanduser())]
        if self.target.port:
            argv += ["-p", str(self.target.port)]
        if self.target.user:
            argv += ["-l", self.target.user]
        if not _interactive():
            argv += ["-o", "BatchMode=yes"]  # no one can answer a prompt: fail instead of hanging
        return [*argv, "-T", "--", self.target.host, command]

    def edgetl_command(self, *args: str) -> str:
        return " ".join([self.edgetl, *(shlex.quote(a) for a in args)])

    def run(
        self,
        command: str,
        *,
        feed: Callable[[IO[bytes]], None] | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        echo_stderr: bool = False,
    ) -> Result:
        """Run ``command`` on the device. stdout is returned (or handed to ``on_stdout`` as it
        comes); stderr is echoed live when ``echo_stderr`` (except ``Error:`` lines, which end up
        in the raised message) and its tail kept. ``feed`` writes the command's stdin."""
        try:
            proc = subprocess.Popen(
                self.ssh_argv(command),
                stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except FileNotFoundError:
            raise RemoteError(
                f"the OpenSSH client ({self.ssh}) is not installed on this machine: "
                "apt install openssh-client (or your system's equivalent)"
            ) from None
        tail: deque[str] = deque(maxlen=40)
        out: list[bytes] = []
        threads = [
            threading.Thread(target=_pump_stderr, args=(proc.stderr, tail, echo_stderr), daemon=True),
            threading.Thread(target=_pump_stdout, args=(proc.stdout, out, on_stdout), daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            if feed is not None:
                try:
                    feed(proc.stdin)
                except BrokenPipeError:
                    pass  # the connection went away; the return code and stderr say why
                finally:
                    try:
                        proc.stdin.close()
                    except BrokenPipeError:
                        pass
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            for t in threads:
                t.join(timeout=10)
        return Result(proc.returncode, b"".join(out), list(tail))

    def check(self, result: Result, what: str) -> Result:
        """Raise a one-line RemoteError for a failed ``result``; return it otherwise."""
        if result.returncode == 0:
            return result
        raise RemoteError(self.explain(result, what))

    def explain(self, result: Result, what: str) -> str:
        t = self.target
        text = "\n".join(result.stderr_tail)
        if result.returncode == SSH_FAILED:
            return _ssh_failure(t, text, what)
        if result.returncode == NOT_FOUND or (
            re.search(r"(command )?not found|No such file or directory", text) and not _edgetl_error(result.stderr_tail)
        ):
            return (
                f"{what} on {t.where} failed: {self.edgetl!r} is not found there. Install the runtime on the "
                f"device with: edgetl device setup {t.destination} --name NAME (then use NAME as the target, or "
                "pass --remote-edgetl '~/edgetl/bin/edgetl')"
            )
        message = _edgetl_error(result.stderr_tail) or (result.stderr_tail[-1] if result.stderr_tail else "")
        return f"{what} on {t.where} failed (exit {result.returncode}): {message or 'no message'}"

    def version(self) -> str:
        """``edgetl --version`` on the device; also proves the connection and the host key."""
        result = self.check(self.run(self.edgetl_command("--version")), "edgetl --version")
        text = result.stdout.decode(errors="replace").strip()
        return text.rsplit(" ", 1)[-1] if text else "unknown"

    def compatible_version(self) -> str:
        """:meth:`version`, refused with one line when the device's edgetl is too old for this one
        (:func:`version_skew`): what deploy, bench and predict call before any work."""
        from edgetl import __version__

        version = self.version()
        problem = version_skew(version, __version__)
        if problem:
            t = self.target
            setup_target = f"ssh://{t.destination}:{t.port}" if t.port else t.destination
            raise RemoteError(
                f"{t.where} runs edgetl {version}, {problem}; install this edgetl there with: "
                f"edgetl device setup {setup_target}"
            )
        return version

    def json(self, *args: str, what: str, echo_stderr: bool = True) -> Any:
        """Run ``edgetl ARGS --json`` on the device and parse its stdout."""
        import json

        result = self.check(self.run(self.edgetl_command(*args, "--json"), echo_stderr=echo_stderr), what)
        try:
            return json.loads(result.stdout)
        except ValueError:
            head = result.stdout[:200].decode(errors="replace")
            raise RemoteError(
                f"{what} on {self.target.where} printed no JSON (is edgetl there too old? "
                f"compare `edgetl --version`): {head!r}"
            ) from None

    def upload(self, local: Path, remote_path: str, *, on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream ``local`` into ``remote_path`` (its folder made if needed) over one ssh session."""
        script = 'umask 022; mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
        command = f"sh -c {shlex.quote(script)} sh {shlex.quote(remote_path)}"

        def feed(stdin: IO[bytes]) -> None:
            with open(local, "rb") as f:
                while chunk := f.read(CHUNK):
                    stdin.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
            stdin.flush()

        result = self.run(command, feed=feed)
        if result.returncode == SSH_FAILED and result.stderr_tail:
            raise RemoteError(
                f"copying {local.name} to {self.target.where} was interrupted "
                f"(ssh: {result.stderr_tail[-1].strip()}); the bundle there is unchanged"
            )
        if result.returncode != 0:
            raise RemoteError(
                f"copying {local.name} to {self.target.where} failed, the bundle there is unchanged: "
                f"{self.explain(result, 'the copy')}"
            )

    def remove(self, remote_path: str) -> bool:
        """Best effort: delete a file on the device (a partial upload); True if the command ran."""
        try:
            return self.run(f"rm -f -- {shlex.quote(remote_path)}").returncode == 0
        except (RemoteError, OSError):
            return False


def _release(version: str) -> tuple[int, ...] | None:
    """``0.1.0`` -> (0, 1, 0); a pre-release or local suffix is ignored; None when it is not a version."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    return tuple(int(g) for g in m.groups(default="0")) if m else None


def version_skew(device: str, here: str) -> str | None:
    """Why a device's edgetl ``device`` cannot serve this edgetl ``here``, or None when it can.

    Bundles carry their format's ``schema_version``; an edgetl reads the versions up to its own
    (newer devices read older bundles). Before 1.0 a minor release may change the bundle format or
    the JSON a device answers with, so a device whose major.minor is older than this edgetl's is
    refused; a newer one, or another patch release, is fine."""
    mine, theirs = _release(here), _release(device)
    if theirs is None:
        return f"which is not a version this edgetl {here} can compare ({device!r})"
    if mine is not None and theirs[:2] < mine[:2]:
        return f"older than this edgetl {here}: bundles and answers of {here} may not be readable there"
    return None


def _interactive() -> bool:
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _pump_stderr(stream: IO[bytes], tail: deque[str], echo: bool) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        tail.append(line)
        if echo and not line.startswith("Error: "):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


def _pump_stdout(stream: IO[bytes], out: list[bytes], on_stdout: Callable[[bytes], None] | None) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        if on_stdout is None:
            out.append(chunk)
        else:
            on_stdout(chunk)


def _edgetl_error(lines: Sequence[str]) -> str | None:
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line[len("Error: ") :]
    return None


def _ssh_failure(t: Target, text: str, what: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"@"}]
    last = lines[-1] if lines else "no message"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or re.search(r"Host key for .* has changed", text):
        offered = re.search(r"key sent by the remote host is\s+(\S+?)\.?\s*$", text, re.M)
        remove = re.search(r"^\s*(ssh-keygen -f .+ -R .+)$", text, re.M)
        return (
            f"the host key of {t.where} does not match the one in known_hosts: refusing to connect (the "
            "connection may be intercepted, or the device was re-installed"
            + (f"; it offered {offered.group(1)}" if offered else "")
            + "). If you re-installed it, check its "
            "new key, then remove the old one with: "
            + (remove.group(1).strip() if remove else f"ssh-keygen -R '{t.known_hosts_name}'")
        )
    if (
        "Host key verification failed" in text
        or "No ED25519 host key is known" in text
        or re.search(r"No \S+ host key is known", text)
    ):
        return (
            f"{t.where} is not in known_hosts, and edgetl never accepts an unknown host key on its own: "
            f"connect once with `ssh {'-p ' + str(t.port) + ' ' if t.port else ''}{t.destination}`, check the "
            "fingerprint, accept it, then run this again"
        )
    if "Permission denied" in text:
        return (
            f"{t.destination} refused the login ({last}): set up key login (ssh-copy-id {t.destination}) "
            "or pass --identity KEY"
        )
    for pattern in (
        "Connection refused",
        "Could not resolve hostname",
        "timed out",
        "No route to host",
        "Network is unreachable",
    ):
        if pattern in text:
            return f"cannot reach {t.where}: {last}"
    return f"{what}: ssh to {t.where} failed: {last}"


def envelope_record(doc: Any, what: str) -> dict[str, Any]:
    """The one record of a device's ``edgetl COMMAND --json`` document: edgetl with schema
    versions prints ``{"schema", ..., "results": [record]}``, older edgetl the record itself."""
    if isinstance(doc, dict) and "schema" in doc:
        results = doc.get("results")
        if isinstance(results, list) and results and isinstance(results[0], dict):
            return results[0]
        raise RemoteError(f"{what} printed a {doc.get('schema')!r} document without results")
    if not isinstance(doc, dict):
        raise RemoteError(f"{what} printed JSON that is not an object")
    return doc


def remote_args(options: dict[str, Any], flags: dict[str, str]) -> list[str]:
    """Command-line words for the device from option values: ``flags`` maps each name to its
    ``--option`` (``--x/--no-x`` for booleans); None and False values are left out."""
    words: list[str] = []
    for name, flag in flags.items():
        value = options.get(name)
        if "/" in flag and isinstance(value, bool):  # a --x/--no-x switch: always say which
            on, off = flag.split("/")
            words.append(on if value else off)
        elif value is None or value is False or value == ():
            continue
        elif value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return words


__all__ = ["Remote", "Result", "Target", "envelope_record", "is_remote", "parse_target", "remote_args"]
