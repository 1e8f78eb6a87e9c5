"""Deploy vLLM to hosts over SSH; the same as ``kvroute deploy``. See app/deploy/command.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.deploy.command import main

if __name__ == "__main__":
    sys.exit(main())
