"""The dashboard in a real browser: the system's Chromium driven by Playwright (never a browser
that Playwright downloads), for the dashboard test and the README's screenshot.

    uv run kvroute demo &                       # a router in front of simulated backends
    uv run python -m tools.dashboard_shot --url http://127.0.0.1:8080 --out docs/dashboard.png

puts the demo under load from a few tenants, waits for the charts to fill, and saves the page.
Playwright is a dev dependency: it is imported when a page is opened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

# Headless, and nothing that reaches outside loopback or persists between runs.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def find_chromium() -> str | None:
    """The system's Chromium (Debian: `apt-get install chromium`), or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@contextlib.contextmanager
def dashboard_page(
    url: str,
    *,
    chromium: str,
    dark: bool = False,
    width: int = 1440,
    height: int = 900,
) -> Iterator[Page]:
    """`url`/dashboard open in a fresh headless Chromium profile; closed on exit."""
    from playwright.sync_api import sync_playwright

    with (
        tempfile.TemporaryDirectory(
            prefix="kvroute-chromium-", ignore_cleanup_errors=True
        ) as profile,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": width, "height": height},
            color_scheme="dark" if dark else "light",
        )
        try:
            page = context.new_page()
            page.goto(url.rstrip("/") + "/dashboard")
            yield page
        finally:
            context.close()


def polls(page: Page) -> int:
    """How many times the page has drawn fresh data (its body's `data-polls`)."""
    return int(page.locator("body").get_attribute("data-polls") or 0)


def wait_polls(page: Page, at_least: int, timeout_s: float = 10.0) -> int:
    """Wait until the page has drawn `at_least` polls. (Polled from here: the page's content
    security policy forbids the `eval` that Playwright's wait_for_function would need.)"""
    deadline = time.monotonic() + timeout_s
    while (n := polls(page)) < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the dashboard drew {n} polls in {timeout_s} s, not {at_least}")
        time.sleep(0.05)
    return n


def _load(url: str, model: str, seconds: float, tenants: int, concurrency: int) -> None:
    from bench.loadgen import LoadSpec, run_load

    async def run() -> None:
        await asyncio.gather(
            *(
                run_load(
                    LoadSpec(
                        base_url=url,
                        model=model,
                        concurrency=concurrency,
                        duration_s=seconds,
                        max_tokens=48,
                        conversations=24,
                        headers={"X-Tenant-ID": f"tenant-{i}"},
                    )
                )
                for i in range(tenants)
            )
        )

    asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="screenshot of a router's /dashboard under load")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--out", default="docs/dashboard.png")
    parser.add_argument("--model", default="demo-model")
    parser.add_argument("--load-s", type=float, default=75.0, help="seconds of load first")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=3, help="streams per tenant")
    parser.add_argument("--dark", action="store_true")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 1
    load = threading.Thread(
        target=_load,
        args=(args.url, args.model, args.load_s + 30, args.tenants, args.concurrency),
        daemon=True,
    )
    load.start()
    time.sleep(args.load_s)
    with dashboard_page(args.url, chromium=chromium, dark=args.dark) as page:
        wait_polls(page, 2)
        page.screenshot(path=args.out, full_page=True)
    load.join()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
