"""A throw-away OpenSSH server on loopback playing the "GPU box" for deploy tests.

``/usr/sbin/sshd -D -f CONFIG`` with its own host key, user key, authorized_keys and PidFile
(``UsePAM no``, ``StrictModes no``, ``PermitRootLogin prohibit-password``). A login through sshd
does not carry the test's environment, so the package-access settings (``PIP_*``, ``UV_*``,
proxies, CA bundles) are handed to sessions with ``SetEnv``: a real GPU box has its own network.
Sessions also get ``PATH`` with a ``bin/`` of stand-ins first: a fake ``nvidia-smi`` that prints
the GPUs written by ``set_gpus`` and, when the test machine has one, ``uv``.

A second port plays a host without Python: its sessions run under a ``PATH`` that holds every
system command except ``python*`` (``ForceCommand``, since the account's ~/.bashrc may add its own
Python to PATH before any command runs).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import asyncssh

from harness.ports import free_port
from harness.process import ChildServer

SSHD = "/usr/sbin/sshd"
PASSED_PREFIXES = ("PIP_", "UV_")
PASSED_NAMES = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_FAKE_NVIDIA_SMI = """#!/bin/sh
# Stand-in for nvidia-smi: GPUs come from {state} (index, name, total MiB, free MiB, driver).
[ -f {state} ] || {{ echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."; exit 9; }}
case "$*" in
  *--query-gpu=*) cat {state} ;;
  *)
    echo "+-----------------------------------------------------------------------------------------+"
    echo "| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |"
    echo "+-----------------------------------------------------------------------------------------+"
    while IFS=, read -r index name total free driver; do
      echo "|   $index $name $((total - free))MiB / ${{total}}MiB |"
    done < {state}
    ;;
esac
"""


def passed_environment(environ: dict[str, str]) -> dict[str, str]:
    """The package-access settings of the test's own environment, for SetEnv."""
    return {
        name: value
        for name, value in environ.items()
        if (name.startswith(PASSED_PREFIXES) or name in PASSED_NAMES)
        and not name.startswith("UV_RUN_")
        and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
        and '"' not in value
        and "\n" not in value
    }


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str = "NVIDIA H100 80GB HBM3"
    total_mib: int = 81559
    free_mib: int = 80000
    driver: str = "550.54.15"


class SshdServer(ChildServer):
    """sshd on two loopback ports; ``known_hosts`` trusts both, ``user_key`` logs in as us."""

    port: int

    def __init__(self, root: Path, session_env: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        self.nopython_port = free_port()
        self.user = os.environ.get("USER") or _whoami()
        self.host_key = root / "ssh_host_ed25519_key"
        self.user_key = root / "id_ed25519"
        self.known_hosts = root / "known_hosts"
        self.bin = root / "bin"
        self.nopython_bin = root / "bin-nopython"
        self.gpu_state = root / "gpus.csv"
        self.pid_file = root / "sshd.pid"
        self.log_file = root / "sshd.log"
        self.config = root / "sshd_config"
        self.session_env = session_env
        # -e: the log goes to stderr, which the harness keeps in log_file.
        argv = [SSHD, "-D", "-e", "-f", str(self.config)]
        super().__init__("sshd", argv, port=self.port, log_path=self.log_file)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def target(self, port: int | None = None) -> str:
        return f"{self.user}@{self.host}:{port or self.port}"

    def start(self, timeout_s: float = 10.0) -> Self:
        if not Path(SSHD).exists():
            raise RuntimeError(
                "OpenSSH server missing: apt-get update && apt-get install -y openssh-server"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(self.host_key))
        self.host_key.chmod(0o600)
        user_key = asyncssh.generate_private_key("ssh-ed25519")
        user_key.write_private_key(str(self.user_key))
        self.user_key.chmod(0o600)
        (self.root / "authorized_keys").write_bytes(user_key.export_public_key())
        public = host_key.export_public_key().decode().split()
        self.known_hosts.write_text(
            "".join(f"[{self.host}]:{port} {public[0]} {public[1]}\n" for port in self.ports)
        )
        self._write_bin()
        self.set_gpus([])
        self.config.write_text(self._config_text())
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        return super().start(timeout_s)

    def is_ready(self) -> bool:
        return all(_is_listening(port) for port in self.ports)

    @property
    def ports(self) -> tuple[int, int]:
        return (self.port, self.nopython_port)

    def set_gpus(self, gpus: list[Gpu] | None) -> None:
        """What the fake nvidia-smi reports; ``None`` makes it fail like a broken driver."""
        if gpus is None:
            self.gpu_state.unlink(missing_ok=True)
            return
        self.gpu_state.write_text(
            "".join(
                f"{i}, {g.name}, {g.total_mib}, {g.free_mib}, {g.driver}\n"
                for i, g in enumerate(gpus)
            )
        )

    def _write_bin(self) -> None:
        self.bin.mkdir(exist_ok=True)
        smi = self.bin / "nvidia-smi"
        smi.write_text(_FAKE_NVIDIA_SMI.format(state=self.gpu_state))
        smi.chmod(0o755)
        uv = os.environ.get("UV") or shutil.which("uv")
        if uv and not (self.bin / "uv").exists():
            (self.bin / "uv").symlink_to(os.path.realpath(uv))
        self.nopython_bin.mkdir(exist_ok=True)
        for folder in SYSTEM_PATH.split(":"):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                link = self.nopython_bin / name
                if name.startswith("python") or link.exists() or link.is_symlink():
                    continue
                link.symlink_to(os.path.join(folder, name))

    def _config_text(self) -> str:
        env = {**self.session_env, "PATH": f"{self.bin}:{SYSTEM_PATH}"}
        set_env = " ".join(f'"{name}={value}"' for name, value in sorted(env.items()))
        nopython_path = f"{self.bin}:{self.nopython_bin}"
        return "\n".join(
            [
                f"ListenAddress {self.host}",
                f"Port {self.port}",
                f"Port {self.nopython_port}",
                f"HostKey {self.host_key}",
                f"PidFile {self.pid_file}",
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AllowTcpForwarding yes",
                "PrintMotd no",
                "LogLevel VERBOSE",
                f"SetEnv {set_env}",
                f"Match LocalPort {self.nopython_port}",
                f'  ForceCommand /usr/bin/env PATH={nopython_path} /bin/sh -c "$SSH_ORIGINAL_COMMAND"',
                "",
            ]
        )


def _is_listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
