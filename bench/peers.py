"""Peer routers for the overhead bench: how to launch each one in front of the same backends.

Peers are never project dependencies. They live in a separate virtual environment named by
`KVROUTE_PEERS_VENV` (default `/tmp/peers`); `peer_plans(...)` returns a launch plan for each one
installed there and `missing_peers(...)` names the others. Starting and measuring is the bench's job.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PEERS_VENV_ENV = "KVROUTE_PEERS_VENV"
DEFAULT_PEERS_VENV = "/tmp/peers"
PEER_NAMES = ("vllm-router", "sglang-router", "litellm")
INSTALL_HINT = (
    "uv venv /tmp/peers && uv pip install --python /tmp/peers "
    "vllm-router sglang-router 'litellm[proxy]'   # then KVROUTE_PEERS_VENV=/tmp/peers"
)


@dataclass(frozen=True, slots=True)
class PeerPlan:
    """What to run for one peer; `files` are written (name -> text) into a scratch folder first."""

    name: str
    port: int
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # what clients must send
    note: str = ""


def peers_venv() -> Path:
    return Path(os.environ.get(PEERS_VENV_ENV) or DEFAULT_PEERS_VENV)


def _executable(venv: Path, name: str) -> Path | None:
    path = venv / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _rust_router(
    name: str,
    head: Sequence[str],
    tail: Sequence[str],
    urls: Sequence[str],
    port: int,
    metrics_port: int,
) -> PeerPlan:
    """vllm-router and sglang-router share their flags but for a subcommand and the log level."""
    return PeerPlan(
        name=name,
        port=port,
        argv=(
            *head,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *urls,
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(metrics_port),
            *tail,
        ),
        note="policy cache_aware (its default)",
    )


def _litellm(exe: Path, urls: Sequence[str], model: str, port: int) -> PeerPlan:
    key = "sk-bench-" + secrets.token_hex(16)  # the proxy refuses to start without one
    entries = "".join(
        f"  - model_name: {model}\n"
        f"    litellm_params:\n"
        f"      model: hosted_vllm/{model}\n"
        f"      api_base: {url}/v1\n"
        f"      api_key: none\n"
        for url in urls
    )
    config = (
        f"model_list:\n{entries}"
        "litellm_settings:\n  telemetry: false\n  drop_params: true\n"
        f"general_settings:\n  master_key: {key}\n  disable_spend_logs: true\n"
    )
    return PeerPlan(
        name="litellm",
        port=port,
        argv=(
            str(exe),
            "--config",
            "{dir}/litellm.yaml",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ),
        # No network here: the cost map comes from the package, not from the internet.
        env={
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
        },
        files={"litellm.yaml": config},
        headers={"Authorization": f"Bearer {key}"},
        note="proxy, one uvicorn worker; re-serialises every chunk",
    )


def peer_plans(
    urls: Sequence[str],
    model: str,
    port_for: Callable[[], int],
    venv: Path | None = None,
    only: Sequence[str] = PEER_NAMES,
) -> list[PeerPlan]:
    """Plans for the peers installed in `venv`, in `PEER_NAMES` order; ports from `port_for()`."""
    venv = venv or peers_venv()
    plans: list[PeerPlan] = []
    for name in PEER_NAMES:
        if name not in only:
            continue
        exe = _executable(venv, name)
        if exe is None:
            continue
        if name == "vllm-router":
            tail: tuple[str, ...] = ("--log-level", "warning", "--queue-size", "4096")
            plans.append(_rust_router(name, (str(exe),), tail, urls, port_for(), port_for()))
        elif name == "sglang-router":
            head, tail = (str(exe), "launch"), ("--log-level", "warn")
            plans.append(_rust_router(name, head, tail, urls, port_for(), port_for()))
        else:
            plans.append(_litellm(exe, urls, model, port_for()))
    return plans


def missing_peers(venv: Path | None = None, only: Sequence[str] = PEER_NAMES) -> list[str]:
    venv = venv or peers_venv()
    return [name for name in PEER_NAMES if name in only and _executable(venv, name) is None]
