"""A model to ONNX Runtime GenAI (int4 / int8 / fp16 / bf16 / fp32 for cpu, cuda, dml, webgpu)
with onnxruntime-genai's model builder, or to bitsandbytes 4/8-bit (CUDA), and the quality gate:
the source and the quantized model on the same held-out prompts.

Run as: python -m pipelines.quantize --config cfg.json --workdir out/
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.base import (
    CHECKPOINT_DIR,
    Cancelled,
    Log,
    Metrics,
    Progress,
    Reporter,
    StepError,
    StepResult,
    main,
    option,
)
from pipelines.tasks import TaskFields

Precision = Literal["int4", "int8", "fp16", "bf16", "fp32"]
Provider = Literal["cpu", "cuda", "dml", "webgpu"]
Algorithm = Literal["k_quant_mixed", "k_quant_last", "k_quant", "rtn_last", "rtn", "default"]
# what the builder can make, and what is worth making: ONNX Runtime has no fp16 CPU kernels
# (it would cast back to fp32 and run slower), so fp16/bf16 are offered on GPUs only
SUPPORTED: dict[str, tuple[str, ...]] = {
    "cpu": ("int4", "int8", "fp32"),
    "cuda": ("int4", "int8", "fp16", "bf16", "fp32"),
    "dml": ("int4", "fp16"),
    "webgpu": ("int4", "int8"),
}
BLOCK_SIZES = (16, 32, 64, 128, 256)
BUILTIN_PROMPTS = Path(__file__).parent / "samples" / "heldout_chat.jsonl"
MIN_STOP_PARITY = 0.8  # share of prompts where both models stop the same way
ONNX_DIR, BNB_DIR = "onnx", "bnb"


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig(TaskFields):
    model: str = option(
        "bundled",
        "Model",
        "A merged or full model, an adapter (merged into its base first), a folder or a Hub id.",
    )
    format: Literal["onnx", "bitsandbytes"] = option(
        "onnx",
        "Format",
        "onnx: an ONNX Runtime GenAI folder (any machine). bitsandbytes: a transformers "
        "folder with 4-bit (NF4) or 8-bit weights, for serving with transformers on CUDA.",
    )
    precision: Precision = option(
        "int4", "Precision", "int4 is the smallest and fastest; int8 keeps more quality."
    )
    execution_provider: Provider = option(
        "cpu", "Target", "Where the model will run: cpu, cuda (NVIDIA), dml (DirectML), webgpu."
    )
    algorithm: Algorithm = option(
        "k_quant_mixed",
        "int4 algorithm",
        "k_quant_mixed: k-quant with the output layer and the most sensitive layers in int8 "
        "(the best quality, a little slower); k_quant_last: only the output layer in int8; "
        "rtn / default: plain round-to-nearest (fastest to build, loses the most).",
    )
    block_size: int = option(32, "Block size", "Weights per int4/int8 scale: 16-256.")
    symmetric: bool = option(
        True, "Symmetric", "Symmetric int4/int8; asymmetric (uint) is refused for tied embeddings."
    )
    accuracy_level: int = option(
        0,
        "Accuracy level",
        "Compute type of int4/int8 matmuls: 1 fp32, 2 fp16, 3 bf16, 4 int8; 0 = the builder's "
        "default (4 on CPU).",
    )
    adapter: Literal["merge", "separate"] = option(
        "merge",
        "Adapter",
        "For an adapter: merge it into the base first, or keep it as a separate "
        "adapter_weights.onnx_adapter that can be swapped at run time (multi-LoRA serving).",
    )
    extra_options: str = option(
        "",
        "Builder options",
        "More KEY=VALUE options for the model builder, separated by spaces "
        "(e.g. shared_embeddings=true); they override the settings above.",
    )
    gate: bool = option(
        True, "Quality gate", "Run the source and the quantized model on held-out prompts."
    )
    dataset_dir: str = option(
        "",
        "Held-out dataset",
        "A dataset folder whose test (or validation) rows are the gate's prompts; empty uses "
        "12 built-in general prompts.",
    )
    split: Literal["test", "validation"] = option("test", "Split", "Held-out rows to use.")
    max_rows: int = option(12, "Gate prompts", "Prompts each model answers (one at a time).")
    max_new_tokens: int = option(64, "Answer length", "Longest answer in the gate, in tokens.")
    min_quality_pct: float = option(
        95.0, "Min quality kept (%)", "Quality of the quantized model against the source."
    )
    min_speedup: float = option(
        2.0, "Min speed-up (x)", "Decode tokens/s of the quantized model over the source's."
    )
    min_memory_saved_pct: float = option(
        50.0, "Min memory saved (%)", "Less memory than the source while answering."
    )

    def __post_init__(self):
        self.check_task()
        if not self.model.strip():
            raise ValueError("model must name a model")
        if self.format == "onnx" and self.precision not in SUPPORTED[self.execution_provider]:
            raise ValueError(
                f"precision {self.precision} is not offered for {self.execution_provider}: "
                f"choose one of {', '.join(SUPPORTED[self.execution_provider])}"
                + (
                    " (fp16/bf16 run slower than fp32 on a CPU)"
                    if self.precision in ("fp16", "bf16") and self.execution_provider == "cpu"
                    else ""
                )
            )
        if self.format == "bitsandbytes" and (
            self.precision not in ("int4", "int8") or self.execution_provider != "cuda"
        ):
            raise ValueError("bitsandbytes export is int4 or int8 for the cuda target")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if (
            self.precision == "int4"
            and self.algorithm.startswith("k_quant")
            and (self.block_size > 32)
        ):
            raise ValueError(
                f"the k_quant algorithms work on blocks of 16 or 32 weights, not "
                f"{self.block_size}: choose block_size 32, or the rtn algorithm"
            )
        if not 0 <= self.accuracy_level <= 4:
            raise ValueError(f"accuracy_level must be 0-4, got {self.accuracy_level}")
        for pair in self.extra_options.split():
            if "=" not in pair or pair.startswith("="):
                raise ValueError(f"extra_options must be KEY=VALUE pairs, got {pair!r}")
        if self.max_rows < 1 or self.max_new_tokens < 1:
            raise ValueError("max_rows and max_new_tokens must be >= 1")

    @property
    def queue(self) -> str:
        return "compute"

    def recipe(self) -> str:
        """The recipe in a few words, for names, cards and logs."""
        if self.format == "bitsandbytes":
            return f"bitsandbytes {'nf4' if self.precision == 'int4' else 'int8'}"
        text = f"{self.precision} {self.execution_provider}"
        if self.precision == "int4":
            text += f" {self.algorithm}"
        if self.precision in ("int4", "int8"):
            text += f" block {self.block_size}" + ("" if self.symmetric else " asymmetric")
        return text


CONFIG = QuantizeConfig


def run(config: QuantizeConfig, workdir: Path, report: Reporter) -> StepResult:
    """Convert (or quantize) the model, then measure both on the gate's prompts."""
    from pipelines.models import resolve_model

    path = Path(resolve_model(config.model))
    work = workdir / CHECKPOINT_DIR
    work.mkdir(parents=True, exist_ok=True)
    adapter = (path / "adapter_config.json").exists()
    if config.format == "bitsandbytes":
        source, out, meta = _bitsandbytes(config, path, workdir, report)
    else:
        source, out, meta = _onnx(config, path, adapter, workdir, report)
    summary: dict[str, Any] = {
        "model": config.model,
        "source": str(source),
        "recipe": config.recipe(),
        "format": config.format,
        "precision": config.precision,
        "execution_provider": config.execution_provider,
        **meta,
    }
    if config.gate:
        summary["gate"] = quality_gate(config, source, out, report, meta.get("adapter_file"))
        report(Metrics(step=0, values=_flat(summary["gate"])))
        (workdir / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        report(Log(format_report(summary)))
    shutil.rmtree(work, ignore_errors=True)  # merged copies and the builder cache
    gate = summary.get("gate", {})
    name = f"{_display_name(config.model)} {config.recipe()}"
    artifact_meta = {
        "name": name,
        "recipe": config.recipe(),
        "source_model": config.model,
        **{k: v for k, v in meta.items() if k != "builder_command"},
        **{k: gate.get(k) for k in ("verdict", "quality_kept_pct", "speedup", "size_ratio")},
    }
    kind = "onnx" if config.format == "onnx" else "model"
    artifacts = [(kind, out.name, artifact_meta)]
    if config.gate:
        artifacts.append(
            ("report", "report.json", {"name": f"{name} gate", "verdict": gate.get("verdict")})
        )
    return StepResult(artifacts=artifacts, summary=summary)


# --- ONNX Runtime GenAI ------------------------------------------------------------------------


def _onnx(
    config: QuantizeConfig, path: Path, adapter: bool, workdir: Path, report: Reporter
) -> tuple[Path, Path, dict[str, Any]]:
    work = workdir / CHECKPOINT_DIR
    options = builder_options(config)
    adapter_dir = None
    if adapter and config.adapter == "merge":
        report(Progress(0, None, "merging the adapter into its base"))
        source = work / "merged"
        if not (source / "config.json").exists():
            from pipelines.finetune import merge_adapter

            shutil.rmtree(source, ignore_errors=True)
            merge_adapter(_adapter_base(path), path, source)
    elif adapter:
        adapter_dir, source = path, Path(_adapter_base(path))
        options["adapter_path"] = str(path)
        if config.precision in ("int4", "int8"):  # the adapter stays full precision
            options["nodes_to_exclude"] = ",".join(lora_nodes(path))
    else:
        source = path
    if source.is_file():  # a .gguf file: the builder reads only fp16/fp32 GGUF, so convert
        source = _from_gguf(source, work / "source")
    _check_builder_input(config, source)
    out = workdir / ONNX_DIR
    tmp = workdir / (ONNX_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(source), "-o", str(tmp),
        "-p", config.precision, "-e", config.execution_provider,
        "-c", str(work / "builder-cache"),
        "--extra_options", *[f"{k}={v}" for k, v in options.items()],
    ]  # fmt: skip
    report(Log("model builder: " + " ".join(command[1:])))
    started = time.perf_counter()
    _build(command, workdir / "builder.log", _layers(source), report)
    meta: dict[str, Any] = {"build_seconds": round(time.perf_counter() - started, 1)}
    if adapter_dir is not None:
        meta["adapter_file"] = extract_adapter(tmp, adapter_dir)
    _copy_chat_template(source, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the folder appears complete or not at all
    meta.update(
        builder_options={k: v for k, v in options.items() if k != "nodes_to_exclude"},
        builder_command=" ".join(command[1:]),
        bytes=_folder_bytes(out),
    )
    return source if adapter_dir is None else adapter_dir, out, meta


def builder_options(config: QuantizeConfig) -> dict[str, str]:
    """The model builder's --extra_options for a config (the user's own ones win)."""
    options = {"hf_token": "false"}  # never send a stored token anywhere from here
    if config.precision in ("int4", "int8"):
        options["block_size"] = str(config.block_size)
        if config.precision == "int4":
            options["algo_config"] = config.algorithm
        if not config.symmetric:
            options["is_symmetric"] = "false"
        if config.accuracy_level:
            options["accuracy_level"] = str(config.accuracy_level)
    for pair in config.extra_options.split():
        key, value = pair.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def _check_builder_input(config: QuantizeConfig, source: Path) -> None:
    """Refuse, before building, what the builder would make broken."""
    model_config = json.loads((source / "config.json").read_text())
    if not config.symmetric and model_config.get("tie_word_embeddings"):
        raise StepError(
            "asymmetric int4/int8 builds a model that fails to load when the input and output "
            "embeddings are tied (as in this model): keep 'Symmetric' on."
        )


def _build(command: list[str], log_path: Path, layers: int, report: Reporter) -> None:
    """Run the model builder, following its output for progress; its log is kept."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HF_TOKEN", None)
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        lines: list[str] = []
        try:
            for line in process.stdout:
                log.write(line)
                lines = [*lines[-40:], line.rstrip()]
                layer = re.match(r"Reading layer (\d+)", line)
                if layer:
                    report(Progress(int(layer.group(1)) + 1, layers + 2, "reading the layers"))
                elif "quantize" in line and "start to quantize" in line:
                    report(Progress(layers + 1, layers + 2, "quantizing the weights"))
                elif line.startswith("Saving ONNX model"):
                    report(Progress(layers + 2, layers + 2, "saving the ONNX model"))
        except Cancelled:
            process.kill()
            process.wait()
            raise
        if process.wait() != 0:
            raise StepError(_builder_error(lines, log_path))


def _builder_error(lines: list[str], log_path: Path) -> str:
    text = "\n".join(lines)
    if "is not currently supported" in text:
        return (
            "the ONNX Runtime GenAI model builder does not support this model's architecture "
            "(it supports Llama, Mistral, Phi, Qwen, Gemma, SmolLM3, Granite and a few more). "
            "Pick a model of a supported family, or use format 'bitsandbytes' on a GPU."
        )
    last = next((line for line in reversed(lines) if line.strip()), "no output")
    return f"the model builder failed: {last.strip()[:400]} (full log: {log_path})"


def lora_nodes(adapter_dir: Path) -> list[str]:
    """The builder's node names of an adapter's LoRA matmuls (kept out of quantization)."""
    from safetensors import safe_open

    names = []
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            match = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_[AB])\.weight", key)
            if match:
                layer, block, proj, part = match.groups()
                block = "attn" if block == "self_attn" else block
                names.append(f"/model/layers.{layer}/{block}/{proj}/{part}/MatMul")
    if not names:
        raise StepError(f"{adapter_dir} holds no LoRA weights of attention or MLP layers")
    return names


def extract_adapter(folder: Path, adapter_dir: Path) -> str:
    """Turn the LoRA weights the builder baked into model.onnx into inputs that default to zero
    (the model alone is the base) and save them as adapter_weights.onnx_adapter, which
    onnxruntime-genai's Adapters load and swap at run time."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    graph = model.graph
    weights: dict[str, Any] = {}
    for tensor in graph.initializer:
        if ".lora_A." in tensor.name or ".lora_B." in tensor.name:
            array = numpy_helper.to_array(tensor)
            weights[tensor.name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(array), tensor.name))
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(array.shape))
            )
    if not weights:
        raise StepError("the model builder kept no LoRA weights to extract from the adapter")
    for f in folder.glob("model.onnx*"):
        f.unlink()
    onnx.save(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
    )
    from pipelines.onnx_model import ADAPTER_FILE

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(weights)
    adapter.export_adapter(str(folder / ADAPTER_FILE))
    return ADAPTER_FILE


def _adapter_base(adapter_dir: Path) -> str:
    from pipelines.models import resolve_model

    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    if not base:
        raise StepError(f"{adapter_dir}/adapter_config.json does not name its base model")
    return resolve_model(base)


def _from_gguf(path: Path, out: Path) -> Path:
    from pipelines.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(path))
    model.hf_quantizer, model.is_quantized = None, False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _copy_chat_template(source: Path, folder: Path) -> None:
    """Keep the source's chat template beside the ONNX model (the #1 cause of 'fine in the
    trainer, garbage after export' is a template that did not travel)."""
    template = source / "chat_template.jinja"
    if template.exists() and not (folder / template.name).exists():
        shutil.copy(template, folder / template.name)


def _layers(source: Path) -> int:
    try:
        return int(json.loads((source / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError):
        return 1


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _display_name(spec: str) -> str:
    path = Path(spec)
    if spec in ("", "bundled"):
        return "SmolLM2-135M-Instruct"
    if path.name in ("merged", "model", "adapter") and path.parent.name == "out":
        return f"{path.parent.parent.name} {path.name}"  # runs/<id>/out/merged
    return path.name or spec


# --- bitsandbytes ------------------------------------------------------------------------------


def _bitsandbytes(
    config: QuantizeConfig, path: Path, workdir: Path, report: Reporter
) -> tuple[Path, Path, dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        raise StepError(
            "bitsandbytes 4-bit and 8-bit models are for serving with transformers on an "
            "NVIDIA GPU, and this machine has none. For a CPU, quantize to ONNX int4 or int8."
        )
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from pipelines.models import load_tokenizer

    if config.precision == "int4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    source = path
    if (path / "adapter_config.json").exists():
        from pipelines.finetune import merge_adapter

        source = workdir / CHECKPOINT_DIR / "merged"
        merge_adapter(_adapter_base(path), path, source)
    report(Progress(0, None, f"loading {path.name} in {config.recipe()}"))
    model = AutoModelForCausalLM.from_pretrained(
        str(source), quantization_config=quantization, device_map="cuda"
    )
    out, tmp = workdir / BNB_DIR, workdir / (BNB_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(str(source)).save_pretrained(tmp)
    del model
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return source, out, {"bytes": _folder_bytes(out)}


# --- the quality gate --------------------------------------------------------------------------


def quality_gate(
    config: QuantizeConfig,
    source: Path,
    out: Path,
    report: Reporter,
    adapter_file: str | None = None,
) -> dict[str, Any]:
    """The source and the quantized model answer the same held-out prompts one at a time:
    quality (task metric or perplexity), greedy agreement, chat template and end-of-sequence
    parity, size, decode speed, time to first token and memory, against the user's gates."""
    from pipelines.evaluate import held_out
    from pipelines.generation import LocalModel, Sampling
    from pipelines.tasks import build_task, dataset_labels

    if config.dataset_dir:
        folder = Path(config.dataset_dir)
        rows, split = held_out(folder, config.split, config.max_rows)
        labels = dataset_labels(folder) if config.task == "classification" else []
        task = config.build(labels)
        prompts_from = f"{len(rows)} {split} rows of {folder.parent.name or folder.name}"
    else:
        with BUILTIN_PROMPTS.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][: config.max_rows]
        task = build_task("conversation")
        prompts_from = f"{len(rows)} built-in prompts"
    prompts = [task.messages(r) for r in rows]
    references = [r.get("reference") or task.reference(r) for r in rows]
    conversations = [
        [*p, {"role": "assistant", "content": ref}]
        for p, ref in zip(prompts, references, strict=True)
        if ref
    ]
    sampling = Sampling(temperature=0.0, max_new_tokens=config.max_new_tokens)
    report(Log(f"quality gate on {prompts_from}, greedy, up to {config.max_new_tokens} tokens"))
    measured_on, note = _gate_device(config, out)
    quantized = _open_quantized(config, out, measured_on, adapter_file)
    results, replies = {}, {}
    results["quantized"], replies["quantized"] = _measure(
        "quantized", quantized, prompts, conversations, sampling, report, 0
    )
    results["source"], replies["source"] = _measure(
        "source", LocalModel(str(source)), prompts, conversations, sampling, report, 1
    )
    from pipelines.models import load_tokenizer

    tokenizer = load_tokenizer(str(source))
    parity = _parity(config, tokenizer, source, out, prompts, replies, adapter_file)
    for role in results:
        texts = [r.text or "" for r in replies[role]]
        scored = [task.score(t, ref) for t, ref in zip(texts, references, strict=True) if ref]
        results[role]["metric"] = _mean(scored) if scored else None
    agreement = _agreement(tokenizer, replies["source"], replies["quantized"])
    gate = _gates(config, task.metric, results)
    gate.update(
        prompts=prompts_from,
        measured_on=measured_on,
        note=note,
        models=results,
        agreement=agreement,
        parity=parity,
        samples=[
            {
                "prompt": prompts[i][-1]["content"][:300],
                "source": (replies["source"][i].text or "")[:300],
                "quantized": (replies["quantized"][i].text or "")[:300],
            }
            for i in range(min(6, len(prompts)))
        ],
    )
    gate["checks"].append(
        {
            "name": "chat template and end of sequence",
            "value": parity["stop_parity"],
            "op": ">=",
            "target": MIN_STOP_PARITY,
            "passed": parity["passed"],
        }
    )
    gate["verdict"] = "pass" if all(c["passed"] for c in gate["checks"]) else "fail"
    gate["suggestion"] = suggestion(config, gate["checks"])
    return gate


def _gate_device(config: QuantizeConfig, out: Path) -> tuple[str, str]:
    """Where the quantized model is measured: on its target when this machine has it."""
    if config.format == "bitsandbytes" or config.execution_provider == "cpu":
        return config.execution_provider, ""
    import onnxruntime_genai as og

    available = {
        "cuda": og.is_cuda_available(),
        "dml": og.is_dml_available(),
        "webgpu": og.is_webgpu_available(),
    }[config.execution_provider]
    if available:
        return config.execution_provider, ""
    return "cpu", (
        f"this machine has no {config.execution_provider}: the model ran on the CPU, so quality "
        "and parity hold for the target but its speed there will differ"
    )


def _open_quantized(config, out: Path, measured_on: str, adapter_file: str | None) -> Any:
    from pipelines.generation import LocalModel
    from pipelines.onnx_model import OnnxModel

    if config.format == "bitsandbytes":
        return LocalModel(str(out))
    return OnnxModel(
        out,
        on_cpu=measured_on == "cpu" and config.execution_provider != "cpu",
        adapter=out / adapter_file if adapter_file else None,
    )


def _measure(role, model, prompts, conversations, sampling, report, index) -> tuple[dict, list]:
    total = len(prompts)
    replies = []
    try:
        for i, prompt in enumerate(prompts):
            replies.append(model.generate([prompt], sampling)[0])
            report(Progress(index * total + i + 1, 2 * total, f"{role}: {i + 1}/{total} answered"))
        perplexity = model.perplexity(conversations) if conversations else None
        size = model.size_bytes()
    finally:
        model.close()
    report(Progress(index * total + total, 2 * total, f"{role}: measuring its memory"))
    memory = memory_probe(model, prompts[0], sampling)
    decode_tokens = sum(max(0, r.completion_tokens - 1) for r in replies)
    decode_seconds = sum(r.seconds - (r.first_token_s or 0) for r in replies)
    first = sorted(r.first_token_s for r in replies if r.first_token_s is not None)
    result = {
        "perplexity": perplexity,
        "decode_tokens_per_s": round(decode_tokens / decode_seconds, 1) if decode_seconds else None,
        "first_token_p50_s": round(first[len(first) // 2], 4) if first else None,
        "latency_p50_s": round(sorted(r.seconds for r in replies)[total // 2], 4),
        "memory_mb": round(memory / 2**20, 1),
        "size_mb": round(size / 2**20, 1),
        "stopped": sum(bool(r.stopped) for r in replies),
    }
    report(Log(f"{role}: {_describe(result)}"))
    return result, replies


def memory_probe(model: Any, prompt: list[dict[str, str]], sampling: Any) -> int:
    """Peak memory a fresh process needs to load the model and answer one prompt: its resident
    set's growth after the libraries are imported (on CUDA, the peak allocated). Measured apart,
    because memory this process freed earlier would hide what the next model takes."""
    from pipelines.onnx_model import OnnxModel

    args = {
        "path": str(model.path),
        "onnx": isinstance(model, OnnxModel),
        "on_cpu": getattr(model, "on_cpu", False),
        "adapter": str(model.adapter) if getattr(model, "adapter", None) else None,
        "prompt": prompt,
        "max_new_tokens": min(16, sampling.max_new_tokens),
    }
    result = subprocess.run(
        [sys.executable, "-c", "from pipelines import quantize; quantize._probe_child()", "--"]
        + [json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise StepError(f"measuring the memory of {model.path} failed: {result.stderr[-500:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _probe_child() -> None:
    import resource

    import psutil

    args = json.loads(sys.argv[-1])
    if args["onnx"]:  # an ONNX model is served without torch: its baseline has no torch either
        import onnxruntime_genai  # noqa: F401

        from pipelines.onnx_model import OnnxModel

        base = psutil.Process().memory_info().rss
        model = OnnxModel(args["path"], on_cpu=args["on_cpu"], adapter=args["adapter"])
    else:
        import torch
        import transformers  # noqa: F401

        from pipelines.generation import LocalModel

        base = psutil.Process().memory_info().rss
        model = LocalModel(args["path"])
    from pipelines.generation import Sampling

    model.generate([args["prompt"]], Sampling(max_new_tokens=args["max_new_tokens"]))
    if not args["onnx"] and torch.cuda.is_available():
        print(torch.cuda.max_memory_allocated())
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def _parity(config, tokenizer, source, out, prompts, replies, adapter_file) -> dict[str, Any]:
    """Does the quantized model see the prompts the source sees, and stop where it stops?"""
    checks: dict[str, Any] = {}
    if config.format == "onnx":
        from pipelines.onnx_model import OnnxModel, eos_ids

        model = OnnxModel(out, on_cpu=True)
        try:
            same_text = same_ids = True
            for prompt in prompts[:4]:
                ours = model.prompt_text(prompt)
                theirs = tokenizer.apply_chat_template(
                    prompt, tokenize=False, add_generation_prompt=True
                )
                same_text &= ours == theirs
                same_ids &= [int(t) for t in model.tokenizer.encode(ours)] == tokenizer(
                    theirs, add_special_tokens=False
                )["input_ids"]
        finally:
            model.close()
        expected = _source_eos(source, tokenizer)
        checks.update(
            chat_template=same_text,
            tokens=same_ids,
            eos_source=expected,
            eos_quantized=eos_ids(out),
            eos_match=set(expected) <= set(eos_ids(out)),
        )
    pairs = list(zip(replies["source"], replies["quantized"], strict=True))
    checks["stop_parity"] = round(sum(a.stopped == b.stopped for a, b in pairs) / len(pairs), 3)
    checks["passed"] = (
        checks.get("chat_template", True)
        and checks.get("tokens", True)
        and checks.get("eos_match", True)
        and checks["stop_parity"] >= MIN_STOP_PARITY
    )
    return checks


def _source_eos(source: Path, tokenizer: Any) -> list[int]:
    path = source / "generation_config.json"
    value = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    if value is None:
        value = tokenizer.eos_token_id
    return sorted(value if isinstance(value, list) else [value])


def _agreement(tokenizer, source: list, quantized: list) -> dict[str, float]:
    """Greedy answers compared token by token: the shared prefix, and identical answers."""
    prefixes, same = [], 0
    for a, b in zip(source, quantized, strict=True):
        ids_a = tokenizer(a.text or "", add_special_tokens=False)["input_ids"]
        ids_b = tokenizer(b.text or "", add_special_tokens=False)["input_ids"]
        longest = max(len(ids_a), len(ids_b))
        shared = next(
            (i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y),
            min(len(ids_a), len(ids_b)),
        )
        prefixes.append(shared / longest if longest else 1.0)
        same += ids_a == ids_b
    return {
        "prefix_match": round(sum(prefixes) / len(prefixes), 3),
        "identical": round(same / len(prefixes), 3),
    }


def _gates(config: QuantizeConfig, metric: str, results: dict[str, dict]) -> dict[str, Any]:
    source, quantized = results["source"], results["quantized"]
    if metric in ("accuracy", "exact_match") and source.get("metric"):
        quality_by = metric
        quality = 100 * (quantized["metric"] or 0) / source["metric"]
    elif source.get("perplexity") and quantized.get("perplexity"):
        quality_by = "perplexity"
        quality = 100 * source["perplexity"] / quantized["perplexity"]
    else:
        quality_by, quality = "none", None

    def ratio(a, b):
        return None if a is None or not b else a / b

    speedup = ratio(quantized["decode_tokens_per_s"], source["decode_tokens_per_s"])
    memory = ratio(quantized["memory_mb"], source["memory_mb"])
    size = ratio(quantized["size_mb"], source["size_mb"])
    values = {
        "quality_kept_pct": None if quality is None else round(quality, 1),
        "speedup": None if speedup is None else round(speedup, 2),
        "memory_saved_pct": None if memory is None else round(100 * (1 - memory), 1),
        "size_ratio": None if size is None else round(size, 3),
        "perplexity_ratio": ratio(quantized["perplexity"], source["perplexity"]),
        "first_token_speedup": ratio(source["first_token_p50_s"], quantized["first_token_p50_s"]),
    }
    for key in ("perplexity_ratio", "first_token_speedup"):
        values[key] = None if values[key] is None else round(values[key], 3)
    checks = [
        ("quality kept (%)", "quality_kept_pct", config.min_quality_pct),
        ("decode speed-up (x)", "speedup", config.min_speedup),
        ("memory saved (%)", "memory_saved_pct", config.min_memory_saved_pct),
    ]
    return {
        "quality_by": quality_by,
        **values,
        "checks": [
            {
                "name": label,
                "value": values[key],
                "op": ">=",
                "target": target,
                "passed": values[key] is not None and values[key] >= target,
            }
            for label, key, target in checks
        ],
    }


def suggestion(config: QuantizeConfig, checks: list[dict[str, Any]]) -> str:
    """What to try next when a gate fails (the course's ladder int4 -> int8 -> fp16/fp32)."""
    failed = {c["name"].split(" (")[0] for c in checks if not c["passed"]}
    if not failed:
        return ""
    tips = []
    if "chat template and end of sequence" in failed:
        tips.append(
            "the quantized model does not see the prompts the source sees or does not stop "
            "where it stops: check the chat template and eos_token_id of the source model"
        )
    if "quality kept" in failed:
        tips.append(f"for quality, try {_next_rung(config)}")
    if "decode speed-up" in failed:
        tips.append(
            "for speed, int4 is the fastest on a CPU (fp32 ONNX gains little over PyTorch); "
            "accuracy level 4 computes int4 matmuls in int8"
            if config.precision != "int4"
            else "for speed, this CPU is the limit: a GPU target (cuda) is much faster"
        )
    if "memory saved" in failed:
        tips.append("for memory, int4 stores weights in half a byte and int8 in one")
    return "; ".join(tips)


def _next_rung(config: QuantizeConfig) -> str:
    if config.precision == "int4" and config.algorithm != "k_quant_mixed":
        return "int4 with the k_quant_mixed algorithm (sensitive layers in int8)"
    if config.precision == "int4":
        return "int8 (nearly lossless, about twice the size of int4)"
    if config.precision == "int8" and "fp16" in SUPPORTED[config.execution_provider]:
        return "fp16"
    if config.precision != "fp32" and "fp32" in SUPPORTED[config.execution_provider]:
        return "fp32"
    return "a higher precision on a GPU target; or check the source model itself"


def format_report(summary: dict[str, Any]) -> str:
    gate = summary["gate"]

    def fmt(value, spec="{:.3g}", unit=""):
        return "n/a" if value is None else spec.format(value) + unit

    lines = [
        f"{summary['recipe']}: {gate['verdict'].upper()} on {gate['prompts']} (measured on "
        f"{gate['measured_on']}). Quality kept {fmt(gate['quality_kept_pct'], '{:.1f}', '%')} "
        f"(by {gate['quality_by']}), {fmt(gate['speedup'], '{:.2f}', 'x')} decode speed, "
        f"{fmt(gate['memory_saved_pct'], '{:.0f}', '%')} less memory, "
        f"{fmt(gate['size_ratio'], '{:.2f}', 'x')} the size on disk.",
    ]
    for check in gate["checks"]:
        mark = "pass" if check["passed"] else "FAIL"
        lines.append(f"  [{mark}] {check['name']}: {fmt(check['value'])} >= {check['target']}")
    for role, result in gate["models"].items():
        lines.append(f"  {role}: {_describe(result)}")
    agreement, parity = gate["agreement"], gate["parity"]
    lines.append(
        f"  greedy answers: {agreement['prefix_match']:.0%} shared token prefix, "
        f"{agreement['identical']:.0%} identical; both stop the same way on "
        f"{parity['stop_parity']:.0%} of the prompts"
        + (
            f"; chat template {'same' if parity['chat_template'] else 'DIFFERENT'}, "
            f"end-of-sequence ids {parity['eos_quantized']} (source {parity['eos_source']})"
            if "chat_template" in parity
            else ""
        )
    )
    if gate["note"]:
        lines.append(f"  note: {gate['note']}")
    if gate["suggestion"]:
        lines.append(f"  next: {gate['suggestion']}")
    return "\n".join(lines)


def _describe(result: dict[str, Any]) -> str:
    def fmt(key, spec="{:.3g}", unit=""):
        value = result.get(key)
        return "n/a" if value is None else spec.format(value) + unit

    return (
        f"perplexity {fmt('perplexity')}, {fmt('decode_tokens_per_s')} tokens/s, first token "
        f"{fmt('first_token_p50_s', unit=' s')}, {fmt('memory_mb', '{:.0f}', ' MB')} memory, "
        f"{fmt('size_mb', '{:.0f}', ' MB')} on disk, stopped on its own {result['stopped']}x"
    )


def _flat(gate: dict[str, Any]) -> dict[str, float]:
    values = {
        k: float(v)
        for k, v in gate.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for role, result in gate["models"].items():
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{role}_{key}"] = float(value)
    values.update({f"agreement_{k}": float(v) for k, v in gate["agreement"].items()})
    values["stop_parity"] = float(gate["parity"]["stop_parity"])
    return values


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


if __name__ == "__main__":
    main(QuantizeConfig, run)
