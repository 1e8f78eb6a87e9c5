"""Remote deploy of a vLLM server over SSH: ``kvroute deploy`` (``scripts/deploy_remote.py``).

The plan is pure, one module per step: ``spec`` (target, ``DeploySpec``, remote paths),
``events`` (what remote scripts print), ``preflight``, ``install``, ``download``, ``serve``,
``state`` (state, list, stop, logs), ``health`` and ``diagnose`` build the remote shell scripts
and parse what comes back; ``remote/`` holds the Python programs they run on the host.
``ssh`` is the asyncssh edge; ``command`` is the CLI and the step sequence; ``progress`` draws it. Every failure the user can act on is one of these, each with a fix:

    DeployError                 base: ``message`` and ``fix``
    ├── UsageError              bad command-line arguments
    ├── SshError                cannot connect or authenticate
    │   └── HostKeyError        host key unknown (no --accept-new-host-key) or changed
    ├── PreflightError          python, GPUs, disk or port check failed on the host
    ├── InstallError            installing vLLM into the remote virtualenv failed
    ├── DownloadError           model download failed (gated, missing, disk, network)
    ├── StartError              vLLM exited or never became healthy; carries the log tail
    ├── RegisterError           the router (--register) refused or could not be reached
    └── RemoteCommandError      a remote helper command failed unexpectedly
"""

from __future__ import annotations


class DeployError(Exception):
    """A deploy failure with a one-line ``message`` and a ``fix`` telling the user what to do."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


class UsageError(DeployError):
    """The command line asks for something impossible."""


class SshError(DeployError):
    """The SSH connection could not be opened or authenticated."""


class HostKeyError(SshError):
    """The host key is not trusted: unknown (without --accept-new-host-key) or changed."""


class PreflightError(DeployError):
    """A remote requirement (python, GPUs, disk, free port) is not met."""


class InstallError(DeployError):
    """Creating the virtualenv or installing vLLM failed; ``output_tail`` holds the last lines."""

    def __init__(self, message: str, fix: str = "", output_tail: tuple[str, ...] = ()) -> None:
        super().__init__(message, fix)
        self.output_tail = output_tail


class DownloadError(DeployError):
    """The model could not be downloaded into the remote Hugging Face cache."""


class StartError(DeployError):
    """vLLM exited during start-up or did not become healthy in time."""

    def __init__(self, message: str, fix: str = "", log_tail: tuple[str, ...] = ()) -> None:
        super().__init__(message, fix)
        self.log_tail = log_tail


class RemoteCommandError(DeployError):
    """A remote helper script failed in a way no step anticipated."""


__all__ = [
    "DeployError",
    "DownloadError",
    "HostKeyError",
    "InstallError",
    "PreflightError",
    "RegisterError",
    "RemoteCommandError",
    "SshError",
    "StartError",
    "UsageError",
]


class RegisterError(DeployError):
    """The router given with --register could not add or drain the backend."""
