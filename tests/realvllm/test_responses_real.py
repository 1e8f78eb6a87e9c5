"""The Responses API through the router in front of two real vLLM servers (store on), with the
official `openai` client: chains by `previous_response_id` all succeed through the router, and
fail about half the time sent round robin straight to the servers; a conversation whose server
left the fleet continues elsewhere with RESPONSES_HISTORY (shared through Redis), or gets the
router's 410 without it."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from tests.conftest import running_router
from tools.realvllm import RealVllmServers

CONVERSATIONS, TURNS = 8, 5


def chains(clients: list[openai.OpenAI], model: str) -> tuple[int, int]:
    """8 conversations x 5 turns (odd conversations stream); turn i through clients[i % n]."""
    ok = failed = 0
    last: dict[int, str | None] = dict.fromkeys(range(CONVERSATIONS))
    for turn in range(TURNS):
        client = clients[turn % len(clients)]
        for n in range(CONVERSATIONS):
            text = f"Conversation {n} opens here. " * 4 if last[n] is None else f"turn {turn}"
            extra: dict[str, Any] = {"previous_response_id": last[n]} if last[n] else {}
            args: dict[str, Any] = {"model": model, "input": text, "max_output_tokens": 4}
            try:
                if n % 2:
                    with client.responses.stream(**args, **extra) as events:
                        last[n] = str(events.get_final_response().id)
                else:
                    last[n] = str(client.responses.create(**args, **extra).id)
                ok += 1
            except openai.NotFoundError:
                failed += 1
    return ok, failed


def test_chains_through_the_router_and_without_it(real_vllm_servers: RealVllmServers) -> None:
    model, urls = real_vllm_servers.model, real_vllm_servers.urls
    with running_router(urls, served_model=model) as router:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        routed = chains([client], model)
    direct = chains(
        [openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0) for u in urls], model
    )
    print(f"\nthrough the router: {routed}; round robin straight to vLLM: {direct} (ok, failed)")
    assert routed == (CONVERSATIONS * TURNS, 0)
    assert direct[1] >= CONVERSATIONS * (TURNS - 1) // 3
    assert sum(direct) == CONVERSATIONS * TURNS


def turn(url: str, model: str, text: str, previous: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "input": text, "max_output_tokens": 3}
    if previous:
        body["previous_response_id"] = previous
    return httpx.post(url + "/v1/responses", json=body, timeout=60)


def test_owner_gone_from_the_fleet(real_vllm_servers: RealVllmServers, redis_url: str) -> None:
    """Router A (both servers) starts conversations; routers sharing its Redis but serving only
    one server then get the turns of conversations held by the other one."""
    model, urls = real_vllm_servers.model, real_vllm_servers.urls
    shared = {"served_model": model, "redis_url": redis_url}
    last: list[tuple[str, str]] = []  # (response id, url of the server holding it)
    with running_router(urls, responses_history=True, **shared) as first:
        for n in range(6):
            opened = turn(first.url, model, f"Topic {n}: tell me more. " * 3)
            assert opened.status_code == 200
            second = turn(first.url, model, "And then?", opened.json()["id"])
            assert second.status_code == 200
            backend = second.headers["x-router-backend"]
            last.append((second.json()["id"], first.router.pool.get(backend).url))
    gone = urls[0]
    held_by_gone = [rid for rid, url in last if url == gone]
    assert held_by_gone, f"no conversation on {gone}: {last}"
    with running_router([urls[1]], responses_history=True, **shared) as survivor:
        for rid in held_by_gone:
            moved = turn(survivor.url, model, "Still there?", rid)
            assert moved.status_code == 200, moved.text
            assert moved.headers["x-router-cache-outcome"] == "reassigned"
            follow = turn(survivor.url, model, "Good.", moved.json()["id"])
            assert follow.status_code == 200
            assert follow.headers["x-router-cache-outcome"] == "hit"
    with running_router([urls[1]], responses_history=False, **shared) as strict:
        refused = turn(strict.url, model, "Still there?", held_by_gone[0])
        assert refused.status_code == 410
        error = refused.json()["error"]
        assert error["code"] == "response_lost"
        assert "RESPONSES_HISTORY" in error["message"]
