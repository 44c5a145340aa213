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
from dataclasses import dataclass, replace
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
from pipelines.lib.gate import CHECK_MEMORY, CHECK_PARITY, CHECK_QUALITY, CHECK_SPEED
from pipelines.lib.tasks import TaskFields
from pipelines.reports import for_step

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
# The model builder options a user may set: recipe and graph choices only. Options that name files
# (filename, adapter_path, kv_cache_scale_file, ...), fetch code or tokens (hf_remote, hf_token)
# or size what the machine spends (max_batch_size, num_hidden_layers) are the studio's to set.
BUILDER_OPTIONS = (
    "accuracy_level",
    "algo_config",
    "block_size",
    "disable_qkv_fusion",
    "enable_cuda_graph",
    "enable_dml_graph",
    "enable_webgpu_graph",
    "exclude_embeds",
    "exclude_lm_head",
    "fuse_mlp_gate_up",
    "fuse_qk_norm_gqa",
    "fuse_qkv",
    "include_hidden_states",
    "is_symmetric",
    "matmul_mixed_precision",
    "nodes_to_exclude",
    "op_types_to_quantize",
    "prune_lm_head",
    "shared_embeddings",
    "use_cuda_bf16",
    "use_qdq",
    "use_webgpu_fp32",
)
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
    max_rows: int = option(
        0,
        "Gate prompts",
        "Answer only the first N held-out rows (or built-in prompts); 0 answers all of them.",
    )
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
            key = pair.split("=", 1)[0].strip()
            if key not in BUILDER_OPTIONS:
                raise ValueError(
                    f"extra_options: '{key}' is not a builder option the studio passes on; "
                    f"use one of {', '.join(BUILDER_OPTIONS)}"
                )
        if self.max_rows < 0 or self.max_new_tokens < 1:
            raise ValueError("max_rows must be >= 0 and max_new_tokens >= 1")

    @property
    def queue(self) -> str:
        return "compute"

    @property
    def outputs(self) -> dict[str, str]:
        folder = {ONNX_DIR: "onnx"} if self.format == "onnx" else {BNB_DIR: "model"}
        return folder | ({"report.json": "report"} if self.gate else {})

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
    from pipelines.lib.models import resolve_model

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
        from pipelines.lib.gate import flat, quality_gate

        result = quality_gate(config, source, out, report, meta.get("adapter_file"))
        from pipelines.lib.hardware import hardware

        result["suggestion"] = suggestion(config, result["checks"])
        result["hardware"] = hardware()
        summary["gate"] = result
        report(Metrics(step=0, values=flat(result)))
        (workdir / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        report(Log(for_step("quantize", summary).text()))
    shutil.rmtree(work, ignore_errors=True)  # merged copies and the builder cache
    gate = summary.get("gate", {})
    name = f"{_display_name(config.model)} {config.recipe()}"
    artifact_meta = {
        "name": name,
        "recipe": config.recipe(),
        "source_model": config.model,
        **{k: v for k, v in meta.items() if k != "builder_command"},
        **{k: gate.get(k) for k in ("verdict", "quality_kept_pct", "speedup", "size_ratio")},
        # what the quality figure rests on: its rows and interval (task metric), or perplexity
        "quality_by": gate.get("quality_by"),
        "quality_rows": gate.get("pair", {}).get("rows"),
        "quality_kept_ci": [
            gate.get("pair", {}).get("kept_ci_low"),
            gate.get("pair", {}).get("kept_ci_high"),
        ],
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
            from pipelines.lib.merge import merge_adapter

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
    from pipelines.lib.onnx_model import ADAPTER_FILE

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(weights)
    adapter.export_adapter(str(folder / ADAPTER_FILE))
    return ADAPTER_FILE


def _adapter_base(adapter_dir: Path) -> str:
    from pipelines.lib.models import resolve_model

    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    if not base:
        raise StepError(f"{adapter_dir}/adapter_config.json does not name its base model")
    return resolve_model(base)


def _from_gguf(path: Path, out: Path) -> Path:
    from pipelines.lib.models import load_causal_lm

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

    from pipelines.lib.models import load_tokenizer

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
        from pipelines.lib.merge import merge_adapter

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


# --- what to try next -------------------------------------------------------------------------


def proposal(config: QuantizeConfig, checks: list[dict[str, Any]]) -> QuantizeConfig | None:
    """The config to try when the gate failed, if another recipe can help: for quality the
    course's ladder (int4 -> int4 k_quant_mixed -> int8 -> fp16 on GPUs -> fp32), for memory
    int4. Speed is the hardware's, and a parity failure is the source model's to fix."""
    failed = {c["name"] for c in checks if not c["passed"]}
    undecided = any(c.get("why") for c in checks if c["name"] == CHECK_QUALITY)
    if CHECK_PARITY in failed or undecided:
        return None  # (too few rows to tell: another recipe would be judged no better)
    if CHECK_QUALITY in failed:
        if config.precision == "int4" and config.algorithm != "k_quant_mixed":
            return replace(config, algorithm="k_quant_mixed", block_size=min(32, config.block_size))
        order = ("int4", "int8", "fp16", "fp32")
        after = order[order.index(config.precision) + 1 :] if config.precision in order else ()
        for precision in after:
            if precision in SUPPORTED[config.execution_provider]:
                return replace(config, precision=precision)
        return None
    if CHECK_MEMORY in failed and config.precision != "int4":
        return replace(config, precision="int4")
    return None


def suggestion(config: QuantizeConfig, checks: list[dict[str, Any]]) -> str:
    """What to try next when a gate failed, in words."""
    failed = {c["name"] for c in checks if not c["passed"]}
    better = proposal(config, checks)
    tips = []
    if CHECK_PARITY in failed:
        tips.append(
            "the quantized model does not see the prompts the source sees or does not stop "
            "where it stops: check the chat template and eos_token_id of the source model"
        )
    why = next((c.get("why") for c in checks if c["name"] == CHECK_QUALITY), None)
    if why:
        tips.append(f"for quality, {why}")
    elif CHECK_QUALITY in failed:
        tips.append(
            f"for quality, try {better.recipe()}"
            if better
            else "the highest precision for this target already: check the source model itself"
        )
    if CHECK_SPEED in failed:
        tips.append(
            "for speed, int4 is the fastest on a CPU (fp32 ONNX gains little over PyTorch)"
            if config.precision != "int4"
            else "for speed, this CPU is the limit: a GPU target (cuda) is much faster"
        )
    if CHECK_MEMORY in failed:
        tips.append("for memory, int4 stores weights in half a byte and int8 in one")
    return "; ".join(tips)


if __name__ == "__main__":
    main(QuantizeConfig, run)
