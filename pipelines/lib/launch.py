"""Distributed launch: a step's run() under `accelerate launch` on several GPUs (or CPU processes),
its rank 0 events forwarded to the caller's reporter, and a cancel carried by a stop file.

A step opts in with, at the end of its module:
    if "--events" in sys.argv: launch.rank_main(MyConfig, run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines.base import (
    Cancelled,
    Log,
    Metrics,
    Progress,
    Reporter,
    StepError,
    StepResult,
    config_from_dict,
    config_to_dict,
)


def launch(
    module: str,
    config: Any,
    workdir: Path,
    report: Reporter,
    processes: int,
    cuda: bool = True,
) -> StepResult:
    """Several GPUs: the step `module` under `accelerate launch`, one process per GPU; rank 0
    reports through a JSONL file that this process forwards, and a stop file carries a cancel."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config_to_dict(config)))
    events, stop = workdir / "events.jsonl", workdir / "stop"
    events.unlink(missing_ok=True)
    stop.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu" if cuda else "--cpu",
        "--num_processes",
        str(processes),
        "-m",
        module,
        "--config",
        str(workdir / "config.json"),
        "--workdir",
        str(workdir),
        "--events",
        str(events),
        "--stop-file",
        str(stop),
    ]
    where = f"{processes} GPUs" if cuda else f"{processes} CPU processes"
    report(Log(f"training on {where}: {' '.join(command[2:])}"))
    proc = subprocess.Popen(command, start_new_session=False)
    offset, result = 0, None
    while True:
        done = proc.poll() is not None
        if events.exists():
            with events.open() as f:
                f.seek(offset)
                for line in f:
                    item = json.loads(line)
                    if item["type"] == "result":
                        result = item
                    else:
                        try:
                            report(_event_from_json(item))
                        except Cancelled:
                            stop.touch()
                offset = f.tell()
        if done:
            break
        time.sleep(0.5)
    if stop.exists() and result is None:  # (a cancel that came after the end changes nothing)
        raise Cancelled()
    if proc.returncode != 0 or result is None:
        raise StepError(f"distributed training failed (exit code {proc.returncode}); see the log")
    return StepResult(artifacts=[tuple(a) for a in result["artifacts"]], summary=result["summary"])


def _event_from_json(item: dict[str, Any]):
    kind = item.pop("type")
    return {"progress": Progress, "metrics": Metrics, "log": Log}[kind](**item)


def rank_main(config_cls: type, run: Callable[[Any, Path, Reporter], StepResult]) -> None:
    """Entry of each rank under accelerate: events go to a file, a stop file cancels."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--stop-file", required=True)
    args = parser.parse_args()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    events, stop = Path(args.events), Path(args.stop_file)

    def report(event) -> None:
        if rank0:
            kind = {Progress: "progress", Metrics: "metrics", Log: "log"}[type(event)]
            with events.open("a") as f:
                f.write(json.dumps({"type": kind, **asdict(event)}) + "\n")
        if stop.exists():
            raise Cancelled()

    config = config_from_dict(config_cls, json.loads(Path(args.config).read_text()))
    result = run(config, Path(args.workdir), report)
    if rank0:
        with events.open("a") as f:
            f.write(
                json.dumps(
                    {"type": "result", "artifacts": result.artifacts, "summary": result.summary}
                )
                + "\n"
            )
