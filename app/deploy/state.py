"""The deployment as found on the host: state, list, stop and logs scripts and their parsers."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.deploy.events import first_fact, parse_facts
from app.deploy.spec import RemotePaths

STOP_GRACE_S = 30


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
    pid_text = first_fact(facts, "pid") or ""
    info: dict[str, Any] = {}
    info_text = first_fact(facts, "info") or ""
    if info_text:
        try:
            loaded = json.loads(info_text)
            info = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            info = {}
    return ServerState(
        pid=int(pid_text) if pid_text.isdigit() else None,
        alive=first_fact(facts, "alive") == "yes",
        fingerprint=first_fact(facts, "fingerprint") or None,
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
