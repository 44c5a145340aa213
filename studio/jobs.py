"""The job runner: named queues with concurrency limits, runs as child processes, cancel, resume.

One runner per STUDIO_HOME executes runs (it holds runner.lock); other processes only submit.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pipelines import STEPS
from pipelines.base import CHECKPOINT_DIR, config_from_dict, config_to_dict
from studio import procs, quota, store, worker
from studio.settings import DEFAULT_QUEUES, Limits
from studio.store import RunStatus

log = logging.getLogger(__name__)
KILL_AFTER_TERM_S = 5.0


class JobRunner:
    """Owns execution: a thread that launches queued runs as `python -m studio.worker` children."""

    def __init__(
        self,
        home: Path,
        *,
        queues: dict[str, int] | None = None,
        inline: bool = False,
        grace_s: float = 30.0,
        poll_s: float = 0.5,
        limits: Limits | None = None,
    ):
        self.home = Path(home).resolve()
        self.limits = limits  # hosted mode: each owner's runs stay within these
        self.queues = dict(queues or DEFAULT_QUEUES)
        self.inline, self.grace_s, self.poll_s = inline, grace_s, poll_s
        self._procs: dict[str, subprocess.Popen | int] = {}  # run id -> child, or adopted pid
        self._terminated: dict[str, float] = {}  # run id -> when SIGTERM was sent
        self._secrets: dict[str, dict[str, str]] = {}  # run id -> env vars, memory only
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_file = None
        store.init(self.home)

    # --- what the UI and the CLI call ---------------------------------------------------------

    def submit(
        self,
        step: str,
        config: Any,
        *,
        name: str = "",
        depends_on: str | None = None,
        resumed_from: str | None = None,
        secrets: dict[str, str] | None = None,
        owner: str | None = None,
        chain: tuple[str, str] | None = None,
    ) -> str:
        """Record a queued run and wake the runner; returns the run id at once.

        `chain` is (chain id, this run's role in it) for runs queued together (store.create_chain).

        `secrets` (API keys) reach the run's process as environment variables; they are held
        in this runner's memory only, never written to the database or the run folder.
        `owner` (hosted mode) is the signed-in user: their limits and files are checked
        (quota.LimitReached, PermissionError)."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; steps are {', '.join(STEPS)}")
        values = config_to_dict(config)
        with store.connect(self.home) as db:
            if depends_on and store.get_run(db, depends_on, owner) is None:
                raise ValueError(f"depends_on: no run {depends_on!r}")
            if self.limits is not None and owner is not None:
                values = quota.check_submit(db, self.home, self.limits, owner, step, values)
            run_id = store.create_run(
                db,
                step,
                values,
                queue=config.queue,
                name=name,
                depends_on=depends_on,
                resumed_from=resumed_from,
                owner=owner or "",
                outputs=config.outputs,
            )
            if chain:
                store.add_to_chain(db, chain[0], chain[1], run_id)
            run_dir = store.run_dir(self.home, run_id)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(values, indent=2))
            if secrets:
                self._secrets[run_id] = dict(secrets)
            if self.inline:
                self._run_inline(db, run_id)
        self._wake.set()
        return run_id

    def check(self, owner: str | None, runs: list[tuple[str, Any]], room: int = 0) -> None:
        """Before a chain is queued: raise what `submit` would for any of its (step, config)
        runs, and unless `room` runs fit; a chain is queued whole or not at all."""
        if self.limits is not None and owner is not None:
            with store.connect(self.home) as db:
                quota.check_room(db, self.limits, owner, room or len(runs))
                for step, config in runs:
                    values = config_to_dict(config)
                    quota.check_submit(db, self.home, self.limits, owner, step, values, 0)

    def cancel(self, run_id: str, owner: str | None = None) -> str:
        """Cancel a queued run at once, or ask a running one to stop; returns what happened
        ('unknown' for a run that is not the owner's)."""
        with store.connect(self.home) as db:
            if store.get_run(db, run_id, owner) is None:
                return "unknown"
            if store.set_status(
                db,
                run_id,
                "canceled",
                only_from=(RunStatus.QUEUED,),
                message="canceled before it started",
            ):
                store.add_event(db, run_id, "status", "canceled before it started")
                return "canceled"
            if store.request_cancel(db, run_id):
                store.add_event(db, run_id, "status", "cancel requested; stopping")
                self._wake.set()
                return "stopping"
        return "finished"

    def rerun(self, run_id: str, owner: str | None = None) -> str:
        """A new run with the same step, config, name and dependency."""
        with store.connect(self.home) as db:
            row = store.get_run(db, run_id, owner)
        if row is None:
            raise ValueError(f"no run {run_id!r}")
        config = config_of(row)
        return self.submit(
            row["step"], config, name=row["name"], depends_on=row["depends_on"], owner=owner
        )

    def resume(self, run_id: str, owner: str | None = None) -> str:
        """Continue a stopped run from its last checkpoint, as a new run."""
        with store.connect(self.home) as db:
            row = store.get_run(db, run_id, owner)
        if row is None or not resumable(self.home, row):
            raise ValueError(f"run {run_id} has no checkpoint to resume from")
        return self.submit(
            row["step"], config_of(row), name=row["name"], resumed_from=run_id, owner=owner
        )

    def delete(self, run_id: str, owner: str | None = None) -> bool:
        """Delete a finished run and its files; False if it is active (or not the owner's)."""
        with store.connect(self.home) as db:
            if store.get_run(db, run_id, owner) is None:
                return False
            return store.mark_deleted(db, self.home, run_id)

    def output(self, run_id: str, name: str) -> Path:
        """Where run `run_id` writes (or wrote) its output `name` (see store.output)."""
        with store.connect(self.home) as db:
            return store.output(db, self.home, run_id, name)

    def wait(self, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the run is final (tests, CLI); returns its row."""
        deadline = time.monotonic() + timeout
        with store.connect(self.home) as db:
            while True:
                row = store.get_run(db, run_id)
                if row["status"] in store.TERMINAL or time.monotonic() > deadline:
                    return row
                time.sleep(0.1)

    # --- the runner thread --------------------------------------------------------------------

    def start(self) -> bool:
        """Reconcile and start executing; False if another process already runs this home."""
        if self.inline or self._thread:
            return True
        self._lock_file = open(self.home / "runner.lock", "w")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            return False
        with store.connect(self.home) as db:
            interrupted, alive = store.reconcile(db, worker_alive)
        for row in alive:  # children of a previous runner that are still working
            self._procs[row["id"]] = row["pid"]
        if interrupted:
            log.warning("marked interrupted: %s", ", ".join(interrupted))
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop launching (children keep running and are re-attached by the next runner)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
            self._thread = None
        if self._lock_file:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _loop(self) -> None:
        with store.connect(self.home) as db:
            while not self._stop.is_set():
                try:
                    self.tick(db)
                except (sqlite3.Error, OSError) as e:  # keep the runner alive; try again next tick
                    log.exception("job runner tick failed: %s", e)
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def tick(self, db) -> None:
        """One pass: reap finished children, escalate overdue cancels, launch what may start."""
        self._reap(db)
        self._escalate_cancels(db)
        running = store.running_per_queue(db)
        for row in store.queued_runs(db):
            if running.get(row["queue"], 0) >= self.queues.get(row["queue"], 1):
                continue
            if not self._dependency_ready(db, row):
                continue
            if self._launch(db, row["id"]):
                running[row["queue"]] = running.get(row["queue"], 0) + 1

    def _dependency_ready(self, db, row: dict[str, Any]) -> bool:
        if not row["depends_on"]:
            return True
        parent = store.get_run(db, row["depends_on"])
        if parent and parent["status"] == RunStatus.SUCCEEDED and not parent["deleted"]:
            return True
        if parent and parent["status"] in (RunStatus.QUEUED, RunStatus.RUNNING):
            store.set_queued_message(db, row["id"], f"waiting for run {parent['id']}")
            return False
        state = (
            "was deleted"
            if parent and parent["deleted"]
            else f"ended {parent['status']}"
            if parent
            else "does not exist"
        )
        store.set_status(
            db,
            row["id"],
            RunStatus.FAILED,
            message="its input run did not succeed",
            error=f"run {row['depends_on']}, whose output this run needs, {state}. "
            "Re-run it, then re-run this one.",
        )
        return False

    def _launch(self, db, run_id: str) -> bool:
        if not store.set_status(db, run_id, RunStatus.RUNNING, message="starting"):
            return False  # canceled meanwhile
        run_dir = store.run_dir(self.home, run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            proc = procs.start(
                ["studio.worker", run_id, "--home", str(self.home)],
                log_path=run_dir / "log.txt",
                STUDIO_HOME=str(self.home),
                **self._secrets.pop(run_id, {}),
            )
        except OSError as e:
            store.set_status(db, run_id, RunStatus.FAILED, error=f"could not start the worker: {e}")
            return False
        store.set_pid(db, run_id, proc.pid)
        self._procs[run_id] = proc
        return True

    def _reap(self, db) -> None:
        for run_id, proc in list(self._procs.items()):
            if isinstance(proc, subprocess.Popen):
                code = proc.poll()
                if code is None:
                    continue
            elif worker_alive(proc, run_id):
                continue
            else:
                code = None  # adopted: not our child, so its exit code is unknown
            del self._procs[run_id]
            self._terminated.pop(run_id, None)
            row = store.get_run(db, run_id)
            if row and row["status"] == RunStatus.RUNNING:  # the worker died without saying how
                if row["cancel_requested"]:
                    store.set_status(db, run_id, RunStatus.CANCELED, message="stopped by the user")
                    store.add_event(db, run_id, "status", "stopped by the user")
                else:
                    tail = procs.log_tail(store.run_dir(self.home, run_id) / "log.txt")
                    store.set_status(
                        db,
                        run_id,
                        RunStatus.FAILED,
                        traceback=tail,
                        message="failed",
                        error=f"the worker process exited (code {code}) without "
                        "finishing; see the log",
                    )
                    store.add_event(
                        db, run_id, "status", f"worker exited with code {code}", level="error"
                    )

    def _escalate_cancels(self, db) -> None:
        """Cooperative cancel first; after the grace period SIGTERM the group, then SIGKILL."""
        now = time.time()
        for row in store.cancels_pending(db):
            pid = row["pid"]
            if not pid or row["id"] not in self._procs:
                continue
            asked = _parse_time(row["cancel_requested_at"])
            if row["id"] not in self._terminated and now - asked > self.grace_s:
                procs.signal_group(pid, signal.SIGTERM)
                self._terminated[row["id"]] = now
                store.add_event(
                    db, row["id"], "status", "did not stop in time; terminating", level="warning"
                )
            elif (
                row["id"] in self._terminated
                and now - self._terminated[row["id"]] > KILL_AFTER_TERM_S
            ):
                procs.signal_group(pid, signal.SIGKILL)

    def _run_inline(self, db, run_id: str) -> None:
        """Immediate mode for tests: run in this process, so the caller sees the final row."""
        row = store.get_run(db, run_id)
        if row["depends_on"] and not self._dependency_ready(db, row):
            return
        if store.set_status(db, run_id, RunStatus.RUNNING, message="starting"):
            secrets = self._secrets.pop(run_id, {})
            saved = {k: os.environ.get(k) for k in secrets}
            os.environ.update(secrets)
            try:
                worker.execute(self.home, run_id)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def config_of(row: dict[str, Any]) -> Any:
    """The config object of a stored run."""
    return config_from_dict(STEPS[row["step"]].CONFIG, json.loads(row["config_json"]))


def resumable(home: Path, row: dict[str, Any]) -> bool:
    """A stopped run that saved checkpoints can continue from them."""
    checkpoints = store.workdir(home, row["id"]) / CHECKPOINT_DIR
    return (
        row["status"] in (RunStatus.INTERRUPTED, RunStatus.CANCELED, RunStatus.FAILED)
        and not row["deleted"]
        and checkpoints.is_dir()
        and any(checkpoints.iterdir())
    )


def worker_alive(pid: int, run_id: str) -> bool:
    """Is `pid` still the worker of `run_id` (not a finished one, nor a reused pid)?"""
    return procs.alive(pid, "studio.worker", run_id)


def _parse_time(text: str | None) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp() if text else time.time()
