"""Finetune step on a tiny model: LoRA, QLoRA, full, answer-only loss, merge, cancel, memory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines import finetune
from pipelines.base import Cancelled, Log, Metrics, Progress
from pipelines.finetune import FinetuneConfig
from pipelines.lib import launch, memory, models, templates


def _config(tiny_lm, tiny_dataset, **kwargs):
    return FinetuneConfig(
        **{
            "base_model": str(tiny_lm),
            "dataset_dir": str(tiny_dataset),
            "max_steps": 4,
            "batch_size": 4,
            "eval_steps": 2,
            "save_steps": 2,
            "learning_rate": 1e-2,
            "lora_r": 4,
            **kwargs,
        }
    )


def test_lora_trains_saves_adapter_and_merged_model(tiny_lm, tiny_dataset, tmp_path, events):
    result = finetune.run(_config(tiny_lm, tiny_dataset), tmp_path, events.append)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # it moved
    assert (tmp_path / "merged" / "config.json").exists()
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
    assert [kind for kind, _, _ in result.artifacts] == ["adapter", "model"]
    done = [e.done for e in events if isinstance(e, Progress) and e.total == 4]
    assert done == sorted(done) and done[-1] == 4
    keys = {k for e in events if isinstance(e, Metrics) for k in e.values}
    assert {"loss", "learning_rate", "eval_loss", "memory_mb", "tokens_per_s"} <= keys
    summary = result.summary
    assert summary["steps"] == 4 and summary["eval_loss"] is not None
    assert 0 <= summary["padding_share"] < 0.5 and summary["tokens_per_s"] > 0
    assert not (tmp_path / "checkpoints").exists()  # removed once the run succeeded


def test_merged_logits_equal_base_plus_adapter(tiny_lm, tiny_dataset, tmp_path, events):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    finetune.run(_config(tiny_lm, tiny_dataset), tmp_path, events.append)
    ids = torch.tensor([[1, 5, 7, 8, 2, 6, 12]])
    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    plain = base(ids).logits
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    assert not torch.allclose(plain, with_adapter, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)


def test_full_finetuning_changes_the_weights(tiny_lm, tiny_dataset, tmp_path, events):
    result = finetune.run(_config(tiny_lm, tiny_dataset, method="full"), tmp_path, events.append)
    before = load_file(tiny_lm / "model.safetensors")
    after = load_file(tmp_path / "model" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert [kind for kind, _, _ in result.artifacts] == ["model"]


def test_qlora_runs_on_cpu_with_a_warning(tiny_dataset, tmp_path, events):
    from tests.tiny import build_tiny_causal_lm

    wider = build_tiny_causal_lm(tmp_path / "wide", hidden_size=64)  # 4-bit CPU kernels' blocks
    result = finetune.run(
        _config(wider, tiny_dataset, method="qlora", max_steps=2), tmp_path / "out", events.append
    )
    assert (tmp_path / "out" / "merged" / "config.json").exists()
    assert any(isinstance(e, Log) and "QLoRA on CPU" in e.message for e in events)
    assert result.summary["method"] == "qlora"


def test_only_assistant_tokens_carry_loss(tiny_lm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    messages = [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "good world"},
        {"role": "user", "content": "the"},
        {"role": "assistant", "content": "bad"},
    ]
    ids, labels = templates.chat_labels(tokenizer, messages, assistant_only=True)
    learned = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert learned.split() == ["assistant", "good", "world", "</s>", "assistant", "bad", "</s>"]
    _, all_labels = templates.chat_labels(tokenizer, messages, assistant_only=False)
    assert all_labels == ids


@pytest.mark.slow
def test_assistant_masking_on_the_bundled_template():
    from pipelines.lib.models import load_tokenizer

    tokenizer = load_tokenizer("bundled")  # SmolLM2: no {% generation %} markers in its template
    messages = [
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "shipping"},
    ]
    ids, labels = templates.chat_labels(tokenizer, messages, assistant_only=True)
    learned = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert learned.strip() == "shipping<|im_end|>"


def test_text_template_trains_on_the_whole_text(tiny_lm, tiny_dataset, tmp_path, events):
    config = _config(
        tiny_lm,
        tiny_dataset,
        use_chat_template=False,
        max_steps=2,
        text_template="{text}\\n{label}",
        merge=False,
    )
    assert finetune.run(config, tmp_path, events.append).summary["steps"] == 2
    with pytest.raises(Exception, match="'nope'"):
        finetune.run(
            _config(tiny_lm, tiny_dataset, text_template="{nope}", max_steps=1),
            tmp_path / "x",
            events.append,
        )


def test_cancel_saves_and_resume_continues_at_the_same_step(tiny_lm, tiny_dataset, tmp_path):
    config = _config(tiny_lm, tiny_dataset, max_steps=6, save_steps=100)

    def cancel_at_step_3(event):
        if isinstance(event, Progress) and event.total == 6 and event.done == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        finetune.run(config, tmp_path, cancel_at_step_3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-3"]
    events = []
    result = finetune.run(config, tmp_path, events.append)
    steps = [e.done for e in events if isinstance(e, Progress) and e.total == 6]
    assert steps[0] == 4 and steps[-1] == 6
    assert any(isinstance(e, Log) and "resuming from checkpoint-3" in e.message for e in events)
    assert result.summary["steps"] == 6


def test_memory_estimate_grows_with_batch_and_length(tiny_lm, tiny_dataset):
    arch = models.BUNDLED_ARCH

    def total(**kwargs):
        return memory.estimate_memory(arch, _config(tiny_lm, tiny_dataset, **kwargs), False)

    small = total(batch_size=1, max_seq_len=128)
    assert total(batch_size=8, max_seq_len=128)["total"] > small["total"]
    assert total(batch_size=1, max_seq_len=1024)["total"] > small["total"]
    assert total(batch_size=1, max_seq_len=128, method="full")["optimizer"] > small["optimizer"]
    assert (
        total(batch_size=8, max_seq_len=1024, gradient_checkpointing=True)["activations"]
        < total(batch_size=8, max_seq_len=1024)["activations"]
    )
    assert 130e6 < small["parameters"] < 140e6  # SmolLM2-135M
    huge = memory.estimate_memory(
        arch, _config(tiny_lm, tiny_dataset, batch_size=512, max_seq_len=8192), False, 24 * 2**30
    )
    assert huge["fits"] is False and "lower the batch size" in memory.format_estimate(huge)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "dpo"}, "method must be one of"),
        ({"lora_r": 0}, "lora_r must be >= 1"),
        ({"learning_rate": 2}, "learning_rate must be in"),
        ({"use_chat_template": False}, "text_template"),
        ({"early_stopping_patience": 2, "eval_steps": 0}, "needs eval_steps"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(dataset_dir="d", **kwargs)


def test_an_adapter_is_refused_as_base(tiny_lm, tiny_dataset, tmp_path, events):
    from pipelines.base import StepError

    (tmp_path / "adapter_config.json").write_text(json.dumps({}))
    with pytest.raises(StepError, match="is an adapter"):
        finetune.run(
            _config(tiny_lm, tiny_dataset, base_model=str(tmp_path)), tmp_path / "o", events.append
        )


@pytest.mark.slow
def test_two_processes_through_accelerate_report_save_and_cancel(tiny_lm, tiny_dataset, tmp_path):
    """The several-GPU path, run here with two CPU processes (gloo): rank 0's events reach the
    reporter, outputs are saved once, and a cancel stops every rank at the same step."""
    config = _config(tiny_lm, tiny_dataset, max_steps=4, batch_size=2)
    events = []
    result = launch.launch(
        "pipelines.finetune", config, tmp_path / "a", events.append, 2, cuda=False
    )
    assert result.summary["steps"] == 4
    assert (tmp_path / "a" / "merged" / "config.json").exists()
    assert [e.done for e in events if isinstance(e, Progress) and e.total == 4][-1] == 4

    def cancel_at_2(event):
        if isinstance(event, Progress) and event.total == 400 and event.done >= 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        launch.launch(
            "pipelines.finetune",
            _config(tiny_lm, tiny_dataset, max_steps=400, batch_size=2, save_steps=100),
            tmp_path / "b",
            cancel_at_2,
            2,
            cuda=False,
        )
    assert list((tmp_path / "b" / "checkpoints").glob("checkpoint-*"))
