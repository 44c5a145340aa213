"""How runs, progress and dataset reports are rendered (Markdown and HTML strings)."""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from typing import Any

from pipelines.reports import for_step
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


def conversation_row(messages: list[dict[str, str]], limit: int = 300) -> list[str]:
    """[system, user, assistant] texts of a conversation (turns of one role joined by ' / ')."""
    cells = []
    for role in ("system", "user", "assistant"):
        text = " / ".join(m["content"] for m in messages if m["role"] == role)
        cells.append(text if len(text) <= limit else text[:limit] + "…")
    return cells


def summary_md(row: dict[str, Any]) -> str:
    """A finished run's report, from its step's presenter (pipelines/reports)."""
    if not row.get("summary_json"):
        return ""
    return for_step(row["step"], json.loads(row["summary_json"])).markdown()


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
