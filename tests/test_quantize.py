"""Quantization on tiny models: ONNX Runtime GenAI int4 and fp32 folders that load and generate,
the quality gate's report, a runtime-swappable LoRA adapter, and clear refusals."""

import json
import shutil

import pytest

from pipelines import quantize
from pipelines.base import Log, StepError
from pipelines.lib.gate import (
    CHECK_MEMORY,
    CHECK_PARITY,
    CHECK_QUALITY,
    CHECK_SPEED,
    quality_gate,
)
from pipelines.lib.generation import LocalModel, Sampling, open_model
from pipelines.lib.onnx_model import ADAPTER_FILE, OnnxModel, eos_ids
from pipelines.quantize import QuantizeConfig
from pipelines.reports import for_step

CHAT = [{"role": "user", "content": "hello world"}]
FIGURES = (
    "perplexity",
    "decode_tokens_per_s",
    "first_token_p50_s",
    "latency_p50_s",
    "memory_mb",
    "size_mb",
)


@pytest.fixture(scope="module")
def int4(bpe_lm, tmp_path_factory):
    """The tiny model in int4 with the gate on 4 built-in prompts (shared by several tests)."""
    workdir = tmp_path_factory.mktemp("int4")
    events = []
    config = QuantizeConfig(model=str(bpe_lm), max_rows=4, max_new_tokens=12)
    return quantize.run(config, workdir, events.append), workdir, events


def test_int4_folder_loads_generates_and_has_every_file(int4, bpe_lm):
    result, workdir, _ = int4
    folder = workdir / "onnx"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert (folder / "chat_template.jinja").read_text() == (
        bpe_lm / "chat_template.jinja"
    ).read_text()
    assert result.artifacts[0][:2] == ("onnx", "onnx")
    assert result.artifacts[0][2]["recipe"] == "int4 cpu k_quant_mixed block 32"
    assert not (workdir / "onnx.tmp").exists() and not (workdir / "checkpoints").exists()
    model = open_model(str(folder))
    assert isinstance(model, OnnxModel)
    reply = model.generate([CHAT], Sampling(max_new_tokens=5))[0]
    assert 1 <= reply.completion_tokens <= 5 and reply.first_token_s > 0
    assert (
        model.prompt_text(CHAT)
        == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    )
    model.close()


def test_gate_report_has_every_figure(int4):
    result, workdir, events = int4
    gate = result.summary["gate"]
    for role in ("source", "quantized"):
        for key in FIGURES:
            assert gate["models"][role][key] is not None, (role, key)
    assert gate["quality_by"] == "perplexity"
    assert gate["quality_kept_pct"] == pytest.approx(
        100 * gate["models"]["source"]["perplexity"] / gate["models"]["quantized"]["perplexity"],
        abs=0.1,
    )
    assert 0 < gate["size_ratio"] < 1  # int4 is smaller than the fp32 safetensors
    assert gate["parity"]["chat_template"] and gate["parity"]["tokens"]
    assert gate["parity"]["eos_match"]
    assert {c["name"] for c in gate["checks"]} == {
        "quality kept (%)",
        "decode speed-up (x)",
        "memory saved (%)",
        "chat template and end of sequence",
    }
    assert gate["verdict"] == ("pass" if all(c["passed"] for c in gate["checks"]) else "fail")
    assert 0 <= gate["agreement"]["prefix_match"] <= 1
    assert len(gate["samples"]) == 4
    saved = json.loads((workdir / "report.json").read_text())
    assert saved["gate"]["verdict"] == gate["verdict"]
    assert any(
        isinstance(e, Log) and "quality gate on 4 built-in prompts" in e.message for e in events
    )
    assert "quality kept" in for_step("quantize", result.summary).text()


def test_fp32_export_matches_the_source(bpe_lm, tmp_path, events):
    config = QuantizeConfig(model=str(bpe_lm), precision="fp32", max_rows=3, max_new_tokens=8)
    gate = quantize.run(config, tmp_path, events.append).summary["gate"]
    source, exported = gate["models"]["source"], gate["models"]["quantized"]
    assert exported["perplexity"] == pytest.approx(source["perplexity"], rel=1e-3)
    assert gate["agreement"]["identical"] == 1.0
    assert gate["parity"]["stop_parity"] == 1.0
    assert gate["quality_kept_pct"] == pytest.approx(100, abs=0.2)


def test_gate_catches_an_end_of_sequence_mismatch(int4, bpe_lm, tmp_path, events):
    """The #1 export bug: the quantized model does not stop where the source stops."""
    _, workdir, _ = int4
    broken = tmp_path / "broken"
    shutil.copytree(workdir / "onnx", broken)
    genai = json.loads((broken / "genai_config.json").read_text())
    genai["model"]["eos_token_id"] = 0
    (broken / "genai_config.json").write_text(json.dumps(genai))
    assert eos_ids(broken) == [0]
    config = QuantizeConfig(model=str(bpe_lm), max_rows=2, max_new_tokens=4)
    gate = quality_gate(config, bpe_lm, broken, events.append)
    assert not gate["parity"]["eos_match"] and not gate["parity"]["passed"]
    assert gate["verdict"] == "fail"
    assert "chat template" in quantize.suggestion(config, gate["checks"])
    assert quantize.proposal(config, gate["checks"]) is None  # the source's to fix, not a recipe


def test_the_ladder_proposes_the_next_recipe():
    def failing(*names):
        return [
            {"name": n, "passed": n not in names}
            for n in (
                CHECK_QUALITY,
                CHECK_SPEED,
                CHECK_MEMORY,
                CHECK_PARITY,
            )
        ]

    quality = failing(CHECK_QUALITY)
    steps = [QuantizeConfig(algorithm="rtn", block_size=128)]
    while (nxt := quantize.proposal(steps[-1], quality)) is not None:
        steps.append(nxt)
    assert [c.recipe() for c in steps] == [
        "int4 cpu rtn block 128",
        "int4 cpu k_quant_mixed block 32",
        "int8 cpu block 32",
        "fp32 cpu",
    ]
    cuda = QuantizeConfig(precision="int8", execution_provider="cuda")
    assert quantize.proposal(cuda, quality).precision == "fp16"
    assert (
        quantize.proposal(QuantizeConfig(precision="fp32"), failing(CHECK_MEMORY)).precision
        == "int4"
    )
    assert quantize.proposal(QuantizeConfig(), failing(CHECK_SPEED)) is None
    assert "int8 cpu block 32" in quantize.suggestion(QuantizeConfig(), quality)


def make_adapter(base_dir, out, rank=4):
    """A LoRA adapter on the tiny model with random (non-zero) weights, saved as finetune does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def test_separate_adapter_swaps_at_run_time(bpe_lm, tmp_path, events):
    """A LoRA kept as adapter_weights.onnx_adapter: the model alone is the base, and with the
    adapter active it answers like the merged model."""
    make_adapter(bpe_lm, tmp_path / "adapter")
    config = QuantizeConfig(
        model=str(tmp_path / "adapter"), precision="fp32", adapter="separate", gate=False
    )
    result = quantize.run(config, tmp_path / "run", events.append)
    folder = tmp_path / "run" / "onnx"
    assert result.artifacts[0][2]["adapter_file"] == ADAPTER_FILE
    assert (folder / ADAPTER_FILE).is_file()
    messages = [*CHAT, {"role": "assistant", "content": "good"}]
    tuned = LocalModel(str(tmp_path / "adapter")).perplexity([messages])
    plain = LocalModel(str(bpe_lm)).perplexity([messages])
    assert abs(tuned - plain) > 1e-3  # the adapter changes the model
    assert OnnxModel(folder, adapter=folder / ADAPTER_FILE).perplexity([messages]) == pytest.approx(
        tuned, rel=1e-3
    )
    assert OnnxModel(folder).perplexity([messages]) == pytest.approx(plain, rel=1e-3)


def test_adapter_is_merged_first_by_default(bpe_lm, tmp_path, events):
    make_adapter(bpe_lm, tmp_path / "adapter", rank=2)
    config = QuantizeConfig(model=str(tmp_path / "adapter"), precision="int8", gate=False)
    quantize.run(config, tmp_path / "run", events.append)
    assert not (tmp_path / "run" / "onnx" / ADAPTER_FILE).exists()
    assert OnnxModel(tmp_path / "run" / "onnx").generate([CHAT], Sampling(max_new_tokens=3))


def test_unsupported_or_broken_models_get_a_clear_message_and_no_artifact(tmp_path, events):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny import build_tiny_bpe_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(
        tmp_path / "gpt2"
    )
    build_tiny_bpe_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(StepError, match="does not support this model's architecture"):
        quantize.run(QuantizeConfig(model=str(tmp_path / "gpt2")), tmp_path / "a", events.append)
    assert not (tmp_path / "a" / "onnx").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepError, match="holds no model"):
        quantize.run(QuantizeConfig(model=str(tmp_path / "empty")), tmp_path / "b", events.append)


def test_refusals_name_the_problem(bpe_lm, tmp_path, events):
    with pytest.raises(ValueError, match="fp16 is not offered for cpu.*slower than fp32"):
        QuantizeConfig(precision="fp16")
    with pytest.raises(ValueError, match="block_size must be one of"):
        QuantizeConfig(block_size=48)
    with pytest.raises(ValueError, match="k_quant algorithms work on blocks of 16 or 32"):
        QuantizeConfig(block_size=128)
    assert QuantizeConfig(block_size=128, algorithm="rtn").block_size == 128
    with pytest.raises(ValueError, match="KEY=VALUE"):
        QuantizeConfig(extra_options="block_size")
    with pytest.raises(StepError, match="tied"):
        quantize.run(QuantizeConfig(model=str(bpe_lm), symmetric=False), tmp_path, events.append)
    config = QuantizeConfig(model=str(bpe_lm), format="bitsandbytes", execution_provider="cuda")
    with pytest.raises(StepError, match="NVIDIA GPU.*ONNX int4"):
        quantize.run(config, tmp_path, events.append)


def test_builder_options_follow_the_config():
    options = quantize.builder_options(
        QuantizeConfig(
            block_size=16, accuracy_level=1, extra_options="shared_embeddings=true block_size=128"
        )
    )
    assert options == {
        "hf_token": "false",
        "block_size": "128",
        "algo_config": "k_quant_mixed",
        "accuracy_level": "1",
        "shared_embeddings": "true",
    }
    assert quantize.builder_options(QuantizeConfig(precision="fp32")) == {"hf_token": "false"}


@pytest.mark.parametrize(
    "option", ["filename=/data/studio.db", "adapter_path=/etc", "hf_remote=true", "hf_token=x"]
)
def test_builder_options_that_touch_files_or_the_network_are_refused(option):
    """Only recipe and graph options reach the model builder (an allow-list)."""
    with pytest.raises(ValueError, match="is not a builder option the studio passes on"):
        QuantizeConfig(extra_options=f"block_size=32 {option}")
    assert QuantizeConfig(extra_options="shared_embeddings=true accuracy_level=4").extra_options
