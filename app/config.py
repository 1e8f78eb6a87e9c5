"""Settings: the one reader of the environment (and `.env`).

Built once by `kvroute serve` / `main.py` and passed down; never mutated. Tests build
`Settings(...)` directly. Every field is documented in `.env.example` and the README.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
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

    # --- listener -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Router worker processes on one port; more than one needs REDIS_URL to share ownership.
    workers: int = Field(default=1, ge=1, le=64)

    # --- upstream connections -------------------------------------------------------------
    connect_timeout_s: float = Field(default=3.0, gt=0)
    # Longest silence tolerated between two upstream bytes (covers long prefills/queues).
    read_timeout_s: float = Field(default=600.0, gt=0)
    # vLLM's uvicorn drops idle keep-alive connections after 5 s: retire ours sooner.
    pool_idle_timeout_s: float = Field(default=4.0, gt=0, lt=5.0)
    max_connections_per_backend: int = Field(default=1024, ge=1)

    # --- background probes ----------------------------------------------------------------
    health_interval_s: float = Field(default=2.0, gt=0)
    metrics_interval_s: float = Field(default=1.0, gt=0)
    probe_timeout_s: float = Field(default=2.0, gt=0)
    unhealthy_after_failures: int = Field(default=2, ge=1)

    # --- request limits -------------------------------------------------------------------
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    retries: int = Field(default=1, ge=0, le=3)

    # --- stream statistics ----------------------------------------------------------------
    stream_stats: bool = True

    # --- routing --------------------------------------------------------------------------
    routing_policy: PolicyName = "sticky"
    redis_url: str = Field(default="", repr=False)
    redis_timeout_s: float = Field(default=0.05, gt=0)
    redis_retry_s: float = Field(default=5.0, gt=0)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    prefix_window_chars: int = Field(default=2048, ge=16)
    # Second level of affinity: a new conversation prefers a backend holding its system prompt.
    system_affinity: bool = True
    ownership_ttl_s: float = Field(default=600.0, gt=0)
    # One-cost selection: cost = w_prefill * uncached_tokens + w_load * load.
    w_prefill: float = Field(default=1.0, ge=0)
    w_load: float = Field(default=64.0, ge=0)
    w_waiting: float = Field(default=2.0, ge=0)
    load_cap_factor: float = Field(default=2.0, ge=1.0)
    load_cap_floor: float = Field(default=4.0, ge=0)
    chars_per_token: float = Field(default=4.0, gt=0)

    @field_validator("backend_urls", "trusted_proxies", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("backend_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        cleaned = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{url!r} is not an http(s) URL such as http://10.0.0.5:8000")
            cleaned.append(url.rstrip("/"))
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("lists the same URL twice")
        return cleaned

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, url: str) -> str:
        if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{url!r} is not a redis:// URL")
        return url

    def require_backends(self) -> None:
        """Serving needs at least one backend; tests and tools may build Settings without."""
        if not self.backend_urls:
            raise SettingsError(
                "BACKEND_URLS is not set: give the vLLM servers as a comma-separated list, "
                "e.g. BACKEND_URLS=http://10.0.0.5:8000,http://10.0.0.6:8000 "
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
        data["redis_url"] = redact_url(self.redis_url)
        data["backend_urls"] = [redact_url(u) for u in self.backend_urls]
        return data


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
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise SettingsError(f"invalid setting {name}: {first['msg']}") from None
