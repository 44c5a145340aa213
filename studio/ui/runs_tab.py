"""Runs tab: every run with live status, metrics, log, config, artifacts and a lineage picture;
and two to four runs compared (configs, reports, curves)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from pipelines import STEPS
from studio import deploy, store
from studio.jobs import JobRunner, resumable
from studio.quota import LimitReached
from studio.store import RunStatus
from studio.ui import choices, session, views

CURVES = {
    "loss": ("loss", "eval_loss", "distill_loss"),
    "learning rate": ("learning_rate",),
    "tokens/s": ("tokens_per_s",),
    "memory (MB)": ("memory_mb",),
    "all": (),
}
TABLE_HEADERS = ["run", "name", "step", "status", "progress", "created", "duration"]


def build_tab(home: Path, runner: JobRunner) -> None:
    limits, nobody = runner.limits, session.page_owner(runner.limits)
    with gr.Row():
        step = gr.Dropdown(choices=["", *STEPS], value="", label="Step", scale=1)
        status = gr.Dropdown(choices=["", *store.STATUSES], value="", label="Status", scale=1)
        run_id = gr.Textbox(
            label="Run",
            placeholder="click a run in the table, or paste its id",
            scale=3,
            elem_id="runs-selected",
        )
    table = gr.Dataframe(
        value=lambda: runs_table(home, owner=nobody),
        headers=TABLE_HEADERS,
        interactive=False,
        max_height=320,
        elem_id="runs-table",
    )
    page = _run_controls()
    with gr.Tabs():
        page |= _run_tabs()
        with gr.Tab("Compare"):
            _compare_section(home, limits, nobody)
    table.select(select_row, inputs=[table], outputs=[run_id])
    curve = page["curve"]

    def show(owner: str | None, run_id: str, curve: str) -> tuple:
        run_id = run_id.strip()
        return (*refresh_run(home, run_id, curve, owner), *button_states(home, run_id, owner))

    run_outputs = [page[n] for n in RUN_OUTPUTS]
    run_id.change(session.for_viewer(limits, show), inputs=[run_id, curve], outputs=run_outputs)
    curve.change(session.for_viewer(limits, show), inputs=[run_id, curve], outputs=run_outputs)
    for control in (step, status):
        control.change(
            session.for_viewer(limits, lambda owner, s, st: runs_table(home, s, st, owner)),
            inputs=[step, status],
            outputs=[table],
        )

    def act(action):
        return session.for_user(limits, lambda owner, r: action(runner, r, owner))

    page["cancel"].click(act(cancel_run), inputs=[run_id], outputs=[page["header"]])
    for name, action in (("rerun", rerun_run), ("resume", resume_run), ("delete", delete_run)):
        page[name].click(act(action), inputs=[run_id], outputs=[run_id])
    timer = gr.Timer(2.0)
    timer.tick(
        session.for_viewer(
            limits,
            lambda owner, s, st, r, c: (runs_table(home, s, st, owner), *show(owner, r, c)),
        ),
        inputs=[step, status, run_id, curve],
        outputs=[table, *run_outputs],
    )


# what refresh_run and button_states fill, in their order
RUN_OUTPUTS = (
    "header",
    "progress",
    "summary",
    "plot",
    "log",
    "config",
    "command",
    "artifacts",
    "cancel",
    "resume",
    "delete",
)


def _run_controls() -> dict[str, Any]:
    """The selected run's header, progress bar and buttons."""
    page = {"header": gr.Markdown(elem_id="run-header")}
    page["progress"] = gr.HTML(elem_id="run-progress")
    with gr.Row():
        page["cancel"] = gr.Button("Cancel", size="sm", variant="stop")
        page["rerun"] = gr.Button("Re-run", size="sm")
        page["resume"] = gr.Button("Resume from checkpoint", size="sm")
        page["delete"] = gr.Button("Delete", size="sm")
    return page


def _run_tabs() -> dict[str, Any]:
    """The selected run's report, curves, log, config and lineage, a tab each."""
    page = {}
    with gr.Tab("Report"):
        page["summary"] = gr.Markdown(elem_id="run-summary")
    with gr.Tab("Metrics"):
        page["curve"] = gr.Radio(choices=list(CURVES), value="loss", label="Curve")
        page["plot"] = gr.LinePlot(x="step", y="value", color="key", height=300, label="Metrics")
    with gr.Tab("Log"):
        page["log"] = gr.Textbox(
            lines=14,
            max_lines=14,
            label="Log",
            autoscroll=True,
            buttons=["copy"],
            elem_id="run-log",
        )
    with gr.Tab("Config"):
        page["config"] = gr.Code(language="json", label="Config (JSON)", buttons=["copy"])
        page["command"] = gr.Code(
            language="shell", label="The same run from the command line", buttons=["copy"]
        )
    with gr.Tab("Artifacts & lineage"):
        page["artifacts"] = gr.Markdown()
    return page


def _compare_section(home: Path, limits: Any, nobody: str | None) -> None:
    compared = gr.Dropdown(
        label="Runs to compare (2 to 4)",
        choices=choices.runs(home, nobody),
        multiselect=True,
        max_choices=4,
        elem_id="compare-runs",
    )
    compared_curve = gr.Dropdown(
        label="Curve", choices=[], allow_custom_value=True, elem_id="compare-curve"
    )
    compare_plot = gr.LinePlot(x="step", y="value", color="run", height=280)
    compare_reports = gr.Dataframe(
        label="Reports: quality, speed, size", interactive=False, elem_id="compare-reports"
    )
    compare_configs = gr.Dataframe(
        label="Configs (≠ marks a difference)", interactive=False, elem_id="compare-configs"
    )
    choices.fill_on_focus(compared, choices.runs, home, limits)
    for control in (compared, compared_curve):
        control.change(
            session.for_viewer(limits, lambda owner, ids, key: compare(home, ids, key, owner)),
            inputs=[compared, compared_curve],
            outputs=[compare_configs, compare_reports, compare_plot, compared_curve],
        )


def runs_table(
    home: Path, step: str = "", status: str = "", owner: str | None = None
) -> list[list[Any]]:
    with store.connect(home) as db:
        rows = store.list_runs(db, step=step or None, status=status or None, limit=200, owner=owner)
    return [
        [
            r["id"],
            r["name"],
            r["step"],
            r["status"],
            f"{100 * (r['progress'] or 0):.0f}%",
            r["created_at"][:19].replace("T", " "),
            views.duration(views.elapsed_s(r)),
        ]
        for r in rows
    ]


def select_row(table: Any, evt: gr.SelectData) -> str:
    """Clicking a row of the table opens that run."""
    row = evt.row_value if evt.row_value else table.iloc[evt.index[0]].tolist()
    return row[0]


def refresh_run(
    home: Path, run_id: str | None, curve: str = "loss", owner: str | None = None
) -> tuple:
    """Everything the run page shows; reads SQLite and the log file only."""
    empty = ("Pick a run in the table.", "", "", None, "", "", "", "")
    if not run_id:
        return empty
    with store.connect(home) as db:
        row = store.get_run(db, run_id, owner)
        if row is None:
            return (f"No run `{run_id}`.", *empty[1:])
        metric_rows = store.metrics(db, run_id)
        events = store.last_events(db, run_id)
        outputs = store.artifacts(db, run_id=run_id)
        links = store.lineage(db, run_id)
        chain = store.run_chain(db, run_id)
        paths = {str((Path(home) / a["path"]).resolve()) for a in outputs}
    served = [  # refreshed: a server whose process is gone is not shown as serving
        f"{server['host']}:{server['port']}"
        for server in deploy.refresh(home, owner)
        if server["status"] in store.SERVER_LIVE
        and paths & {str(Path(p).resolve()) for p in server["models"].values()}
    ]
    picture = views.lineage_mermaid(chain, links["used_by"], served)
    return (
        _header_md(home, row),
        views.progress_html(row),
        views.summary_md(row),
        _curve(metric_rows, curve),
        _log_text(home, row, events),
        json.dumps(json.loads(row["config_json"]), indent=2, ensure_ascii=False),
        cli_command(home, row),
        _artifacts_md(outputs, links) + "\n\n" + picture,
    )


def button_states(home: Path, run_id: str, owner: str | None = None) -> tuple:
    """Cancel, Resume and Delete are clickable only when they can do something."""
    with store.connect(home) as db:
        row = store.get_run(db, run_id, owner) if run_id else None
    if row is None:
        return (gr.update(interactive=False),) * 3
    return (
        gr.update(interactive=row["status"] in (RunStatus.QUEUED, RunStatus.RUNNING)),
        gr.update(interactive=resumable(home, row)),
        gr.update(interactive=row["status"] in store.TERMINAL),
    )


def run_status(home: Path, run_id: str, owner: str | None = None) -> tuple[str, str]:
    """A submitted run's progress bar, and its report once it ended (the tabs poll this)."""
    if not run_id:
        return gr.skip(), gr.skip()
    with store.connect(home) as db:
        row = store.get_run(db, run_id, owner)
    if row is None:
        return "", ""
    header = f"Run <code>{run_id}</code> ({row['name']}) · {views.progress_html(row)}"
    if row["status"] == RunStatus.SUCCEEDED:
        return header, views.summary_md(row)
    if row["status"] in (RunStatus.FAILED, RunStatus.CANCELED, RunStatus.INTERRUPTED):
        return header, f"**{row['status'].capitalize()}:** {row['error'] or row['message']}"
    return header, ""


def _curve(metric_rows: list[dict[str, Any]], curve: str) -> pd.DataFrame | None:
    """The metric rows of one curve (all of them when the run has none of its keys)."""
    if not metric_rows:
        return None
    frame = pd.DataFrame(metric_rows, columns=["key", "step", "value"])
    keys = CURVES.get(curve, ())
    chosen = frame[frame["key"].isin(keys)] if keys else frame
    return chosen if len(chosen) else frame


# the figures the Compare table shows, looked for in a summary, its gate and its ratios
REPORT_KEYS = (
    "verdict",
    "metric",
    "quality_kept_pct",
    "gain_over_base",
    "eval_loss",
    "train_loss",
    "perplexity",
    "success_ratio",
    "speedup",
    "time_saved_pct",
    "tokens_per_s",
    "decode_tokens_per_s",
    "ttft_p95_s",
    "latency_p95_s",
    "memory_saved_pct",
    "peak_memory_mb",
    "size_ratio",
    "size_saved_pct",
    "rows_kept",
    "steps",
    "train_seconds",
)


def compare(
    home: Path, run_ids: list[str] | None, curve: str | None, owner: str | None = None
) -> tuple:
    """Two to four runs side by side: configs with the differences marked, their reports in
    one table, and one metric's curves overlaid."""
    with store.connect(home) as db:
        rows = [r for r in (store.get_run(db, i, owner) for i in (run_ids or [])[:4]) if r]
        run_ids = [r["id"] for r in rows]
        if len(run_ids) < 2:
            return None, None, None, gr.update(choices=[])
        metric_rows = {r: store.metrics(db, r) for r in run_ids}
    configs = [_flat(json.loads(row["config_json"])) for row in rows]
    keys = sorted(set().union(*configs))
    config_rows = [
        ["≠" if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1 else "", k]
        + [_cell(c.get(k)) for c in configs]
        for k in keys
    ]
    config_rows.sort(key=lambda r: r[0] != "≠")  # the differences first
    headers = [f"{row['id']} ({row['step']})" for row in rows]
    summaries = [_report_values(json.loads(row["summary_json"] or "{}")) for row in rows]
    report_rows = [["status", *(row["status"] for row in rows)]] + [
        [k, *(_cell(s.get(k)) for s in summaries)]
        for k in REPORT_KEYS
        if any(k in s for s in summaries)
    ]
    names = sorted({m["key"] for ms in metric_rows.values() for m in ms})
    chosen = (
        curve
        if curve in names
        else next((k for k in ("loss", "eval_loss") if k in names), names[0] if names else None)
    )
    curves = pd.DataFrame(
        [
            {"step": m["step"], "value": m["value"], "run": run_id}
            for run_id, ms in metric_rows.items()
            for m in ms
            if m["key"] == chosen
        ],
        columns=["step", "value", "run"],
    )
    return (
        pd.DataFrame(config_rows, columns=["", "setting", *headers]),
        pd.DataFrame(report_rows, columns=["figure", *headers]),
        curves if len(curves) else None,
        gr.update(choices=names, value=chosen),
    )


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys; the lineage a publish run carries is left out."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key == "lineage":
            continue
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _report_values(summary: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for part in (summary, summary.get("gate") or {}, summary.get("ratios") or {}):
        for key in REPORT_KEYS:
            if key in part and not isinstance(part[key], (dict, list)):
                found.setdefault(key, part[key])
    # quality kept with what it rests on: the interval and rows of the paired comparison
    pair = (summary.get("gate") or {}).get("pair") or next(iter(summary.get("pairs") or []), {})
    if found.get("quality_kept_pct") is not None and pair.get("kept_ci_low") is not None:
        found["quality_kept_pct"] = (
            f"{found['quality_kept_pct']:.4g} [{pair['kept_ci_low']:.0f}, "
            f"{pair['kept_ci_high']:.0f}] on {pair['rows']} rows"
        )
    return found


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)[:80]
    return "" if value is None else str(value)[:80]


def cli_command(home: Path, row: dict[str, Any]) -> str:
    config = store.run_dir(home, row["id"]) / "config.json"
    return f"slmops run {row['step']} --config {shlex.quote(str(config))} --follow"


def cancel_run(runner: JobRunner, run_id: str, owner: str | None = None) -> str:
    if not run_id:
        raise gr.Error("Pick a run first.")
    outcome = runner.cancel(run_id, owner)
    if outcome == "unknown":
        raise gr.Error(f"No run {run_id} of yours.")
    if outcome == "finished":
        gr.Warning(f"Run {run_id} has already finished; nothing to cancel.")
    else:
        gr.Info(f"Run {run_id}: {outcome}.")
    return gr.skip()


def rerun_run(runner: JobRunner, run_id: str, owner: str | None = None) -> str:
    if not run_id:
        raise gr.Error("Pick a run first.")
    try:
        new_id = runner.rerun(run_id, owner)
    except ValueError as e:  # LimitReached is one
        raise gr.Error(str(e)) from e
    gr.Info(f"Queued {new_id} with the same config as {run_id}.")
    return new_id


def resume_run(runner: JobRunner, run_id: str, owner: str | None = None) -> str:
    if not run_id:
        raise gr.Error("Pick a run first.")
    try:
        new_id = runner.resume(run_id, owner)
    except LimitReached as e:
        raise gr.Error(str(e)) from e
    except ValueError as e:
        raise gr.Error(
            f"{e}. Only a stopped run that saved checkpoints can resume; use Re-run to start over."
        ) from e
    gr.Info(f"Resuming {run_id} as {new_id}.")
    return new_id


def delete_run(runner: JobRunner, run_id: str, owner: str | None = None) -> str:
    if not run_id:
        raise gr.Error("Pick a run first.")
    if not runner.delete(run_id, owner):
        raise gr.Error(f"Run {run_id} is still queued or running (or not yours): cancel it first.")
    gr.Info(f"Deleted run {run_id} and its files.")
    return ""


def _header_md(home: Path, row: dict[str, Any]) -> str:
    lines = [
        f"### {row['name']} · `{row['id']}`",
        f"step **{row['step']}** · queue **{row['queue']}** · created {row['created_at'][:19]}"
        + (f" · waits for `{row['depends_on']}`" if row["depends_on"] else "")
        + (f" · resumes `{row['resumed_from']}`" if row["resumed_from"] else ""),
    ]
    if row["error"]:
        lines.append(f"\n**Error:** {row['error']}")
    if resumable(home, row):
        lines.append("\nThis run saved checkpoints: **Resume from checkpoint** continues it.")
    return "\n".join(lines)


def _log_text(home: Path, row: dict[str, Any], events: list[dict[str, Any]]) -> str:
    lines = [f"{e['ts'][11:19]} {e['level']:<7} {e['message']}" for e in events]
    if row["traceback"]:
        lines += ["", "--- worker output (tail) ---", row["traceback"]]
    log_file = store.run_dir(home, row["id"]) / "log.txt"
    if row["status"] == RunStatus.RUNNING and log_file.exists():
        with log_file.open("rb") as f:
            f.seek(max(0, log_file.stat().st_size - 4000))
            tail = f.read().decode("utf-8", "replace").splitlines()[-15:]
        lines += ["", "--- worker output (tail) ---", *tail]
    return "\n".join(lines)


def _artifacts_md(outputs: list[dict[str, Any]], links: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["**Produced**"] if outputs else ["No artifacts (yet)."]
    for a in outputs:
        lines.append(
            f"- {a['kind']} **{a['name']}** · `{a['path']}` · {a['bytes'] / 1024:.1f} KB · "
            f"sha256 `{a['sha256'][:12]}…`"
        )
    if links["inputs"]:
        lines.append("\n**Made from**")
        lines += [
            f"- {i['role']}: {i['kind']} **{i['name']}** made by run `{i['made_by']}`"
            for i in links["inputs"]
        ]
    if links["used_by"]:
        lines.append("\n**Used by**")
        lines += [
            f"- run `{u['run_id']}` ({u['step']}, {u['status']}) as {u['role']}"
            for u in links["used_by"]
        ]
    return "\n".join(lines)
