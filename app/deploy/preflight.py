"""Preflight: the script that gathers facts about the host, their parser, and the checks.

The script never fails; every decision is taken here, locally, by ``check_preflight``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal

from app.deploy import PreflightError
from app.deploy.events import first_fact, parse_facts
from app.deploy.remote import program
from app.deploy.spec import DeploySpec, shell_value

MIN_PYTHON = (3, 10)


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


def _hub_cache_expr(spec: DeploySpec) -> str:
    if spec.hf_home:
        return shell_value(spec.hf_home.rstrip("/") + "/hub")
    return '"${HF_HUB_CACHE:-${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/hub}"'


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
        f"  {py} -c {shlex.quote(program('port_bind'))} {shlex.quote(spec.bind)} {spec.vllm_port}",
        "fi",
    ]
    return "\n".join(lines) + "\n"


def parse_host_facts(text: str) -> HostFacts:
    facts = parse_facts(text)
    python = first_fact(facts, "python")
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
    df_line = first_fact(facts, "df")
    listening = (
        frozenset(parse_ss_listening("\n".join(facts.get("listen", [])))) if "ss" in facts else None
    )
    bind_free = first_fact(facts, "port_bind_free")
    return HostFacts(
        home=first_fact(facts, "home") or "",
        python_version=version,
        python_exe=first_fact(facts, "python_exe") or None,
        uv=first_fact(facts, "uv") or None,
        has_curl="curl" in facts,
        has_setsid="setsid" in facts,
        nvidia_smi=nvidia,
        nvidia_smi_error=first_fact(facts, "nvidia_smi_error") or "",
        gpus=gpus,
        disk_path=first_fact(facts, "disk_path") or "",
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
