"""A bench's results file: JSON, indented, its folder made if missing (`bench/results/` by
default for every bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
