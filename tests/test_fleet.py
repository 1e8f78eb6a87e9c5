"""The pool's membership changes, the fleet's drains and cuts, the backends file (no network)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.admin import parse_add, parse_drain
from app.backends import BackendPool
from app.errors import BadRequest, Conflict, NotFound, Unauthorized
from app.fleet import BackendsFile, Fleet, parse_backends_file
from app.security import AdminKey
from app.transport import MockResponse


def pool_of(n: int) -> BackendPool:
    return BackendPool([f"http://10.0.0.{i}:8000" for i in range(n)], default_model="m")


def serve_all(pool: BackendPool) -> None:
    for b in pool.backends:
        b.healthy = b.admitted = True


def test_names_are_stable_and_never_reused() -> None:
    pool = pool_of(2)
    assert [b.name for b in pool.backends] == ["b0", "b1"]
    assert pool.add("http://10.0.0.9:8000/").name == "b2"
    assert pool.get("b2").url == "http://10.0.0.9:8000"
    pool.remove("b2")
    assert pool.add("http://10.0.0.9:8000").name == "b3"  # b2's counters and records stay its own
    assert pool.add("http://10.0.0.10:8000", name="gpu-a").name == "gpu-a"
    assert pool.add("http://10.0.0.11:8000", name="b7").name == "b7"
    assert pool.add("http://10.0.0.12:8000").name == "b8"
    with pytest.raises(ValueError, match="already"):
        pool.add("http://10.0.0.9:8000")
    with pytest.raises(ValueError, match="already"):
        pool.add("http://10.0.0.99:8000", name="gpu-a")


def test_states_and_what_routing_sees() -> None:
    pool = pool_of(1)
    b0 = pool.get("b0")

    def state() -> str:  # (a function: mypy would keep the first assert's narrowing)
        return b0.state

    assert state() == "probing"
    assert not pool.any_healthy()
    serve_all(pool)
    assert state() == "serving"
    assert pool.models() == {"m": None}
    pool.drain("b0")
    assert state() == "draining"
    assert not pool.snapshot()[0].healthy  # no new request goes to it
    assert pool.models() == {}
    assert not pool.any_healthy()
    b0.draining, b0.healthy = False, False
    assert state() == "down"


def test_iterating_the_pool_is_a_snapshot() -> None:
    pool = pool_of(3)
    seen = []
    for b in pool.backends:
        seen.append(b.name)
        if b.name == "b0":
            pool.remove("b1")
            pool.add("http://10.0.0.7:8000")
    assert seen == ["b0", "b1", "b2"]
    assert [b.name for b in pool.backends] == ["b0", "b2", "b3"]


def test_a_lease_on_a_removed_backend_is_released_on_it() -> None:
    pool = pool_of(2)
    response = MockResponse(200, chunks=[b"data: x\n\n"])
    with pool.lease("b1") as b1:
        b1.responses[id(response)] = response
        assert pool.remove("b1") is b1
        assert response.closed  # a cut closes what is open on it
        assert b1.cut
        # Reports on it by name are ignored, not errors.
        pool.mark_failed("b1", "x")
        pool.record_failure("b1", "x")
        pool.record_success("b1")
    assert b1.in_flight == 0
    assert pool.remove("b1") is None


async def test_drain_waits_for_open_requests_then_removes() -> None:
    pool = pool_of(2)
    serve_all(pool)
    fleet = Fleet(pool, drain_timeout_s=10)
    with pool.lease("b0"):
        assert (await fleet.remove("b0")).state == "draining"
        await asyncio.sleep(0.05)
        assert pool.find("b0") is not None  # still open: it waits
        assert await fleet.remove("b0")  # idempotent while draining
    await _until(lambda: pool.find("b0") is None)
    assert fleet.changes == {"drain": 1, "remove": 1}
    with pytest.raises(NotFound):
        await fleet.remove("b0")


async def test_drain_timeout_cuts_what_is_still_open() -> None:
    pool = pool_of(1)
    fleet = Fleet(pool, drain_timeout_s=0.05)
    response = MockResponse(200, chunks=[b"data: x\n\n"])
    with pool.lease("b0") as b0:
        b0.responses[id(response)] = response
        await fleet.remove("b0")
        await _until(lambda: pool.find("b0") is None)
        assert response.closed
    assert b0.in_flight == 0


async def test_cut_removes_at_once() -> None:
    pool = pool_of(2)
    fleet = Fleet(pool, drain_timeout_s=10)
    with pool.lease("b1"):
        await fleet.remove("b1", drain=False)
        await _until(lambda: pool.find("b1") is None)
    assert fleet.changes == {"cut": 1, "remove": 1}


async def test_fleet_add_checks_its_input() -> None:
    pool = pool_of(1)
    fleet = Fleet(pool, drain_timeout_s=1)
    with pytest.raises(BadRequest):
        await fleet.add("not a url")
    with pytest.raises(Conflict):
        await fleet.add("http://10.0.0.0:8000/")
    with pytest.raises(Conflict):
        await fleet.add("http://10.0.0.5:8000", name="b0")
    with pytest.raises(BadRequest):
        await fleet.add("http://10.0.0.5:8000", name="")
    backend = await fleet.add("http://10.0.0.5:8000", api_key="k")
    assert (backend.name, backend.state, backend.api_key) == ("b1", "probing", "k")
    assert fleet.changes == {"add": 1}


def test_backends_file_is_parsed_line_by_line() -> None:
    text = (
        "# the fleet\n"
        "http://10.0.0.1:8000\n"
        "\n"
        "  http://10.0.0.2:8000/   # second\n"
        "htp://typo:8000\n"
        "http://10.0.0.1:8000\n"
        "http://h:notaport\n"
    )
    urls, problems = parse_backends_file(text)
    assert urls == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert [n for n, _ in problems] == [5, 7]


async def test_a_bad_backends_file_edit_drops_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "backends"
    pool = BackendPool([])
    fleet = Fleet(pool, drain_timeout_s=0)
    watcher = BackendsFile(path, fleet)
    path.write_text("http://a:1\nhttp://b:1\n")
    await watcher.apply()
    assert [b.url for b in pool.backends] == ["http://a:1", "http://b:1"]
    # b mistyped, c added: c joins, b stays while the file has a malformed line.
    path.write_text("http://a:1\nhttp//b:1\nhttp://c:1\n")
    await watcher.apply()
    assert [b.url for b in pool.backends] == ["http://a:1", "http://b:1", "http://c:1"]
    assert "line 2" in caplog.text
    assert not any(b.draining for b in pool.backends)
    # The file vanishing (an editor's rename) keeps everything.
    path.unlink()
    await watcher.apply()
    assert len(pool.backends) == 3
    # Fixed without b: b is drained.
    path.write_text("http://a:1\nhttp://c:1\n")
    await watcher.apply()
    await _until(lambda: pool.by_url("http://b:1") is None)
    assert [b.url for b in pool.backends] == ["http://a:1", "http://c:1"]


async def test_backends_file_leaves_other_backends_alone(tmp_path: Path) -> None:
    path = tmp_path / "backends"
    pool = BackendPool(["http://env:1"])
    fleet = Fleet(pool, drain_timeout_s=0)
    watcher = BackendsFile(path, fleet)
    path.write_text("http://env:1\nhttp://f:1\n")  # env's URL listed too: no conflict
    await watcher.apply()
    path.write_text("")
    await watcher.apply()
    await _until(lambda: len(pool.backends) == 1)
    assert pool.backends[0].url == "http://env:1"  # not the file's to remove


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b"{}", b'{"url": 1}', b'{"url": "x"}', b'{"url": "http://h:1", "z": 1}'],
)
def test_parse_add_rejects(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_add(raw)


def test_parse_add_and_drain() -> None:
    assert parse_add(b'{"url": "http://h:1/", "name": "g", "api_key": "k"}') == (
        "http://h:1",
        "g",
        "k",
    )
    assert parse_drain(None) is True
    assert parse_drain("false") is False
    with pytest.raises(BadRequest):
        parse_drain("later")


def test_admin_key() -> None:
    key = AdminKey("s3cret")
    key.check("Bearer s3cret")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(Unauthorized):
            key.check(header)
    assert not AdminKey("").enabled
    with pytest.raises(Unauthorized):
        AdminKey("").check("Bearer ")


async def _until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_name_used_again_starts_without_the_old_ownership() -> None:
    pool = pool_of(1)
    forgotten: list[str] = []

    async def forget(name: str) -> None:
        forgotten.append(name)

    fleet = Fleet(pool, drain_timeout_s=0, forget=forget)
    await fleet.add("http://10.0.0.5:8000", name="gpu1-8000")
    await fleet.remove("gpu1-8000")
    await _until(lambda: pool.find("gpu1-8000") is None)
    assert forgotten == ["gpu1-8000"]  # at the add; the removal leaves the records
    await fleet.add("http://10.0.0.5:8000", name="gpu1-8000")
    assert forgotten == ["gpu1-8000", "gpu1-8000"]
