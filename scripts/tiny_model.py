"""Build the tiny local Llama model directory: `uv run python scripts/tiny_model.py OUT_DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.tiny_model import main

if __name__ == "__main__":
    raise SystemExit(main())
