"""The Gradio Blocks app: tabs wired to the run store and the job runner."""

from __future__ import annotations

import functools
import os

import gradio as gr

from pipelines.dataset import SAMPLE_DATASET
from studio.chat import ChatClient
from studio.jobs import JobRunner
from studio.settings import Limits, Settings
from studio.ui import (
    data_tab,
    deploy_tab,
    distill_tab,
    finetune_tab,
    quantize_tab,
    quickstart_panel,
    runs_tab,
    session,
)

INTRO = (
    "# SLMOps Studio\nA small language model's whole life in your browser. Every step runs in "
    "the background: close the tab or restart the studio, and your runs are still here "
    "(the **Runs** tab)."
)


def build_app(settings: Settings, runner: JobRunner) -> gr.Blocks:
    """The Blocks UI (not launched); `runner` executes what the tabs submit."""
    with gr.Blocks(title="SLMOps Studio", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        if runner.limits is not None:
            with gr.Row():
                who = gr.Markdown(elem_id="signed-in")
                if not settings.users:  # on a Space: Hugging Face OAuth
                    gr.LoginButton(scale=0)
            demo.load(
                session.with_request(functools.partial(signed_in_md, runner.limits)),
                outputs=[who],
            )
        panel = quickstart_panel.build(settings.home, runner)
        with gr.Tabs() as tabs:
            with gr.Tab("Data", id="data"):
                data_tab.build_tab(settings.home, runner, settings)
            with gr.Tab("Distill", id="distill"):
                distill_tab.build_tab(settings.home, runner)
            with gr.Tab("Finetune", id="finetune"):
                finetune_tab.build_tab(settings.home, runner)
            with gr.Tab("Quantize", id="quantize"):
                quantize_tab.build_tab(settings.home, runner)
            with gr.Tab("Deploy", id="deploy"):
                deploy = deploy_tab.build_tab(settings.home, runner, ChatClient(settings.home))
            with gr.Tab("Runs", id="runs"):
                runs_tab.build_tab(settings.home, runner)
        quickstart_panel.wire(settings.home, runner, panel, tabs, deploy)
    return demo


def signed_in_md(limits: Limits, request: gr.Request) -> str:
    user = session.signed_in(request)
    if user is None:
        return "**Sign in** with your Hugging Face account to start: your runs stay yours."
    return (
        f"Signed in as **{user.name}** ([sign out](logout)) · this shared studio keeps your runs "
        f"and models to you, with these limits: {session.describe(limits)}."
    )


def launch(settings: Settings, **kwargs) -> gr.Blocks:
    """Start the job runner and serve the UI (blocks unless prevent_thread_lock=True)."""
    if settings.limits is not None and not settings.users and not os.environ.get("SPACE_ID"):
        raise SystemExit(
            "STUDIO_HOSTED=1 needs a way to sign in: set STUDIO_USERS=name:password,... or run "
            "it as a Hugging Face Space with `hf_oauth: true` in its README."
        )
    runner = JobRunner(
        settings.home,
        queues=settings.queues,
        grace_s=settings.cancel_grace_s,
        limits=settings.limits,
    )
    if not runner.start():
        print(
            f"Another studio process executes the runs of {settings.home}; this one only "
            "submits them.",
            flush=True,
        )
    demo = build_app(settings, runner)
    demo.queue(default_concurrency_limit=8)
    upload_mb = settings.limits.upload_mb if settings.limits else 0
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        max_file_size=f"{upload_mb or settings.max_upload_mb}mb",
        auth=list(settings.users.items()) or None,
        auth_message="SLMOps Studio: sign in to see your own runs and models.",
        allowed_paths=[str(SAMPLE_DATASET.parent)],
        **kwargs,
    )
    return demo
