"""Download a model snapshot into the host's Hugging Face cache with the venv's huggingface_hub.

argv: event prefix, repo, revision, download record path, JSON list of ignore patterns.
stdin: one JSON line, ``{"hf_token": ...}`` or ``{}``: the token never sits in argv.
Prints event lines: ``progress`` while it runs, then ``download`` (cached or done) or ``error``
with a ``kind`` the deploy tool turns into a fix (exit 3 after an ``error`` event).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from typing import Any

ERROR_EXIT = 3
NO_SPACE_ERRNO = 28
Refusals = Sequence[tuple[type[BaseException], str]]


class Events:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def emit(self, **event: Any) -> None:
        sys.stdout.write(self.prefix + json.dumps(event) + "\n")
        sys.stdout.flush()

    def failure(self, kind: str, exc: BaseException) -> SystemExit:
        """Report ``exc`` as an ``error`` event; the caller raises what this returns."""
        lines = str(exc).strip().splitlines()
        name = type(exc).__name__
        self.emit(event="error", kind=kind, error=name, message=lines[0] if lines else "")
        return SystemExit(ERROR_EXIT)


def hub_refusals() -> Refusals:
    """The hub's refusals, most specific first, each with the error kind it is reported as."""
    try:
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # huggingface_hub before 0.23 kept them in utils
        from huggingface_hub.utils import (  # type: ignore[attr-defined,no-redef,unused-ignore]
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    # A gated repo error is a kind of repository-not-found error: it is tested first.
    return [
        (GatedRepoError, "gated"),
        (RevisionNotFoundError, "revision"),
        (RepositoryNotFoundError, "not_found"),
    ]


def transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's own errors: requests' are OSErrors, httpx's (hub >= 1.0) are not."""
    try:
        import httpx
    except ImportError:
        return ()
    return (httpx.HTTPError,)


def refusal_kind(refusals: Refusals, exc: BaseException) -> str | None:
    return next((kind for cls, kind in refusals if isinstance(exc, cls)), None)


def failure_kind(refusals: Refusals, exc: BaseException) -> str:
    """The error kind of a failed snapshot download."""
    refused = refusal_kind(refusals, exc)
    if refused:
        return refused
    if isinstance(exc, OSError):
        return "disk" if exc.errno == NO_SPACE_ERRNO else "network"
    return "network" if "connect" in type(exc).__name__.lower() else "other"


def read_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):  # no record yet, or a torn one: download again
        return None
    return record if isinstance(record, dict) else None


def cached_snapshot(repo: str, revision: str, record_path: str) -> str | None:
    """The snapshot a previous run completed, when it is still whole in the cache."""
    from huggingface_hub import snapshot_download

    record = read_record(record_path)
    if not record or record.get("repo") != repo or record.get("revision") != revision:
        return None
    try:
        path = snapshot_download(
            repo, revision=revision, local_files_only=True, ignore_patterns=record.get("ignore")
        )
    except (OSError, ValueError):  # no longer (all) in the cache: download again
        return None
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def download_plan(
    events: Events, refusals: Refusals, repo: str, revision: str, base_ignore: list[str]
) -> tuple[list[str], int | None]:
    """(ignore patterns, total bytes) from the repo's file list; the total is None when the
    hub would not list the files."""
    from huggingface_hub import HfApi

    ignore = list(base_ignore)
    expected: tuple[type[Exception], ...] = (OSError, ValueError, *transport_errors())
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except expected as exc:
        kind = refusal_kind(refusals, exc)
        if kind:
            raise events.failure(kind, exc) from exc
        # Only the size is lost (no disk check, no total); the download meets the same failure,
        # if it lasts, and names it.
        events.emit(event="note", message=f"model size unknown: {type(exc).__name__}: {exc}")
        return ignore, None
    siblings = info.siblings or []
    if any(s.rfilename.endswith(".safetensors") for s in siblings):
        ignore.append("*.bin")
    kept = [s for s in siblings if not any(fnmatch.fnmatch(s.rfilename, p) for p in ignore)]
    return ignore, sum(s.size or 0 for s in kept)


def check_disk(events: Events, storage: str, total: int | None) -> None:
    existing = storage
    while not os.path.isdir(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if total and total > free:
        message = f"model needs {total} bytes, {free} free at {existing}"
        events.emit(event="error", kind="disk", message=message)
        raise SystemExit(ERROR_EXIT)


def blob_bytes(storage: str) -> int:
    size = 0
    for folder, _dirs, names in os.walk(os.path.join(storage, "blobs")):
        for name in names:
            # An incomplete blob is renamed when it completes: it may vanish before the stat.
            with contextlib.suppress(OSError):
                size += os.path.getsize(os.path.join(folder, name))
    return size


def fetch(
    events: Events,
    refusals: Refusals,
    repo: str,
    revision: str,
    ignore: list[str],
    storage: str,
    total: int | None,
) -> str:
    """``snapshot_download`` with a ``progress`` event every half second."""
    from huggingface_hub import snapshot_download

    done = threading.Event()

    def report() -> None:
        while not done.wait(0.5):
            events.emit(event="progress", done=blob_bytes(storage), total=total)

    threading.Thread(target=report, daemon=True).start()
    try:
        return snapshot_download(repo, revision=revision, ignore_patterns=ignore)
    except Exception as exc:  # the program's boundary: every failure becomes an error event
        raise events.failure(failure_kind(refusals, exc), exc) from exc
    finally:
        done.set()


def main(argv: list[str]) -> None:
    prefix, repo, revision, record_path, base_ignore = argv
    events = Events(prefix)
    secrets = json.loads(sys.stdin.readline() or "{}")
    if secrets.get("hf_token"):
        os.environ["HF_TOKEN"] = secrets["hf_token"]
    # Before the first import: huggingface_hub reads its settings from the environment then.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from huggingface_hub import constants

        refusals = hub_refusals()
    except ImportError as exc:
        events.emit(event="error", kind="import", message=str(exc))
        raise SystemExit(ERROR_EXIT) from exc

    cached = cached_snapshot(repo, revision, record_path)
    if cached:
        events.emit(event="download", status="cached", path=cached)
        return
    ignore, total = download_plan(events, refusals, repo, revision, json.loads(base_ignore))
    storage = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
    check_disk(events, storage, total)
    path = fetch(events, refusals, repo, revision, ignore, storage, total)
    if not os.path.isfile(os.path.join(path, "config.json")):
        events.emit(event="error", kind="not_a_model", message="no config.json in " + path)
        raise SystemExit(ERROR_EXIT)
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    with open(record_path, "w") as f:
        json.dump({"repo": repo, "revision": revision, "ignore": ignore, "path": path}, f)
    events.emit(event="progress", done=blob_bytes(storage), total=total)
    events.emit(event="download", status="done", path=path)


if __name__ == "__main__":
    main(sys.argv[1:])
