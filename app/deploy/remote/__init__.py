"""Programs that run on the deploy host, with the remote venv's Python, sent as ``python -c``.

They are real modules so that ruff and mypy read them, but they never import ``app``: the host
has only the standard library and what the venv holds. Each takes its parameters on the command
line (the event prefix among them) and must stay runnable by Python 3.10.
"""

from __future__ import annotations

from importlib.resources import files


def program(name: str) -> str:
    """The source of ``app/deploy/remote/<name>.py``, as sent to the host."""
    return files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")
