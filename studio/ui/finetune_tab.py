"""Finetune tab: pick a dataset, a base model and a method, see the memory estimate, start; the
models it made, grouped by base."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.finetune import METHODS, FinetuneConfig
from pipelines.lib import memory
from pipelines.lib.hardware import gpu_free_bytes
from pipelines.lib.models import model_arch
from studio import store
from studio.jobs import JobRunner
from studio.settings import Limits
from studio.ui import choices, forms, runs_tab, session

HAND_LAID = (
    "dataset_dir",
    "base_model",
    "method",
    "lora_r",
    "lora_alpha",
    "epochs",
    "max_steps",
    "learning_rate",
    "batch_size",
    "max_seq_len",
    "gradient_checkpointing",
)
ESTIMATE_FIELDS = (
    "base_model",
    "method",
    "lora_r",
    "batch_size",
    "max_seq_len",
    "gradient_checkpointing",
)


def build_tab(home: Path, runner: JobRunner) -> None:
    limits, nobody = runner.limits, session.page_owner(runner.limits)
    form = _main_fields(home, limits, nobody)
    estimate = gr.Markdown(elem_id="ft-estimate")
    with gr.Accordion("Advanced", open=False):
        form |= forms.build_form(FinetuneConfig, exclude=HAND_LAID)
    start = gr.Button("Start finetuning", variant="primary", elem_id="ft-start")
    run_id = gr.State("")
    status = gr.HTML(elem_id="ft-status")
    report = gr.Markdown()
    gr.Markdown("### Models made here")
    models = gr.Markdown(models_md(home, nobody))

    gr.Markdown(
        "Try the models side by side in **Deploy → Playground** (the bundled model against "
        "a tuned one, the same message to both)."
    )

    sizing = ("base_model", "method", "lora_r", "batch_size", "max_seq_len")
    fields = [form[n] for n in (*sizing, "gradient_checkpointing")]
    for control in fields:
        control.change(lambda *v: estimate_md(*v), inputs=fields, outputs=[estimate])
    choices.fill_on_focus(form["dataset_dir"], choices.datasets, home, limits)
    choices.fill_on_focus(form["base_model"], choices.models, home, limits)
    start.click(
        session.for_user(limits, functools.partial(submit_finetune, runner)),
        inputs_kwargs=form,
        outputs=[run_id, status],
    )
    timer = gr.Timer(2.0)
    timer.tick(
        session.for_viewer(
            limits, lambda owner, r: (*runs_tab.run_status(home, r, owner), models_md(home, owner))
        ),
        inputs=[run_id],
        outputs=[status, report, models],
    )


def _main_fields(home: Path, limits: Limits | None, nobody: str | None) -> dict[str, Any]:
    """The fields laid out by hand (HAND_LAID), by FinetuneConfig field name."""
    with gr.Row():
        form = {
            "dataset_dir": gr.Dropdown(
                label="Dataset",
                choices=choices.datasets(home, nobody),
                value=None,
                info="Imported in the Data tab.",
                elem_id="ft-dataset",
            ),
            "base_model": gr.Dropdown(
                label="Base model",
                choices=choices.models(home, nobody),
                value="bundled",
                allow_custom_value=True,
                elem_id="ft-base",
                info="The bundled SmolLM2-135M-Instruct, a model made here, a "
                "local folder or a Hub id.",
            ),
            "method": gr.Radio(**_kwargs("method"), choices=list(METHODS)),
        }
    with gr.Row():
        form["lora_r"] = gr.Number(precision=0, **_kwargs("lora_r"))
        form["lora_alpha"] = gr.Number(precision=0, **_kwargs("lora_alpha"))
        form["epochs"] = gr.Number(**_kwargs("epochs"))
        steps = form["max_steps"] = gr.Number(
            precision=0, elem_id="ft-steps", **_kwargs("max_steps")
        )
        if limits and limits.train_steps:  # a shared studio: whole epochs are not allowed
            steps.value = min(steps.value or limits.train_steps, limits.train_steps)
            steps.info = f"At most {limits.train_steps} on this shared studio."
    with gr.Row():
        form["learning_rate"] = gr.Number(**_kwargs("learning_rate"))
        form["batch_size"] = gr.Number(precision=0, **_kwargs("batch_size"))
        form["max_seq_len"] = gr.Number(precision=0, **_kwargs("max_seq_len"))
        form["gradient_checkpointing"] = gr.Checkbox(**_kwargs("gradient_checkpointing"))
    return form


def _kwargs(name: str) -> dict[str, Any]:
    return forms.field_kwargs(FinetuneConfig, name)


def models_md(home: Path, owner: str | None = None) -> str:
    """Adapters and merged models grouped by their base model."""
    with store.connect(home) as db:
        rows = store.artifacts(db, kind="adapter", owner=owner)
        rows += store.artifacts(db, kind="model", owner=owner)
    if not rows:
        return "None yet: finetune a model and it appears here (and in Quantize and Deploy)."
    groups: dict[str, list[str]] = {}
    for a in sorted(rows, key=lambda a: a["id"]):
        meta = json.loads(a["meta_json"] or "{}")
        loss = meta.get("eval_loss")
        groups.setdefault(choices.short_model(meta.get("base_model", "?")), []).append(
            f"- {a['kind']} **{a['name']}** (run `{a['run_id']}`, {meta.get('method', '')}"
            + (f", r {meta['lora_r']}" if "lora_r" in meta and meta.get("method") != "full" else "")
            + (f", validation loss {loss:.3f}" if loss is not None else "")
            + f") `{a['path']}`"
        )
    return "\n".join(f"**Base {base}**\n" + "\n".join(items) for base, items in groups.items())


def estimate_md(
    base_model: str,
    method: str,
    lora_r: float,
    batch_size: float,
    max_seq_len: float,
    checkpointing: bool,
) -> str:
    """The memory estimate for the form's settings, against this machine's free memory."""
    arch = model_arch(base_model or "bundled")
    if arch is None:
        return "Memory estimate: unknown for this model until it is downloaded."
    try:
        config = FinetuneConfig(
            dataset_dir="-",
            base_model=base_model,
            method=method or "lora",
            lora_r=int(lora_r or 16),
            batch_size=int(batch_size or 1),
            max_seq_len=int(max_seq_len or 512),
            gradient_checkpointing=bool(checkpointing),
        )
    except ValueError as e:
        return f"Memory estimate: {e}"
    gpu_free = gpu_free_bytes()
    import psutil

    available = gpu_free if gpu_free is not None else psutil.virtual_memory().available
    where = "GPU" if gpu_free is not None else "CPU"
    estimate = memory.estimate_memory(arch, config, gpu_free is not None, available)
    icon = "⚠️ " if estimate["fits"] is False else ""
    return f"{icon}Memory estimate ({where}): {memory.format_estimate(estimate)}."


def submit_finetune(
    runner: JobRunner, owner: str | None, *, dataset_dir: str | None = None, **fields: Any
) -> tuple[str, str]:
    """Validate the form (values by FinetuneConfig field name) and queue a finetune run; a field
    left empty keeps the config's default."""
    if not dataset_dir:
        raise gr.Error("Pick a dataset (import one in the Data tab first).")
    values = forms.config_values(FinetuneConfig, fields)
    values["base_model"] = (values.get("base_model") or "bundled").strip()
    try:
        config = FinetuneConfig(**values, dataset_dir=dataset_dir)
    except (ValueError, TypeError) as e:
        raise gr.Error(f"Can't start: {e}") from e
    data = store.run_of_path(runner.home, dataset_dir) or Path(dataset_dir).name
    name = f"{config.method} {data} on {choices.short_model(config.base_model)}"
    run_id = runner.submit("finetune", config, name=name, owner=owner)
    return run_id, *runs_tab.run_status(runner.home, run_id, owner)[:1]
