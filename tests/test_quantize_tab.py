"""Quantize tab handlers: the form queues a quantize run (inline runner, tiny model), the report
shows the verdict and every figure, and the list of quantized models picks it up."""

import json

import gradio as gr
import pytest

from studio import store
from studio.jobs import JobRunner
from studio.ui import quantize_tab, views


def test_precisions_follow_the_target():
    cpu = quantize_tab.precision_choices("cpu", "fp16")
    assert cpu["choices"] == ["int4", "int8", "fp32"] and cpu["value"] == "int4"
    cuda = quantize_tab.precision_choices("cuda", "fp16")
    assert "bf16" in cuda["choices"] and cuda["value"] == "fp16"
    assert quantize_tab.gate_answer_length("classification") == 16
    assert quantize_tab.gate_answer_length("conversation") == 64


def test_quantize_from_the_form(home, bpe_lm):
    runner = JobRunner(home, inline=True)
    assert "None yet" in quantize_tab.quantized_md(home)
    run_id, status = quantize_tab.submit_quantize(
        runner,
        None,
        model=str(bpe_lm),
        precision="int8",
        dataset_dir="",
        min_quality_pct=101,
        max_rows=2,
        max_new_tokens=4,
    )
    # no model keeps 101% of its quality: the gate fails
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
        (onnx,) = store.artifacts(db, run_id=run_id, kind="onnx")
    assert row["status"] == "succeeded", row["error"]
    assert (home / onnx["path"] / "genai_config.json").is_file()
    meta = json.loads(onnx["meta_json"])
    assert meta["recipe"] == "int8 cpu block 32" and meta["verdict"] == "fail"
    text = views.summary_md(row)
    assert "Quality gate on 2 built-in prompts" in text and "decode tokens/s" in text
    assert "onnxruntime_genai.models.builder" in text
    assert "int8 cpu block 32" in quantize_tab.quantized_md(home)
    assert "**Next:** for quality, try fp32 cpu" in text
    button = quantize_tab.retry_button(home, run_id)
    assert button["visible"] and button["value"] == "Quantize again as fp32 cpu"
    new_id, _ = quantize_tab.retry_quantize(runner, None, run_id)  # one click down the ladder
    with store.connect(home) as db:
        retried = store.get_run(db, new_id)
    assert (
        retried["status"] == "succeeded"
        and json.loads(retried["config_json"])["precision"] == "fp32"
    )
    assert json.loads(retried["summary_json"])["gate"]["verdict"] == "fail"  # still 101%
    assert not quantize_tab.retry_button(home, new_id)["visible"]  # fp32 is the top rung


def test_form_mistakes_are_refused(home):
    runner = JobRunner(home, inline=True)
    with pytest.raises(gr.Error, match="block_size"):
        quantize_tab.submit_quantize(runner, None, model="bundled", block_size=48)
    with pytest.raises(gr.Error, match="NVIDIA GPU"):
        quantize_tab.submit_quantize(runner, None, execution_provider="cuda", format="bitsandbytes")
    with store.connect(home) as db:
        assert store.list_runs(db) == []


def test_quality_kept_says_what_it_rests_on():
    meta = {"quality_kept_pct": 97.1, "quality_rows": 36, "quality_kept_ci": [91.2, 103.0]}
    assert quantize_tab.kept_md(meta) == "97.1% [91–103%] on 36 rows"
    assert quantize_tab.kept_md({"quality_kept_pct": 92.7, "quality_by": "perplexity"}) == (
        "92.7% (by perplexity)"
    )
    from studio.ui import runs_tab

    gate = {
        "quality_kept_pct": 97.1,
        "pair": {"rows": 36, "kept_ci_low": 91.2, "kept_ci_high": 103},
    }
    assert (
        runs_tab._report_values({"gate": gate})["quality_kept_pct"] == "97.1 [91, 103] on 36 rows"
    )
