"""app/deploy/state.py: state, list, stop and logs scripts and their parsers."""

from __future__ import annotations

import json

from app.deploy.state import (
    list_script,
    logs_command,
    parse_list,
    parse_state,
    state_script,
    stop_script,
)
from tests.deploy_examples import assert_sh_syntax, paths_for, spec


def test_parse_state_and_list() -> None:
    info = {"served_model": "tiny", "vllm_port": 8000}
    text = f"pid=123\nalive=yes\nfingerprint=abc\ninfo={json.dumps(info)}\nlog=line one\nlog=line two\n"
    state = parse_state(text)
    assert (state.pid, state.alive, state.fingerprint) == (123, True, "abc")
    assert state.log_tail == ("line one", "line two")
    assert state.info == info
    empty = parse_state("pid=\nalive=no\nfingerprint=\ninfo=\n")
    assert (empty.pid, empty.alive, empty.fingerprint, dict(empty.info)) == (None, False, None, {})
    listing = parse_list("name=a-1\n" + text + "name=b-2\npid=\nalive=no\n")
    assert set(listing) == {"a-1", "b-2"}
    assert listing["a-1"].alive
    assert not listing["b-2"].alive


def test_state_scripts_are_valid_sh() -> None:
    p = paths_for(spec(served_model="we'ird name"))
    for script in (
        state_script(p, tail_lines=5),
        stop_script(p),
        logs_command(p, 10, True),
        list_script(p.root),
        list_script("~/kv"),
    ):
        assert_sh_syntax(script)
