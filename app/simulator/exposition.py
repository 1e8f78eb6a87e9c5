"""The simulator's `/metrics` text: vLLM's metric names and labels, written by hand (cheap).

Same names, types and labels (`engine="0",model_name="<first served name>"`) as vLLM's
Prometheus logger, plus `process_start_time_seconds` as the process collector exposes it; a
router reads that to tell a restart. Pure: values in, text out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    running: int
    waiting: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    finished: Mapping[str, int]
    block_size: int
    num_gpu_blocks: int
    start_time_s: float


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _labels(pairs: Mapping[str, str]) -> str:
    return ",".join(f'{key}="{_escape(value)}"' for key, value in pairs.items())


def render_metrics(snapshot: MetricsSnapshot, model_name: str) -> str:
    base = {"engine": "0", "model_name": model_name}
    labels = _labels(base)
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{label}}} {float(value)!r}" for label, value in samples)

    metric(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        [(labels, snapshot.running)],
    )
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        [(labels, snapshot.waiting)],
    )
    metric(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        [(labels, snapshot.kv_usage)],
    )
    metric(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        [(labels, snapshot.prefix_cache_queries)],
    )
    metric(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
        [(labels, snapshot.prefix_cache_hits)],
    )
    metric(
        "vllm:num_preemptions_total",
        "counter",
        "Cumulative number of preemption from the engine.",
        [(labels, 0)],
    )
    metric(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        [(labels, snapshot.prompt_tokens)],
    )
    metric(
        "vllm:prompt_tokens_cached_total",
        "counter",
        "Number of cached prompt tokens (local prefix cache hits).",
        [(labels, snapshot.prefix_cache_hits)],
    )
    metric(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        [(labels, snapshot.generation_tokens)],
    )
    metric(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        [
            (_labels({**base, "finished_reason": reason}), count)
            for reason, count in sorted(snapshot.finished.items())
        ],
    )
    cache_info = _labels(
        {
            "block_size": str(snapshot.block_size),
            "enable_prefix_caching": "True",
            "num_gpu_blocks": str(snapshot.num_gpu_blocks),
        }
    )
    metric(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
        [(cache_info, 1)],
    )
    lines.append(
        "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds."
    )
    lines.append("# TYPE process_start_time_seconds gauge")
    lines.append(f"process_start_time_seconds {snapshot.start_time_s!r}")
    return "\n".join(lines) + "\n"
