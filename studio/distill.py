"""The Distill chain: synthesize (teacher answers) -> finetune (the student) -> evaluate (student
against teacher), queued as three runs that each wait for the one before."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipelines.evaluate import EvaluateConfig
from pipelines.finetune import FinetuneConfig
from pipelines.lib.generation import TeacherFields
from pipelines.lib.tasks import TaskFields
from pipelines.synthesize import SynthesizeConfig
from studio import store
from studio.jobs import JobRunner

SHARED = [f.name for f in dataclasses.fields(TeacherFields)] + [
    f.name for f in dataclasses.fields(TaskFields)
]


def plan(spec: dict[str, Any]) -> tuple[SynthesizeConfig, FinetuneConfig, EvaluateConfig]:
    """The three configs of a distill spec, checked before anything is queued.

    spec: {"dataset_dir", "synthesize": {...}, "finetune": {...}, "evaluate": {...},
    "logits": bool}. The student trains on the teacher's answers; with "logits" (a local
    teacher only) it also learns the teacher's token probabilities. Paths between the runs are
    filled in by `submit`."""
    dataset_dir = spec.get("dataset_dir") or spec.get("synthesize", {}).get("dataset_dir")
    if not dataset_dir:
        raise ValueError("dataset_dir is missing: the dataset whose prompts the teacher answers")
    synth = SynthesizeConfig(**{**spec.get("synthesize", {}), "dataset_dir": dataset_dir})
    tune = dict(spec.get("finetune", {}))
    if spec.get("logits"):
        if synth.endpoint:
            raise ValueError(
                "logit distillation needs a local teacher (an endpoint sends text, not "
                "logits): turn it off, or pick a local teacher"
            )
        tune["teacher_model"] = synth.teacher
    tune.setdefault("merge", True)
    student = FinetuneConfig(**{**tune, "dataset_dir": "-"})
    if student.method != "full" and not student.merge:
        student = dataclasses.replace(student, merge=True)  # evaluate takes the merged model
    shared = {name: getattr(synth, name) for name in SHARED}
    evaluation = EvaluateConfig(
        **{**shared, **spec.get("evaluate", {}), "dataset_dir": "-", "student": "-"}
    )
    return synth, student, evaluation


def submit(
    runner: JobRunner,
    spec: dict[str, Any],
    name: str = "",
    secrets: dict[str, str] | None = None,
    depends_on: str | None = None,
    owner: str | None = None,
    chain_id: str | None = None,
) -> dict[str, str]:
    """Queue the chain (after `depends_on`, e.g. the import of its dataset) as a stored chain of
    its own, or as part of `chain_id`; returns the run id of each step."""
    synth, student, evaluation = plan(spec)
    name = name or f"distill {Path(synth.dataset_dir).parent.parent.name}"
    runner.check(owner, [("synthesize", synth), ("finetune", student), ("evaluate", evaluation)])
    if chain_id is None:
        with store.connect(runner.home) as db:
            chain_id = store.create_chain(db, "distill", name, owner or "")
    synth_id = runner.submit(
        "synthesize",
        synth,
        name=f"{name} · teacher answers",
        secrets=secrets,
        depends_on=depends_on,
        owner=owner,
        chain=(chain_id, "synthesize"),
    )
    data = runner.output(synth_id, "dataset")
    student = dataclasses.replace(student, dataset_dir=str(data))
    tune_id = runner.submit(
        "finetune",
        student,
        name=f"{name} · student",
        depends_on=synth_id,
        owner=owner,
        chain=(chain_id, "finetune"),
    )
    evaluation = dataclasses.replace(
        evaluation,
        dataset_dir=str(data),
        student=str(runner.output(tune_id, "model" if student.method == "full" else "merged")),
        student_base=str(runner.output(tune_id, "student_base"))
        if student.keep_layers
        else student.base_model,
    )
    evaluate_id = runner.submit(
        "evaluate",
        evaluation,
        name=f"{name} · report",
        depends_on=tune_id,
        secrets=secrets,
        owner=owner,
        chain=(chain_id, "evaluate"),
    )
    return {"synthesize": synth_id, "finetune": tune_id, "evaluate": evaluate_id}
