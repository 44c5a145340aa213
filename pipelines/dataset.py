"""Dataset import: read files or a Hub dataset, normalize rows to chat `messages`, validate, split.

Run as: python -m pipelines.dataset --config cfg.json --workdir out/
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.base import Log, Progress, Reporter, StepError, StepResult, main, option
from pipelines.lib.dataset_folder import SPLITS, content_hash
from pipelines.lib.readers import Malformed, check_file, read_file, read_hub
from pipelines.lib.shapes import ROLES, SHAPES, Drop, normalize_row, resolve_mapping
from pipelines.reports import for_step

DROP_REASONS = (
    "malformed",
    "missing_field",
    "empty",
    "invalid_role",
    "template_error",
    "too_long",
    "duplicate",
)
# Shipped with the project: customer-support messages of a small shop, each with one of six intents.
SAMPLE_DATASET = Path(__file__).parent / "samples" / "support_intents.csv"
SAMPLE_SYSTEM_PROMPT = (
    "Classify the customer message. Answer with one word: billing, shipping, "
    "returns, account, technical or product."
)
_BATCH = 256


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    name: str = option(label="Dataset name", help="Shown in every dataset list.")
    files: list[str] = option(
        [], "Files", "CSV, TSV, JSON, JSONL, Parquet or TXT files; rows are concatenated."
    )
    hub_dataset: str = option(
        "", "Hub dataset", "A Hugging Face dataset id instead of files (needs network)."
    )
    hub_config: str = option(
        "", "Hub config", "The dataset's configuration (subset), if it has several."
    )
    hub_split: str = option(
        "train", "Hub split", "Which split to read, e.g. train or train[:1000]."
    )
    shape: str = option(
        "auto",
        "Shape",
        (
            "How rows are read: auto-detected from the columns, or one of messages, sharegpt, "
            "alpaca, prompt_completion, question_answer, classification, text."
        ),
    )
    mapping: dict[str, str] = option(
        {},
        "Column mapping",
        (
            "Role -> column, overriding detection. Roles: messages, prompt, input, response, text, "
            "label, system."
        ),
    )
    system_prompt: str = option(
        "", "System prompt", "Added as the first turn of rows that have none."
    )
    tokenizer_model: str = option(
        "bundled", "Tokenizer of", "Model whose tokenizer and chat template count tokens."
    )
    max_tokens: int = option(
        2048, "Max tokens", "Rows longer than this are dropped as too long; 0 keeps all."
    )
    drop_duplicates: bool = option(
        True, "Drop duplicates", "Drop rows whose conversation repeats an earlier one."
    )
    train_ratio: float = option(0.8, "Train share", "Share of rows for training.")
    validation_ratio: float = option(
        0.1, "Validation share", "Share of rows held out to validate while training."
    )
    test_ratio: float = option(
        0.1,
        "Test share",
        "Share of rows held out for the final evaluation (the course keeps 10-20%).",
    )
    seed: int = option(42, "Seed", "Seed of the shuffle before splitting (same seed, same split).")
    max_rows: int = option(0, "Max rows", "Stop reading after this many rows; 0 reads everything.")
    max_file_mb: int = option(
        200, "Max file size (MB)", "Files larger than this are refused before parsing."
    )

    def __post_init__(self):
        if not self.name.strip():
            raise ValueError("name must not be empty")
        if not self.files and not self.hub_dataset.strip():
            raise ValueError("files is empty and hub_dataset is not set: give one of them")
        if self.files and self.hub_dataset.strip():
            raise ValueError("give files or hub_dataset, not both")
        if self.shape != "auto" and self.shape not in SHAPES:
            raise ValueError(
                f"shape must be 'auto' or one of {', '.join(SHAPES)}, got {self.shape!r}"
            )
        unknown = sorted(set(self.mapping) - set(ROLES))
        if unknown:
            raise ValueError(f"mapping has unknown roles {unknown}; roles are {', '.join(ROLES)}")
        ratios = (self.train_ratio, self.validation_ratio, self.test_ratio)
        if any(r < 0 for r in ratios) or self.train_ratio <= 0:
            raise ValueError(f"split ratios must be >= 0 with train > 0, got {ratios}")
        if not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"train_ratio + validation_ratio + test_ratio must be 1, got {sum(ratios):g}"
            )
        for name in ("max_tokens", "max_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_file_mb < 1:
            raise ValueError(f"max_file_mb must be >= 1, got {self.max_file_mb}")

    @property
    def queue(self) -> str:
        """Imports are light: they get their own queue instead of waiting behind training."""
        return "network" if self.hub_dataset else "data"

    @property
    def outputs(self) -> dict[str, str]:
        return {"dataset": "dataset"}


CONFIG = DatasetConfig


def run(config: DatasetConfig, workdir: Path, report: Reporter) -> StepResult:
    """Import, validate, split and write the dataset folder; nothing is kept unless all works."""
    sources = _sources(config)
    report(Progress(0, 1000, "loading tokenizer"))
    from pipelines.lib.models import load_tokenizer

    tokenizer = load_tokenizer(config.tokenizer_model)
    final = workdir / "dataset"
    tmp = workdir / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stats, labels = _normalize_all(config, sources, tokenizer, tmp / "all.jsonl", report)
        report(Progress(900, 1000, "splitting"))
        stats["splits"] = _split(tmp / "all.jsonl", labels, config, tmp)
        stats["content_hash"] = content_hash(tmp)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
        (tmp / "README.md").write_text(dataset_card(config, stats), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(Log(for_step("dataset", stats).text()))
    report(Progress(1000, 1000, f"imported {stats['rows_kept']} rows"))
    meta = {
        "name": config.name,
        "rows": stats["rows_kept"],
        "splits": stats["splits"],
        "shape": stats["shape"],
        "content_hash": stats["content_hash"],
    }
    return StepResult(artifacts=[("dataset", "dataset", meta)], summary=stats)


def preview(
    files: list[str],
    shape: str = "auto",
    mapping: dict[str, str] | None = None,
    system_prompt: str = "",
    rows: int = 20,
) -> dict[str, Any]:
    """Detect shape and mapping from the first rows of the first file and normalize a few.

    Cheap (reads the head only, no tokenizer): the Data tab calls it right after an upload.
    """
    path = Path(files[0])
    check_file(path, max_mb=None)
    head = []
    for _, item, _ in read_file(path):
        if isinstance(item, dict):
            head.append(item)
        if len(head) >= max(rows, 50):
            break
    if not head:
        raise StepError(f"{path.name}: no rows found. Check that the file is not empty.")
    columns = list(dict.fromkeys(k for row in head for k in row))
    shape, roles = resolve_mapping(columns, head[0], shape, mapping or {}, path.name)
    examples, problems = [], Counter()
    for row in head[:rows]:
        try:
            examples.append(normalize_row(row, shape, roles, system_prompt)[0])
        except Drop as d:
            problems[d.reason] += 1
    labels = (
        sorted({str(r.get(roles["label"])) for r in head if roles.get("label") in r})
        if shape == "classification"
        else []
    )
    return {
        "columns": columns,
        "shape": shape,
        "mapping": roles,
        "examples": examples,
        "problems": dict(problems),
        "labels": labels,
        "raw": head[:rows],
    }


def dataset_card(config: DatasetConfig, stats: dict[str, Any]) -> str:
    """A Hub-style dataset card (README.md) with the splits as data files and the statistics."""
    data_files = "\n".join(
        f"      - split: {s}\n        path: {s}.jsonl" for s, n in stats["splits"].items() if n
    )
    source = config.hub_dataset or ", ".join(Path(f).name for f in config.files)
    return (
        f"---\nconfigs:\n  - config_name: default\n    data_files:\n{data_files}\n"
        f"tags:\n  - slmops-studio\n---\n\n# {config.name}\n\n"
        f"Imported by SLMOps Studio from {source} (shape: {stats['shape']}, "
        f"mapping: {json.dumps(stats['mapping'])}).\n\nEach row has a chat `messages` list "
        "and keeps its original columns.\n\n"
        f"Content hash (sha256 of the split files): `{stats['content_hash']}`\n\n"
        f"```\n{for_step('dataset', stats).text()}\n```\n"
    )


def _sources(config: DatasetConfig) -> list[Path]:
    paths = [Path(f) for f in config.files]
    for path in paths:
        check_file(path, config.max_file_mb)
    return paths


# --- the import pass ---------------------------------------------------------------------------


def _rows(config: DatasetConfig, sources: list[Path]) -> Iterator[tuple[str, str, Any, float]]:
    """(source, where, row, fraction of bytes read so far) for all rows of all sources."""
    if config.hub_dataset:
        for where, row in read_hub(config.hub_dataset, config.hub_config, config.hub_split):
            yield config.hub_dataset, where, row, 0.0
        return
    total = sum(p.stat().st_size for p in sources)
    done = 0
    for path in sources:
        for where, row, position in read_file(path):
            yield path.name, where, row, min(1.0, (done + position) / total)
        done += path.stat().st_size


def _normalize_all(
    config: DatasetConfig, sources: list[Path], tokenizer: Any, out: Path, report: Reporter
) -> tuple[dict[str, Any], list[str | None]]:
    """Normalize every row into `out` (JSONL), counting what is dropped and why."""
    dropped: Counter[str] = Counter()
    examples: dict[str, list[dict[str, str]]] = defaultdict(list)
    seen: set[bytes] = set()
    labels: list[str | None] = []
    lengths: list[int] = []
    role_counts: Counter[str] = Counter()
    turns: Counter[int] = Counter()
    mapped: dict[str, tuple[str, dict[str, str]]] = {}
    read, reported, stopped = 0, 0, False
    batch: list[tuple[str, dict[str, Any], str | None]] = []

    def drop(reason: str, where: str, detail: str) -> None:
        dropped[reason] += 1
        if len(examples[reason]) < 3:
            examples[reason].append({"where": where, "detail": detail})

    def flush() -> None:
        for (where, row, label), n in zip(batch, _token_lengths(tokenizer, batch)):
            if isinstance(n, str):
                drop("template_error", where, n)
                continue
            if config.max_tokens and n > config.max_tokens:
                drop("too_long", where, f"{n} tokens > {config.max_tokens}")
                continue
            if config.drop_duplicates:
                key = hashlib.blake2b(
                    json.dumps(row["messages"], sort_keys=True).encode(), digest_size=12
                ).digest()
                if key in seen:
                    drop("duplicate", where, "same conversation as an earlier row")
                    continue
                seen.add(key)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            labels.append(label)
            lengths.append(n)
            role_counts.update({m["role"] for m in row["messages"]})
            turns[len(row["messages"])] += 1
        batch.clear()

    with out.open("w", encoding="utf-8") as f:
        for source, where, row, fraction in _rows(config, sources):
            if config.max_rows and read >= config.max_rows:
                stopped = True
                break
            read += 1
            if isinstance(row, Malformed):
                drop("malformed", where, row.detail)
                continue
            if source not in mapped:
                columns = list(row)
                mapped[source] = resolve_mapping(columns, row, config.shape, config.mapping, source)
            shape, roles = mapped[source]
            try:
                normalized, label = normalize_row(row, shape, roles, config.system_prompt)
            except Drop as d:
                drop(d.reason, where, d.detail)
                continue
            batch.append((where, normalized, label))
            if len(batch) >= _BATCH:
                flush()
                done = int(50 + 840 * fraction)
                if done >= reported + 10:  # every 1%: enough for a bar, quiet in a log
                    reported = done
                    report(Progress(done, 1000, f"read {read} rows"))
        flush()
    if read == 0:
        raise StepError(
            "no rows found in " + (config.hub_dataset or ", ".join(p.name for p in sources))
        )
    kept = len(lengths)
    stats = {
        "name": config.name,
        "rows_read": read,
        "stopped_at_max_rows": config.max_rows if stopped else 0,
        "rows_kept": kept,
        "dropped": {r: dropped[r] for r in DROP_REASONS if dropped[r]},
        "drop_examples": {r: examples[r] for r in DROP_REASONS if dropped[r]},
        "shape": ", ".join(sorted({s for s, _ in mapped.values()})) or "none",
        "mapping": next(iter(mapped.values()))[1] if mapped else {},
        "sources": [p.name for p in sources] or [config.hub_dataset],
        "tokenizer": config.tokenizer_model,
        "tokens": _length_stats(lengths),
        "roles": {role: n for role, n in sorted(role_counts.items())},
        "turns": {str(k): v for k, v in sorted(turns.items())},
        "labels": dict(Counter(x for x in labels if x is not None).most_common()),
    }
    if kept == 0:
        raise StepError(
            "no usable rows: all "
            + str(read)
            + " rows were dropped.\n"
            + for_step("dataset", {**stats, "splits": {}}).text()
        )
    return stats, labels


def _token_lengths(
    tokenizer: Any, batch: list[tuple[str, dict[str, Any], str | None]]
) -> list[int | str]:
    """Tokens per row as training will see them (chat template applied); a str is an error."""
    from jinja2 import TemplateError

    texts: list[str | None] = []
    errors: dict[int, str] = {}
    for i, (_, row, _) in enumerate(batch):
        try:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        except TemplateError as e:
            texts.append(None)
            errors[i] = f"the chat template refuses it: {e}"
    ok = [t for t in texts if t is not None]
    ids = iter(tokenizer(ok, add_special_tokens=False)["input_ids"]) if ok else iter(())
    return [errors[i] if t is None else len(next(ids)) for i, t in enumerate(texts)]


def _length_stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 1),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "total": sum(ordered),
    }


def _split(
    all_rows: Path, labels: list[str | None], config: DatasetConfig, out: Path
) -> dict[str, int]:
    """Shuffle with the seed and split by the ratios, stratified by label when there is one."""
    rng = random.Random(config.seed)
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    assignment = [0] * len(labels)
    for indices in groups.values():
        rng.shuffle(indices)
        n_val = round(len(indices) * config.validation_ratio)
        n_test = round(len(indices) * config.test_ratio)
        for rank, i in enumerate(indices):
            assignment[i] = 1 if rank < n_val else 2 if rank < n_val + n_test else 0
    counts = Counter(assignment)
    if config.validation_ratio and not counts[1] and counts[0] > 1:
        first_train = assignment.index(0)  # tiny data: still hold out one validation row
        assignment[first_train] = 1
    names = [
        s
        for s, r in zip(SPLITS, (config.train_ratio, config.validation_ratio, config.test_ratio))
        if r > 0
    ]
    files = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in names}
    counts = Counter()
    with all_rows.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            split = SPLITS[assignment[i]]
            files[split].write(line)
            counts[split] += 1
    for handle in files.values():
        handle.close()
    all_rows.unlink()
    return {s: counts[s] for s in names}


if __name__ == "__main__":
    main(DatasetConfig, run)
