"""Dataset step: every shape detected from a file, drop reasons, split, bad input, streaming."""

import csv
import json
import tracemalloc

import pytest

from pipelines import dataset
from pipelines.base import Progress, StepError
from pipelines.dataset import DatasetConfig
from pipelines.lib import readers
from pipelines.reports import for_step
from studio import store

CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path, header, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _config(files, tokenizer, **kwargs):
    return DatasetConfig(
        name="test", files=[str(f) for f in files], tokenizer_model=str(tokenizer), **kwargs
    )


SHAPE_FILES = {
    "messages": lambda p: _jsonl(p / "chat.jsonl", [{"messages": CHAT, "id": i} for i in range(4)]),
    "sharegpt": lambda p: (
        (p / "sg.json").write_text(
            json.dumps(
                [
                    {
                        "conversations": [
                            {"from": "human", "value": f"hi {i}"},
                            {"from": "gpt", "value": "yo"},
                        ]
                    }
                    for i in range(4)
                ]
            )
        )
        and p / "sg.json"
    ),
    "alpaca": lambda p: (
        (p / "alpaca.json").write_text(
            json.dumps(
                {
                    "version": 1,
                    "data": [
                        {"instruction": f"do {i}", "input": "x", "output": "done"} for i in range(4)
                    ],
                }
            )
        )
        and p / "alpaca.json"
    ),
    "prompt_completion": lambda p: _csv(
        p / "pc.csv", ["prompt", "completion"], [[f"p{i}", "c"] for i in range(4)]
    ),
    "prompt_response": lambda p: _csv(
        p / "pr.tsv", ["Prompt", "Response"], [[f"p{i}", "r"] for i in range(4)], delimiter="\t"
    ),
    "question_answer": lambda p: _parquet(
        p / "qa.parquet", [{"question": f"q{i}", "answer": "a", "context": "ctx"} for i in range(4)]
    ),
    "classification": lambda p: _csv(
        p / "cls.csv", ["text", "label"], [[f"t{i}", "good" if i % 2 else "bad"] for i in range(4)]
    ),
    "text": lambda p: (
        (p / "raw.txt").write_text("first paragraph\nline two\n\nsecond one\n") and p / "raw.txt"
    ),
}
EXPECTED_SHAPE = {"prompt_response": "prompt_completion"}


@pytest.mark.parametrize("kind", SHAPE_FILES)
def test_every_shape_is_detected_and_normalized(kind, tmp_path, tiny_tokenizer_dir, events):
    path = SHAPE_FILES[kind](tmp_path)
    result = dataset.run(
        _config([path], tiny_tokenizer_dir, validation_ratio=0.5, train_ratio=0.5, test_ratio=0),
        tmp_path / "out",
        events.append,
    )
    stats = result.summary
    assert stats["shape"] == EXPECTED_SHAPE.get(kind, kind)
    folder = tmp_path / "out" / "dataset"
    rows = [
        json.loads(line)
        for s in ("train", "validation")
        for line in (folder / f"{s}.jsonl").read_text().splitlines()
    ]
    assert len(rows) == stats["rows_kept"] > 0
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "assistant" and all(m["content"] for m in row["messages"])
    assert (folder / "stats.json").exists() and "content hash" in (
        folder / "README.md"
    ).read_text().lower()
    done = [e.done for e in events if isinstance(e, Progress)]
    assert done == sorted(done) and done[-1] == 1000


def test_original_columns_and_system_prompt_are_kept(tmp_path, tiny_tokenizer_dir, events):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "source": "wiki"}])
    dataset.run(
        _config([path], tiny_tokenizer_dir, system_prompt="be brief"), tmp_path / "o", events.append
    )
    row = json.loads((tmp_path / "o" / "dataset" / "train.jsonl").read_text())
    assert row["source"] == "wiki" and row["question"] == "q"
    assert row["messages"][0] == {"role": "system", "content": "be brief"}


def test_every_drop_reason_is_counted_with_examples(tmp_path, tiny_tokenizer_dir, events):
    rows = [
        {"messages": CHAT},
        {"messages": CHAT},  # duplicate
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {
            "messages": [
                {"role": "user", "content": "long " * 50},
                {"role": "assistant", "content": "x"},
            ]
        },
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")
    stats = dataset.run(
        _config([path], tiny_tokenizer_dir, max_tokens=20), tmp_path / "o", events.append
    ).summary
    assert stats["rows_read"] == 7 and stats["rows_kept"] == 1
    assert stats["dropped"] == {
        "malformed": 1,
        "missing_field": 1,
        "empty": 1,
        "invalid_role": 1,
        "too_long": 1,
        "duplicate": 1,
    }
    assert stats["drop_examples"]["malformed"][0]["where"] == "d.jsonl line 7"
    assert "wizard" in stats["drop_examples"]["invalid_role"][0]["detail"]
    assert "too long" in for_step("dataset", stats).text()


def test_split_is_seeded_and_stratified(tmp_path, tiny_tokenizer_dir, events):
    path = _csv(
        tmp_path / "c.csv",
        ["text", "label"],
        [[f"row {i}", "good" if i < 80 else "bad"] for i in range(100)],
    )
    config = _config(
        [path], tiny_tokenizer_dir, train_ratio=0.7, validation_ratio=0.2, test_ratio=0.1
    )
    stats = dataset.run(config, tmp_path / "a", events.append).summary
    assert stats["splits"] == {"train": 70, "validation": 20, "test": 10}
    assert stats["labels"] == {"good": 80, "bad": 20}
    validation = [
        json.loads(x)["label"]
        for x in (tmp_path / "a" / "dataset" / "validation.jsonl").read_text().splitlines()
    ]
    assert validation.count("bad") == 4  # 20% of each label
    again = dataset.run(config, tmp_path / "b", events.append).summary
    assert again["content_hash"] == stats["content_hash"]


def test_manual_mapping_overrides_detection(tmp_path, tiny_tokenizer_dir, events):
    path = _csv(tmp_path / "odd.csv", ["Frage", "Antwort"], [["wie", "so"], ["was", "das"]])
    with pytest.raises(StepError, match="can't tell the shape"):
        dataset.run(_config([path], tiny_tokenizer_dir), tmp_path / "o", events.append)
    stats = dataset.run(
        _config(
            [path],
            tiny_tokenizer_dir,
            shape="question_answer",
            mapping={"prompt": "Frage", "response": "Antwort"},
        ),
        tmp_path / "o",
        events.append,
    ).summary
    assert stats["rows_kept"] == 2 and stats["shape"] == "question_answer"
    found = dataset.preview([str(path)], "auto", {"prompt": "Frage", "response": "Antwort"})
    assert found["examples"][0]["messages"][1]["content"] == "so"


def test_utf16_with_bom_and_several_files(tmp_path, tiny_tokenizer_dir, events):
    a = tmp_path / "a.csv"
    a.write_bytes("text,label\nhéllo,good\n".encode("utf-16"))
    b = _csv(tmp_path / "b.csv", ["text", "label"], [["world", "bad"]])
    stats = dataset.run(_config([a, b], tiny_tokenizer_dir), tmp_path / "o", events.append).summary
    assert stats["rows_kept"] == 2 and stats["sources"] == ["a.csv", "b.csv"]


BAD_FILES = {
    "empty": (lambda p: p / "e.csv", b"", "e.csv is empty"),
    "binary": (lambda p: p / "b.jsonl", b"\x00\x01\x02PK\x03\x04" * 50, "looks binary"),
    "latin-1": (
        lambda p: p / "l.csv",
        "text,label\ncaf\xe9,good\n".encode("latin-1"),
        "not valid UTF-8",
    ),
    "broken json": (lambda p: p / "j.json", b'[{"text": "a"},\n{"text": "b",\n', "near line"),
    "unsupported": (lambda p: p / "x.xlsx", b"PK\x03\x04", "unsupported file type '.xlsx'"),
    "fake parquet": (lambda p: p / "f.parquet", b"text,label\n", "not a Parquet file"),
    "no rows": (lambda p: p / "n.csv", b"text,label\n", "no rows found"),
    "no json lines": (lambda p: p / "g.jsonl", b"garbage\n" * 25, "none of the first 20 lines"),
    "bad mapping": (lambda p: p / "m.csv", b"foo,bar\n1,2\n", "can't tell the shape"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_input_gets_a_clear_message_and_registers_nothing(
    kind, home, runner, tiny_tokenizer_dir, tmp_path
):
    make, content, message = BAD_FILES[kind]
    path = make(tmp_path)
    path.write_bytes(content)
    run_id = runner.submit("dataset", _config([path], tiny_tokenizer_dir))
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
        assert row["status"] == "failed"
        assert message in row["error"] and path.name in row["error"], row["error"]
        assert not row["traceback"]  # a StepError, not a crash
        assert store.artifacts(db) == []
    assert not (home / "runs" / run_id / "out" / "dataset").exists()


def test_oversized_file_is_refused_before_parsing(home, runner, tiny_tokenizer_dir, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * (1024 * 1024 + 1))  # not even valid: it must never be read
    run_id = runner.submit("dataset", _config([path], tiny_tokenizer_dir, max_file_mb=1))
    with store.connect(home) as db:
        assert "over the 1 MB limit" in store.get_run(db, run_id)["error"]


def test_all_rows_dropped_fails_with_the_report(home, runner, tiny_tokenizer_dir, tmp_path):
    path = _csv(tmp_path / "c.csv", ["text", "label"], [["a", ""], ["b", ""]])
    run_id = runner.submit("dataset", _config([path], tiny_tokenizer_dir))
    with store.connect(home) as db:
        error = store.get_run(db, run_id)["error"]
    assert "no usable rows" in error and "empty    2" in error


def test_hub_dataset_fails_at_once_offline(home, runner):
    run_id = runner.submit("dataset", DatasetConfig(name="hub", hub_dataset="owner/data"))
    with store.connect(home) as db:
        assert "offline" in store.get_run(db, run_id)["error"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"files": []}, "files is empty"),
        ({"shape": "weird"}, "shape must be"),
        ({"mapping": {"colour": "x"}}, "unknown roles"),
        ({"train_ratio": 0.5}, "must be 1"),
        ({"max_tokens": -1}, "max_tokens must be >= 0"),
        ({"name": " "}, "name must not be empty"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DatasetConfig(**{"name": "x", "files": ["a.csv"], **kwargs})


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_parsing_streams_in_constant_memory(tmp_path, suffix):
    row = {"text": "some words " * 20, "label": "good"}
    path = tmp_path / f"big{suffix}"
    line = json.dumps(row)
    with path.open("w") as f:
        if suffix == ".json":
            f.write('{"meta": {"n": 1}, "rows": [\n' + ",\n".join([line] * 60000) + "\n]}")
        else:
            f.write((line + "\n") * 60000)
    assert path.stat().st_size > 12 * 2**20
    tracemalloc.start()
    count = sum(1 for _ in readers.read_file(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 60000
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MB while reading a 12 MB file"


def test_sample_dataset_is_a_checkable_task():
    found = dataset.preview([str(dataset.SAMPLE_DATASET)])
    assert found["shape"] == "classification"
    with dataset.SAMPLE_DATASET.open() as f:
        rows = list(csv.DictReader(f))
    labels = {r["label"] for r in rows}
    assert len(rows) >= 300 and labels == {
        "billing",
        "shipping",
        "returns",
        "account",
        "technical",
        "product",
    }
    assert all(label in dataset.SAMPLE_SYSTEM_PROMPT for label in labels)
