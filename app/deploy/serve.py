"""Running ``vllm serve`` on the host, and how the router reaches it afterwards.

``fingerprint`` digests everything that decides the running server: equal means no restart.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Sequence
from typing import Any

from app.deploy.events import EVENT_PREFIX
from app.deploy.health import probe_address
from app.deploy.spec import DeploySpec, RemotePaths, SshTarget, shell_value


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
    if spec.responses_store:
        # Kept in vLLM's memory and never evicted: see the README (Responses API).
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
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
        "responses_store": spec.responses_store,
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
