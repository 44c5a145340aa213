"""Model cards from a lineage record: Hub metadata (base model, datasets, model-index), the
lineage lines of every step, the gate and speed tables, usage per kind; checked locally."""

import pytest

from pipelines.base import StepError
from pipelines.lib import card

HOME = "/srv/studio-data"
LINEAGE = {
    "artifact": {"kind": "onnx", "name": "support int4", "bytes": 98 * 2**20, "sha256": "ab" * 32},
    "runs": [
        {
            "id": "20261130-100000-aaaa",
            "step": "dataset",
            "name": "support",
            "config": {"hub_dataset": "acme/support-intents", "files": []},
            "summary": {
                "rows_read": 360,
                "rows_kept": 358,
                "splits": {"train": 286, "validation": 36, "test": 36},
                "content_hash": "c0ffee",
            },
            "inputs": [],
        },
        {
            "id": "20261130-100100-bbbb",
            "step": "synthesize",
            "name": "teacher answers",
            "config": {
                "teacher": f"{HOME}/runs/20261130-090000-tttt/out/merged",
                "temperature": 0.7,
            },
            "summary": {
                "teacher": f"{HOME}/runs/20261130-090000-tttt/out/merged (local, transformers)",
                "valid": 280,
                "rows": 286,
                "success_ratio": 0.979,
                "splits": {"train": 280},
                "content_hash": "beef",
            },
            "inputs": [],
        },
        {
            "id": "20261130-100200-cccc",
            "step": "finetune",
            "name": "student",
            "config": {
                "method": "lora",
                "base_model": "bundled",
                "lora_r": 16,
                "lora_alpha": 32,
                "learning_rate": 0.0002,
                "batch_size": 8,
                "max_seq_len": 512,
                "teacher": f"{HOME}/runs/20261130-090000-tttt/out/merged",
            },
            "summary": {
                "steps": 40,
                "train_loss_first": 2.1,
                "train_loss": 0.4,
                "eval_loss_before": 2.3,
                "eval_loss": 0.5,
                "distillation": {"loss": "kl", "alpha": 0.5, "temperature": 2.0},
            },
            "inputs": [],
        },
        {
            "id": "20261130-100300-dddd",
            "step": "quantize",
            "name": "int4",
            "config": {
                "model": f"{HOME}/runs/20261130-100200-cccc/out/merged",
                "format": "onnx",
                "precision": "int4",
                "execution_provider": "cpu",
                "algorithm": "k_quant_mixed",
                "block_size": 32,
                "symmetric": True,
                "accuracy_level": 0,
                "adapter": "merge",
            },
            "summary": {
                "recipe": "int4 k_quant_mixed b32",
                "gate": {
                    "verdict": "pass",
                    "prompts": "36 test rows of support",
                    "hardware": "AMD EPYC, 2 cores",
                    "metric": "accuracy",
                    "checks": [
                        {
                            "name": "quality kept (%)",
                            "value": 97.0,
                            "op": ">=",
                            "target": 95,
                            "passed": True,
                        },
                    ],
                    "models": {
                        "source": {"perplexity": 10.2, "metric": 0.9, "decode_tokens_per_s": 12.0},
                        "quantized": {
                            "perplexity": 10.9,
                            "metric": 0.87,
                            "decode_tokens_per_s": 70.0,
                        },
                    },
                },
            },
            "inputs": [],
        },
    ],
    "measured": [
        {
            "id": "20261130-100400-eeee",
            "step": "benchmark",
            "name": "benchmark",
            "of_this": True,
            "summary": {
                "hardware": "AMD EPYC, 2 cores",
                "requests": 24,
                "decode_tokens_per_s": 71.3,
                "ttft_avg_s": 0.13,
                "ttft_p95_s": 0.2,
                "latency_avg_s": 1.0,
                "latency_p95_s": 1.2,
                "peak_memory_mb": 420,
            },
        },
    ],
}


def test_card_metadata_lineage_and_results():
    text = card.model_card(LINEAGE, "me/support-int4")
    card.check_card(text)
    from huggingface_hub import ModelCard

    data = ModelCard(text).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.base_model_relation == "quantized"
    assert data.datasets == ["acme/support-intents"]
    assert data.library_name == "onnxruntime-genai" and data.pipeline_tag == "text-generation"
    assert {"slmops-studio", "lora", "distillation", "onnx", "int4"} <= set(data.tags)
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"perplexity": 10.9, "accuracy": 0.87}
    body = ModelCard(text).text
    for fact in (
        "358 of 360 rows kept",
        "content hash `c0ffee`",
        "280 of 286 prompts",
        "r=16, alpha=32",
        "loss=kl",
        "int4 k_quant_mixed b32",
        "| quality kept (%) | 97 | >= 95 | yes |",
        "| AMD EPYC, 2 cores | 24 | 71.3 |",
        "420 MB",
        "onnxruntime_genai",
        "OpenAI(",
    ):
        assert fact in body, fact
    assert HOME not in text  # the teacher shows as 'merged of run ...', not a path here
    assert "merged of run 20261130-090000-tttt" in body


def test_card_usage_follows_the_kind():
    adapter = {**LINEAGE, "artifact": {**LINEAGE["artifact"], "kind": "adapter"}}
    text = card.model_card(adapter, "me/a")
    assert "AutoPeftModelForCausalLM" in text and "library_name: peft" in text
    assert "base_model_relation: adapter" in text
    merged = {**LINEAGE, "artifact": {**LINEAGE["artifact"], "kind": "model"}}
    text = card.model_card(merged, "me/m")
    assert 'pipeline("text-generation"' in text and "base_model_relation: finetune" in text


def test_check_card_names_what_is_missing():
    text = card.model_card(LINEAGE, "me/x", license="")
    with pytest.raises(StepError, match="lacks license"):
        card.check_card(text)
    with pytest.raises(StepError, match="not valid"):
        card.check_card("---\nlicense: [unclosed\n---\nbody")
