"""After an install: the vLLM version the venv now reports, as an ``installed`` event.

argv: event prefix. Fails (exit 1, a traceback) when vllm is not installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys


def main(prefix: str) -> None:
    event = {"event": "installed", "vllm": importlib.metadata.version("vllm")}
    print(prefix + json.dumps(event))


if __name__ == "__main__":
    main(sys.argv[1])
