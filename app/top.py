"""`kvroute top --url http://HOST:PORT`: a running router's dashboard in the terminal.

It polls the router's `GET /dashboard/data` (the same JSON as the `/dashboard` page) and redraws
a rich table; `--once` prints one frame and exits (scripts, tests). `render(data)` is pure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

OUTCOMES = ("hit", "miss", "spill", "reassigned")
OUTCOME_STYLES = {"hit": "green", "miss": "bright_black", "spill": "yellow", "reassigned": "red"}
_BLOCKS = "▁▂▃▄▅▆▇█"
NONE = "-"  # a figure not known (yet)


class TopError(Exception):
    """The router could not be read; `str()` says why in one line."""


def fetch(url: str, timeout_s: float, api_key: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/dashboard/data")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise TopError(f"{url} answered {exc.code} on /dashboard/data") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TopError(f"cannot read {url}/dashboard/data: {reason}") from None
    if not isinstance(data, dict):
        raise TopError(f"{url}/dashboard/data did not answer a JSON object")
    return data


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else NONE


def _int(value: Any) -> str:
    return f"{round(value):,}" if isinstance(value, int | float) else NONE


def _pct(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, int | float) else NONE


def _ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return NONE
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms"


def sparkline(values: Sequence[float | None], width: int = 30) -> str:
    """The last `width` values as block characters, scaled to their maximum; gaps as spaces."""
    tail = list(values)[-width:]
    top = max((v for v in tail if v is not None), default=0.0)
    if top <= 0:
        return "".join(" " if v is None else _BLOCKS[0] for v in tail)
    return "".join(
        " " if v is None else _BLOCKS[min(len(_BLOCKS) - 1, int(v / top * (len(_BLOCKS) - 1)))]
        for v in tail
    )


def _summary(data: Mapping[str, Any], url: str) -> Table:
    current, totals, series = data["current"], data["totals"], data["series"]
    grid = Table.grid(padding=(0, 2))
    for _ in range(4):
        grid.add_column()
    clock = time.strftime("%H:%M:%S", time.localtime(data.get("now") or time.time()))
    grid.add_row(
        Text(f"kvroute top · {url}", style="bold"),
        f"policy {data.get('policy', NONE)}",
        f"requests {_int(totals.get('requests'))}",
        clock,
    )
    grid.add_row(
        f"req/s {_num(current.get('rps'))}  {sparkline(series.get('rps', []))}",
        f"in flight {_int(current.get('in_flight'))}",
        f"errors {_int(totals.get('errors'))}  retries {_int(totals.get('retries'))}",
        "",
    )
    grid.add_row(
        f"TTFT p50 {_ms(current.get('ttft_p50_ms'))}  p99 {_ms(current.get('ttft_p99_ms'))}",
        f"cached tokens {_pct(totals.get('cached_ratio'))}",
        f"TTFT all p50 {_ms(totals.get('ttft_p50_ms'))}  p99 {_ms(totals.get('ttft_p99_ms'))}",
        "",
    )
    return grid


def _backends(data: Mapping[str, Any]) -> Table:
    table = Table(title="backends", title_justify="left", expand=False)
    table.add_column("backend")
    table.add_column("health")
    for name in ("in flight", "running", "waiting", "KV cache", "owned keys", "requests", "cached"):
        table.add_column(name, justify="right")
    for outcome in OUTCOMES:
        table.add_column(outcome, justify="right", style=OUTCOME_STYLES[outcome])
    for b in data.get("backends", []):
        outcomes = b.get("outcomes") or {}
        table.add_row(
            str(b.get("name")),
            _health(b),
            _int(b.get("in_flight")),
            _int(b.get("running")),
            _int(b.get("waiting")),
            _pct(b.get("kv_usage")),
            _int(b.get("owned_keys")),
            _int(b.get("requests")),
            _pct(b.get("cached_ratio")),
            *(_int(outcomes.get(o, 0)) for o in OUTCOMES),
        )
    return table


def _health(b: Mapping[str, Any]) -> Text:
    if b.get("state") in ("probing", "draining"):
        return Text(str(b["state"]), style="yellow")
    return Text("up", style="green") if b.get("healthy") else Text("down", style="bold red")


def _mix(data: Mapping[str, Any]) -> Text:
    outcomes = data.get("outcomes") or {}
    total = sum(int(outcomes.get(o, 0)) for o in OUTCOMES)
    text = Text("cache outcomes  ")
    for outcome in OUTCOMES:
        n = int(outcomes.get(outcome, 0))
        share = f" ({n / total * 100:.0f}%)" if total else ""
        text.append(f"{outcome} {n:,}{share}   ", style=OUTCOME_STYLES[outcome])
    return text


def _recent(data: Mapping[str, Any], rows: int) -> Table:
    table = Table(title="last routing decisions", title_justify="left")
    for name in ("time", "tenant", "model", "backend", "outcome", "affinity"):
        table.add_column(name)
    table.add_column("TTFT", justify="right")
    table.add_column("status", justify="right")
    for d in list(data.get("recent", []))[:rows]:
        outcome = d.get("outcome") or NONE
        status = d.get("status")
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(d.get("time") or 0)),
            d.get("tenant") or NONE,
            d.get("model") or NONE,
            d.get("backend") or NONE,
            Text(outcome, style=OUTCOME_STYLES.get(outcome, "")),
            d.get("affinity") or NONE,
            _ms(d.get("ttft_ms")),
            Text(str(status), style="red" if isinstance(status, int) and status >= 400 else ""),
        )
    return table


def render(data: Mapping[str, Any], url: str, recent_rows: int = 8) -> RenderableType:
    """One frame: summary, backends, the cache-outcome mix and the last decisions."""
    return Group(_summary(data, url), _backends(data), _mix(data), _recent(data, recent_rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvroute top", description="live figures of a running kvroute router"
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the router's base URL")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--rows", type=int, default=8, help="routing decisions shown")
    parser.add_argument("--width", type=int, help="columns (default: the terminal's)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per poll")
    parser.add_argument("--api-key", help="sent as `Authorization: Bearer …` if set")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        print("kvroute top: --interval must be positive", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    console = Console(width=args.width)
    if args.once:
        try:
            data = fetch(url, args.timeout, args.api_key)
        except TopError as exc:
            print(f"kvroute top: {exc}", file=sys.stderr)
            return 1
        console.print(render(data, url, args.rows))
        return 0
    frame: RenderableType = Text(f"connecting to {url} …")
    try:
        with Live(frame, console=console, refresh_per_second=4, screen=False) as live:
            while True:
                try:
                    live.update(render(fetch(url, args.timeout, args.api_key), url, args.rows))
                except TopError as exc:
                    live.update(Text(f"kvroute top: {exc}; retrying", style="bold red"))
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0
