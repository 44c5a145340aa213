"""Student against teacher (and the untrained student) on held-out rows: the task metric,
agreement with the teacher, perplexity, latency p50/p95, tokens/s, peak memory, parameters and
size, and the three ratios of the course's case study (quality kept, time saved, memory saved).

Run as: python -m pipelines.evaluate --config cfg.json --workdir out/
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.base import (
    Log,
    Metrics,
    Progress,
    Reporter,
    StepError,
    StepResult,
    fmt,
    main,
    option,
)
from pipelines.lib import stats
from pipelines.lib.dataset_folder import dataset_labels, held_out
from pipelines.lib.generation import TeacherFields, memory_sampler, open_model
from pipelines.lib.sampling import Reply
from pipelines.lib.tasks import Task, TaskFields
from pipelines.reports import for_step

ROLES = ("teacher", "student", "student_base")
SAMPLES = 8  # rows shown side by side in the report


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(TaskFields, TeacherFields):
    dataset_dir: str = option(
        label="Dataset", help="A dataset folder; its test split (else validation) is used."
    )
    student: str = option(label="Student", help="The trained student (a merged or full model).")
    student_base: str = option(
        "", "Student before training", "The untrained student, for the gain; empty skips it."
    )
    split: Literal["test", "validation"] = option(
        "test", "Split", "Held-out rows to score (falls back to validation when test is empty)."
    )
    max_rows: int = option(
        0, "Max rows", "Score only the first N rows of the split; 0 scores all of them."
    )

    def __post_init__(self):
        self.check_task()
        self.check_teacher()
        if not self.student.strip():
            raise ValueError("student must name a model")
        if self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {self.max_rows}")

    @property
    def queue(self) -> str:
        return "compute"

    @property
    def outputs(self) -> dict[str, str]:
        return {"report.json": "report"}


CONFIG = EvaluateConfig


def run(config: EvaluateConfig, workdir: Path, report: Reporter) -> StepResult:
    """Answer the held-out prompts with each model, one at a time, and compare."""
    folder = Path(config.dataset_dir)
    rows, split = held_out(folder, config.split, config.max_rows)
    labels = dataset_labels(folder) if config.task == "classification" else []
    task = config.build(labels)
    prompts = [task.messages(r) for r in rows]
    references = [_original_reference(task, r) for r in rows]
    models = {"teacher": config.teacher, "student": config.student}
    if config.student_base.strip():
        models["student_base"] = config.student_base
    report(Log(f"scoring {len(rows)} {split} rows with {', '.join(models)} ({task.metric})"))
    results: dict[str, dict[str, Any]] = {}
    replies: dict[str, list[str]] = {}
    scores: dict[str, list[float | None]] = {}
    for index, (role, spec) in enumerate(models.items()):
        results[role], replies[role] = _measure(
            role, spec, config, task, prompts, references, report, index, len(models)
        )
        scores[role] = [
            task.score(text, ref) if ref else None
            for text, ref in zip(replies[role], references, strict=True)
        ]
        results[role].update(_with_interval(stats.interval(scores[role])))
    for role in results:
        if role != "teacher":
            results[role]["agreement"] = _mean(
                task.agreement(a, b) for a, b in zip(replies[role], replies["teacher"], strict=True)
            )
    summary = {
        "task": task.name,
        "metric": task.metric,
        "split": split,
        "rows": len(rows),
        "teacher": config.teacher_id(),
        "models": results,
        # each comparison on the same rows: B against A (B - A), with its paired interval
        "pairs": [
            {"a": a, "b": b, **stats.compare(scores[a], scores[b])}
            for a, b in (("teacher", "student"), ("student_base", "student"))
            if a in scores
        ],
        "ratios": ratios(results),
        "samples": [
            {
                "prompt": prompts[i][-1]["content"][:300],
                "reference": references[i],
                **{role: replies[role][i][:300] for role in replies},
            }
            for i in range(min(SAMPLES, len(rows)))
        ],
    }
    kept = summary["pairs"][0]
    summary["ratios"]["quality_kept_ci"] = [kept.get("kept_ci_low"), kept.get("kept_ci_high")]
    report(Metrics(step=0, values=_flat(summary)))
    (workdir / "report.json").parent.mkdir(parents=True, exist_ok=True)
    (workdir / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    report(Log(for_step("evaluate", summary).text()))
    return StepResult(
        artifacts=[("report", "report.json", {"name": f"{task.name} report", **summary["ratios"]})],
        summary=summary,
    )


def _original_reference(task: Task, row: dict[str, Any]) -> str | None:
    """The dataset's own answer (a teacher-answered row keeps it under 'reference')."""
    return row.get("reference") or task.reference(row)


def _measure(
    role: str,
    spec: str,
    config: EvaluateConfig,
    task: Task,
    prompts: list[list[dict[str, str]]],
    references: list[str | None],
    report: Reporter,
    index: int,
    count: int,
) -> tuple[dict[str, Any], list[str]]:
    """One model answers every prompt alone (batch 1: latency as a user sees it)."""
    total = len(prompts)
    report(Progress(index * total, count * total, f"loading the {role.replace('_', ' ')}"))
    endpoint = role == "teacher" and bool(config.endpoint)
    model = config.open_teacher() if role == "teacher" else open_model(spec)
    stop_memory = None if endpoint else memory_sampler()
    sampling = config.sampling(greedy=True)
    replies: list[Reply] = []
    try:
        for i, prompt in enumerate(prompts):
            if endpoint:
                replies.append(model.ask(prompt, sampling, config.max_retries))
            else:
                replies.append(model.generate([prompt], sampling)[0])
            report(
                Progress(
                    index * total + i + 1,
                    count * total,
                    f"{role.replace('_', ' ')}: {i + 1}/{total} answered",
                )
            )
        conversations = [
            [*p, {"role": "assistant", "content": r}]
            for p, r in zip(prompts, references, strict=True)
            if r
        ]
        perplexity = None if endpoint else model.perplexity(conversations)
        memory = None if stop_memory is None else model.memory_bytes() + stop_memory()
        size = None if endpoint else model.size_bytes()
        parameters = model.parameters
    finally:
        model.close()
    failed = [r.error for r in replies if r.text is None]
    if len(failed) == len(replies):
        raise StepError(f"the {role} answered none of the prompts: {failed[0]}")
    texts = [r.text or "" for r in replies]
    latencies = sorted(r.seconds for r in replies if r.text is not None)
    tokens = sum(r.completion_tokens for r in replies)
    seconds = sum(latencies)
    result = {
        "model": spec,
        "valid_answers": _mean(float(task.check(t)[0] is not None) for t in texts),
        "perplexity": perplexity,
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p95_s": round(_percentile(latencies, 0.95), 4),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "peak_memory_mb": None if memory is None else round(memory / 2**20, 2),
        "parameters": parameters,
        "size_mb": None if size is None else round(size / 2**20, 1),
        "failed_requests": len(failed),
    }
    report(
        Log(
            f"{role}: latency p50 "
            f"{fmt(result.get('latency_p50_s'), unit=' s')}, {fmt(result.get('tokens_per_s'))} "
            f"tokens/s, peak memory {fmt(result.get('peak_memory_mb'), '{:.0f}', ' MB')}"
        )
    )
    return result, texts


def _with_interval(scored: dict[str, Any]) -> dict[str, Any]:
    return {
        "metric": scored["mean"],
        "ci_low": scored["ci_low"],
        "ci_high": scored["ci_high"],
        "scored_rows": scored["rows"],
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The case study's three ratios (student against teacher), and the gain over the base."""
    teacher, student = results["teacher"], results["student"]

    def ratio(key: str) -> float | None:
        if teacher.get(key) in (None, 0) or student.get(key) is None:
            return None
        return student[key] / teacher[key]

    quality = ratio("metric")
    latency = ratio("latency_p50_s")
    memory = ratio("peak_memory_mb")
    size = ratio("size_mb")
    base = results.get("student_base", {}).get("metric")
    return {
        "quality_kept_pct": None if quality is None else round(100 * quality, 1),
        "time_saved_pct": None if latency is None else round(100 * (1 - latency), 1),
        "memory_saved_pct": None if memory is None else round(100 * (1 - memory), 1),
        "size_saved_pct": None if size is None else round(100 * (1 - size), 1),
        "gain_over_base": None
        if base is None or student.get("metric") is None
        else round(student["metric"] - base, 4),
    }


def _flat(summary: dict[str, Any]) -> dict[str, float]:
    values = {}
    for role, result in summary["models"].items():
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{role}_{key}"] = float(value)
    values.update(
        {k: float(v) for k, v in summary["ratios"].items() if isinstance(v, (int, float))}
    )
    return values


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


if __name__ == "__main__":
    main(EvaluateConfig, run)
