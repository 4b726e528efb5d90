"""A real OpenSSH server on loopback for the deploy tests: throwaway host key, one authorized key.

``LoopbackSSHD`` starts Debian's ``/usr/sbin/sshd`` (package openssh-server, installed by
``.ci/run``) on 127.0.0.1 and a free port, and writes a client config (``ssh_config``) naming it
``edgetl-device`` with a known_hosts that holds exactly its host key. Nothing of the user's own
ssh set-up is read or changed. When sshd is missing the tests skip, unless EDGETL_REQUIRE_SSHD=1
(as in CI), where they fail.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
ALIAS = "edgetl-device"
RELAY = Path(__file__).with_name("ssh_relay.py")


def require_sshd() -> None:
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        message = "OpenSSH server/client not installed (apt install openssh-server openssh-client)"
        if os.environ.get("EDGETL_REQUIRE_SSHD") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    """A new ed25519 key pair at ``path``; returns the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgetl-test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return Path(f"{path}.pub").read_text().strip()


class LoopbackSSHD:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        self.user = getpass.getuser()
        self.host_key = root / "host_ed25519"
        self.host_pub = keygen(self.host_key)
        self.client_key = root / "client_ed25519"
        (root / "authorized_keys").write_text(keygen(self.client_key) + "\n")
        self.known_hosts = root / "known_hosts"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> LoopbackSSHD:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        for _ in range(5):
            self.port = _free_port()
            config = self.root / "sshd_config"
            config.write_text(
                f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
                f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.root / 'authorized_keys'}\n"
                "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n"
            )
            log = open(self.root / "sshd.log", "ab")  # noqa: SIM115  (sshd writes to it until stop())
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
            if self._wait_ready():
                self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_pub}\n")
                self.write_client_config()
                return self
            self.stop()
        raise RuntimeError(f"sshd did not start: {(self.root / 'sshd.log').read_text()[-2000:]}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def write_client_config(
        self, *, known_hosts: Path | None = None, relay_limit: int | None = None, name: str = "ssh_config"
    ) -> Path:
        """A client config for ``edgetl-device``; ``relay_limit`` routes it through a relay that
        drops the connection after that many bytes from the client (a network cut mid-copy)."""
        lines = [
            f"Host {ALIAS} 127.0.0.1",
            "  HostName 127.0.0.1",
            f"  Port {self.port}",
            f"  User {self.user}",
            f"  IdentityFile {self.client_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {known_hosts or self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
        ]
        if relay_limit is not None:
            lines += [
                f"  HostKeyAlias [127.0.0.1]:{self.port}",
                f"  ProxyCommand {sys.executable} {RELAY} 127.0.0.1 {self.port} {relay_limit}",
            ]
        path = self.root / name
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def config(self) -> Path:
        return self.root / "ssh_config"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
