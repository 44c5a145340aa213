"""Pipeline steps: each module has CONFIG (its config dataclass, whose `queue` names the job queue)
and run(config, workdir, report) -> StepResult."""

from pipelines import dataset

STEPS = {  # step id -> module; ids are stored in runs.step, never rename one
    "dataset": dataset,
}
