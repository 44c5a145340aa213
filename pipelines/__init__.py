"""Pipeline steps: each module has CONFIG (its config dataclass, whose `queue` names the job queue)
and run(config, workdir, report) -> StepResult."""

import importlib
from types import ModuleType

STEP_NAMES = (
    "dataset",
    "synthesize",
    "finetune",
    "evaluate",
    "quantize",
    "benchmark",
    "publish",
)  # stored in runs.step: never rename one


def __getattr__(name: str) -> dict[str, ModuleType]:
    # STEPS (step id -> module) is built on first use, so that `python -m pipelines.<step>` does
    # not import the step twice (runpy warns when the package already imported it).
    if name != "STEPS":
        raise AttributeError(name)
    steps = {step: importlib.import_module(f"pipelines.{step}") for step in STEP_NAMES}
    globals()["STEPS"] = steps
    return steps
