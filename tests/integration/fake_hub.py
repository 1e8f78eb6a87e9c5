"""A Hugging Face hub stand-in on loopback, for the real ``huggingface_hub`` client (as HF_ENDPOINT).

Serves what ``snapshot_download`` asks (huggingface_hub 0.36 and 2.x): repo info with ``sha`` and
``siblings``, the recursive tree, and ``HEAD``/``GET`` on ``/{repo}/resolve/{rev}/{file}`` with
``X-Repo-Commit``, ``ETag``, ``Content-Length`` and ``Range`` -> 206. A gated repo's metadata is
public (as on the real hub) and its files answer 401 ``X-Error-Code: GatedRepo`` unless the
request carries the right token; an unknown repo answers 404 ``X-Error-Code: RepoNotFound``.
Every request is recorded, with its Authorization header, for assertions.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

LFS_THRESHOLD = 1_000_000


@dataclass(frozen=True, slots=True)
class HubFile:
    path: str
    data: bytes

    @property
    def git_sha(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_lfs(self) -> bool:
        return len(self.data) >= LFS_THRESHOLD

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.git_sha


@dataclass(slots=True)
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    gated_token: str | None = None

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, gated_token: str | None = None) -> HubRepo:
        files = {
            str(path.relative_to(folder)): HubFile(str(path.relative_to(folder)), path.read_bytes())
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.startswith("kvroute_build")
        }
        return cls(repo_id, files, gated_token)

    @property
    def commit(self) -> str:
        digest = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name].git_sha.encode())
        return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class HubRequest:
    method: str
    path: str
    authorization: str | None
    range: str | None


@dataclass(slots=True)
class FakeHub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[HubRequest] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo: HubRepo) -> None:
        self.repos[repo.repo_id] = repo

    # ---- lifecycle: its own event loop in a daemon thread -----------------------------------

    def start(self) -> FakeHub:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:
                failure.append(exc)  # start() raises it in the caller's thread
                ready.set()
                raise
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-hub", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise RuntimeError("fake hub failed to start") from failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}/{sub:.*}", self._tree)
        app.router.add_route("HEAD", "/{org}/{name}/resolve/{rev}/{file:.+}", self._resolve)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{file:.+}", self._resolve, allow_head=False)
        app.middlewares.append(self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- handlers -----------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: object) -> web.StreamResponse:
        self.requests.append(
            HubRequest(
                request.method,
                request.path,
                request.headers.get("Authorization"),
                request.headers.get("Range"),
            )
        )
        assert callable(handler)
        response: web.StreamResponse = await handler(request)
        return response

    def _repo(self, request: web.Request) -> HubRepo:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"},
                text='{"error":"Repository not found"}',
            )
        rev = request.match_info.get("rev", "main")
        if rev not in ("main", repo.commit):
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "RevisionNotFound", "Content-Type": "application/json"},
                text=f'{{"error":"Invalid rev id: {rev}"}}',
            )
        return repo

    async def _info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        siblings = []
        for hub_file in repo.files.values():
            sibling: dict[str, object] = {
                "rfilename": hub_file.path,
                "size": len(hub_file.data),
                "blobId": hub_file.git_sha,
            }
            if hub_file.is_lfs:
                sibling["lfs"] = {
                    "sha256": hub_file.sha256,
                    "size": len(hub_file.data),
                    "pointerSize": 134,
                }
            siblings.append(sibling)
        return web.json_response(
            {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": repo.commit,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "createdAt": "2025-01-01T00:00:00.000Z",
                "private": False,
                "disabled": False,
                "gated": "manual" if repo.gated_token else False,
                "downloads": 0,
                "likes": 0,
                "tags": ["transformers", "llama"],
                "library_name": "transformers",
                "pipeline_tag": "text-generation",
                "siblings": siblings,
                "spaces": [],
            }
        )

    async def _tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        prefix = request.match_info.get("sub", "").strip("/")
        entries = []
        for hub_file in repo.files.values():
            if prefix and not hub_file.path.startswith(prefix + "/"):
                continue
            entry: dict[str, object] = {
                "type": "file",
                "oid": hub_file.git_sha,
                "size": len(hub_file.data),
                "path": hub_file.path,
            }
            if hub_file.is_lfs:
                entry["lfs"] = {
                    "oid": hub_file.sha256,
                    "size": len(hub_file.data),
                    "pointerSize": 134,
                }
            entries.append(entry)
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if (
            repo.gated_token
            and request.headers.get("Authorization") != f"Bearer {repo.gated_token}"
        ):
            raise web.HTTPUnauthorized(
                headers={"X-Error-Code": "GatedRepo", "Content-Type": "application/json"},
                text=(
                    f'{{"error":"Access to model {repo.repo_id} is restricted. You must have '
                    f'access to it and be authenticated to access it. Please log in."}}'
                ),
            )
        hub_file = repo.files.get(request.match_info["file"])
        if hub_file is None:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit},
                text='{"error":"Entry not found"}',
            )
        headers = {
            "X-Repo-Commit": repo.commit,
            "ETag": f'"{hub_file.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if hub_file.is_lfs:
            headers["X-Linked-Size"] = str(len(hub_file.data))
            headers["X-Linked-Etag"] = f'"{hub_file.sha256}"'
        data = hub_file.data
        status = 200
        range_header = request.headers.get("Range", "")
        if range_header.startswith("bytes="):
            start_text, _sep, end_text = range_header[6:].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        headers["Content-Length"] = str(len(data))
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, headers=headers, body=data)
