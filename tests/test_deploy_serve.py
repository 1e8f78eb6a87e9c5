"""app/deploy/serve.py: the serve command, its fingerprint, the start script, what the user is told."""

from __future__ import annotations

from app.deploy.serve import (
    backend_url,
    backend_urls_line,
    fingerprint,
    serve_argv,
    serve_env,
    start_script,
    tunnel_command,
)
from app.deploy.spec import SshTarget, api_key_digest
from tests.deploy_examples import assert_sh_syntax, paths_for, spec


def test_fingerprint_is_stable_and_tracks_what_runs() -> None:
    base = spec()
    fp = fingerprint(base, paths_for(base))
    assert fp == fingerprint(spec(), paths_for(spec()))
    assert len(fp) == 16
    same = spec(hf_endpoint="https://mirror.example", min_free_gb=1.0)
    assert fingerprint(same, paths_for(same)) == fp
    for changed in (
        spec(max_model_len=8192),
        spec(tp=2),
        spec(bind="0.0.0.0"),
        spec(extra_args=("--enforce-eager",)),
        spec(api_key_sha256=api_key_digest("k1")),
        spec(vllm_version="0.11.0"),
        spec(revision="abc123"),
        spec(responses_store=False),
    ):
        assert fingerprint(changed, paths_for(changed)) != fp
    key1 = spec(api_key_sha256=api_key_digest("k1"))
    key2 = spec(api_key_sha256=api_key_digest("k2"))
    assert fingerprint(key1, paths_for(key1)) != fingerprint(key2, paths_for(key2))


def test_serve_argv_and_env() -> None:
    s = spec(tp=2, extra_args=("--gpu-memory-utilization", "0.85"))
    argv = serve_argv(s, paths_for(s))
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
    env = serve_env(s)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_TARGET_DEVICE" not in env
    assert env["VLLM_ENABLE_RESPONSES_API_STORE"] == "1"
    assert "VLLM_ENABLE_RESPONSES_API_STORE" not in serve_env(spec(responses_store=False))
    cpu = serve_env(spec(device="cpu", cpu_kvcache_gb=1, hf_home="/data/hf"))
    assert cpu["VLLM_TARGET_DEVICE"] == "cpu"
    assert cpu["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert cpu["HF_HOME"] == "/data/hf"


def test_start_script_reads_api_key_from_stdin_only() -> None:
    key = "sk-very-secret"
    s = spec(api_key_sha256=api_key_digest(key), served_model='it\'s "odd"; rm -rf /')
    script = start_script(s, paths_for(s))
    assert key not in script
    assert "IFS= read -r VLLM_API_KEY" in script
    assert "setsid nohup" in script
    assert "</dev/null" in script
    assert_sh_syntax(script)
    plain = start_script(spec(), paths_for(spec()))
    assert "unset VLLM_API_KEY" in plain


def test_routing_output() -> None:
    target = SshTarget("gpu1", "root", 2222)
    assert (
        tunnel_command(target, spec(), 18000, "/k/id")
        == "ssh -N -L 18000:127.0.0.1:8000 -p 2222 -i /k/id root@gpu1"
    )
    assert (
        tunnel_command(SshTarget("gpu1"), spec(), 8000, None)
        == "ssh -N -L 8000:127.0.0.1:8000 gpu1"
    )
    assert backend_url(spec(), "10.0.0.5", 18000) == "http://127.0.0.1:18000"
    assert backend_url(spec(bind="0.0.0.0"), "10.0.0.5", 18000) == "http://10.0.0.5:8000"
    assert backend_url(spec(bind="0.0.0.0"), "2001:db8::1", 1) == "http://[2001:db8::1]:8000"
    assert backend_url(spec(bind="0.0.0.0"), "10.0.0.5", 18000, via_tunnel=True) == (
        "http://127.0.0.1:18000"
    )
    assert backend_url(spec(bind="10.0.0.7"), "10.0.0.5", 1) == "http://10.0.0.7:8000"
    assert backend_urls_line(["http://a:1", "http://b:2"]) == "BACKEND_URLS=http://a:1,http://b:2"
