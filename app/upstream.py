"""Open a request on a backend: choose, dispatch, retry elsewhere before the first byte.

`Dispatcher.open(...)` is an async context manager: inside it the caller holds one upstream
response and one in-flight count on its backend; both are released when the `async with` ends,
on every path. Retries happen inside, before anything reaches the client: a connection error
or a 502/503 answer moves the request to another backend while the retry budget lasts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass

from app.backends import Backend, BackendPool
from app.errors import KvrouteError, NoHealthyBackend, Overloaded, UpstreamUnavailable
from app.ownership import OwnershipStore
from app.routing import NO_OWNERSHIP, Decision, Ownership, Policy, RouteRequest
from app.tracing import NO_TRACE, RequestTrace
from app.transport import Transport, UpstreamResponse

log = logging.getLogger("kvroute.upstream")

# Statuses that mean "this backend cannot take it now": safe to retry on another one.
RETRYABLE_STATUSES = frozenset({502, 503})


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What goes upstream, the same for every attempt (but the request id)."""

    path: str
    body: bytes
    headers: Mapping[str, str]
    request_id: str
    started_s: float  # receipt at the router (time.monotonic), for the retry budget
    method: str = "POST"


@dataclass(frozen=True, slots=True)
class Attempt:
    """An upstream response that answered with headers, and the decision that led to it."""

    decision: Decision
    response: UpstreamResponse
    retries: int


class Dispatcher:
    def __init__(
        self,
        *,
        pool: BackendPool,
        policy: Policy,
        ownership: OwnershipStore,
        transport: Transport,
        read_timeout_s: float,
        retries: int,
        retry_budget_s: float = 5.0,
        max_in_flight_per_backend: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.ownership = ownership
        self.transport = transport
        self.read_timeout_s = read_timeout_s
        self.retries = retries
        self.retry_budget_s = retry_budget_s
        self.max_in_flight_per_backend = max_in_flight_per_backend
        self._clock = clock

    @contextlib.asynccontextmanager
    async def open(
        self,
        route: RouteRequest,
        ownership: Ownership,
        out: Outgoing,
        *,
        policy: Policy | None = None,
        remember: bool = True,
        trace: RequestTrace = NO_TRACE,
    ) -> AsyncIterator[Attempt]:
        """Hold an answered attempt for the body of the `async with`.

        A retry goes to another backend, and only while the request is younger than the retry
        budget: a slow failover would break the time-to-first-token objective anyway."""
        tried: list[str] = []
        last_error: KvrouteError | None = None
        for n in range(self.retries + 1):
            if n and not self._within_budget(out):
                break
            decision = self._choose(route, ownership, policy or self.policy, tried)
            if decision is None:
                break
            tried.append(decision.backend)
            with self.pool.lease(decision.backend) as backend:
                if remember:
                    # Recorded at dispatch, not at the answer, so that requests arriving
                    # meanwhile (the next conversations on this system prompt) see this home.
                    claim = ownership.owner is None and n == 0
                    await self.ownership.record(
                        route.keys, backend.name, route.prompt_tokens, claim=claim
                    )
                try:
                    response = await self._send(backend, n, out, trace)
                except UpstreamUnavailable as exc:
                    last_error = exc
                    continue
                backend.responses[id(response)] = response  # closed by a cut of the backend
                try:
                    if self._retry_elsewhere(backend, response, n, out):
                        last_error = UpstreamUnavailable(
                            f"backend {backend.name} answered {response.status}",
                            backend=backend.name,
                        )
                        continue  # its body is not read: the connection is closed below
                    yield Attempt(decision=decision, response=response, retries=n)
                    return
                finally:
                    backend.responses.pop(id(response), None)
                    response.close()
        if last_error is not None:
            raise last_error
        raise NoHealthyBackend(f"no healthy backend serves model {route.model!r}")

    async def _send(
        self, backend: Backend, n: int, out: Outgoing, trace: RequestTrace
    ) -> UpstreamResponse:
        # vLLM wants ids unique among its in-flight requests: a retry gets a fresh one.
        request_id = f"{out.request_id}-r{n}" if n else out.request_id
        headers = {**out.headers, "X-Request-Id": request_id}
        if backend.api_key:
            headers["Authorization"] = f"Bearer {backend.api_key}"
        trace.upstream(backend.name, n, headers)
        try:
            response = await self.transport.request(
                out.method,
                backend.url + out.path,
                out.body,
                headers,
                read_timeout_s=self.read_timeout_s,
            )
        except UpstreamUnavailable as exc:
            self.pool.mark_failed(backend.name, exc.message)
            log.warning("attempt %d on %s failed: %s", n + 1, backend.name, exc.message)
            raise UpstreamUnavailable(
                f"backend {backend.name} is unreachable ({exc.message})", backend=backend.name
            ) from exc
        if backend.cut:  # removed while it answered: nothing reached the client, go elsewhere
            response.close()
            raise UpstreamUnavailable(f"backend {backend.name} was removed", backend=backend.name)
        return response

    def _retry_elsewhere(
        self, backend: Backend, response: UpstreamResponse, n: int, out: Outgoing
    ) -> bool:
        """Whether this answer should be dropped for another backend (and the breaker told)."""
        if response.status not in RETRYABLE_STATUSES:
            self.pool.record_success(backend.name)
            return False
        self.pool.record_failure(backend.name, f"answered {response.status}")
        if n < self.retries and self._within_budget(out):
            log.warning("attempt %d on %s answered %d", n + 1, backend.name, response.status)
            return True
        return False

    @contextlib.contextmanager
    def first_home(self, route: RouteRequest) -> Iterator[Callable[[], str | None]]:
        """For the `with`: a call giving where `route` would open its system prompt if no
        backend held it (the policy's choice without ownership; None without a system prompt or
        a candidate), for a shared store to claim when it finds no home (`RedisStore.lookup`).

        The backend proposed counts the request in flight until the `with` ends (the look-up),
        so that the next proposals of a burst see it, as the burst's next decisions see this
        one's dispatch. Without it they would all see the same loads, and the system keys' hash
        would place a low load's new prompts, stacking some on one backend. Call it once."""
        with contextlib.ExitStack() as held:

            def propose() -> str | None:
                if route.system_tokens <= 0:
                    return None
                candidates = self.pool.candidates(
                    route.model, max_in_flight=self.max_in_flight_per_backend
                )
                if candidates.is_empty():
                    return None
                backend = self.policy.choose(route, candidates, NO_OWNERSHIP).backend
                held.enter_context(self.pool.hold(backend))
                return backend

            yield propose

    def _within_budget(self, out: Outgoing) -> bool:
        return self._clock() - out.started_s <= self.retry_budget_s

    def _choose(
        self, route: RouteRequest, ownership: Ownership, policy: Policy, tried: list[str]
    ) -> Decision | None:
        candidates = self.pool.candidates(
            route.model, frozenset(tried), self.max_in_flight_per_backend
        )
        if candidates.is_empty():
            if not tried and not self.pool.candidates(route.model).is_empty():
                raise Overloaded("every backend serving this model is at its in-flight limit")
            return None
        return policy.choose(route, candidates, ownership)
