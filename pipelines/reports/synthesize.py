"""The synthesize step's report: valid answers, what was not kept (with examples), the teacher's
labels against the dataset's, agreement with the dataset, tokens and cost."""

from __future__ import annotations

from typing import Any

from pipelines.reports import Report


def report(stats: dict[str, Any]) -> Report:
    r = Report().line(
        f"Teacher **{stats['teacher']}** · task **{stats['task']}** · **{stats['valid']}** of "
        f"**{stats['rows']}** rows valid (**{stats['success_ratio']:.0%}**)"
    )
    problems = {f"request failed: {k}": v for k, v in stats["failed"].items()}
    problems.update(stats["rejected"])
    rows = []
    for why, n in problems.items():
        key = "request failed" if why.startswith("request failed") else why
        examples = "; ".join(
            f"{e['prompt'][:60]} → {e['reply'][:80]!r}" for e in stats["examples"].get(key, [])
        )
        rows.append([why, n, examples])
    r.table(["not kept", "rows", "examples"], rows)
    if stats.get("answer_labels"):
        total = sum(stats["answer_labels"].values()) or 1
        reference = stats.get("reference_labels") or {}
        r.table(
            ["label", "teacher", "share", "dataset"],
            [
                [k, v, f"{100 * v / total:.1f}%", reference.get(k, "")]
                for k, v in stats["answer_labels"].items()
            ],
        )
        r.line(
            f"Bias against uniform (0 = balanced): teacher **{stats['answer_bias']}**, dataset "
            f"{stats.get('reference_bias')}"
        )
    if stats.get("teacher_accuracy_on_references") is not None:
        r.line(
            f"The teacher agrees with the dataset's own answers on "
            f"**{stats['teacher_accuracy_on_references']:.0%}** of the kept rows."
        )
    cost = f" · cost {stats['cost']}" if stats.get("cost") else ""
    r.line(
        f"Tokens: {stats['prompt_tokens']} in · {stats['completion_tokens']} out{cost} · "
        f"{stats['teacher_seconds']} s · splits "
        + ", ".join(f"{k} **{v}**" for k, v in stats.get("splits", {}).items())
    )
    return r
