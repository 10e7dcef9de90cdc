"""Loads the items of the bundled sentcode tasks from the JSONL files next to this file (no download)."""

from __future__ import annotations

import json
from pathlib import Path


def load(data_file: str, **_metadata) -> dict:
    """lm-eval's ``custom_dataset`` hook: the test split of one bundled JSONL file."""
    import datasets

    path = Path(__file__).with_name(data_file)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
