"""The Gradio Blocks app: tabs wired to the run store and the job runner."""

from __future__ import annotations

import gradio as gr

from pipelines.dataset import SAMPLE_DATASET
from studio.chat import ChatClient
from studio.jobs import JobRunner
from studio.settings import Settings
from studio.ui import (
    data_tab,
    deploy_tab,
    distill_tab,
    finetune_tab,
    quantize_tab,
    quickstart_panel,
    runs_tab,
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


def launch(settings: Settings, **kwargs) -> gr.Blocks:
    """Start the job runner and serve the UI (blocks unless prevent_thread_lock=True)."""
    runner = JobRunner(settings.home, queues=settings.queues, grace_s=settings.cancel_grace_s)
    if not runner.start():
        print(
            f"Another studio process executes the runs of {settings.home}; this one only "
            "submits them.",
            flush=True,
        )
    demo = build_app(settings, runner)
    demo.queue(default_concurrency_limit=8)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        max_file_size=f"{settings.max_upload_mb}mb",
        allowed_paths=[str(SAMPLE_DATASET.parent)],
        **kwargs,
    )
    return demo
