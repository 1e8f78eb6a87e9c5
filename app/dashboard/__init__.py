"""The live dashboard: `GET /dashboard` serves one self-contained page (`page.html`: no build
step, no CDN) that polls `GET /dashboard/data`, whose JSON `dashboard_data(...)` assembles from
the router's state without side effects. `kvroute top` shows the same JSON in a terminal.

What it shows is what an operator may see: backends, load, figures and the last routing
decisions, with each tenant as a keyed hash (`TenantTags`) and never a prompt.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from app.config import redact_url
from app.dashboard.series import SERIES_SECONDS, Sample, SeriesRecorder
from app.metrics import RecentDecision, RouterMetrics
from app.percentile import nearest_rank

__all__ = [
    "SERIES_SECONDS",
    "Sample",
    "SeriesRecorder",
    "TenantTags",
    "dashboard_data",
    "page_headers",
    "page_html",
]

OUTCOMES = ("hit", "miss", "spill", "reassigned")


@functools.cache
def page_html() -> bytes:
    return (importlib.resources.files(__package__) / "page.html").read_bytes()


@functools.cache
def page_headers() -> dict[str, str]:
    """Headers of the page: a content security policy that allows its own inline script (by
    hash), its inline styles and requests to this origin, and nothing else."""
    scripts = re.findall(rb"<script>(.*?)</script>", page_html(), flags=re.S)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts
    )
    return {
        "content-type": "text/html; charset=utf-8",
        "cache-control": "no-store",
        "x-content-type-options": "nosniff",
        "content-security-policy": (
            f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        ),
    }


class TenantTags:
    """Short keyed hashes of tenants: stable for the life of the process, not reversible by
    someone who sees them (an IP-address tenant would be with a plain hash)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or os.urandom(16)

    def __call__(self, tenant: str | None) -> str | None:
        if tenant is None:
            return None
        return hashlib.blake2b(tenant.encode(), key=self._key, digest_size=4).hexdigest()


def _series(samples: Sequence[Sample]) -> dict[str, Any]:
    names: list[str] = []
    for sample in samples:
        for name, _ in sample.kv_usage:
            if name not in names:
                names.append(name)
    kv: dict[str, list[float | None]] = {name: [] for name in names}
    for sample in samples:
        usage = dict(sample.kv_usage)
        for name in names:
            kv[name].append(usage.get(name))
    return {
        "t": [round(s.time_s, 3) for s in samples],
        "rps": [s.rps for s in samples],
        "cached_ratio": [s.cached_ratio for s in samples],
        "ttft_p50_ms": [s.ttft_p50_ms for s in samples],
        "ttft_p99_ms": [s.ttft_p99_ms for s in samples],
        "in_flight": [s.in_flight for s in samples],
        "kv_usage": kv,
    }


def _backend_row(status: Mapping[str, Any], metrics: RouterMetrics) -> dict[str, Any]:
    name = str(status.get("name"))
    vllm = status.get("vllm") or {}
    counters = metrics.backends.get(name)
    outcomes = (
        {o: counters.outcomes[o] for o in OUTCOMES} if counters else dict.fromkeys(OUTCOMES, 0)
    )
    return {
        "name": name,
        "url": redact_url(str(status.get("url") or "")),
        "healthy": bool(status.get("healthy")),
        "state": status.get("state"),
        "in_flight": status.get("in_flight", 0),
        "owned_keys": status.get("owned_keys", 0),
        "running": vllm.get("running"),
        "waiting": vllm.get("waiting"),
        "kv_usage": vllm.get("kv_cache_usage"),
        "prefix_hit_rate": vllm.get("prefix_cache_hit_rate"),
        "requests": counters.requests if counters else 0,
        "errors": counters.errors if counters else 0,
        "outcomes": outcomes,
        "cached_ratio": round(counters.cached_tokens / counters.prompt_tokens, 4)
        if counters and counters.prompt_tokens
        else None,
        "last_error": status.get("last_error"),
    }


def _decision(d: RecentDecision, tags: TenantTags) -> dict[str, Any]:
    return {
        "time": round(d.time_s, 3),
        "tenant": tags(d.tenant),
        "model": d.model,
        "backend": d.backend,
        "outcome": d.outcome,
        "affinity": d.affinity,
        "ttft_ms": round(d.ttft_ms, 3) if d.ttft_ms is not None else None,
        "status": d.status,
    }


def dashboard_data(
    *,
    now_s: float,
    samples: Sequence[Sample],
    backends: Iterable[Mapping[str, Any]],
    metrics: RouterMetrics,
    tags: TenantTags,
    policy: str,
    recent: int = 12,
) -> dict[str, Any]:
    """The JSON of `/dashboard/data`: current figures, per-backend rows, the time series, the
    cache-outcome mix and the last `recent` decisions (newest first). Reads, never changes."""
    last = samples[-1] if samples else None
    prompt = metrics.tokens["prompt"]
    ttft = sorted(metrics.ttft_ms)
    decisions = list(metrics.recent)[-recent:]
    decisions.reverse()
    rows = [_backend_row(b, metrics) for b in backends]
    return {
        "now": round(now_s, 3),
        "policy": policy,
        "interval_s": 1,
        "current": {
            "rps": last.rps if last else 0.0,
            "in_flight": sum(int(r["in_flight"] or 0) for r in rows),
            "ttft_p50_ms": last.ttft_p50_ms if last else None,
            "ttft_p99_ms": last.ttft_p99_ms if last else None,
            "cached_ratio": last.cached_ratio if last else None,
        },
        "totals": {
            "requests": sum(metrics.requests.values()),
            "streams": metrics.streams,
            "errors": sum(metrics.errors.values()),
            "retries": metrics.retries,
            "prompt_tokens": prompt,
            "cached_tokens": metrics.tokens["cached"],
            "cached_ratio": round(metrics.tokens["cached"] / prompt, 4) if prompt else None,
            "ttft_p50_ms": _rounded(nearest_rank(ttft, 0.5)),
            "ttft_p99_ms": _rounded(nearest_rank(ttft, 0.99)),
        },
        "outcomes": {o: metrics.outcomes[o] for o in OUTCOMES},
        "backends": rows,
        "series": _series(samples),
        "recent": [_decision(d, tags) for d in decisions],
    }


def _rounded(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None
