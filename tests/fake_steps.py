"""A fake pipeline step for job tests: sleeps, reports, checkpoints, fails or crashes on demand."""

import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.base import CHECKPOINT_DIR, Log, Metrics, Progress, StepError, StepResult


@dataclass(frozen=True, kw_only=True)
class FakeConfig:
    steps: int = field(default=1, metadata={"help": "How many progress steps."})
    sleep_s: float = field(default=0.0, metadata={"help": "Sleep per step, reporting after it."})
    silent_sleep_s: float = field(default=0.0, metadata={"help": "Sleep first without reporting."})
    fail: bool = field(default=False, metadata={"help": "Raise StepError at the end."})
    crash: bool = field(default=False, metadata={"help": "Raise RuntimeError at the end."})
    queue_name: str = field(default="compute", metadata={"help": "Queue to run in."})
    input_path: str = field(default="", metadata={"help": "An artifact path (lineage)."})

    @property
    def queue(self) -> str:
        return self.queue_name

    @property
    def outputs(self) -> dict[str, str]:
        return {"result.txt": "text"}


CONFIG = FakeConfig


def run(config: FakeConfig, workdir: Path, report) -> StepResult:
    checkpoints = workdir / CHECKPOINT_DIR
    done = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    start = done[-1] if done else 0
    report(Log(f"starting at step {start}"))
    time.sleep(config.silent_sleep_s)
    for i in range(start + 1, config.steps + 1):
        time.sleep(config.sleep_s)
        checkpoints.mkdir(exist_ok=True)
        (checkpoints / f"step-{i}").write_text(str(i))
        report(Metrics(step=i, values={"loss": 1.0 / i}))
        report(Progress(i, config.steps, f"step {i}"))
    if config.fail:
        raise StepError("asked to fail")
    if config.crash:
        raise RuntimeError("boom")
    (workdir / "result.txt").write_text("ok")
    return StepResult(
        artifacts=[("text", "result.txt", {"name": "result"})], summary={"started_at_step": start}
    )
