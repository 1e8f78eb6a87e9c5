"""Settings: the one reader of the environment (and `.env`).

Built once by `kvroute serve` / `main.py` and passed down; never mutated. Tests build
`Settings(...)` directly. Every field is documented in `.env.example` and the README.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PolicyName = Literal["sticky", "least_loaded", "round_robin"]


class SettingsError(Exception):
    """A missing or malformed setting; `str()` is one line naming the setting."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        case_sensitive=False,
    )

    # --- backends -------------------------------------------------------------------------
    backend_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    served_model: str = ""
    backend_api_key: str = Field(default="", repr=False)
    # A file of backend URLs (one a line, `#` comments), watched: edits add and drain backends.
    backends_file: str = ""
    # Enables /admin/backends (add, list, drain, cut) for `Authorization: Bearer <key>`.
    admin_api_key: str = Field(default="", repr=False)
    # How long a drained backend's open requests may run before they are cut.
    drain_timeout_s: float = Field(default=60.0, ge=0)

    # --- listener -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # `text`: readable lines (requests as key=value); `json`: one JSON object per line.
    log_format: Literal["text", "json"] = "text"
    # Router worker processes on one port; more than one needs REDIS_URL to share ownership.
    workers: int = Field(default=1, ge=1, le=64)
    # Client connections: header size and count (431 past them), time to send the headers
    # (slow clients are cut: 408), and open connections at once (503 past it).
    max_header_bytes: int = Field(default=65536, ge=1024)
    max_headers: int = Field(default=100, ge=8)
    # nginx waits 60 s, Apache 20 to 40 s: 10 s cut a real client whose own loop was starved.
    header_timeout_s: float = Field(default=30.0, gt=0)
    # Time to send the whole body, from the end of the headers (408 past it): 16 MiB in 60 s
    # needs 280 KB/s. A body trickled a byte at a time would otherwise hold its connection.
    body_timeout_s: float = Field(default=60.0, gt=0)
    max_connections: int = Field(default=4096, ge=1)
    # Longest a client may take none of its answer while the router has bytes for it (nginx's
    # send_timeout, 60 s): past it the connection is cut, which frees its slot and ends its
    # generation upstream. A client that never reads would otherwise hold both for good.
    send_timeout_s: float = Field(default=60.0, gt=0)
    # The least a client must take, on average over each SEND_TIMEOUT_S of the router waiting
    # on it (0: off). Without it a client taking a few bytes a minute holds its slot for good:
    # each few bytes count as progress. 1 KiB/s is slower than any working link.
    send_min_bytes_per_s: int = Field(default=1024, ge=0)

    # --- upstream connections -------------------------------------------------------------
    connect_timeout_s: float = Field(default=3.0, gt=0)
    # Longest silence tolerated between two upstream bytes (covers long prefills/queues).
    read_timeout_s: float = Field(default=600.0, gt=0)
    # vLLM's uvicorn drops idle keep-alive connections after 5 s: retire ours sooner.
    pool_idle_timeout_s: float = Field(default=4.0, gt=0, lt=5.0)
    max_connections_per_backend: int = Field(default=1024, ge=1)
    # The upstream HTTP client: httptools (lean, the default) or aiohttp (the reference).
    upstream_client: Literal["httptools", "aiohttp"] = "httptools"

    # --- background probes ----------------------------------------------------------------
    health_interval_s: float = Field(default=2.0, gt=0)
    metrics_interval_s: float = Field(default=1.0, gt=0)
    probe_timeout_s: float = Field(default=2.0, gt=0)
    unhealthy_after_failures: int = Field(default=2, ge=1)

    # --- request limits -------------------------------------------------------------------
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Request bodies held at once, all requests (read, parsed, queued): past it a new body gets
    # 429. Parsed, a body takes a few times its size in memory.
    max_body_bytes_held: int = Field(default=1024 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=4096, ge=1)
    max_tokens_cap: int = Field(default=0, ge=0)  # 0: no cap beyond the backend's own
    # The largest non-streamed answer relayed (and stream gathered for an HTTP/1.0 client), and
    # the largest single SSE event: a backend past them gets a 502 / an error event.
    max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=65536)
    max_sse_event_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    retries: int = Field(default=1, ge=0, le=3)
    # A retry is only started this soon after the request arrived (TTFT budget).
    retry_budget_s: float = Field(default=5.0, ge=0)
    # Consecutive failed live requests that open a backend's circuit breaker; it closes when a
    # health probe passes after the cool-down.
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=5.0, ge=0)

    # --- admission ------------------------------------------------------------------------
    max_in_flight: int = Field(default=0, ge=0)  # 0: no global limit
    max_in_flight_per_backend: int = Field(default=256, ge=1)
    max_in_flight_per_tenant: int = Field(default=0, ge=0)  # 0: no tenant limit
    # A backend whose vLLM reports more waiting requests than this takes no new ones: the
    # router queues them instead of piling them into vLLM's queue.
    max_backend_waiting: int = Field(default=16, ge=0)
    max_queue: int = Field(default=1024, ge=0)
    max_queue_per_tenant: int = Field(default=256, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0)
    tenant_rpm: float = Field(default=0, ge=0)  # 0: off
    tenant_tpm: float = Field(default=0, ge=0)  # 0: off
    shutdown_grace_s: float = Field(default=30.0, ge=0)

    # --- security ---------------------------------------------------------------------------
    # Comma-separated client keys; `KEY=TENANT` binds a key to a tenant. Empty: no auth.
    router_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    # Send vLLM a per-tenant cache_salt so tenants never share (or time) each other's KV blocks.
    tenant_cache_salt: bool = False
    cache_salt_secret: str = Field(default="", repr=False)
    # Believe X-Tenant-ID / X-User-ID from any client even when tenants are isolated or
    # limited (TENANT_CACHE_SALT, TENANT_RPM/TPM, MAX_IN_FLIGHT_PER_TENANT). Off: only from
    # TRUSTED_PROXIES; keys bound to a tenant (KEY=TENANT) decide regardless.
    trust_tenant_headers: bool = False

    # --- stream statistics ----------------------------------------------------------------
    stream_stats: bool = True
    # `chunk`: a plain `data:` chunk any SSE reader accepts; `event`: the same with an
    # `event: router.stream_stats` line, which naive readers (vllm bench serve) fail on.
    stream_stats_format: Literal["chunk", "event"] = "chunk"

    # --- tracing (OpenTelemetry's standard names; on when an exporter or endpoint is set) ---
    otel_traces_exporter: Literal["", "otlp", "console", "none"] = ""
    otel_exporter_otlp_endpoint: str = Field(default="", repr=False)
    otel_exporter_otlp_traces_endpoint: str = Field(default="", repr=False)
    otel_service_name: str = "kvroute"
    otel_sdk_disabled: bool = False

    # --- routing --------------------------------------------------------------------------
    routing_policy: PolicyName = "sticky"
    redis_url: str = Field(default="", repr=False)
    # auto: ask the server at start (INFO cluster); true/false: decided here.
    redis_cluster: Literal["auto", "true", "false"] = "auto"
    redis_timeout_s: float = Field(default=0.05, gt=0)
    redis_retry_s: float = Field(default=5.0, gt=0)
    # The request path's Redis calls (look-ups, rate checks): `lean` (app/resp.py: one pipelined
    # connection per node, a third of redis-py's loop turns and under half its CPU) or
    # `redis-py`. TLS or a credential provider always use redis-py.
    redis_lookup_client: Literal["lean", "redis-py"] = "lean"
    # With Redis: replicas publish their per-backend in-flight counts and read each other's with
    # every look-up (no extra round trip), instead of the last vLLM scrape. Ignored without Redis.
    shared_load: bool = True
    # With Redis: a look-up that finds no home for a new system prompt claims one (the backend
    # this replica would pick) in the same round trip, so replicas opening it at once agree.
    # Closer to one process's locality, but a burst of new prompts then queues more (README).
    first_home_claim: bool = False
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    prefix_window_chars: int = Field(default=2048, ge=16)
    # Second level of affinity: a new conversation prefers a backend holding its system prompt.
    system_affinity: bool = True
    # Weigh a conversation's owner by the share of its conversations' earlier tokens it still
    # held when they came back (measured from vLLM's cached_tokens, which needs
    # --enable-prompt-tokens-details; without it nothing is measured and nothing changes).
    kv_retention: bool = True
    ownership_ttl_s: float = Field(default=600.0, gt=0)
    # With Redis: answer a conversation's look-up from this process's last read for this long.
    # 0 (default): every look-up reads Redis, so replicas never route on each other's old records.
    ownership_cache_s: float = Field(default=0.0, ge=0, le=60)
    # Responses API: response id -> backend records, and (opt-in) conversations kept for
    # continuing on another backend when the one holding them is lost.
    responses_owner_ttl_s: float = Field(default=86400.0, gt=0)
    responses_history: bool = False
    responses_history_ttl_s: float = Field(default=86400.0, gt=0)
    responses_history_max_bytes: int = Field(default=1024 * 1024, ge=1024)
    # All the history this process keeps in memory (the oldest turns go first past it; with
    # Redis, Redis still has them): without it, 200 000 turns of 1 MiB each.
    responses_history_memory_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    # One-cost selection: cost = w_prefill * uncached_tokens + w_load * load.
    w_prefill: float = Field(default=1.0, ge=0)
    w_load: float = Field(default=32.0, ge=0)
    w_waiting: float = Field(default=2.0, ge=0)
    load_cap_factor: float = Field(default=2.0, ge=1.0)
    load_cap_floor: float = Field(default=16.0, ge=0)
    chars_per_token: float = Field(default=4.0, gt=0)

    @field_validator("backend_urls", "trusted_proxies", "router_api_keys", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("backend_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        cleaned = [backend_url(url) for url in urls]
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("lists the same URL twice")
        return cleaned

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, url: str) -> str:
        if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{url!r} is not a redis:// URL")
        return url

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, cidrs: list[str]) -> list[str]:
        from app.tenancy import parse_networks

        parse_networks(cidrs)
        return cidrs

    @model_validator(mode="after")
    def _check_bodies(self) -> Settings:
        if self.max_body_bytes_held < self.max_body_bytes:
            raise ValueError(
                f"MAX_BODY_BYTES_HELD ({self.max_body_bytes_held}) is below MAX_BODY_BYTES "
                f"({self.max_body_bytes}): a body of the largest size could never be taken"
            )
        return self

    @model_validator(mode="after")
    def _check_salt(self) -> Settings:
        if self.tenant_cache_salt and len(self.cache_salt_secret) < 16:
            raise ValueError(
                "CACHE_SALT_SECRET must be set (16+ characters) when TENANT_CACHE_SALT is on, "
                "and be the same on every router replica"
            )
        return self

    @model_validator(mode="after")
    def _check_tenant_trust(self) -> Settings:
        isolating = self.isolating_settings()
        if not isolating or self.trust_tenant_headers or self.trusted_proxies:
            return self
        keys = self.router_api_keys
        if keys and all("=" in k and k.split("=", 1)[1] for k in keys):
            return self  # every client's tenant comes from its key
        verb = "isolates or limits" if len(isolating) == 1 else "isolate or limit"
        raise ValueError(
            f"{', '.join(isolating)} {verb} tenants, but any client can claim a tenant "
            "with X-Tenant-ID: bind every ROUTER_API_KEYS entry to a tenant (KEY=TENANT), set "
            "TRUSTED_PROXIES to the proxy that sets the header, or set TRUST_TENANT_HEADERS=true "
            "to accept the header from anyone"
        )

    def isolating_settings(self) -> list[str]:
        """The settings that make the tenant a security boundary (isolation or limits)."""
        names = {
            "TENANT_CACHE_SALT": self.tenant_cache_salt,
            "TENANT_RPM": bool(self.tenant_rpm),
            "TENANT_TPM": bool(self.tenant_tpm),
            "MAX_IN_FLIGHT_PER_TENANT": bool(self.max_in_flight_per_tenant),
        }
        return [name for name, on in names.items() if on]

    @property
    def tenant_headers_open(self) -> bool:
        """Whether tenant headers are believed from any client (else only from trusted proxies)."""
        return self.trust_tenant_headers or not self.isolating_settings()

    @property
    def tracing_enabled(self) -> bool:
        """OpenTelemetry tracing: on when an exporter (other than `none`) or an OTLP endpoint is
        set, unless OTEL_SDK_DISABLED."""
        if self.otel_sdk_disabled or self.otel_traces_exporter == "none":
            return False
        return bool(
            self.otel_traces_exporter
            or self.otel_exporter_otlp_endpoint
            or self.otel_exporter_otlp_traces_endpoint
        )

    def require_backends(self) -> None:
        """Serving needs at least one backend; tests and tools may build Settings without."""
        if not (self.backend_urls or self.backends_file or self.admin_api_key):
            raise SettingsError(
                "BACKEND_URLS is not set: give the vLLM servers as a comma-separated list, "
                "e.g. BACKEND_URLS=http://10.0.0.5:8000,http://10.0.0.6:8000, give BACKENDS_FILE, "
                "or set ADMIN_API_KEY to add them through /admin/backends "
                "(or run `kvroute demo` to try the router on simulated backends)"
            )

    def environment(self) -> dict[str, str]:
        """The settings as environment variables (for worker processes that read them again)."""
        env = {}
        for name, value in self.model_dump().items():
            if isinstance(value, list):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[name.upper()] = str(value)
        return env

    def public_view(self) -> dict[str, object]:
        """The configuration without secrets, for /architecture."""
        data = self.model_dump()
        data["backend_api_key"] = "set" if self.backend_api_key else ""
        data["admin_api_key"] = "set" if self.admin_api_key else ""
        data["router_api_keys"] = f"{len(self.router_api_keys)} keys"
        data["cache_salt_secret"] = "set" if self.cache_salt_secret else ""
        data["redis_url"] = redact_url(self.redis_url)
        data["backend_urls"] = [redact_url(u) for u in self.backend_urls]
        for name in ("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint"):
            data[name] = redact_url(str(data[name]))
        return data


def backend_url(url: str) -> str:
    """A backend's base URL, without the trailing slash; ValueError for anything else."""
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or any(c.isspace() for c in url)
    ):
        raise ValueError(f"{url!r} is not an http(s) URL such as http://10.0.0.5:8000")
    try:
        parts.port  # noqa: B018  (raises for a port out of range or not a number)
    except ValueError as exc:
        raise ValueError(f"{url!r} has a bad port") from exc
    return url.rstrip("/")


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return parts._replace(netloc=f"***@{host}").geturl()
    return url


def load_settings(**overrides: object) -> Settings:
    """Read the environment; raise SettingsError with one line naming the bad setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["loc"]:
            name = str(first["loc"][0]).upper()
            raise SettingsError(f"invalid setting {name}: {first['msg']}") from None
        raise SettingsError(
            f"invalid settings: {first['msg'].removeprefix('Value error, ')}"
        ) from None
