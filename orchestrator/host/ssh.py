"""SSH into guests through their 127.0.0.1 forward, with the guest's own host key pinned.

Every guest gets its own host key from osimg at creation (``new_host_key``), delivered on its config
drive; a builder guest without a drive presents the key made at image build and recorded in the
image's manifest. Either way the client knows the key before the first connection: RejectPolicy,
never auto-adding an unknown key (no trust on first use).
Commands go over the wire as argv lists quoted with ``shlex.join``, or as a script on stdin.
"""

from __future__ import annotations

import base64
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import GuestError, StorageError
from ..settings import create_private


@dataclass
class Result:
    rc: int
    out: str
    err: str


def ensure_client_key(path: Path) -> str:
    """Create the ed25519 key osimg logs in with (once); returns the public key line."""
    pub = path.with_suffix(".pub")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # left by a crash between create and rename
        create_private(tmp, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        pub.write_text(line.decode() + " osimg\n")
        tmp.rename(path)
    return pub.read_text().strip()


def new_host_key(path: Path) -> str:
    """Write a new ed25519 host key (OpenSSH format, what cloud-init's ``ssh_keys`` and dropbearconvert
    read) to ``path``, created 0600 so it is never readable by others, not even for a moment.

    Returns the public key line (``ssh-ed25519 AAAA...``) that SSH sessions pin. Refuses to
    overwrite: a guest's key changes only by rotation (a new file, then a move).
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    create_private(path, pem)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def public_key_of(path: Path) -> str:
    """The public line of a private key file written by ``new_host_key``."""
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def wait_banner(port: int, timeout: float) -> None:
    """Slirp accepts on the host port before the guest's sshd listens: wait for a real banner."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(4) == b"SSH-":
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise GuestError(f"no SSH banner on 127.0.0.1:{port} within {timeout:.0f}s")


class Session:
    """One authenticated SSH connection to a guest."""

    def __init__(self, port: int, host_key: str, key_file: Path, user: str = "root", timeout: float = 60) -> None:
        self.port = port
        try:
            kind, b64 = host_key.split()[:2]
            pinned = paramiko.PKey.from_type_string(kind, base64.b64decode(b64, validate=True))
        except (ValueError, paramiko.SSHException):
            raise StorageError(f"127.0.0.1:{port}: the pinned host key {host_key[:40]!r} is not an OpenSSH public "
                               "key line; the guest's record or image manifest is damaged") from None
        try:
            pkey = paramiko.Ed25519Key.from_private_key_file(str(key_file))
        except OSError as err:
            raise StorageError(f"osimg's client key {key_file} cannot be read ({err.strerror}); "
                               "'osimg recipe build tiny:v1' or 'osimg doctor' creates it") from None
        except paramiko.SSHException as err:
            raise StorageError(f"osimg's client key {key_file} is not an ed25519 private key ({err})") from None
        deadline = time.monotonic() + timeout
        wait_banner(port, timeout)
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = paramiko.SSHClient()
            client.get_host_keys().add(f"[127.0.0.1]:{port}", kind, pinned)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(
                    "127.0.0.1", port=port, username=user, pkey=pkey, timeout=10, banner_timeout=20,
                    auth_timeout=20, allow_agent=False, look_for_keys=False,
                )
                self.client = client
                return
            except paramiko.BadHostKeyException as err:
                client.close()
                raise GuestError(f"127.0.0.1:{port}: HostKey mismatch: the guest there presents another key than the "
                                 f"one pinned for it ({err}); refusing to talk to it") from None
            except (paramiko.SSHException, OSError) as err:
                last = err
                client.close()
                time.sleep(0.3)
        raise GuestError(f"SSH to 127.0.0.1:{port} failed within {timeout:.0f}s: {last}")

    def run(self, argv: list[str], timeout: float = 60, check: bool = False, stdin: str | None = None) -> Result:
        return self._exec(shlex.join(argv), timeout, check, stdin)

    def script(self, text: str, timeout: float = 60, check: bool = False) -> Result:
        """Run a shell script in the guest, sent on stdin (no quoting games)."""
        return self._exec("sh -s", timeout, check, text)

    def _exec(self, command: str, timeout: float, check: bool, stdin: str | None) -> Result:
        try:
            chan_in, chan_out, chan_err = self.client.exec_command(command, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read().decode(errors="replace")
            err = chan_err.read().decode(errors="replace")
            rc = chan_out.channel.recv_exit_status()
        except (paramiko.SSHException, OSError, TimeoutError) as e:
            raise GuestError(f"SSH command on 127.0.0.1:{self.port} failed: {e}") from None
        if check and rc != 0:
            raise GuestError(f"guest command {command!r} exited {rc}: {err.strip() or out.strip()}")
        return Result(rc, out, err)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
