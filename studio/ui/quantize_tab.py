"""Quantize tab: a model, a target and a precision to an ONNX Runtime GenAI folder (or
bitsandbytes), the quality gate's verdict with what to try next, and the quantized models."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.lib.hardware import gpu_free_bytes
from pipelines.lib.tasks import PRESETS
from pipelines.quantize import SUPPORTED, QuantizeConfig, proposal
from studio import store
from studio.jobs import JobRunner, config_of
from studio.store import RunStatus
from studio.ui import choices, forms, runs_tab, session, views
from studio.ui.distill_tab import answer_length

HAND_LAID = (
    "model",
    "execution_provider",
    "precision",
    "format",
    "dataset_dir",
    "task",
    "min_quality_pct",
    "min_speedup",
    "min_memory_saved_pct",
)
SETTINGS = (
    "algorithm",
    "block_size",
    "symmetric",
    "accuracy_level",
    "adapter",
    "extra_options",
    "gate",
    "split",
    "max_rows",
    "max_new_tokens",
)
TARGETS = [
    ("CPU", "cpu"),
    ("NVIDIA GPU (CUDA)", "cuda"),
    ("DirectML (Windows GPUs)", "dml"),
    ("WebGPU (browsers)", "webgpu"),
]


def build_tab(home: Path, runner: JobRunner) -> None:
    limits, nobody = runner.limits, session.page_owner(runner.limits)
    gr.Markdown(
        "Make a model small and fast for the machine it will run on: an **ONNX Runtime "
        "GenAI** folder built by its model builder, then a **quality gate** that runs the "
        "source and the quantized model on the same held-out prompts and says pass or fail "
        "against your targets (and what to try next)."
    )
    form = _main_fields(home, nobody)
    with gr.Accordion("Quantization and gate settings", open=False):
        form |= forms.build_form(QuantizeConfig, exclude=_others())
    start = gr.Button("Quantize", variant="primary", elem_id="q-start")
    run_id = gr.State("")
    status = gr.HTML(elem_id="q-status")
    report = gr.Markdown(elem_id="q-report")
    retry = gr.Button(visible=False, elem_id="q-retry")
    gr.Markdown("### Quantized models")
    made = gr.Markdown(quantized_md(home, nobody), elem_id="q-models")

    target, precision = form["execution_provider"], form["precision"]
    target.change(precision_choices, inputs=[target, precision], outputs=[precision])
    form["task"].change(gate_answer_length, inputs=[form["task"]], outputs=[form["max_new_tokens"]])
    choices.fill_on_focus(form["model"], choices.models, home, limits)
    choices.fill_on_focus(form["dataset_dir"], choices.gate_prompts, home, limits)
    start.click(
        session.for_user(limits, functools.partial(submit_quantize, runner)),
        inputs_kwargs=form,
        outputs=[run_id, status],
    )
    retry.click(
        session.for_user(limits, functools.partial(retry_quantize, runner)),
        inputs=[run_id],
        outputs=[run_id, status],
    )
    timer = gr.Timer(2.0)
    timer.tick(
        session.for_viewer(
            limits,
            lambda owner, r: (
                *runs_tab.run_status(home, r, owner),
                quantized_md(home, owner),
                retry_button(home, r, owner),
            ),
        ),
        inputs=[run_id],
        outputs=[status, report, made, retry],
    )


def _main_fields(home: Path, nobody: str | None) -> dict[str, Any]:
    """The fields laid out by hand, by QuantizeConfig field name."""
    with gr.Row():
        form = {
            "model": gr.Dropdown(
                label="Model",
                choices=choices.models(home, nobody),
                value="bundled",
                allow_custom_value=True,
                elem_id="q-model",
                info="The bundled model, a merged student, a finetuned model or an adapter "
                "(merged first), or a folder.",
            ),
            "execution_provider": gr.Radio(
                label="Target", choices=TARGETS, value="cpu", elem_id="q-target"
            ),
            "precision": gr.Radio(
                label="Precision",
                choices=list(SUPPORTED["cpu"]),
                value="int4",
                elem_id="q-precision",
                info="fp16/bf16 are offered for GPUs only: a CPU runs them slower than fp32.",
            ),
            "format": gr.Radio(**_kwargs("format"), choices=["onnx", "bitsandbytes"]),
        }
    with gr.Row():
        form["dataset_dir"] = gr.Dropdown(
            label="Held-out prompts",
            choices=choices.gate_prompts(home, nobody),
            value="",
            elem_id="q-dataset",
            info="A dataset's test rows (with its task's metric), or the built-in prompts.",
        )
        form["task"] = gr.Dropdown(
            label="Task",
            choices=[(p["label"], name) for name, p in PRESETS.items()],
            value="conversation",
            info="Only with a dataset: sets the prompts and the metric.",
        )
    with gr.Row():
        for name in ("min_quality_pct", "min_speedup", "min_memory_saved_pct"):
            form[name] = gr.Number(**_kwargs(name))
    return form


def _others() -> list[str]:
    return [f for f in forms.form_fields(QuantizeConfig) if f not in SETTINGS]


def _kwargs(name: str) -> dict[str, Any]:
    return forms.field_kwargs(QuantizeConfig, name)


def gate_answer_length(task: str) -> int:
    """Labels need a few tokens; free text is compared on its first 64 (and by perplexity)."""
    return min(answer_length(task), 64)


def precision_choices(target: str, current: str):
    """Only the precisions the builder makes for a target (and that are worth it there)."""
    choices = list(SUPPORTED.get(target, SUPPORTED["cpu"]))
    return gr.update(choices=choices, value=current if current in choices else choices[0])


def submit_quantize(runner: JobRunner, owner: str | None, **fields: Any) -> tuple[str, str]:
    """Validate the form (values by QuantizeConfig field name) and queue a quantize run; a field
    left empty keeps the config's default."""
    values = forms.config_values(QuantizeConfig, fields)
    values["model"] = (values.get("model") or "bundled").strip()
    if not values.get("dataset_dir"):
        values["task"] = "conversation"  # the built-in prompts are conversations
    try:
        config = QuantizeConfig(**values)
    except (ValueError, TypeError) as e:
        raise gr.Error(f"Can't start: {e}") from e
    if config.format == "bitsandbytes" and gpu_free_bytes() is None:
        raise gr.Error(
            "bitsandbytes 4-bit/8-bit models run on NVIDIA GPUs, and this machine has none: "
            "choose the onnx format (int4 or int8 for a CPU)."
        )
    run_id = runner.submit("quantize", config, name=config.recipe(), owner=owner)
    return run_id, runs_tab.run_status(runner.home, run_id, owner)[0]


def _proposal(home: Path, run_id: str, owner: str | None = None) -> QuantizeConfig | None:
    """The next recipe for a finished quantize run whose gate failed (None otherwise)."""
    if not run_id:
        return None
    with store.connect(home) as db:
        row = store.get_run(db, run_id, owner)
    if row is None or row["step"] != "quantize" or row["status"] != RunStatus.SUCCEEDED:
        return None
    gate = json.loads(row["summary_json"] or "{}").get("gate")
    if not gate or gate["verdict"] == "pass":
        return None
    return proposal(config_of(row), gate["checks"])


def retry_button(home: Path, run_id: str, owner: str | None = None):
    """'Quantize again as <next recipe>' when the gate failed and another recipe can help."""
    better = _proposal(home, run_id, owner)
    if better is None:
        return gr.update(visible=False)
    return gr.update(visible=True, value=f"Quantize again as {better.recipe()}")


def retry_quantize(runner: JobRunner, owner: str | None, run_id: str) -> tuple[str, str]:
    """Queue the proposed recipe of a run whose gate failed."""
    better = _proposal(runner.home, run_id, owner)
    if better is None:
        raise gr.Error("This run's gate passed, or no other recipe would help.")
    new_id = runner.submit("quantize", better, name=better.recipe(), owner=owner)
    return new_id, runs_tab.run_status(runner.home, new_id, owner)[0]


def kept_md(meta: dict[str, Any]) -> str:
    """Quality kept with what it rests on: '97.1% [91–103%] on 36 rows', or by perplexity."""
    kept = views.number(meta.get("quality_kept_pct"), "{:.1f}%")
    low, high = (meta.get("quality_kept_ci") or [None, None])[:2]
    if meta.get("quality_rows") and low is not None:
        return f"{kept} [{low:.0f}–{high:.0f}%] on {meta['quality_rows']} rows"
    if meta.get("quality_by") == "perplexity":
        return f"{kept} (by perplexity)"
    return kept


def quantized_md(home: Path, owner: str | None = None) -> str:
    """Every ONNX (and bitsandbytes) model made here, with its gate verdict."""
    with store.connect(home) as db:
        rows = store.artifacts(db, kind="onnx", owner=owner) + [
            a
            for a in store.artifacts(db, kind="model", owner=owner)
            if "recipe" in (a["meta_json"] or "")
        ]
    if not rows:
        return "None yet: quantize a model and it appears here (and in Deploy)."
    lines = [
        "| model | verdict | quality kept | speed-up | size | run | folder |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in sorted(rows, key=lambda a: a["id"], reverse=True):
        meta = json.loads(a["meta_json"] or "{}")
        lines.append(
            f"| {views.cell(a['name'])} | {meta.get('verdict') or 'not gated'} | "
            f"{kept_md(meta)} | "
            f"{views.number(meta.get('speedup'), '{:.2f}x')} | "
            f"{views.number(a['bytes'] / 2**20 if a['bytes'] else None, '{:.0f} MB')} | "
            f"`{a['run_id']}` | `{a['path']}` |"
        )
    return "\n".join(lines)
