"""The Quick start panel above the tabs: one button runs the whole journey on the sample dataset,
each step shown as it goes (and in the Runs tab); at the end the model is served and put in the
Playground, with the report of what was gained."""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any

import gradio as gr

from studio import deploy, quickstart
from studio.jobs import JobRunner
from studio.settings import Limits
from studio.store import RunStatus
from studio.ui import choices, session, views

SERVED_NAME = "quickstart-int4"


def build(home: Path, runner: JobRunner) -> dict[str, Any]:
    """The panel's components; `wire` connects them once the Deploy tab exists."""
    with gr.Accordion("Quick start: the whole journey in one click", open=True):
        gr.Markdown(
            "Imports the sample dataset (360 support messages), lets the bundled SmolLM2-135M "
            "teach a pruned 10-layer student, finetunes it with LoRA, quantizes it to int4, "
            "serves it and opens it in the Playground. About 13 minutes on a 2-core CPU; "
            "every step also shows in the **Runs** tab, and closing the page stops nothing."
        )
        start = gr.Button("Quick start", variant="primary", elem_id="quickstart")
        status = gr.HTML(elem_id="quickstart-status")
        report = gr.Markdown(elem_id="quickstart-report")
    return {"start": start, "status": status, "report": report, "runs": gr.State({})}


def wire(home: Path, runner: JobRunner, panel: dict[str, Any], tabs: Any, deploy_parts: dict):
    """Start button, the live status, and at the end: serve, select the model, open the chat."""
    opened, limits = gr.State(False), runner.limits
    panel["start"].click(
        session.for_user(limits, functools.partial(start, runner)),
        outputs=[panel["runs"], panel["status"], opened],
    )
    gr.Timer(2.0).tick(
        session.for_viewer(limits, functools.partial(tick, home, limits)),
        inputs=[panel["runs"], opened],
        outputs=[
            panel["runs"],
            panel["status"],
            panel["report"],
            opened,
            tabs,
            deploy_parts["tabs"],
            deploy_parts["model_a"],
        ],
    )


def start(runner: JobRunner, owner: str | None) -> tuple[dict[str, str], str, bool]:
    runs = quickstart.submit(runner, owner=owner)
    return runs, status_html(runner.home, runs), False


def tick(
    home: Path, limits: Limits | None, owner: str | None, runs: dict[str, str], was_open: bool
) -> tuple:
    """Progress of each step; once the int4 model exists, serve it and open the Playground."""
    runs = runs or quickstart.latest(home, owner=owner)
    if not runs:
        return ({}, "", "", was_open, *(gr.skip(),) * 3)
    steps = quickstart.state(home, runs)
    folder = quickstart.onnx_folder(home, runs)
    if folder is None or steps[-1]["status"] != RunStatus.SUCCEEDED:
        return (runs, status_html(home, runs), "", was_open, *(gr.skip(),) * 3)
    served = deploy.serving(home, str(folder))
    if served is None and deploy.ever_served(home, str(folder)):
        return (  # served once and stopped since: the user decides now (Deploy -> Serve)
            runs,
            status_html(home, runs),
            "### What was gained\n\n"
            + quickstart.format_report(quickstart.report(home, runs))
            + "\n\nIts server was stopped; start it again in **Deploy → Serve**.",
            True,
            *(gr.skip(),) * 3,
        )
    if served is None:
        try:
            server_id = deploy.start_server(
                home, {SERVED_NAME: str(folder)}, owner=owner, limits=limits
            )
        except deploy.DeployError as e:
            return (
                runs,
                status_html(home, runs),
                f"**Could not serve it:** {e}",
                True,
                *(gr.skip(),) * 3,
            )
        row, name = deploy.wait_serving(home, server_id, timeout=30), SERVED_NAME
    else:
        row, name = served
    text = (
        "### What was gained\n\n"
        + quickstart.format_report(quickstart.report(home, runs))
        + f"\n\nServed at `{deploy.url(row)}` as `{name}`; chat with it in **Deploy → "
        "Playground** (it is model A there).\n\n"
        + deploy.snippets(deploy.url(row), name, bool(row["key_required"]))
    )
    if was_open:
        return (runs, status_html(home, runs), text, True, *(gr.skip(),) * 3)
    return (
        runs,
        status_html(home, runs),
        text,
        True,
        gr.Tabs(selected="deploy"),
        gr.Tabs(selected="deploy-playground"),
        gr.update(choices=choices.playground_models(home, owner), value=str(folder)),
    )


def status_html(home: Path, runs: dict[str, str]) -> str:
    rows = []
    for s in quickstart.state(home, runs):
        bar = views.progress_html(s["row"])
        rows.append(f"<div><b>{html.escape(s['label'])}</b> <code>{s['run_id']}</code> {bar}</div>")
    return "".join(rows)
