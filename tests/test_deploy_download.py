"""app/deploy/download.py and remote/download.py: the script, its failures, and a real run.

The download program runs for real with the local huggingface_hub against the hub stand-in
(no SSH, loopback only).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.deploy.download import download_failure, download_script, download_stdin
from app.deploy.events import parse_events
from app.deploy.spec import DeploySpec, RemotePaths
from tests.deploy_examples import assert_sh_syntax, paths_for, spec
from tests.integration.fake_hub import FakeHub, HubFile, HubRepo


def test_download_script_keeps_token_out_of_argv() -> None:
    s = spec(hf_endpoint="http://127.0.0.1:9", hf_home="~/hf")
    script = download_script(s, paths_for(s))
    assert "hf_" not in script.replace("hf_hub", "").replace("hf_token", "")
    assert "export HF_ENDPOINT=http://127.0.0.1:9" in script
    assert 'export HF_HOME="$HOME"/hf' in script
    assert_sh_syntax(script)
    assert json.loads(download_stdin("hf_abc")) == {"hf_token": "hf_abc"}
    assert json.loads(download_stdin(None)) == {}


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("gated", "is gated"),
        ("not_found", "not found"),
        ("revision", "revision"),
        ("disk", "disk"),
        ("weird", "failed"),
    ],
)
def test_download_failure_messages(kind: str, words: str) -> None:
    message, fix = download_failure(spec(), {"event": "error", "kind": kind, "message": "detail"})
    assert words in message
    assert "detail" in message
    assert fix


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub().start()
    files = {
        "config.json": HubFile("config.json", b'{"model_type": "llama"}'),
        "model.safetensors": HubFile("model.safetensors", os.urandom(1_200_000)),
        "pytorch_model.bin": HubFile("pytorch_model.bin", b"duplicate weights"),
    }
    server.add(HubRepo("org/small", dict(files)))
    server.add(HubRepo("org/gated", dict(files), gated_token="hf_right"))
    yield server
    server.stop()


def run_download(
    s: DeploySpec, tmp_path: Path, token: str | None = None
) -> tuple[int, list[dict[str, object]]]:
    p = RemotePaths.for_spec(s, str(tmp_path))
    script = download_script(s, p).replace(
        shlex.quote(p.venv + "/bin/python"), shlex.quote(sys.executable)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    result = subprocess.run(
        ["/bin/sh", "-c", script],
        input=download_stdin(token),
        text=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    return result.returncode, parse_events(result.stdout)


def test_download_script_against_hub(hub: FakeHub, tmp_path: Path) -> None:
    s = spec(model="org/small", hf_endpoint=hub.url, hf_home=str(tmp_path / "hf"))
    code, events = run_download(s, tmp_path)
    assert code == 0
    assert events[-1]["status"] == "done"
    snapshot = Path(str(events[-1]["path"]))
    assert (snapshot / "model.safetensors").stat().st_size == 1_200_000
    assert not (snapshot / "pytorch_model.bin").exists()  # duplicate format skipped
    progress = [e for e in events if e["event"] == "progress"]
    assert (
        progress[-1]["done"] == progress[-1]["total"] == 1_200_000 + len(b'{"model_type": "llama"}')
    )
    code, events = run_download(s, tmp_path)
    assert (code, events[-1]["status"]) == (0, "cached")


def test_download_script_errors(hub: FakeHub, tmp_path: Path) -> None:
    gated = spec(model="org/gated", hf_endpoint=hub.url, hf_home=str(tmp_path / "hf"))
    code, events = run_download(gated, tmp_path)
    assert code == 3
    assert events[-1]["kind"] == "gated"
    hub.requests.clear()
    code, events = run_download(gated, tmp_path, token="hf_right")
    assert code == 0
    assert events[-1]["status"] == "done"
    assert any(r.authorization == "Bearer hf_right" for r in hub.requests)
    missing = spec(model="org/missing", hf_endpoint=hub.url, hf_home=str(tmp_path / "hf"))
    code, events = run_download(missing, tmp_path)
    assert code == 3
    assert events[-1]["kind"] == "not_found"
    bad_rev = spec(
        model="org/small", revision="v9", hf_endpoint=hub.url, hf_home=str(tmp_path / "hf")
    )
    code, events = run_download(bad_rev, tmp_path)
    assert code == 3
    assert events[-1]["kind"] == "revision"
