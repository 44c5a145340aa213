"""How runs, progress and dataset reports are rendered (Markdown and HTML strings)."""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from typing import Any

from studio.store import RunStatus


def elapsed_s(row: dict[str, Any]) -> float | None:
    if not row.get("started_at"):
        return None
    start = datetime.fromisoformat(row["started_at"])
    end = (
        datetime.fromisoformat(row["finished_at"])
        if row.get("finished_at")
        else datetime.now(timezone.utc)
    )
    return max(0.0, (end - start).total_seconds())


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def eta_s(row: dict[str, Any]) -> float | None:
    """Remaining time from the elapsed time and the progress fraction (linear)."""
    progress, elapsed = row.get("progress") or 0.0, elapsed_s(row)
    if row["status"] != RunStatus.RUNNING or elapsed is None or not 0.02 <= progress < 1:
        return None
    return elapsed / progress * (1 - progress)


def progress_html(row: dict[str, Any] | None) -> str:
    """A progress bar with percentage, message, elapsed time and ETA."""
    if row is None:
        return ""
    pct = 100.0 if row["status"] == RunStatus.SUCCEEDED else 100 * (row.get("progress") or 0.0)
    color = {"failed": "#d9534f", "canceled": "#999", "interrupted": "#f0ad4e"}.get(
        row["status"], "#3b82f6" if row["status"] != RunStatus.SUCCEEDED else "#22a06b"
    )
    eta = eta_s(row)
    parts = [f"<b>{row['status']}</b>", f"{pct:.0f}%", html.escape(row.get("message") or "")]
    if elapsed_s(row) is not None:
        parts.append(f"elapsed {duration(elapsed_s(row))}")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return (
        f'<div class="run-progress" data-status="{row["status"]}">'
        f'<div style="background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden">'
        f'<div style="width:{pct:.1f}%;background:{color};height:14px"></div></div>'
        f'<div style="font-size:0.9em;margin-top:4px">{" · ".join(p for p in parts if p)}'
        f"</div></div>"
    )


def dataset_report_md(stats: dict[str, Any]) -> str:
    """The validation report of a dataset import as Markdown."""
    dropped = sum(stats.get("dropped", {}).values())
    lines = [
        f"**{stats['rows_read']}** rows read · **{stats['rows_kept']}** kept · "
        f"**{dropped}** dropped · shape **{stats['shape']}**"
    ]
    if stats.get("stopped_at_max_rows"):
        lines.append(
            f"\n\n⚠️ Only the first **{stats['stopped_at_max_rows']:,}** rows were read (Max "
            "rows, or this shared studio's limit per dataset); the file has more."
        )
    if stats.get("splits"):
        lines.append("\n\nSplits: " + ", ".join(f"{k} **{v}**" for k, v in stats["splits"].items()))
    if stats.get("dropped"):
        lines.append("\n| dropped | rows | examples |\n|---|---|---|")
        for reason, n in stats["dropped"].items():
            examples = "; ".join(
                f"{e['where']}: {e['detail']}" for e in stats["drop_examples"].get(reason, [])
            )
            lines.append(f"| {reason.replace('_', ' ')} | {n} | {cell(examples)} |")
    tokens = stats.get("tokens")
    if tokens:
        lines.append(
            f"\n\nTokens per row ({stats.get('tokenizer', '')} tokenizer, chat template "
            f"applied): min {tokens['min']} · mean {tokens['mean']} · p50 {tokens['p50']}"
            f" · p95 {tokens['p95']} · max {tokens['max']} · total {tokens['total']}"
        )
    if stats.get("roles"):
        lines.append(
            "\n\nConversations with each role: "
            + ", ".join(f"{k} {v}" for k, v in stats["roles"].items())
            + " · turns per conversation: "
            + ", ".join(f"{k}: {v}" for k, v in stats.get("turns", {}).items())
        )
    if stats.get("labels"):
        total = sum(stats["labels"].values())
        lines.append("\n| label | rows | share |\n|---|---|---|")
        lines += [
            f"| {cell(k)} | {v} | {100 * v / total:.1f}% |" for k, v in stats["labels"].items()
        ]
    if stats.get("content_hash"):
        lines.append(f"\nContent hash: `{stats['content_hash'][:16]}…`")
    return "\n".join(lines)


def conversation_row(messages: list[dict[str, str]], limit: int = 300) -> list[str]:
    """[system, user, assistant] texts of a conversation (turns of one role joined by ' / ')."""
    cells = []
    for role in ("system", "user", "assistant"):
        text = " / ".join(m["content"] for m in messages if m["role"] == role)
        cells.append(text if len(text) <= limit else text[:limit] + "…")
    return cells


def summary_md(row: dict[str, Any]) -> str:
    """A finished run's summary: the dataset report for imports, JSON for other steps."""
    if not row.get("summary_json"):
        return ""
    summary = json.loads(row["summary_json"])
    if row["step"] == "dataset" and "rows_read" in summary:
        return dataset_report_md(summary)
    if row["step"] == "finetune" and "steps" in summary:
        from pipelines.finetune import format_summary

        return (
            format_summary(summary)
            + "\n\n```json\n"
            + json.dumps(summary, indent=2, ensure_ascii=False)
            + "\n```"
        )
    if row["step"] == "synthesize" and "valid" in summary:
        return synthesis_md(summary)
    if row["step"] == "evaluate" and "models" in summary:
        return evaluation_md(summary)
    if row["step"] == "quantize" and "recipe" in summary:
        return quantize_md(summary)
    return "```json\n" + json.dumps(summary, indent=2, ensure_ascii=False) + "\n```"


def synthesis_md(stats: dict[str, Any]) -> str:
    """The teacher-answer report: valid rate, rejections with examples, labels, usage."""
    lines = [
        f"Teacher **{cell(stats['teacher'])}** · task **{stats['task']}** · "
        f"**{stats['valid']}** of **{stats['rows']}** rows valid "
        f"(**{stats['success_ratio']:.0%}**)"
    ]
    problems = {**{f"request failed: {k}": v for k, v in stats["failed"].items()}}
    problems.update(stats["rejected"])
    if problems:
        lines.append("\n| not kept | rows | examples |\n|---|---|---|")
        for why, n in problems.items():
            key = "request failed" if why.startswith("request failed") else why
            examples = "; ".join(
                f"{e['prompt'][:60]} → {e['reply'][:80]!r}" for e in stats["examples"].get(key, [])
            )
            lines.append(f"| {cell(why)} | {n} | {cell(examples)} |")
    if stats.get("answer_labels"):
        total = sum(stats["answer_labels"].values()) or 1
        reference = stats.get("reference_labels") or {}
        lines.append("\n| label | teacher | share | dataset |\n|---|---|---|---|")
        lines += [
            f"| {cell(k)} | {v} | {100 * v / total:.1f}% | {reference.get(k, '')} |"
            for k, v in stats["answer_labels"].items()
        ]
        lines.append(
            f"\nBias against uniform (0 = balanced): teacher **{stats['answer_bias']}**, "
            f"dataset {stats.get('reference_bias')}"
        )
    if stats.get("teacher_accuracy_on_references") is not None:
        lines.append(
            f"\nThe teacher agrees with the dataset's own answers on "
            f"**{stats['teacher_accuracy_on_references']:.0%}** of the kept rows."
        )
    cost = f" · cost {stats['cost']}" if stats.get("cost") else ""
    lines.append(
        f"\nTokens: {stats['prompt_tokens']} in · {stats['completion_tokens']} out{cost} · "
        f"{stats['teacher_seconds']} s · splits "
        + ", ".join(f"{k} **{v}**" for k, v in stats.get("splits", {}).items())
    )
    return "\n".join(lines)


EVALUATION_COLUMNS = [
    ("metric", "quality"),
    ("agreement", "agrees with teacher"),
    ("perplexity", "perplexity"),
    ("latency_p50_s", "latency p50 (s)"),
    ("latency_p95_s", "latency p95 (s)"),
    ("tokens_per_s", "tokens/s"),
    ("peak_memory_mb", "memory (MB)"),
    ("parameters", "parameters"),
    ("size_mb", "size (MB)"),
]


def evaluation_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """One row per model (teacher, student, untrained student) for a table."""
    rows = []
    for role, result in summary["models"].items():
        cells = [role.replace("_", " ")]
        for key, _ in EVALUATION_COLUMNS:
            value = result.get(key)
            cells.append(
                "n/a"
                if value is None
                else f"{value:,}"
                if key == "parameters"
                else f"{value:.4g}"
                if isinstance(value, float)
                else value
            )
        rows.append(cells)
    return rows


def evaluation_md(summary: dict[str, Any]) -> str:
    """The student-vs-teacher report: the three ratios, then a row per model."""
    r = summary["ratios"]

    def pct(key: str) -> str:
        return "n/a" if r.get(key) is None else f"{r[key]:.0f}%"

    header = "| model | " + " | ".join(label for _, label in EVALUATION_COLUMNS) + " |"
    lines = [
        f"The student keeps **{pct('quality_kept_pct')}** of the teacher's quality, takes "
        f"**{pct('time_saved_pct')}** less time per answer and **{pct('memory_saved_pct')}** "
        f"less memory ({summary['task']}, {summary['metric']} on {summary['rows']} "
        f"{summary['split']} rows; teacher {cell(summary['teacher'])}).",
        "",
        header,
        "|" + "---|" * (len(EVALUATION_COLUMNS) + 1),
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in evaluation_rows(summary)]
    if r.get("gain_over_base") is not None:
        lines.append(
            f"\nTraining changed the student's {summary['metric']} by "
            f"**{r['gain_over_base']:+.3f}** over its untrained base."
        )
    return "\n".join(lines)


QUANTIZE_COLUMNS = [
    ("perplexity", "perplexity", "{:.3g}"),
    ("decode_tokens_per_s", "decode tokens/s", "{:.1f}"),
    ("first_token_p50_s", "first token p50 (s)", "{:.3f}"),
    ("latency_p50_s", "answer p50 (s)", "{:.2f}"),
    ("memory_mb", "memory (MB)", "{:.0f}"),
    ("size_mb", "size (MB)", "{:.0f}"),
    ("metric", "task metric", "{:.3g}"),
    ("stopped", "stopped on its own", "{}"),
]


def quantize_md(summary: dict[str, Any]) -> str:
    """The quantize report: the verdict, each gate, both models side by side, parity, the next
    thing to try, sample answers and the builder command."""
    lines = [f"Quantized **{cell(summary['recipe'])}** from `{cell(summary['model'])}`."]
    gate = summary.get("gate")
    if gate:
        verdict = "✅ PASS" if gate["verdict"] == "pass" else "❌ FAIL"
        lines[0] = (
            f"**{verdict}** · {lines[0]} Quality gate on {gate['prompts']} (quality by "
            f"{gate['quality_by']}), measured on {gate['measured_on']}."
        )
        lines += ["", "| check | measured | target | |", "|---|---|---|---|"]
        for c in gate["checks"]:
            lines.append(
                f"| {c['name']} | {number(c['value'], '{:.3g}')} | ≥ {c['target']} | "
                f"{'pass' if c['passed'] else '**fail**'} |"
            )
        lines += [
            "",
            "| model | " + " | ".join(label for _, label, _ in QUANTIZE_COLUMNS) + " |",
            "|" + "---|" * (len(QUANTIZE_COLUMNS) + 1),
        ]
        for role, result in gate["models"].items():
            cells = [number(result.get(key), spec) for key, _, spec in QUANTIZE_COLUMNS]
            lines.append(f"| {role} | " + " | ".join(cells) + " |")
        parity, agreement = gate["parity"], gate["agreement"]
        template = (
            f" Chat template: **{'same' if parity['chat_template'] else 'different'}**; "
            f"prompt tokens **{'same' if parity['tokens'] else 'different'}**; end-of-sequence "
            f"ids {parity['eos_quantized']} (source {parity['eos_source']})."
            if "chat_template" in parity
            else ""
        )
        lines.append(
            f"\nGreedy answers share **{agreement['prefix_match']:.0%}** of their tokens "
            f"(as a prefix) and **{agreement['identical']:.0%}** are identical; both models "
            f"stop the same way on **{parity['stop_parity']:.0%}** of the prompts.{template}"
        )
        if gate.get("note"):
            lines.append(f"\nNote: {cell(gate['note'])}")
        if gate.get("suggestion"):
            lines.append(f"\n**Next:** {cell(gate['suggestion'])}")
        if gate.get("samples"):
            lines += ["", "| prompt | source | quantized |", "|---|---|---|"]
            lines += [
                f"| {cell(s['prompt'][:120])} | {cell(s['source'][:160])} | "
                f"{cell(s['quantized'][:160])} |"
                for s in gate["samples"]
            ]
    if summary.get("builder_command"):
        lines.append(
            f"\nBuilt in {summary.get('build_seconds')} s with\n"
            f"```\n{summary['builder_command']}\n```"
        )
    return "\n".join(lines)


def number(value: Any, spec: str = "{:.3g}") -> str:
    return "n/a" if value is None else spec.format(value)


def cell(text: str) -> str:
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def lineage_mermaid(
    chain: list[dict[str, Any]], used_by: list[dict[str, Any]], served: list[str]
) -> str:
    """A picture (Mermaid) of how a run's outputs were made: the runs before it linked by the
    artifacts they passed on, then the runs that used its outputs and where it is served."""
    if not chain:
        return ""

    def node(run_id: str) -> str:
        return "r" + run_id.replace("-", "_")

    def text(value: str) -> str:
        return html.escape(value or "", quote=True).replace("#", "#35;")[:60]

    this = chain[-1]["id"]
    lines = ["```mermaid", "graph LR"]
    for run in chain:
        lines.append(f'  {node(run["id"])}["{run["step"]}<br/>{text(run["name"])}"]')
        for item in run["inputs"]:
            lines.append(f"  {node(item['made_by'])} -->|{item['kind']}| {node(run['id'])}")
    for use in used_by:
        lines.append(f'  {node(use["run_id"])}["{use["step"]}<br/>{use["status"]}"]')
        lines.append(f"  {node(this)} -->|{use['role']}| {node(use['run_id'])}")
    for n, where in enumerate(served):
        lines.append(f'  served{n}(["served at {text(where)}"])')
        lines.append(f"  {node(this)} --> served{n}")
    lines.append(f"  style {node(this)} stroke-width:3px")
    lines.append("```")
    return "\n".join(lines)
