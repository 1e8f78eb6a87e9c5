"""Downloading the model into the host's Hugging Face cache, and naming what went wrong.

The work is done by ``remote/download.py``, run with the remote venv's own huggingface_hub.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any

from app.deploy.events import EVENT_PREFIX
from app.deploy.remote import program
from app.deploy.spec import DeploySpec, RemotePaths, shell_value

# Weight formats vLLM does not need when safetensors are present, and checkpoint duplicates.
BASE_IGNORE_PATTERNS = ("original/*", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.msgpack", "*.h5")


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
            EVENT_PREFIX,
            spec.model,
            spec.revision,
            paths.download_record,
            json.dumps(BASE_IGNORE_PATTERNS),
        )
    )
    return f"{exports}exec {q(paths.venv + '/bin/python')} -c {q(program('download'))} {args}\n"


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
