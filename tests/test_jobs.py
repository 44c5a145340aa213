"""Job runner: statuses, queues, dependencies, cancel, kill -9, reconcile, re-attach, resume."""

import os
import signal
import time

import pytest

from studio import store
from studio.jobs import JobRunner


def _row(home, run_id):
    with store.connect(home) as db:
        return store.get_run(db, run_id)


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize(
    "kwargs, status, error",
    [
        ({}, "succeeded", None),
        ({"fail": True}, "failed", "asked to fail"),
        ({"crash": True}, "failed", "RuntimeError: boom"),
    ],
)
def test_inline_run_reaches_its_final_status(home, runner, fake_steps, kwargs, status, error):
    run_id = runner.submit("fake", fake_steps.FakeConfig(steps=2, **kwargs))
    row = _row(home, run_id)
    assert (row["status"], row["error"]) == (status, error)
    assert bool(row["traceback"]) is bool(kwargs.get("crash"))
    with store.connect(home) as db:
        assert len(store.artifacts(db, run_id=run_id)) == (status == "succeeded")
        assert [m["value"] for m in store.metrics(db, run_id)] == [1.0, 0.5]
    assert (home / "runs" / run_id / "config.json").exists()


def test_inline_dependency_on_a_failed_run_fails_with_a_reason(home, runner, fake_steps):
    parent = runner.submit("fake", fake_steps.FakeConfig(fail=True))
    child = runner.submit("fake", fake_steps.FakeConfig(), depends_on=parent)
    row = _row(home, child)
    assert row["status"] == "failed" and parent in row["error"] and "Re-run" in row["error"]


def test_child_process_runs_and_registers_lineage(home, live_runner, fake_steps):
    first = live_runner.submit("fake", fake_steps.FakeConfig(steps=3))
    assert live_runner.wait(first, 30)["status"] == "succeeded"
    with store.connect(home) as db:
        made = store.artifacts(db, run_id=first)[0]
    second = live_runner.submit("fake", fake_steps.FakeConfig(input_path=str(home / made["path"])))
    assert live_runner.wait(second, 30)["status"] == "succeeded"
    with store.connect(home) as db:
        assert store.lineage(db, second)["inputs"][0]["made_by"] == first
    assert "starting at step 0" in (home / "runs" / first / "log.txt").read_text()


def test_queues_honour_their_limits(home, live_runner, fake_steps):
    compute = [
        live_runner.submit("fake", fake_steps.FakeConfig(steps=3, sleep_s=0.15)) for _ in range(3)
    ]
    network = [
        live_runner.submit(
            "fake", fake_steps.FakeConfig(steps=3, sleep_s=0.15, queue_name="network")
        )
        for _ in range(3)
    ]
    peak = {"compute": 0, "network": 0}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with store.connect(home) as db:
            rows = [store.get_run(db, r) for r in compute + network]
        for queue in peak:
            running = sum(r["status"] == "running" and r["queue"] == queue for r in rows)
            peak[queue] = max(peak[queue], running)
        if all(r["status"] in store.TERMINAL for r in rows):
            break
        time.sleep(0.02)
    assert all(r["status"] == "succeeded" for r in rows)
    assert peak == {"compute": 1, "network": 2}
    # first come, first served within a queue
    starts = [_row(home, r)["started_at"] for r in compute]
    assert starts == sorted(starts)


def test_a_run_waits_for_the_run_it_depends_on(home, live_runner, fake_steps):
    parent = live_runner.submit(
        "fake", fake_steps.FakeConfig(steps=4, sleep_s=0.2, queue_name="network")
    )
    child = live_runner.submit(
        "fake", fake_steps.FakeConfig(queue_name="network"), depends_on=parent
    )
    _wait_for(lambda: _row(home, parent)["status"] == "running")
    time.sleep(0.3)
    assert _row(home, child)["status"] == "queued"
    assert "waiting for run" in _row(home, child)["message"]
    assert live_runner.wait(child, 30)["status"] == "succeeded"
    assert _row(home, child)["started_at"] > _row(home, parent)["finished_at"]


def test_cancel_a_queued_run(home, live_runner, fake_steps):
    blocker = live_runner.submit("fake", fake_steps.FakeConfig(steps=10, sleep_s=0.1))
    queued = live_runner.submit("fake", fake_steps.FakeConfig())
    assert live_runner.cancel(queued) == "canceled"
    assert _row(home, queued)["status"] == "canceled"
    live_runner.cancel(blocker)
    live_runner.wait(blocker, 30)


def test_cancel_a_running_child_cooperatively(home, live_runner, fake_steps):
    run_id = live_runner.submit("fake", fake_steps.FakeConfig(steps=200, sleep_s=0.05))
    _wait_for(lambda: (_row(home, run_id)["progress"] or 0) > 0)
    assert live_runner.cancel(run_id) == "stopping"
    row = live_runner.wait(run_id, 30)
    assert row["status"] == "canceled" and row["message"] == "canceled by the user"
    assert live_runner.cancel(run_id) == "finished"


def test_a_child_that_ignores_cancel_is_terminated_after_the_grace_period(
    home, live_runner, fake_steps
):
    run_id = live_runner.submit("fake", fake_steps.FakeConfig(silent_sleep_s=60))
    _wait_for(lambda: _started(home, run_id))  # past its last report: it can't see the cancel
    live_runner.cancel(run_id)
    row = live_runner.wait(run_id, 20)  # grace is 1 s in the fixture
    assert row["status"] == "canceled" and row["message"] == "stopped by the user"


def test_kill_9_of_a_child_while_the_runner_lives_fails_the_run(home, live_runner, fake_steps):
    run_id = live_runner.submit("fake", fake_steps.FakeConfig(silent_sleep_s=60))
    _wait_for(lambda: _row(home, run_id)["pid"] is not None)
    os.kill(_row(home, run_id)["pid"], signal.SIGKILL)
    row = live_runner.wait(run_id, 20)
    assert row["status"] == "failed" and "exited" in row["error"]


def test_kill_9_while_the_studio_is_down_gives_interrupted_then_resume(
    home, live_runner, fake_steps
):
    run_id = live_runner.submit("fake", fake_steps.FakeConfig(steps=100, sleep_s=0.05))
    _wait_for(lambda: (_row(home, run_id)["progress"] or 0) >= 0.05)
    live_runner.stop()  # the web process goes away; its child keeps working
    pid = _row(home, run_id)["pid"]
    os.kill(pid, signal.SIGKILL)
    live_runner._procs[run_id].wait()  # reap the zombie, as init would
    restarted = JobRunner(home, grace_s=1.0, poll_s=0.05)
    assert restarted.start()
    try:
        row = _row(home, run_id)
        assert row["status"] == "interrupted"
        checkpoints = len(list((home / "runs" / run_id / "out" / "checkpoints").iterdir()))
        assert checkpoints >= 5
        resumed = restarted.resume(run_id)
        final = restarted.wait(resumed, 30)
        assert final["status"] == "succeeded" and final["resumed_from"] == run_id
        import json

        assert json.loads(final["summary_json"])["started_at_step"] >= checkpoints
    finally:
        restarted.stop()


def test_a_restarted_runner_reattaches_to_a_live_child(home, live_runner, fake_steps):
    run_id = live_runner.submit("fake", fake_steps.FakeConfig(steps=20, sleep_s=0.1))
    _wait_for(lambda: (_row(home, run_id)["progress"] or 0) > 0)
    live_runner.stop()
    restarted = JobRunner(home, poll_s=0.05)
    assert restarted.start()
    try:
        assert _row(home, run_id)["status"] == "running"
        assert run_id in restarted._procs
        assert restarted.wait(run_id, 30)["status"] == "succeeded"
        _wait_for(lambda: run_id not in restarted._procs)
    finally:
        restarted.stop()


def test_only_one_runner_executes_a_home(home, live_runner):
    assert not JobRunner(home).start()


def test_rerun_and_delete(home, runner, fake_steps):
    first = runner.submit("fake", fake_steps.FakeConfig(steps=2), name="mine")
    second = runner.rerun(first)
    assert _row(home, second)["name"] == "mine" and _row(home, second)["status"] == "succeeded"
    assert runner.delete(first)
    assert not (home / "runs" / first).exists()
    with pytest.raises(ValueError, match="no checkpoint"):
        runner.resume(second)


def _started(home, run_id) -> bool:
    with store.connect(home) as db:
        return any("starting at step" in e["message"] for e in store.events(db, run_id, 0))
