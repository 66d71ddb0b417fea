"""A run's log.jsonl: one JSON object per line (training steps, validations), written by engine.trainer and read
by resume, the benchmark's tables and figures, and the HTML report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def log_entries(path: Path) -> Iterator[dict]:
    """Every entry of a log.jsonl, in order; none if the file is missing. A line torn by a kill or a full disk
    is skipped: the run resumes from its last checkpoint and writes those steps again."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            yield entry
