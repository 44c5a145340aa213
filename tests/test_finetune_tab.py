"""Finetune tab handlers: start a run, list models by base, memory estimate."""

import gradio as gr
import pytest

from pipelines.finetune import FinetuneConfig
from studio import store
from studio.ui import choices, finetune_tab, forms


def test_start_finetuning_from_the_tab(home, runner, tiny_lm, tiny_dataset):
    form = {
        "base_model": str(tiny_lm),
        "lora_r": 4,
        "lora_alpha": 8,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "batch_size": 4,
        "max_seq_len": 64,
        "eval_steps": 2,
        "save_steps": 2,
        "lora_dropout": 0.0,
    }
    run_id, status = finetune_tab.submit_finetune(
        runner, None, dataset_dir=str(tiny_dataset), **form
    )
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
    assert row["status"] == "succeeded", row["error"]
    assert "succeeded" in status
    assert row["name"] == f"lora {tiny_dataset.name} on {tiny_lm.name}"  # not a run's folder
    listing = finetune_tab.models_md(home)
    assert f"**Base {tiny_lm.name}**" in listing
    assert "adapter **adapter**" in listing and "model **merged**" in listing
    labels = [label for label, _ in choices.models(home)]
    assert labels[0].endswith("(bundled)") and any("merged" in x for x in labels)
    with pytest.raises(gr.Error, match="Pick a dataset"):
        finetune_tab.submit_finetune(runner, None, dataset_dir="", **form)
    with pytest.raises(gr.Error, match="lora_r must be >= 1"):
        finetune_tab.submit_finetune(
            runner, None, dataset_dir=str(tiny_dataset), **(form | {"lora_r": 0})
        )
    # a field the form leaves empty keeps the config's default, not a handler's own
    with pytest.raises(gr.Error, match="learning_rate must be in"):
        finetune_tab.submit_finetune(
            runner, None, dataset_dir=str(tiny_dataset), **(form | {"learning_rate": 2})
        )
    assert forms.config_values(FinetuneConfig, {"lora_r": None, "epochs": ""}) == {}


def test_memory_estimate_in_the_form():
    text = finetune_tab.estimate_md("bundled", "lora", 16, 4, 512, False)
    assert text.startswith("Memory estimate (CPU): about") and "available" in text
    huge = finetune_tab.estimate_md("bundled", "full", 16, 256, 8192, False)
    assert huge.startswith("⚠️") and "lower the batch size" in huge
    assert "unknown" in finetune_tab.estimate_md("nobody/nothing", "lora", 16, 4, 512, False)
