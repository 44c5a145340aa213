"""Finetune tab handlers: start a run, list models by base, memory estimate."""

import gradio as gr
import pytest

from pipelines.finetune import FinetuneConfig
from studio import store
from studio.ui import finetune_tab, forms


def _advanced(**overrides):
    names = forms.form_fields(FinetuneConfig, exclude=finetune_tab.HAND_LAID)
    defaults = {n: forms.field_kwargs(FinetuneConfig, n)["value"] for n in names}
    defaults.update(eval_steps=2, save_steps=2, lora_dropout=0.0, **overrides)
    return [defaults[n] for n in names]


def test_start_finetuning_from_the_tab(home, runner, tiny_lm, tiny_dataset):
    run_id, status = finetune_tab.submit_finetune(
        runner,
        None,
        str(tiny_dataset),
        str(tiny_lm),
        "lora",
        4,
        8,
        1.0,
        3,
        1e-2,
        4,
        64,
        False,
        *_advanced(),
    )
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
    assert row["status"] == "succeeded", row["error"]
    assert "succeeded" in status
    listing = finetune_tab.models_md(home)
    assert f"**Base {tiny_lm.name}**" in listing
    assert "adapter **adapter**" in listing and "model **merged**" in listing
    labels = [label for label, _ in finetune_tab.model_choices(home)]
    assert labels[0].endswith("(bundled)") and any("merged" in x for x in labels)
    with pytest.raises(gr.Error, match="Pick a dataset"):
        finetune_tab.submit_finetune(
            runner, None, "", "bundled", "lora", 4, 8, 1, 0, 1e-4, 4, 64, False, *_advanced()
        )
    with pytest.raises(gr.Error, match="lora_r must be >= 1"):
        finetune_tab.submit_finetune(
            runner,
            None,
            str(tiny_dataset),
            "bundled",
            "lora",
            0,
            8,
            1,
            0,
            1e-4,
            4,
            64,
            False,
            *_advanced(),
        )


def test_memory_estimate_in_the_form():
    text = finetune_tab.estimate_md("bundled", "lora", 16, 4, 512, False)
    assert text.startswith("Memory estimate (CPU): about") and "available" in text
    huge = finetune_tab.estimate_md("bundled", "full", 16, 256, 8192, False)
    assert huge.startswith("⚠️") and "lower the batch size" in huge
    assert "unknown" in finetune_tab.estimate_md("nobody/nothing", "lora", 16, 4, 512, False)
