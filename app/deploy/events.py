"""What remote scripts print back: ``@@kvroute {json}`` event lines and ``key=value`` fact lines.

The remote programs (``app/deploy/remote/``) are handed ``EVENT_PREFIX`` on their command line,
so this module is the one place that names it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

EVENT_PREFIX = "@@kvroute "


def parse_events(text: str) -> list[dict[str, Any]]:
    """Every ``@@kvroute {json}`` line in ``text``, in order; other lines are ignored."""
    events = []
    for line in text.splitlines():
        event = parse_event(line)
        if event is not None:
            events.append(event)
    return events


def parse_event(line: str) -> dict[str, Any] | None:
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        value = json.loads(line[len(EVENT_PREFIX) :])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_facts(text: str) -> dict[str, list[str]]:
    """``key=value`` lines into key -> values (keys may repeat); other lines are ignored."""
    facts: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            facts.setdefault(key, []).append(value)
    return facts


def first_fact(facts: Mapping[str, list[str]], key: str) -> str | None:
    """The first value of ``key``, or ``None`` when the script printed none."""
    values = facts.get(key)
    return values[0] if values else None
