"""`vllm bench serve` (openai-chat) through kvroute, default settings, in front of the two real
servers, and the same run straight to server A: 0 failed requests either way.

Both runs' TTFT (mean, median, p99) are printed for the notes (`pytest -s`), with how the router
split the requests: server B (`--max-num-seqs 4`) queues part of its share, and the bench, the
router and both servers share the machine's cores, so the two figures are not router overhead
alone. Random weights mean random text: the runs compare token counts (`--ignore-eos`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import RouterServer, running_router
from tools.realvllm import RealVllmServers, bench_serve

NUM_PROMPTS = 24
INPUT_LEN = 64
OUTPUT_LEN = 16


@pytest.fixture
def router(real_vllm_servers: RealVllmServers) -> Iterator[RouterServer]:
    with running_router(real_vllm_servers.urls, served_model=real_vllm_servers.model) as r:
        yield r


def run(url: str, servers: RealVllmServers) -> dict[str, Any]:
    return bench_serve(
        url,
        backend="openai-chat",
        model=servers.model,
        tokenizer=servers.model_dir,
        num_prompts=NUM_PROMPTS,
        input_len=INPUT_LEN,
        output_len=OUTPUT_LEN,
        seed=11,
        # Warm-up requests (not measured) so neither run pays for a cold server.
        extra_args=("--ignore-eos", "--num-warmups", "4"),
        venv=servers.venv,
    )


def ttft(result: dict[str, Any]) -> str:
    return ", ".join(f"{k} {result[f'{k}_ttft_ms']:.1f} ms" for k in ("mean", "median", "p99"))


def test_vllm_bench_serve_through_kvroute_has_no_failures(
    real_vllm_servers: RealVllmServers, router: RouterServer
) -> None:
    direct = run(real_vllm_servers.urls[0], real_vllm_servers)
    routed = run(router.url, real_vllm_servers)
    counters = httpx.get(f"{router.url}/metrics", timeout=10).json()["backend_counters"]
    split = ", ".join(f"{name} {c['requests']}" for name, c in sorted(counters.items()))
    print(
        f"\nvllm bench serve openai-chat, {NUM_PROMPTS} prompts x {INPUT_LEN} in / {OUTPUT_LEN} out"
        f"\n  straight to server A:    TTFT {ttft(direct)}; failed {direct['failed']}"
        f"\n  through kvroute (A + B): TTFT {ttft(routed)}; failed {routed['failed']}"
        f"\n  router's split (with warm-ups and the tool's first request): {split}"
    )
    assert routed["failed"] == 0, [e for e in routed["errors"] if e][:3]
    assert direct["failed"] == 0, [e for e in direct["errors"] if e][:3]
    assert routed["completed"] == direct["completed"] == NUM_PROMPTS
    # vLLM's own usage, relayed: the same prompts give the same counts through the router.
    assert routed["output_lens"] == direct["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert routed["total_input_tokens"] == direct["total_input_tokens"]
    assert all(text for text in routed["generated_texts"])
