"""The router's error tree and its OpenAI-style bodies.

    KvrouteError                      status  type
    ├── BadRequest                    400     invalid_request_error
    │   └── PayloadTooLarge           413     invalid_request_error
    ├── Unauthorized                  401     authentication_error
    ├── ModelNotFound                 404     invalid_request_error (code model_not_found)
    ├── NotFound                      404     invalid_request_error (code not_found)
    ├── Conflict                      409     invalid_request_error (code conflict)
    ├── ResponseNotFound              404     invalid_request_error (code response_not_found)
    ├── ResponseLost                  410     invalid_request_error (code response_lost): the
    │                                         backend that held a response is down or restarted
    ├── Overloaded                    429     rate_limit_error (+ Retry-After)
    ├── ClientGone                    499     the client left; nothing is sent, the request is logged
    ├── NoHealthyBackend              503     service_unavailable
    └── UpstreamError                 502     upstream_error
        ├── UpstreamUnavailable       502     retryable: connect error, reset, 502/503 before a byte
        └── UpstreamBroken            502     after the first byte: reported as an SSE error event

Every class carries its HTTP status and OpenAI `type`; `body()` renders `{"error": {...}}`.
"""

from __future__ import annotations

from typing import Any

import orjson


class KvrouteError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


class BadRequest(KvrouteError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class Unauthorized(KvrouteError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(KvrouteError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(KvrouteError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(KvrouteError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ResponseNotFound(KvrouteError):
    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


class ResponseLost(KvrouteError):
    """The response existed, on a backend that has since gone or restarted (vLLM keeps it in
    memory only): 410, so that a client can tell it from an id that never existed."""

    status = 410
    type = "invalid_request_error"
    code = "response_lost"


class Overloaded(KvrouteError):
    status = 429
    type = "rate_limit_error"
    code = "router_overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class ClientGone(KvrouteError):
    """The client disconnected (while uploading, queued, waiting for headers or mid-stream)."""

    status = 499
    type = "client_closed_request"
    code = "client_gone"

    def __init__(self, message: str = "the client closed the connection") -> None:
        super().__init__(message)


class NoHealthyBackend(KvrouteError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_backend"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamError(KvrouteError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"

    def __init__(self, message: str, *, backend: str = "") -> None:
        super().__init__(message)
        self.backend = backend


class UpstreamUnavailable(UpstreamError):
    """Failed before any byte reached the client: safe to retry on another backend."""


class UpstreamBroken(UpstreamError):
    """Failed after the first byte: the client gets an SSE error event instead of a status."""
