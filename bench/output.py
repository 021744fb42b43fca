"""Where a benchmark leaves its figures: one timestamped JSON file per run, in --out."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def write_json(folder: Path, name: str, payload: dict[str, Any]) -> Path:
    """`payload` as folder/NAME-YYYYmmdd-HHMMSS.json (the folder made if needed); says where."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return out
