"""What a bench prints and writes: its table, or its JSON report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def print_or_write(report: dict[str, Any], json_path: str | None, table: Callable[[dict[str, Any]], str]) -> None:
    """A bench's output: the JSON on stdout for ``--json -``; else the table, and the JSON to ``json_path`` if set."""
    if json_path == "-":
        print(json.dumps(report, indent=2))
        return
    print(table(report))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")
