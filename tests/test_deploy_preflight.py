"""app/deploy/preflight.py: the facts script, its parser and the checks."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from app.deploy import PreflightError
from app.deploy.preflight import (
    Gpu,
    check_preflight,
    parse_df_available,
    parse_host_facts,
    parse_nvidia_smi_csv,
    parse_ss_listening,
    preflight_script,
)
from app.deploy.remote import program
from tests.deploy_examples import assert_sh_syntax, facts, spec

PREFLIGHT_OUTPUT = """\
home=/home/ada
python=3.11.2
python_exe=/usr/bin/python3
uv=/home/ada/.local/bin/uv
curl=yes
setsid=yes
gpu=0, NVIDIA H100 80GB HBM3, 81559, 81000, 550.54.15
gpu=1, NVIDIA H100 80GB HBM3, 81559, 1200, 550.54.15
disk_path=/home/ada/.cache
df=/dev/nvme0n1p1   1921802432 400000000 1521802432  21% /
ss=yes
listen=LISTEN 0      4096         0.0.0.0:22        0.0.0.0:*
listen=LISTEN 0      4096       127.0.0.1:8000      0.0.0.0:*
listen=LISTEN 0      4096            [::]:9000         [::]:*
"""


def test_parse_host_facts() -> None:
    f = parse_host_facts(PREFLIGHT_OUTPUT)
    assert f.home == "/home/ada"
    assert f.python_version == (3, 11, 2)
    assert f.uv == "/home/ada/.local/bin/uv"
    assert f.has_setsid
    assert f.has_curl
    assert f.nvidia_smi == "ok"
    assert [g.free_mib for g in f.gpus] == [81000, 1200]
    assert f.disk_free_bytes == 1521802432 * 1024
    assert f.listening_ports == frozenset({22, 8000, 9000})


def test_parse_host_facts_without_tools() -> None:
    f = parse_host_facts("home=/root\npython=missing\nnvidia_smi=missing\nport_bind_free=no\n")
    assert f.python_version is None
    assert f.nvidia_smi == "missing"
    assert f.listening_ports is None
    assert f.port_bind_free is False
    assert parse_host_facts("nvidia_smi_error=NVIDIA-SMI has failed\n").nvidia_smi == "error"


def test_parse_nvidia_smi_csv_handles_commas_in_names() -> None:
    gpus = parse_nvidia_smi_csv(
        "0, NVIDIA A100-SXM4-80GB, 81920, 81000, 535.104.05\n1, Odd, Name, 100, 50, 1\nbad line\n"
    )
    assert gpus == [
        Gpu(0, "NVIDIA A100-SXM4-80GB", 81920, 81000, "535.104.05"),
        Gpu(1, "Odd, Name", 100, 50, "1"),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/dev/sda1 100 50 42 55% /", 42 * 1024),
        ("overlay 1 2", None),
        ("fs 1 2 x 4% /", None),
    ],
)
def test_parse_df_available(line: str, expected: int | None) -> None:
    assert parse_df_available(line) == expected


def test_parse_ss_listening() -> None:
    text = "LISTEN 0 128 *:8000 *:*\nLISTEN 0 128 [::1]:8001 [::]:*\nLISTEN 0 5 10.0.0.1%eth0:8002 0.0.0.0:*\n"
    assert parse_ss_listening(text) == {8000, 8001, 8002}


def test_check_preflight_passes_and_reports_gpus() -> None:
    notes = check_preflight(spec(), facts(), port_is_ours=False)
    assert any("NVIDIA H100" in note and "78.1" in note for note in notes)


@pytest.mark.parametrize(
    ("spec_changes", "fact_changes", "words"),
    [
        ({}, {"python_version": None}, "python3 not found"),
        ({}, {"python_version": (3, 8, 10)}, "needs 3.10"),
        ({}, {"has_setsid": False}, "setsid"),
        ({}, {"nvidia_smi": "missing", "gpus": ()}, "no NVIDIA driver"),
        ({}, {"nvidia_smi": "error", "nvidia_smi_error": "driver gone", "gpus": ()}, "driver gone"),
        ({"tp": 2}, {}, "needs 2 GPUs, the host has 1"),
        ({"min_free_gb": 1000.0}, {}, "GiB free"),
        ({"vllm_port": 22}, {}, "port 22 is already in use"),
        ({}, {"listening_ports": None, "port_bind_free": False}, "port 8000"),
    ],
)
def test_check_preflight_failures(
    spec_changes: dict[str, object], fact_changes: dict[str, object], words: str
) -> None:
    with pytest.raises(PreflightError) as info:
        check_preflight(spec(**spec_changes), facts(**fact_changes), port_is_ours=False)
    assert words in info.value.message
    assert info.value.fix


def test_check_preflight_own_port_and_cpu() -> None:
    check_preflight(spec(vllm_port=22), facts(), port_is_ours=True)
    notes = check_preflight(
        spec(device="cpu"), facts(nvidia_smi="missing", gpus=()), port_is_ours=False
    )
    assert not any("GPU" in note for note in notes)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_preflight_script_is_valid_sh(device: str) -> None:
    assert_sh_syntax(preflight_script(spec(device=device, python="python3.11")))


def test_port_bind_program_sees_a_taken_port() -> None:
    def run(port: int) -> str:
        argv = [sys.executable, "-c", program("port_bind"), "127.0.0.1", str(port)]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert parse_host_facts(run(port)).port_bind_free is False
    assert parse_host_facts(run(port)).port_bind_free is True
