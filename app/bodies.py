"""The request bodies the router holds at once, in bytes.

A body is held from its first byte to the end of its request: read, parsed (Python objects take a
few times the JSON's size) and waiting in the admission queue. MAX_BODY_BYTES bounds one request,
not a thousand of them queued at once; `BodyBudget` bounds their sum (`MAX_BODY_BYTES_HELD`): a
body that would pass it is refused as it arrives (429 `bodies_full`), before it is held, and what a
request held is given back when it ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.errors import Overloaded


class BodiesFull(Overloaded):
    code = "bodies_full"


class BodyBudget:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.refused = 0

    def take(self, size: int) -> None:
        if self.held + size > self.max_bytes:
            self.refused += 1
            raise BodiesFull(
                f"the router holds {self.held} bytes of request bodies (limit "
                f"{self.max_bytes}); retry shortly",
            )
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size

    def describe(self) -> dict[str, int]:
        return {"held_bytes": self.held, "max_bytes": self.max_bytes, "refused": self.refused}


class BodiesCollector(Collector):
    """The budget for Prometheus (its refusals are in `kvroute_admission_rejections`)."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "kvroute_body_bytes_held",
            "Bytes of request bodies held now, all requests (MAX_BODY_BYTES_HELD bounds it)",
            value=self.budget.held,
        )
