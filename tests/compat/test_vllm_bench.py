"""`vllm bench serve`, vLLM's own load tester, through kvroute with default settings.

It runs from the real-vLLM venv (`ensure_vllm_venv`, built on first use) with the tiny model's
tokenizer, against the router in front of two simulators and straight to one of them: the same
prompts (fixed seed), 0 failed requests, the same texts and token counts either way.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.compat.conftest import MODEL, Pair
from tools.realvllm import DEFAULT_VENV, BenchBackend, bench_serve, ensure_vllm_venv
from tools.tiny_model import build_tiny_model

NUM_PROMPTS = 16
OUTPUT_LEN = 8


@pytest.fixture(scope="module")
def vllm_tools() -> tuple[Path, Path]:
    """The vLLM venv and the tiny model directory (its tokenizer), both cached per machine."""
    return ensure_vllm_venv(), build_tiny_model(DEFAULT_VENV.parent / "tiny-llama")


def run(url: str, backend: BenchBackend, tools: tuple[Path, Path], *extra: str) -> dict[str, Any]:
    venv, tokenizer = tools
    return bench_serve(
        url,
        backend=backend,
        model=MODEL,
        tokenizer=tokenizer,
        num_prompts=NUM_PROMPTS,
        input_len=32,
        output_len=OUTPUT_LEN,
        seed=7,
        extra_args=extra,
        venv=venv,
    )


def ttft(result: dict[str, Any]) -> str:
    return ", ".join(f"{k} {result[f'{k}_ttft_ms']:.2f} ms" for k in ("mean", "median", "p99"))


@pytest.mark.parametrize("backend", ["openai-chat", "openai"])
def test_vllm_bench_serve_has_no_failures_through_kvroute(
    pair: Pair, vllm_tools: tuple[Path, Path], backend: BenchBackend
) -> None:
    # Both at once: each run is mostly the tool's start (about 30 s of imports on one core).
    with ThreadPoolExecutor(2) as pool:
        direct_run = pool.submit(run, pair.direct.url, backend, vllm_tools)
        routed_run = pool.submit(run, pair.router.url, backend, vllm_tools)
        direct, routed = direct_run.result(), routed_run.result()
    print(f"\n{backend} TTFT direct: {ttft(direct)}; through kvroute: {ttft(routed)}")
    assert routed["failed"] == 0, [e for e in routed["errors"] if e][:3]
    assert routed["completed"] == direct["completed"] == NUM_PROMPTS
    assert direct["failed"] == 0
    assert routed["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    for key in ("total_input_tokens", "total_output_tokens", "input_lens", "output_lens"):
        assert routed[key] == direct[key], key
    assert routed["generated_texts"] == direct["generated_texts"]
    assert set(routed["generated_texts"]) == {"".join(f"tok{i} " for i in range(OUTPUT_LEN))}


def test_named_stats_event_is_what_vllm_bench_cannot_read(
    pair: Pair, vllm_tools: tuple[Path, Path]
) -> None:
    """Why the default is a plain chunk: the `event:` form fails every request of the tool."""
    named = run(
        pair.router.url, "openai-chat", vllm_tools, "--header", "X-Router-Stream-Stats=event"
    )
    assert named["completed"] == 0
    assert named["failed"] == NUM_PROMPTS
    assert all("JSONDecodeError" in error for error in named["errors"])
