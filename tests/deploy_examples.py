"""Example deploy values shared by the tests/test_deploy_*.py files, and an sh syntax check."""

from __future__ import annotations

import subprocess

from app.deploy.preflight import Gpu, HostFacts
from app.deploy.spec import DeploySpec, RemotePaths

HOME = "/home/ada"


def spec(**changes: object) -> DeploySpec:
    values: dict[str, object] = {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "served_model": "llama-3.1-8b",
        "max_model_len": 32768,
    }
    values.update(changes)
    return DeploySpec(**values)  # type: ignore[arg-type]


def paths_for(s: DeploySpec) -> RemotePaths:
    return RemotePaths.for_spec(s, HOME)


def facts(**changes: object) -> HostFacts:
    values: dict[str, object] = {
        "home": HOME,
        "python_version": (3, 11, 2),
        "python_exe": "/usr/bin/python3",
        "uv": None,
        "has_curl": True,
        "has_setsid": True,
        "nvidia_smi": "ok",
        "nvidia_smi_error": "",
        "gpus": (Gpu(0, "NVIDIA H100 80GB HBM3", 81559, 80000, "550.54.15"),),
        "disk_path": "/home/ada/.cache",
        "disk_free_bytes": 500 * 2**30,
        "listening_ports": frozenset({22}),
        "port_bind_free": None,
    }
    values.update(changes)
    return HostFacts(**values)  # type: ignore[arg-type]


def assert_sh_syntax(script: str) -> None:
    result = subprocess.run(["/bin/sh", "-n"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
