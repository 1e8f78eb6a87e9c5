"""The asyncssh edge: connect with host-key policy, run scripts, HTTP over a channel, forward.

Host keys are checked against a known_hosts file (``~/.ssh/known_hosts`` by default). A host
with no entry is refused unless ``accept_new_host_key``, which records a hashed entry; a host
whose entry holds a different key is always refused. asyncssh errors become ``SshError`` here
and nowhere else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import asyncssh

from app.deploy import HostKeyError, SshError, UsageError
from app.deploy.health import http_get_request, parse_http_response
from app.deploy.spec import SshTarget

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


@dataclass(frozen=True, slots=True)
class SshOptions:
    identity: str | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    ssh_config: str | None = None
    connect_timeout_s: float = 20.0

    @property
    def known_hosts_path(self) -> Path:
        return Path(self.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


HostKeyVerdict = Literal["trusted", "unknown", "changed", "added"]


class _HostKeyPolicy(asyncssh.SSHClient):
    """Called by asyncssh only for keys the known_hosts file does not already trust."""

    def __init__(self, known_hosts: Path, accept_new: bool) -> None:
        self._known_hosts = known_hosts
        self._accept_new = accept_new
        self.verdict: HostKeyVerdict = "trusted"
        self.offered: asyncssh.SSHKey | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered = key
        normal_port = None if port == 22 else port
        if self._known_hosts.is_file():
            trusted = asyncssh.read_known_hosts(str(self._known_hosts)).match(
                host, addr, normal_port
            )[0]
            if trusted:
                self.verdict = "changed"
                return False
        if not self._accept_new:
            self.verdict = "unknown"
            return False
        record_host_key(self._known_hosts, host, normal_port, key)
        self.verdict = "added"
        return True


def known_hosts_entry(host: str, port: int | None, key: asyncssh.SSHKey, salt: bytes) -> str:
    """An OpenSSH hashed known_hosts line (``|1|salt|hmac-sha1 keytype base64``)."""
    name = host if port in (None, 22) else f"[{host}]:{port}"
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    key_text = key.export_public_key("openssh").decode().split()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    return f"{hashed} {key_text[0]} {key_text[1]}\n"


def record_host_key(path: Path, host: str, port: int | None, key: asyncssh.SSHKey) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = path.read_text() if path.is_file() else ""
    prefix = "" if not existing or existing.endswith("\n") else "\n"
    with path.open("a") as handle:
        handle.write(prefix + known_hosts_entry(host, port, key, os.urandom(20)))
    path.chmod(0o600)


def _known_hosts_arg(path: Path) -> asyncssh.SSHKnownHosts:
    if path.is_file():
        return asyncssh.read_known_hosts(str(path))
    return asyncssh.import_known_hosts("")


class RemoteHost:
    """One SSH connection to a deploy target."""

    def __init__(self, target: SshTarget, conn: asyncssh.SSHClientConnection) -> None:
        self.target = target
        self._conn = conn
        self._listeners: list[asyncssh.SSHListener] = []

    @property
    def peer_host(self) -> str:
        peer = self._conn.get_extra_info("peername")
        return str(peer[0]) if peer else self.target.host

    async def run(
        self, script: str, *, stdin: str = "", timeout_s: float | None = 120.0
    ) -> RunResult:
        """Run ``script`` with ``/bin/sh`` (whatever the login shell), stdin fed then closed."""
        try:
            result = await self._conn.run(_sh(script), input=stdin, check=False, timeout=timeout_s)
        except asyncssh.TimeoutError as exc:
            raise SshError(
                f"{self.target.label}: remote command timed out after {timeout_s:.0f} s",
                "check the host's load and network, then rerun",
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise SshError(
                f"{self.target.label}: SSH session failed: {exc}", "rerun deploy"
            ) from exc
        return RunResult(
            exit_status=result.exit_status if result.exit_status is not None else -1,
            stdout=_text(result.stdout),
            stderr=_text(result.stderr),
        )

    async def stream(self, script: str, on_line: Callable[[str], None], *, stdin: str = "") -> int:
        """Run ``script``, calling ``on_line`` for each line of stdout and stderr (merged)."""
        try:
            async with self._conn.create_process(_sh(script), stderr=asyncssh.STDOUT) as process:
                if stdin:
                    process.stdin.write(stdin)
                process.stdin.write_eof()
                async for line in process.stdout:
                    on_line(str(line).rstrip("\n"))
                completed = await process.wait(check=False)
        except (asyncssh.Error, OSError) as exc:
            raise SshError(
                f"{self.target.label}: SSH session failed: {exc}", "rerun deploy"
            ) from exc
        return completed.exit_status if completed.exit_status is not None else -1

    async def http_get(
        self,
        host: str,
        port: int,
        path: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
    ) -> tuple[int, bytes]:
        """GET ``http://host:port/path`` as seen from the remote host; status 0 if it refuses."""
        try:
            # asyncio.timeout throughout, not wait_for: 3.11's wait_for can swallow a Ctrl-C.
            async with asyncio.timeout(timeout_s):
                reader, writer = await self._conn.open_connection(host, port)
        except asyncssh.ChannelOpenError as exc:
            if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
                raise SshError(
                    f"{self.target.label}: the SSH server refuses TCP forwarding",
                    "set 'AllowTcpForwarding yes' in the host's sshd_config",
                ) from exc
            return 0, b""
        except (TimeoutError, OSError, asyncssh.Error):
            return 0, b""
        try:
            writer.write(http_get_request(path, host, port, api_key))
            async with asyncio.timeout(timeout_s):
                data = await reader.read()
        except (TimeoutError, OSError, asyncssh.Error):
            return 0, b""
        finally:
            writer.close()
        return parse_http_response(data if isinstance(data, bytes) else data.encode())

    async def forward_local(self, local_port: int, dest_host: str, dest_port: int) -> None:
        """Listen on 127.0.0.1:``local_port`` and forward to ``dest_host:dest_port`` remotely."""
        try:
            listener = await self._conn.forward_local_port(
                "127.0.0.1", local_port, dest_host, dest_port
            )
        except OSError as exc:
            raise UsageError(
                f"cannot listen on local port {local_port}: {exc.strerror or exc}",
                "pick a free port with --local-port",
            ) from exc
        self._listeners.append(listener)

    async def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._conn.close()
        with contextlib.suppress(TimeoutError, OSError, asyncssh.Error):
            async with asyncio.timeout(5):
                await self._conn.wait_closed()

    async def __aenter__(self) -> RemoteHost:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def open_host(target: SshTarget, options: SshOptions) -> RemoteHost:
    """Connect and authenticate (key files, ssh-agent, ~/.ssh/config), or raise ``SshError``."""
    known_hosts = options.known_hosts_path
    policies: list[_HostKeyPolicy] = []

    def client_factory() -> _HostKeyPolicy:
        policy = _HostKeyPolicy(known_hosts, options.accept_new_host_key)
        policies.append(policy)
        return policy

    kwargs = _connect_kwargs(target, options, known_hosts)
    kwargs["client_factory"] = client_factory
    where = target.label
    try:
        conn = await asyncssh.connect(target.host, **kwargs)
    except asyncssh.HostKeyNotVerifiable as exc:
        policy = policies[-1] if policies else None
        raise _host_key_error(where, known_hosts, policy) from exc
    except asyncssh.PermissionDenied as exc:
        raise SshError(
            f"{where}: authentication failed ({exc.reason})",
            "pass the right key with --identity, load it into ssh-agent, "
            "or add its public key to the host's authorized_keys",
        ) from exc
    except asyncssh.KeyImportError as exc:
        raise SshError(
            f"{where}: cannot read the SSH key: {exc}",
            "check --identity (an encrypted key must be loaded into ssh-agent)",
        ) from exc
    except TimeoutError as exc:
        raise SshError(
            f"{where}: connection timed out", "check the host name, port and firewall"
        ) from exc
    except asyncssh.Error as exc:
        raise SshError(f"{where}: SSH failed: {exc.reason}", "check the host's sshd") from exc
    except OSError as exc:
        raise SshError(
            f"{where}: cannot connect: {exc.strerror or exc}",
            "check the host name and --port, and that sshd runs there",
        ) from exc
    return RemoteHost(target, conn)


def _connect_kwargs(target: SshTarget, options: SshOptions, known_hosts: Path) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "known_hosts": _known_hosts_arg(known_hosts),
        "connect_timeout": options.connect_timeout_s,
        # Long health waits and --tunnel sessions must survive idle NAT/firewall timeouts.
        "keepalive_interval": 30,
    }
    if target.port is not None:
        kwargs["port"] = target.port
    if target.user is not None:
        kwargs["username"] = target.user
    if options.identity:
        identity = Path(options.identity).expanduser()
        if not identity.is_file():
            raise UsageError(f"--identity {identity} does not exist", "pass an existing key file")
        kwargs["client_keys"] = [str(identity)]
    if options.ssh_config:
        kwargs["config"] = [str(Path(options.ssh_config).expanduser())]
    return kwargs


def _host_key_error(where: str, known_hosts: Path, policy: _HostKeyPolicy | None) -> HostKeyError:
    offered = policy.offered.get_fingerprint() if policy and policy.offered else "unknown"
    if policy is not None and policy.verdict == "changed":
        return HostKeyError(
            f"{where}: HOST KEY CHANGED (offered {offered}); refusing to connect",
            f"if the host was reinstalled, verify the new key out of band and remove the old "
            f"entry: ssh-keygen -R HOST -f {known_hosts}",
        )
    return HostKeyError(
        f"{where}: unknown host key {offered} (not in {known_hosts})",
        "verify the fingerprint, then rerun with --accept-new-host-key to record it",
    )


def _sh(script: str) -> str:
    return "/bin/sh -c " + shlex.quote(script)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
