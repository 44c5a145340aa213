"""A dataset folder as the dataset step writes it (train/validation/test JSONL, stats.json): pages
of a split, held-out rows, the label set and the content hash."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipelines.base import StepError

SPLITS = ("train", "validation", "test")


def read_split(folder: Path, split: str, offset: int, limit: int) -> list[dict[str, Any]]:
    """One page of an imported split (JSONL lines offset..offset+limit)."""
    path = Path(folder) / f"{split}.jsonl"
    if not path.exists():
        return []
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= offset + limit:
                break
            if i >= offset:
                out.append(json.loads(line))
    return out


def held_out(folder: Path, split: str, max_rows: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Every row of a dataset's split (else its validation or test split), or the first
    `max_rows` when that is set."""
    for name in dict.fromkeys((split, "validation", "test")):
        path = folder / f"{name}.jsonl"
        if path.exists() and path.stat().st_size:
            with path.open(encoding="utf-8") as f:
                lines = f if not max_rows else (line for _, line in zip(range(max_rows), f))
                rows = [json.loads(line) for line in lines if line.strip()]
            return rows, name
    raise StepError(
        f"{folder} has no test or validation rows to score: import the dataset with a test "
        "or validation share."
    )


def dataset_labels(folder: Path, limit: int = 50) -> list[str]:
    """The label set of a classification dataset: the labels its import counted, else its
    distinct answers (at most `limit`)."""
    stats = folder / "stats.json"
    if stats.exists():
        labels = json.loads(stats.read_text()).get("labels") or {}
        if labels:
            return sorted(labels)
    rows = []
    if (folder / "train.jsonl").exists():
        with (folder / "train.jsonl").open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    counts = Counter(
        m["content"].strip()
        for row in rows
        for m in (row.get("messages") or [])[-1:]
        if m["role"] == "assistant"
    )
    if not counts or len(counts) > limit:
        return []
    return sorted(counts)


def content_hash(folder: Path) -> str:
    """sha256 over the splits' bytes: the same rows in the same splits give the same hash."""
    digest = hashlib.sha256()
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if path.exists():
            digest.update(split.encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
