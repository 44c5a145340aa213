"""Uploaded files read as rows, streamed, in any of the formats people have them: CSV/TSV, JSON (an
array or an object holding one list), JSONL, Parquet, TXT; and Hub datasets. A row that can't be
parsed comes back as Malformed (with why), so the import can count it instead of failing."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.base import StepError

FILE_TYPES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")


@dataclass
class Malformed:
    detail: str


def check_file(path: Path, max_mb: int | None) -> None:
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


def read_file(path: Path) -> Iterator[tuple[str, dict[str, Any] | Malformed, int]]:
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
            yield f"{name} line {n}", Malformed(f"invalid JSON: {e.msg}")
            continue
        parsed_any = True
        if isinstance(value, dict):
            yield f"{name} line {n}", value
        else:
            yield f"{name} line {n}", Malformed(f"a JSON {type(value).__name__}, not an object")


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
                    Malformed(f"a JSON {type(item).__name__}, not an object"),
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
                Malformed(f"{len(header)} columns expected, the row has a different number"),
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


def read_hub(
    dataset_id: str, config_name: str = "", split: str = "train"
) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) for a Hub dataset's split, streamed (needs the network)."""
    from pipelines.lib.models import hub_offline

    if hub_offline():
        raise StepError(
            f"can't read Hub dataset '{dataset_id}': the Hugging Face Hub is "
            "offline here (HF_HUB_OFFLINE=1). Download it elsewhere and upload the files."
        )
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, config_name or None, split=split, streaming=True)
        for i, row in enumerate(rows, 1):
            yield f"{dataset_id} row {i}", {k: _jsonable(v) for k, v in row.items()}
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise StepError(
            f"can't read Hub dataset '{dataset_id}' "
            f"(config {config_name or 'default'}, split {split}): {e}"
        ) from None
