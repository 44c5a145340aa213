"""Dataset import: read files or a Hub dataset, normalize rows to chat `messages`, validate, split.

Run as: python -m pipelines.dataset --config cfg.json --workdir out/
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import shutil
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.base import Log, Progress, Reporter, StepError, StepResult, main, option

SHAPES = (
    "messages",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "question_answer",
    "classification",
    "text",
)
# Which mapping roles each shape reads; a role maps to a source column.
SHAPE_ROLES = {
    "messages": ("messages",),
    "sharegpt": ("messages",),
    "alpaca": ("prompt", "input", "response"),
    "prompt_completion": ("prompt", "response"),
    "question_answer": ("prompt", "input", "response"),
    "classification": ("text", "label"),
    "text": ("text",),
}
OPTIONAL_ROLES = ("input", "system")
ROLES = ("messages", "prompt", "input", "response", "text", "label", "system")
FILE_TYPES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")
SPLITS = ("train", "validation", "test")
DROP_REASONS = (
    "malformed",
    "missing_field",
    "empty",
    "invalid_role",
    "template_error",
    "too_long",
    "duplicate",
)
CHAT_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    # ShareGPT speaker names
    "human": "user",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
# Column names that reveal a shape, tried in order; every name is compared lowercased.
_DETECT = (
    ("messages", {"messages": ("messages",)}),
    ("sharegpt", {"messages": ("conversations", "conversation")}),
    ("alpaca", {"prompt": ("instruction",), "response": ("output",), "input": ("input",)}),
    ("prompt_completion", {"prompt": ("prompt",), "response": ("completion", "response")}),
    ("question_answer", {"prompt": ("question",), "response": ("answer",), "input": ("context",)}),
    (
        "classification",
        {
            "text": ("text", "sentence", "utterance", "review", "content"),
            "label": ("label", "labels", "intent", "category", "class", "sentiment"),
        },
    ),
    ("text", {"text": ("text", "content")}),
)
_SYSTEM_COLUMNS = ("system", "system_prompt")
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
    train_ratio: float = option(0.9, "Train share", "Share of rows for training.")
    validation_ratio: float = option(
        0.1, "Validation share", "Share of rows held out to validate while training."
    )
    test_ratio: float = option(
        0.0, "Test share", "Share of rows held out for the final evaluation."
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


CONFIG = DatasetConfig


def run(config: DatasetConfig, workdir: Path, report: Reporter) -> StepResult:
    """Import, validate, split and write the dataset folder; nothing is kept unless all works."""
    sources = _sources(config)
    report(Progress(0, 1000, "loading tokenizer"))
    from pipelines.models import load_tokenizer

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
    report(Log(format_report(stats)))
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
    _check_file(path, max_mb=None)
    head = []
    for _, item, _ in _read_file(path):
        if isinstance(item, dict):
            head.append(item)
        if len(head) >= max(rows, 50):
            break
    if not head:
        raise StepError(f"{path.name}: no rows found. Check that the file is not empty.")
    columns = list(dict.fromkeys(k for row in head for k in row))
    shape, roles = _resolve_mapping(columns, head[0], shape, mapping or {}, path.name)
    examples, problems = [], Counter()
    for row in head[:rows]:
        try:
            examples.append(_normalize_row(row, shape, roles, system_prompt)[0])
        except _Drop as d:
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


def format_report(stats: dict[str, Any]) -> str:
    """The validation report as plain text (CLI, log)."""
    lines = [
        f"rows read: {stats['rows_read']}, kept: {stats['rows_kept']}, "
        f"dropped: {sum(stats['dropped'].values())}  (shape: {stats['shape']})"
    ]
    if stats.get("stopped_at_max_rows"):
        lines.append(f"stopped after {stats['stopped_at_max_rows']} rows (Max rows); more follow")
    for reason, n in stats["dropped"].items():
        examples = "; ".join(f"{e['where']}: {e['detail']}" for e in stats["drop_examples"][reason])
        lines.append(f"  dropped {n} {reason.replace('_', ' ')}: {examples}")
    t = stats.get("tokens")
    if t:
        lines.append(
            f"tokens per row: min {t['min']}, mean {t['mean']}, p50 {t['p50']}, "
            f"p95 {t['p95']}, max {t['max']} (total {t['total']})"
        )
    if stats.get("labels"):
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in stats["labels"].items()))
    if stats.get("splits"):
        lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in stats["splits"].items()))
    return "\n".join(lines)


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
        f"```\n{format_report(stats)}\n```\n"
    )


# --- reading -----------------------------------------------------------------------------------


class _Drop(Exception):  # noqa: N818 - internal control flow, never leaves this module
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Malformed:
    detail: str


def _sources(config: DatasetConfig) -> list[Path]:
    paths = [Path(f) for f in config.files]
    for path in paths:
        _check_file(path, config.max_file_mb)
    return paths


def _check_file(path: Path, max_mb: int | None) -> None:
    """Refuse missing, empty, oversized, binary or unsupported files before parsing them."""
    if not path.is_file():
        raise StepError(f"{path.name}: file not found. Upload it again.")
    size = path.stat().st_size
    if size == 0:
        raise StepError(f"{path.name} is empty. Upload a file with a header and rows.")
    if max_mb is not None and size > max_mb * 1024 * 1024:
        raise StepError(
            f"{path.name} is {size / 2**20:.0f} MB, over the {max_mb} MB limit. "
            "Split it into smaller files or raise the limit (max_file_mb)."
        )
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise StepError(
            f"{path.name}: unsupported file type '{suffix or 'none'}'. "
            f"Use one of: {', '.join(FILE_TYPES)}."
        )
    with path.open("rb") as f:
        head = f.read(8192)
    if suffix == ".parquet":
        if not head.startswith(b"PAR1"):
            raise StepError(
                f"{path.name} is not a Parquet file (no PAR1 header). "
                "Export it again as Parquet, or as CSV/JSONL."
            )
    elif _encoding(head) == "utf-8" and b"\x00" in head:
        raise StepError(
            f"{path.name} looks binary, not text. Upload CSV, TSV, JSON, JSONL, "
            "Parquet or TXT (an Excel file must be saved as CSV first)."
        )


def _encoding(head: bytes) -> str:
    if head.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"  # only with a BOM: without one UTF-16 can't be told from binary
    return "utf-8"


def _read_file(path: Path) -> Iterator[tuple[str, dict[str, Any] | _Malformed, int]]:
    """Yield (where, row, bytes read so far) for each row of a file, streaming.

    `where` names the file and the line (or row) for messages.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    with path.open("rb") as f:
        encoding = _encoding(f.read(4))
    with path.open(encoding=encoding, newline="" if suffix in (".csv", ".tsv") else None) as f:
        reader = {
            ".csv": _read_csv,
            ".tsv": _read_csv,
            ".jsonl": _read_jsonl,
            ".json": _read_json,
            ".txt": _read_txt,
        }[suffix]
        rows = reader(f, path.name)
        while True:
            try:
                where, row = next(rows)
                yield where, row, f.buffer.tell()  # the read-ahead position: close enough
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise StepError(
                    f"{path.name} is not valid UTF-8 text. Save it as UTF-8 (or UTF-16 "
                    "with a byte-order mark) and upload it again."
                ) from None


def _read_jsonl(f: io.TextIOBase, name: str) -> Iterator[tuple[str, Any]]:
    parsed_any = False
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if not parsed_any and n >= 20:
                raise StepError(
                    f"{name}: none of the first {n} lines is valid JSON ({e.msg} on "
                    f"line {n}). Each line must be one JSON object."
                ) from None
            yield f"{name} line {n}", _Malformed(f"invalid JSON: {e.msg}")
            continue
        parsed_any = True
        if isinstance(value, dict):
            yield f"{name} line {n}", value
        else:
            yield f"{name} line {n}", _Malformed(f"a JSON {type(value).__name__}, not an object")


def _read_json(f: io.TextIOBase, name: str) -> Iterator[tuple[str, Any]]:
    """A JSON array of objects, or an object holding one list of them, parsed element by element."""
    cursor = _JsonCursor(f, name)
    first = cursor.peek()
    if first == "{" and cursor.looks_like_jsonl():
        f.seek(0)
        yield from _read_jsonl(f, name)
        return
    if first == "[":
        yield from cursor.array(name)
    elif first == "{":
        cursor.expect("{")
        found = False
        while cursor.peek() != "}":
            key = cursor.value()
            cursor.expect(":")
            if cursor.peek() == "[" and not found:
                found = True
                yield from cursor.array(f"{name} [{key!r}]")
            else:
                cursor.value()
            if cursor.peek() == ",":
                cursor.expect(",")
        if not found:
            raise StepError(
                f"{name}: the JSON object holds no list of rows. Use an array of "
                "objects, an object with one list, or JSONL."
            )
    else:
        raise cursor.error("expected '[' or '{' at the start")


class _JsonCursor:
    """Incremental JSON reader over a text stream: memory holds one element, not the file."""

    def __init__(self, f: io.TextIOBase, name: str):
        self.f, self.name, self.buf, self.pos, self.lines_before = f, name, "", 0, 0
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        chunk = self.f.read(1 << 16)
        if self.pos > 1 << 16:  # drop what was consumed so the buffer stays small
            self.lines_before += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += chunk
        return bool(chunk)

    def peek(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos : self.pos + 1]

    def looks_like_jsonl(self) -> bool:
        line_end = self.buf.find("\n", self.pos)
        try:
            json.loads(self.buf[self.pos : line_end])
        except json.JSONDecodeError:
            return False
        return self.buf[line_end:].lstrip().startswith("{")

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected '{char}'")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self._fill():
                    continue  # the value may just be cut by the buffer's end
                raise self.error("invalid JSON") from None
            if end == len(self.buf) and self._fill():
                continue  # a number may continue in the next chunk
            self.pos = end
            return value

    def array(self, where: str) -> Iterator[tuple[str, Any]]:
        self.expect("[")
        index = 0
        while self.peek() != "]":
            if not self.peek():
                raise self.error("the file ends inside the list")
            index += 1
            item = self.value()
            if isinstance(item, dict):
                yield f"{where} item {index}", item
            else:
                yield (
                    f"{where} item {index}",
                    _Malformed(f"a JSON {type(item).__name__}, not an object"),
                )
            if self.peek() == ",":
                self.expect(",")
            elif self.peek() != "]":
                raise self.error("expected ',' or ']' after a list item")
        self.expect("]")

    def error(self, what: str) -> StepError:
        line = self.lines_before + self.buf.count("\n", 0, self.pos) + 1
        return StepError(
            f"{self.name}: {what} near line {line}. Fix the JSON (a validator shows "
            "the exact spot) or save the rows as JSONL, one object per line."
        )


def _read_csv(f: io.TextIOBase, name: str) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(sys.maxsize)
    head = f.read(1 << 16)
    f.seek(0)
    if name.lower().endswith(".tsv"):
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff(head.split("\n", 1)[0], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    reader = csv.DictReader(f, delimiter=delimiter)
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise StepError(f"{name}: the header line can't be read ({e}).") from None
    if not header or not any(h.strip() for h in header):
        raise StepError(f"{name}: the first line must be a header naming the columns.")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise StepError(
                f"{name} line {reader.line_num}: {e}. Check the quoting there."
            ) from None
        where = f"{name} line {reader.line_num}"
        if None in row or None in row.values():
            yield (
                where,
                _Malformed(f"{len(header)} columns expected, the row has a different number"),
            )
        else:
            yield where, {k: v for k, v in row.items()}


def _read_txt(f: io.TextIOBase, name: str) -> Iterator[tuple[str, Any]]:
    """One row per paragraph (blocks separated by an empty line), or per line if there are none."""
    head = f.read(1 << 16)
    f.seek(0)
    by_line = "\n\n" not in head.replace("\r\n", "\n")
    block, start = [], 1
    for n, line in enumerate(f, 1):
        text = line.rstrip("\r\n")
        if by_line:
            if text.strip():
                yield f"{name} line {n}", {"text": text}
        elif text.strip():
            if not block:
                start = n
            block.append(text)
        elif block:
            yield f"{name} line {start}", {"text": "\n".join(block)}
            block = []
    if block:
        yield f"{name} line {start}", {"text": "\n".join(block)}


def _read_parquet(path: Path) -> Iterator[tuple[str, Any, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = path.stat().st_size
    try:
        reader = pq.ParquetFile(path)
        total = max(1, reader.metadata.num_rows)
        index = 0
        for batch in reader.iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                index += 1
                yield (
                    f"{path.name} row {index}",
                    {k: _jsonable(v) for k, v in row.items()},
                    size * index // total,
                )
    except (pa.ArrowException, OSError) as e:
        raise StepError(f"{path.name} can't be read as Parquet ({e}). Export it again.") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _read_hub(config: DatasetConfig) -> Iterator[tuple[str, Any]]:
    from pipelines.models import hub_offline

    if hub_offline():
        raise StepError(
            f"can't read Hub dataset '{config.hub_dataset}': the Hugging Face Hub is "
            "offline here (HF_HUB_OFFLINE=1). Download it elsewhere and upload the files."
        )
    import datasets

    try:
        rows = datasets.load_dataset(
            config.hub_dataset, config.hub_config or None, split=config.hub_split, streaming=True
        )
        for i, row in enumerate(rows, 1):
            yield f"{config.hub_dataset} row {i}", {k: _jsonable(v) for k, v in row.items()}
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise StepError(
            f"can't read Hub dataset '{config.hub_dataset}' "
            f"(config {config.hub_config or 'default'}, split {config.hub_split}): {e}"
        ) from None


# --- shape detection and normalization ---------------------------------------------------------


def detect_shape(
    columns: list[str], first_row: dict[str, Any]
) -> tuple[str, dict[str, str]] | None:
    """Guess (shape, role -> column) from column names; None if nothing matches."""
    lower = {c.lower(): c for c in columns}
    for shape, wanted in _DETECT:
        roles = {}
        for role, names in wanted.items():
            column = next((lower[n] for n in names if n in lower), None)
            if column is not None:
                roles[role] = column
        if all(r in roles for r in wanted if r not in OPTIONAL_ROLES):
            if shape in ("messages", "sharegpt"):
                shape = _turn_format(first_row.get(roles["messages"]), shape)
            system = next((lower[n] for n in _SYSTEM_COLUMNS if n in lower), None)
            if system:
                roles["system"] = system
            return shape, roles
    return None


def _turn_format(turns: Any, default: str) -> str:
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        return "sharegpt" if "from" in turns[0] else "messages"
    return default


def _resolve_mapping(
    columns: list[str], first_row: dict[str, Any], shape: str, mapping: dict[str, str], where: str
) -> tuple[str, dict[str, str]]:
    mapping = {k: v for k, v in mapping.items() if v}
    detected = detect_shape(columns, first_row)
    if shape == "auto":
        if detected is None and not mapping:
            raise StepError(
                f"{where}: can't tell the shape from the columns {columns}. Expected "
                "messages, conversations, instruction/output, prompt/completion, "
                "question/answer, text/label or text; choose the shape and the columns "
                "in the column mapping."
            )
        shape = detected[0] if detected else _shape_from_roles(mapping)
    roles = dict(detected[1]) if detected and detected[0] == shape else {}
    roles.update(mapping)
    missing = [r for r in SHAPE_ROLES[shape] if r not in OPTIONAL_ROLES and r not in roles]
    if missing:
        raise StepError(
            f"{where}: shape '{shape}' needs a column for {', '.join(missing)}; "
            f"columns found: {columns}. Set it in the column mapping."
        )
    absent = [f"{role}={col}" for role, col in roles.items() if col not in columns]
    if absent:
        raise StepError(
            f"{where}: mapped columns not found: {', '.join(absent)}; columns found: {columns}."
        )
    return shape, roles


def _shape_from_roles(mapping: dict[str, str]) -> str:
    if "messages" in mapping:
        return "messages"
    if "label" in mapping:
        return "classification"
    if "prompt" in mapping:
        return "prompt_completion"
    return "text"


def _text(row: dict[str, Any], column: str | None, role: str, required: bool = True) -> str:
    if column is None:
        return ""
    value = row.get(column)
    if value is None:
        if required:
            raise _Drop("missing_field", f"no value in column '{column}' ({role})")
        return ""
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, ensure_ascii=False)
        if isinstance(value, (list, dict))
        else str(value)
    )
    if required and not text.strip():
        raise _Drop("empty", f"column '{column}' ({role}) is empty")
    return text.strip()


def _normalize_row(
    row: dict[str, Any], shape: str, roles: dict[str, str], system_prompt: str
) -> tuple[dict[str, Any], str | None]:
    """Return (output row with `messages` and the original columns, label or None), or _Drop."""
    label = None
    if shape in ("messages", "sharegpt"):
        messages = _turns(row.get(roles["messages"]), roles["messages"])
    elif shape == "text":
        messages = [{"role": "assistant", "content": _text(row, roles["text"], "text")}]
    elif shape == "classification":
        label = _text(row, roles["label"], "label")
        messages = [
            {"role": "user", "content": _text(row, roles["text"], "text")},
            {"role": "assistant", "content": label},
        ]
    else:
        prompt = _text(row, roles["prompt"], "prompt")
        extra = _text(row, roles.get("input"), "input", required=False)
        if extra:
            prompt = (
                f"{extra}\n\n{prompt}" if shape == "question_answer" else f"{prompt}\n\n{extra}"
            )
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(row, roles["response"], "response")},
        ]
    system = _text(row, roles.get("system"), "system", required=False) or system_prompt.strip()
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    out = {k: v for k, v in row.items() if k != "messages"}
    out["messages"] = messages
    return out, label


def _turns(value: Any, column: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Drop("malformed", f"column '{column}' is not a JSON list of turns") from None
    if value is None:
        raise _Drop("missing_field", f"no value in column '{column}'")
    if not isinstance(value, list):
        raise _Drop("malformed", f"column '{column}' holds a {type(value).__name__}, not a list")
    if not value:
        raise _Drop("empty", f"column '{column}' is an empty list")
    messages = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            raise _Drop("malformed", f"turn {i} is not an object")
        speaker = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if speaker is None or content is None:
            raise _Drop("missing_field", f"turn {i} lacks role/content (or from/value)")
        role = CHAT_ROLES.get(str(speaker).lower())
        if role is None:
            raise _Drop("invalid_role", f"turn {i} has role '{speaker}'")
        if not str(content).strip():
            raise _Drop("empty", f"turn {i} ({role}) is empty")
        messages.append({"role": role, "content": str(content).strip()})
    if not any(m["role"] == "assistant" for m in messages):
        raise _Drop("missing_field", "no assistant turn to learn from")
    return messages


# --- the import pass ---------------------------------------------------------------------------


def _rows(config: DatasetConfig, sources: list[Path]) -> Iterator[tuple[str, str, Any, float]]:
    """(source, where, row, fraction of bytes read so far) for all rows of all sources."""
    if config.hub_dataset:
        for where, row in _read_hub(config):
            yield config.hub_dataset, where, row, 0.0
        return
    total = sum(p.stat().st_size for p in sources)
    done = 0
    for path in sources:
        for where, row, position in _read_file(path):
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
            if isinstance(row, _Malformed):
                drop("malformed", where, row.detail)
                continue
            if source not in mapped:
                columns = list(row)
                mapped[source] = _resolve_mapping(
                    columns, row, config.shape, config.mapping, source
                )
            shape, roles = mapped[source]
            try:
                normalized, label = _normalize_row(row, shape, roles, config.system_prompt)
            except _Drop as d:
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
            + format_report({**stats, "splits": {}})
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


def content_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if path.exists():
            digest.update(split.encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    main(DatasetConfig, run)
