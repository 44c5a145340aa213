"""Run store: migrations, guarded transitions, progress/events/metrics, lineage, deletion."""

import itertools
import json
from pathlib import Path

import pytest

from studio import store
from studio.jobs import JobRunner


def test_migrations_apply_twice_as_a_no_op(home):
    store.init(home)  # the fixture already applied them once
    with store.connect(home) as db:
        assert [m.name for m in store.migrations.applied(db)] == [
            "0001_initial",
            "0002_servers",
            "0003_owners",
            "0004_outputs_and_chains",
        ]
        tables = {"runs", "run_events", "metrics", "artifacts", "run_inputs", "servers", "chains"}
        assert tables <= set(db.table_names())
        assert db.execute("pragma journal_mode").fetchone()[0] == "wal"


def _run_in(db, status):
    """A run brought to `status` through legal transitions."""
    run_id = store.create_run(db, "dataset", {}, queue="data")
    path = {
        "queued": [],
        "running": ["running"],
        "succeeded": ["running", "succeeded"],
        "failed": ["running", "failed"],
        "canceled": ["canceled"],
        "interrupted": ["running", "interrupted"],
    }[status]
    for step in path:
        assert store.set_status(db, run_id, step)
    return run_id


LEGAL = {(src, dst) for dst, sources in store.ALLOWED_FROM.items() for src in sources}


@pytest.mark.parametrize(
    "source, target", list(itertools.product(store.STATUSES, store.ALLOWED_FROM))
)
def test_every_transition_is_guarded(home, source, target):
    with store.connect(home) as db:
        run_id = _run_in(db, source)
        moved = store.set_status(db, run_id, target)
        assert moved is ((source, target) in LEGAL)
        assert store.get_run(db, run_id)["status"] == (target if moved else source)


def test_terminal_states_never_change(home):
    with store.connect(home) as db:
        for status in store.TERMINAL:
            run_id = _run_in(db, status)
            for target in store.ALLOWED_FROM:
                assert not store.set_status(db, run_id, target)


def test_late_progress_after_a_terminal_state_is_ignored(home):
    with store.connect(home) as db:
        run_id = _run_in(db, "running")
        store.update_progress(db, run_id, 0.5, "half")
        assert store.get_run(db, run_id)["progress"] == 0.5
        store.set_status(db, run_id, "failed", error="x")
        store.update_progress(db, run_id, 0.9, "late")
        row = store.get_run(db, run_id)
        assert (row["progress"], row["message"]) == (0.5, "half")


def test_events_cursor_and_metrics_upsert(home):
    with store.connect(home) as db:
        run_id = _run_in(db, "running")
        for i in range(5):
            store.add_event(db, run_id, "log", f"line {i}")
        first = store.events(db, run_id, 0, limit=2)
        rest = store.events(db, run_id, first[-1]["id"])
        assert [e["message"] for e in first + rest] == [f"line {i}" for i in range(5)]
        store.record_metrics(db, run_id, 1, {"loss": 2.0})
        store.record_metrics(db, run_id, 1, {"loss": 1.5, "lr": 0.1})
        assert {(m["key"], m["value"]) for m in store.metrics(db, run_id)} == {
            ("loss", 1.5),
            ("lr", 0.1),
        }


def test_lineage_links_runs_through_artifact_paths(home):
    with store.connect(home) as db:
        maker = _run_in(db, "running")
        out = home / "runs" / maker / "out" / "dataset"
        out.mkdir(parents=True)
        (out / "train.jsonl").write_text("{}\n")
        store.set_status(db, maker, "succeeded")
        [artifact_id] = store.register_artifacts(
            db, home, maker, out.parent, [("dataset", "dataset", {"name": "d"})]
        )
        user = _run_in(db, "running")
        store.record_inputs(
            db, home, user, {"dataset_dir": str(out / "train.jsonl"), "other": "not a path", "n": 3}
        )
        assert store.lineage(db, user)["inputs"][0]["artifact_id"] == artifact_id
        assert store.lineage(db, maker)["used_by"][0]["run_id"] == user
        artifact = store.artifacts(db, run_id=maker)[0]
        assert artifact["bytes"] == 3 and len(artifact["sha256"]) == 64
        assert json.loads(artifact["meta_json"]) == {"name": "d"}


def test_delete_hides_a_finished_run_and_frees_its_files(home):
    with store.connect(home) as db:
        running = _run_in(db, "running")
        assert not store.mark_deleted(db, home, running)
        done = _run_in(db, "succeeded")
        (home / "runs" / done).mkdir(parents=True)
        assert store.mark_deleted(db, home, done)
        assert not (home / "runs" / done).exists()
        assert [r["id"] for r in store.list_runs(db)] == [running]


def test_run_ids_sort_in_submission_order(home):
    with store.connect(home) as db:
        ids = [store.create_run(db, "dataset", {}, queue="data") for _ in range(20)]
        assert [r["id"] for r in reversed(store.list_runs(db))] == ids
        assert len(set(ids)) == 20


def test_runs_submitted_from_many_threads_are_all_stored(home, fake_steps):
    from concurrent.futures import ThreadPoolExecutor

    from studio.jobs import JobRunner

    runner = JobRunner(home)  # not started: submit only writes rows

    def submit(i):
        return runner.submit("fake", fake_steps.FakeConfig(steps=i), name=f"run {i}")

    with ThreadPoolExecutor(10) as pool:
        ids = list(pool.map(submit, range(50)))
    with store.connect(home) as db:
        rows = store.queued_runs(db)
    assert len(set(ids)) == 50 and {r["id"] for r in rows} == set(ids)
    assert [r["created_at"] for r in rows] == sorted(r["created_at"] for r in rows)
    with store.connect(home) as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_a_home_made_before_the_reshaping_opens_with_everything_intact(tmp_path):
    """tests/fixtures/legacy_home.tar.gz was made by the code of commit 162c24f (an import, a
    LoRA run depending on it named like a Quick start step, a failed run, a queued run waiting
    for the LoRA run, a server): after the migrations every run, artifact, lineage link and
    server is there, and outputs resolve by name."""
    import tarfile

    with tarfile.open(Path(__file__).parent / "fixtures" / "legacy_home.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    home = tmp_path / "home"
    with store.connect(home) as db:
        before = {t: db[t].count for t in ("runs", "artifacts", "run_inputs", "servers")}
        lineage_before = list(db["run_inputs"].rows)
    store.init(home)
    with store.connect(home) as db:
        assert (
            {t: db[t].count for t in before}
            == before
            == {
                "runs": 4,
                "artifacts": 3,
                "run_inputs": 1,
                "servers": 1,
            }
        )
        assert list(db["run_inputs"].rows) == lineage_before
        runs = {r["name"]: r for r in store.list_runs(db)}
        assert {n: r["status"] for n, r in runs.items()} == {
            "legacy import": "succeeded",
            "quickstart: LoRA": "succeeded",
            "broken": "failed",
            "waiting": "queued",
        }
        lora, data = runs["quickstart: LoRA"]["id"], runs["legacy import"]["id"]
        assert store.lineage(db, lora)["inputs"][0]["made_by"] == data
        # outputs registered by old runs resolve by name; a name nobody wrote does not
        merged = store.output(db, home, lora, "merged")
        assert (merged / "config.json").exists()
        assert (store.output(db, home, data, "dataset") / "train.jsonl").exists()
        with pytest.raises(KeyError, match="has no output 'onnx'"):
            store.output(db, home, lora, "onnx")
        # runs linked by depends_on became one chain
        chain = {r["chain_id"] for r in runs.values() if r["name"] != "broken"}
        assert len(chain) == 1 and None not in chain
        assert runs["broken"]["chain_id"] is None
        server = store.servers(db)[0]
        assert server["port"] == 8123 and server["models"]["legacy"].endswith("/merged")


def test_outputs_are_declared_before_the_run_and_checked_by_name(home):
    from pipelines.finetune import FinetuneConfig

    runner = JobRunner(home)  # not started: the run stays queued
    lora = FinetuneConfig(dataset_dir="-", keep_layers=4)
    run_id = runner.submit("finetune", lora)
    assert runner.output(run_id, "merged") == store.workdir(home, run_id) / "merged"
    assert runner.output(run_id, "student_base").name == "student_base"
    with pytest.raises(KeyError, match="declares adapter, merged, student_base"):
        runner.output(run_id, "model")
    full = runner.submit("finetune", FinetuneConfig(dataset_dir="-", method="full"))
    assert runner.output(full, "model").parent == store.workdir(home, full)
    assert store.run_of_path(home, runner.output(full, "model") / "config.json") == full
    assert store.run_of_path(home, home / "uploads" / "x.csv") is None


def test_run_status_is_an_enum_equal_to_its_stored_value(home):
    with store.connect(home) as db:
        run_id = store.create_run(db, "dataset", {}, queue="data")
        assert store.get_run(db, run_id)["status"] == store.RunStatus.QUEUED
        assert store.set_status(db, run_id, store.RunStatus.RUNNING)
        assert not store.set_status(db, run_id, "running")  # the same move twice: refused
        with pytest.raises(ValueError):
            store.set_status(db, run_id, "done")


def test_runs_join_a_chain_while_a_worker_writes(home):
    """add_to_chain never reads before it writes inside its transaction: when a worker wrote in
    between, the read turned write failed with 'database is locked' (a browser walk found it).
    Here a worker's write lands exactly when the chain is updated."""
    import sqlite3

    with store.connect(home) as db:
        busy = store.create_run(db, "dataset", {}, queue="data")
        chain = store.create_chain(db, "quickstart")
        run_id = store.create_run(db, "dataset", {}, queue="data")
        worker = sqlite3.connect(home / "studio.db", timeout=1)

        def write_meanwhile(statement: str) -> None:
            if statement.lower().startswith("update") and "chains" in statement:
                worker.execute(
                    "insert into run_events (run_id, kind, message) values (?, 'log', 'x')",
                    [busy],
                )
                worker.commit()

        db.conn.set_trace_callback(write_meanwhile)
        store.add_to_chain(db, chain, "dataset", run_id)
        db.conn.set_trace_callback(None)
        worker.close()
        assert store.latest_chain(db, "quickstart") == {"dataset": run_id}
        assert store.get_run(db, run_id)["chain_id"] == chain
