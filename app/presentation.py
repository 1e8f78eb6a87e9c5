"""What the router shows of itself (pure): `/health`, `/v1/models`, `/architecture`, the JSON of
`/metrics` and the per-backend gauges. Functions of the state they are given; no I/O.
"""

from __future__ import annotations

from typing import Any

from app.backends import BackendPool
from app.config import Settings
from app.ownership import OwnershipStore

PIPELINE = [
    {"stage": "client", "does": "OpenAI-compatible request to the router"},
    {
        "stage": "admission",
        "does": "API key, size and shape checks (OpenAI-style 4xx), tenant rates, in-flight "
        "limits and a queue that is fair across tenants (429 + Retry-After past it)",
    },
    {
        "stage": "prefix key",
        "does": "tenant + model + system prompt + conversation opening -> keys",
    },
    {
        "stage": "backend selection",
        "does": "one cost: uncached prompt tokens + weighted load, bounded",
    },
    {
        "stage": "vLLM",
        "does": "request forwarded; retried on another backend before the first byte",
    },
    {"stage": "stream stats", "does": "router.stream_stats chunk before data: [DONE]"},
]


def backend_status(pool: BackendPool, store: OwnershipStore) -> list[dict[str, Any]]:
    owned = store.owned_counts()
    out = []
    for b in pool.backends:
        metrics = b.metrics
        out.append(
            {
                "name": b.name,
                "url": b.url,
                "healthy": b.healthy,
                "state": b.state,
                "models": sorted(b.models),
                "in_flight": b.in_flight,
                "dispatched": b.dispatched,
                "owned_keys": owned.get(b.name, 0),
                # Measured from its answers' cached_tokens (None until it reports them).
                "kv_retention": round(b.retention, 4) if b.reports_cached else None,
                # Its KV cache in tokens (vLLM's cache_config_info; None until scraped).
                "kv_cache_tokens": b.kv_tokens or None,
                "last_error": b.last_error or None,
                "vllm": None
                if metrics is None
                else {
                    "running": metrics.running,
                    "waiting": metrics.waiting,
                    "kv_cache_usage": metrics.kv_usage,
                    "prefix_cache_hit_rate": round(metrics.prefix_hits / metrics.prefix_queries, 4)
                    if metrics.prefix_queries
                    else None,
                },
            }
        )
    return out


def health_body(pool: BackendPool, store: OwnershipStore) -> tuple[int, dict[str, Any]]:
    ready = pool.any_healthy()
    body = {
        "status": "ok" if ready else "unavailable",
        "ready": ready,
        "backends": backend_status(pool, store),
    }
    return (200 if ready else 503), body


def models_body(pool: BackendPool, created: int) -> dict[str, Any]:
    data = []
    for model, max_len in sorted(pool.models().items()):
        card: dict[str, Any] = {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
        }
        if max_len is not None:
            card["max_model_len"] = max_len
        data.append(card)
    return {"object": "list", "data": data}


def prom_gauges(pool: BackendPool, store: OwnershipStore) -> dict[str, dict[str, float]]:
    owned = store.owned_counts()
    backends = pool.backends
    return {
        "backend_in_flight": {b.name: b.in_flight for b in backends},
        "backend_healthy": {b.name: float(b.healthy) for b in backends},
        "backend_serving": {b.name: float(b.state == "serving") for b in backends},
        "backend_owned_keys": {b.name: owned.get(b.name, 0) for b in backends},
        # As each backend's vLLM last reported them (none before its first scrape).
        "backend_waiting_requests": {
            b.name: b.metrics.waiting for b in backends if b.metrics is not None
        },
        "backend_running_requests": {
            b.name: b.metrics.running for b in backends if b.metrics is not None
        },
        "backend_kv_cache_usage_ratio": {
            b.name: b.metrics.kv_usage for b in backends if b.metrics is not None
        },
        "backend_kv_retention_ratio": {b.name: b.retention for b in backends if b.reports_cached},
        "backend_kv_cache_tokens": {b.name: float(b.kv_tokens) for b in backends if b.kv_tokens},
    }


def architecture_body(
    settings: Settings, pool: BackendPool, store: OwnershipStore
) -> dict[str, Any]:
    return {
        "name": "kvroute",
        "pipeline": PIPELINE,
        "policy": {
            "name": settings.routing_policy,
            "cost": "w_prefill * (prompt_tokens - cached_tokens(b)) + w_load * load(b)",
            "load": "in_flight(b) + w_waiting * queued(b); queued = in_flight past b's learned "
            "capacity, or vLLM's num_requests_waiting until the capacity is known",
            "cap": "in_flight(b) + 1 <= "
            "max(load_cap_factor * (total_in_flight + 1) / n, load_cap_floor)",
            "cached": "the owner's tokens of the conversation"
            + (" * its measured retention" if settings.kv_retention else "")
            + ", else the system prompt's if b holds it, else 0",
        },
        "ownership": store.describe(),
        "backends": [{"name": b.name, "url": b.url, "state": b.state} for b in pool.backends],
        "settings": settings.public_view(),
    }
