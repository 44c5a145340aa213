"""Execute one run in this process: the job runner starts it as a child in its own session.

Run as (the runner does this): python -m studio.worker RUN_ID --home DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from pathlib import Path

from pipelines import STEPS
from pipelines.base import (
    CHECKPOINT_DIR,
    Cancelled,
    Event,
    Log,
    Metrics,
    Progress,
    StepError,
    config_from_dict,
)
from studio import store
from studio.store import RunStatus


class DbReporter:
    """The Reporter a step gets: writes progress (throttled), metrics and logs to SQLite, and
    raises Cancelled once the user asked to stop the run."""

    def __init__(self, db, run_id: str, min_interval: float = 0.5):
        self.db, self.run_id, self.min_interval = db, run_id, min_interval
        self._last_write = self._last_check = 0.0

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, Progress):
            fraction = min(1.0, event.done / event.total) if event.total else None
            if fraction == 1.0 or now - self._last_write >= self.min_interval:
                store.update_progress(self.db, self.run_id, fraction, event.message)
                self._last_write = now
                print(f"progress {event.done}/{event.total or '?'} {event.message}", flush=True)
        elif isinstance(event, Metrics):
            store.record_metrics(self.db, self.run_id, event.step, event.values)
        elif isinstance(event, Log):
            store.add_event(self.db, self.run_id, "log", event.message, event.level)
            print(f"{event.level}: {event.message}", flush=True)
        if now - self._last_check >= self.min_interval:
            self._last_check = now
            if store.cancel_requested(self.db, self.run_id):
                raise Cancelled()


def execute(home: Path, run_id: str) -> int:
    """Run the step of `run_id` (already marked running by the runner); return an exit code."""
    home = Path(home).resolve()
    os.environ["STUDIO_HOME"] = str(home)  # where steps cache models (pipelines.lib.models)
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
        if row is None or row["status"] != RunStatus.RUNNING:
            print(f"run {run_id} is not running; nothing to do", flush=True)
            return 1
        store.add_event(db, run_id, "status", f"started (pid {os.getpid()})")
        workdir = store.workdir(home, run_id)
        workdir.mkdir(parents=True, exist_ok=True)
        if row["resumed_from"]:
            _copy_checkpoints(store.workdir(home, row["resumed_from"]), workdir)
        try:
            module = STEPS[row["step"]]
            config_dict = json.loads(row["config_json"])
            config = config_from_dict(module.CONFIG, config_dict)
            store.record_inputs(db, home, run_id, config_dict)
            result = module.run(config, workdir, DbReporter(db, run_id))
        except Cancelled:
            store.set_status(db, run_id, RunStatus.CANCELED, message="canceled by the user")
            store.add_event(db, run_id, "status", "canceled by the user")
            return 0
        except StepError as e:
            store.set_status(db, run_id, RunStatus.FAILED, error=str(e), message="failed")
            store.add_event(db, run_id, "status", f"failed: {e}", level="error")
            return 1
        except Exception as e:  # the one broad except: any crash becomes a failed run, not a hang
            tb = traceback.format_exc()
            store.set_status(
                db,
                run_id,
                RunStatus.FAILED,
                error=f"{type(e).__name__}: {e}",
                traceback="\n".join(tb.splitlines()[-200:]),
                message="failed",
            )
            store.add_event(db, run_id, "status", f"failed: {type(e).__name__}: {e}", level="error")
            print(tb, flush=True)
            return 1
        with db.atomic():  # succeeded and its artifacts land together, or not at all
            if store.set_status(
                db,
                run_id,
                RunStatus.SUCCEEDED,
                progress=1.0,
                message="done",
                summary_json=json.dumps(result.summary, ensure_ascii=False),
            ):
                store.register_artifacts(db, home, run_id, workdir, result.artifacts)
        store.add_event(db, run_id, "status", "succeeded")
        return 0


def _copy_checkpoints(source: Path, workdir: Path) -> None:
    """Resume: the new run starts from the checkpoints of the run it resumes (hard links)."""
    src, dst = source / CHECKPOINT_DIR, workdir / CHECKPOINT_DIR
    if src.is_dir() and not dst.exists():
        shutil.copytree(src, dst, copy_function=os.link)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_id")
    parser.add_argument("--home", required=True)
    args = parser.parse_args()
    raise SystemExit(execute(Path(args.home), args.run_id))


if __name__ == "__main__":
    main()
