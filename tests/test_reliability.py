"""Proof that nothing is lost: the studio killed with SIGKILL during runs and restarted, twenty
times; many runs submitted from many threads at once; the database stays whole and every
artifact on record is on disk."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from studio import store
from studio.jobs import JobRunner

pytestmark = pytest.mark.slow  # kill -9 cycles and 50 concurrent runs: the slow group

ROOT = Path(__file__).resolve().parent.parent
APP = """
import sys, time
from pathlib import Path
from studio.jobs import JobRunner
from tests import fake_steps
runner = JobRunner(Path(sys.argv[1]), grace_s=1.0, poll_s=0.05)
runner.start()
if sys.argv[2] == "submit":
    print(runner.submit("fake", fake_steps.FakeConfig(steps=30, sleep_s=0.05)), flush=True)
else:
    print("up", flush=True)
time.sleep(600)
"""


def _app(home: Path, mode: str) -> tuple[subprocess.Popen, str]:
    """A studio process (its job runner) as app.py runs it, minus the web page."""
    proc = subprocess.Popen(
        [sys.executable, "-c", APP, str(home), mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


def _row(home: Path, run_id: str) -> dict:
    with store.connect(home) as db:
        return store.get_run(db, run_id)


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_twenty_kill_9_cycles_lose_nothing(home, fake_steps):
    runs = []
    for cycle in range(20):
        app, run_id = _app(home, "submit")
        runs.append(run_id)
        _wait(lambda r=run_id: (_row(home, r)["progress"] or 0) > 0.1)
        app.send_signal(signal.SIGKILL)  # the studio dies mid-run; its worker lives on
        app.wait()
        if cycle % 2:  # every other time the worker dies too, while the studio is down
            os.kill(_row(home, run_id)["pid"], signal.SIGKILL)
            time.sleep(0.2)
        restarted, _ = _app(home, "up")  # re-attaches to a live worker, or marks it interrupted
        if cycle % 2:
            _wait(lambda r=run_id: _row(home, r)["status"] == "interrupted")
        restarted.send_signal(signal.SIGKILL)
        restarted.wait()
    runner = JobRunner(home, grace_s=1.0, poll_s=0.05)
    assert runner.start()
    try:
        _wait(lambda: all(_row(home, r)["status"] in store.TERMINAL for r in runs), 60)
        statuses = [_row(home, r)["status"] for r in runs]
        assert statuses[0::2] == ["succeeded"] * 10  # re-attached and finished
        assert statuses[1::2] == ["interrupted"] * 10  # its worker was killed
        resumed = runner.resume(runs[1])  # an interrupted run goes on from its checkpoint
        assert runner.wait(resumed, 60)["status"] == "succeeded"
    finally:
        runner.stop()
    with store.connect(home) as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        for artifact in store.artifacts(db):
            assert (home / artifact["path"]).exists(), artifact  # none orphaned in the database
            assert store.get_run(db, artifact["run_id"])["status"] == "succeeded"
    for run_id in runs[1::2]:  # an interrupted run registered nothing and left no result
        assert not (home / "runs" / run_id / "out" / "result.txt").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_fifty_runs_from_ten_threads_are_all_stored_in_order(home, fake_steps):
    runner = JobRunner(home, queues={"compute": 2, "network": 4, "data": 2}, poll_s=0.02)
    ids: list[list[str]] = [[] for _ in range(10)]

    def submit(n: int) -> None:
        for _ in range(5):
            ids[n].append(runner.submit("fake", fake_steps.FakeConfig(steps=1, sleep_s=0.01)))

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [r for per_thread in ids for r in per_thread]
    assert len(set(every)) == 50
    with store.connect(home) as db:
        stored = [r["id"] for r in store.list_runs(db, limit=100)]
        assert sorted(stored) == sorted(every)
        created = {r: store.get_run(db, r)["created_at"] for r in every}
    for per_thread in ids:  # each thread's runs were recorded in the order it sent them
        assert [created[r] for r in per_thread] == sorted(created[r] for r in per_thread)
    peak = {"compute": 0}
    assert runner.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with store.connect(home) as db:
                running = len(list(db["runs"].rows_where("status = 'running'")))
                done = len(list(db["runs"].rows_where("status = 'succeeded'")))
            peak["compute"] = max(peak["compute"], running)
            if done == 50:
                break
            time.sleep(0.02)
    finally:
        runner.stop()
    assert done == 50 and 1 <= peak["compute"] <= 2  # within the queue's limit
