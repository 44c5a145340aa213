"""Finetuning of a causal LM (LoRA, QLoRA or full) on a dataset folder made by the dataset step.

Run as: python -m pipelines.finetune --config cfg.json --workdir out/
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
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

METHODS = ("lora", "qlora", "full")
# The bundled model's architecture (SmolLM2-135M-Instruct), so that the memory estimate works
# before its GGUF has been converted.
BUNDLED_ARCH = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    dataset_dir: str = option(
        label="Dataset", help="A dataset folder from the Data tab (train.jsonl, validation.jsonl)."
    )
    base_model: str = option(
        "bundled", "Base model", "'bundled' (SmolLM2-135M-Instruct), a model folder or a Hub id."
    )
    method: Literal["lora", "qlora", "full"] = option(
        "lora",
        "Method",
        (
            "lora: small adapter (default); qlora: adapter on a 4-bit base (saves GPU memory; on "
            "CPU it is slower and saves nothing); full: every weight."
        ),
    )
    lora_r: int = option(16, "LoRA rank", "Adapter rank r: higher = more capacity and memory.")
    lora_alpha: int = option(32, "LoRA alpha", "Adapter scale numerator (the scale is alpha / r).")
    lora_dropout: float = option(
        0.05, "LoRA dropout", "Dropout on the adapter input; 0.1 fights overfitting."
    )
    target_modules: str = option(
        "all-linear", "Target modules", "'all-linear', or comma-separated names like q_proj,v_proj."
    )
    use_rslora: bool = option(False, "rsLoRA", "Scale by alpha / sqrt(r): steadier at high ranks.")
    use_dora: bool = option(False, "DoRA", "Weight-decomposed LoRA: often better, slower per step.")
    use_chat_template: bool = option(
        True, "Use chat template", "Format conversations with the model's own template."
    )
    text_template: str = option(
        "",
        "Text template",
        (
            "Instead of the chat template: text with {column} placeholders, e.g. '### Q: "
            "{text}\\n### A: {label}'."
        ),
    )
    assistant_only_loss: bool = option(
        True,
        "Loss on answers only",
        "Learn only from the assistant turns, not the prompts (chat template only).",
    )
    max_seq_len: int = option(
        512, "Max length", "Tokens per example; longer ones are cut (and counted)."
    )
    max_samples: int = option(0, "Max samples", "Use at most this many training rows; 0 uses all.")
    epochs: float = option(
        1.0, "Epochs", "Passes over the training rows (ignored when max steps is set)."
    )
    max_steps: int = option(0, "Max steps", "Optimizer steps to run; 0 follows the epochs.")
    learning_rate: float = option(
        0.0002, "Learning rate", "Peak learning rate (LoRA 1e-4..5e-4; full 1e-5..5e-5)."
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option(
        "cosine", "Schedule", "How the learning rate decays."
    )
    warmup_ratio: float = option(
        0.03, "Warmup share", "Share of the steps that ramp the learning rate up."
    )
    weight_decay: float = option(0.01, "Weight decay", "AdamW weight decay.")
    batch_size: int = option(4, "Batch size", "Examples per step on each device.")
    gradient_accumulation: int = option(
        1,
        "Gradient accumulation",
        "Steps summed before an update (a larger effective batch without more memory).",
    )
    gradient_checkpointing: bool = option(
        False,
        "Gradient checkpointing",
        "Recompute activations: much less memory, about 30% slower (on CPU far slower).",
    )
    batching: Literal["length_grouped", "padded"] = option(
        "length_grouped",
        "Batching",
        (
            "length_grouped puts rows of similar length together so little is spent on padding; "
            "padded is plain random batches."
        ),
    )
    eval_steps: int = option(
        50, "Evaluate every", "Validation loss every N steps; 0 only at the end."
    )
    early_stopping_patience: int = option(
        0,
        "Early stopping",
        (
            "Stop after N evaluations without a better validation loss (keeps the best); "
            "0 never stops early."
        ),
    )
    save_steps: int = option(
        50, "Checkpoint every", "Save a checkpoint every N steps (for resume)."
    )
    seed: int = option(42, "Seed", "Random seed.")
    merge: bool = option(
        True,
        "Merge adapter",
        "Also write the base model with the adapter merged in (what Quantize and Deploy take).",
    )
    gpus: int = option(0, "GPUs", "GPUs to train on through accelerate: 0 = all the machine has.")
    keep_layers: int = option(
        0,
        "Keep layers",
        (
            "Train a pruned copy of the base: keep this many of its layers, chosen evenly "
            "(a smaller student that shares its tokenizer); 0 keeps them all."
        ),
    )
    teacher_model: str = option(
        "",
        "Teacher for logits",
        (
            "A local teacher with the student's vocabulary: the student also learns the "
            "teacher's token probabilities (token-level distillation). Empty: answers only."
        ),
    )
    distill_loss: Literal["kl", "jsd"] = option(
        "kl",
        "Distillation loss",
        "kl: forward KL from the teacher; jsd: Jensen-Shannon (beta 0.5), more forgiving.",
    )
    distill_temperature: float = option(
        1.0, "Distillation temperature", "Softens both distributions before comparing them."
    )
    distill_weight: float = option(
        0.5,
        "Distillation weight",
        "Share of the loss from the teacher's logits; the rest is the plain loss on the answers.",
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_samples",
            "max_steps",
            "eval_steps",
            "early_stopping_patience",
            "gpus",
            "keep_layers",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.save_steps < 1:
            raise ValueError(f"save_steps must be >= 1, got {self.save_steps}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.epochs <= 0 and self.max_steps == 0:
            raise ValueError(f"epochs must be > 0 when max_steps is 0, got {self.epochs}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("lora_dropout and warmup_ratio must be in [0, 1)")
        if not self.use_chat_template and not self.text_template:
            raise ValueError(
                "use_chat_template is off and text_template is empty: give a "
                "text_template with {column} placeholders, or use the chat template"
            )
        if not 0 <= self.distill_weight <= 1 or self.distill_temperature <= 0:
            raise ValueError("distill_weight must be in [0, 1] and distill_temperature > 0")
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("early_stopping_patience needs eval_steps > 0")

    @property
    def queue(self) -> str:
        return "compute"


CONFIG = FinetuneConfig


def run(config: FinetuneConfig, workdir: Path, report: Reporter) -> StepResult:
    """Train, save the adapter (and the merged model), and summarize; resumes from checkpoints."""
    import torch

    from pipelines.models import load_tokenizer, prune_layers, resolve_model

    model_path = resolve_model(config.base_model)
    if (Path(model_path) / "adapter_config.json").exists():
        raise StepError(
            f"'{config.base_model}' is an adapter, not a full model: pick the merged "
            "model of that run as the base."
        )
    if config.method == "qlora" and not _bitsandbytes_works():
        raise StepError(
            "QLoRA needs bitsandbytes 4-bit kernels, which don't load here. Use LoRA instead."
        )
    pruned = None
    if config.keep_layers:
        report(Progress(0, 1, f"pruning the base to {config.keep_layers} layers"))
        pruned = prune_layers(model_path, config.keep_layers, workdir / "student_base")
        model_path = str(workdir / "student_base")
        report(Log(f"student: {pruned['kept']} of the base's {pruned['layers']} layers"))
    tokenizer = load_tokenizer(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    teacher_path, distillation = _teacher_path(config, tokenizer, report)
    estimate = estimate_memory(
        _arch(model_path),
        config,
        cuda,
        _available_memory(cuda),
        teacher_arch=_arch(teacher_path) if teacher_path else None,
    )
    report(
        Log(
            f"memory estimate: {format_estimate(estimate)}",
            level="warning" if estimate["fits"] is False else "info",
        )
    )
    if config.method == "qlora" and not cuda:
        report(
            Log(
                "QLoRA on CPU: bitsandbytes runs 4-bit here, but it saves no memory at this "
                "size and each step is slower than LoRA; use it to try the method.",
                level="warning",
            )
        )

    report(Progress(0, 1, "tokenizing"))
    train, validation, data_stats = _load_data(config, tokenizer)
    report(
        Log(
            f"{data_stats['train_examples']} training and {data_stats['validation_examples']} "
            f"validation examples; {data_stats['truncated']} cut to {config.max_seq_len} "
            f"tokens; {data_stats['no_labels']} dropped (nothing left to learn after the cut)"
        )
    )
    gpus = torch.cuda.device_count() if cuda else 0
    if gpus > 1 and config.gpus != 1 and "LOCAL_RANK" not in os.environ:
        return launch_distributed(config, workdir, report, min(gpus, config.gpus or gpus))

    model = _load_model(model_path, config, cuda)
    teacher = _load_teacher(teacher_path, cuda) if teacher_path else None
    trainer, bridge, counter = _trainer(
        model, tokenizer, train, validation, config, workdir, report, cuda, teacher
    )
    checkpoints = sorted(
        (workdir / CHECKPOINT_DIR).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
    )
    before = None
    if checkpoints:
        report(Log(f"resuming from {checkpoints[-1].name}"))
    elif validation is not None:  # the baseline, so that the curve shows what training changed
        report(Progress(0, 1, "validation loss before training"))
        before = trainer.evaluate(validation)["eval_loss"]
        report(Metrics(step=0, values={"eval_loss": before}))
    kl_before = _kl_to_teacher(trainer, teacher, validation or train) if teacher else None
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    if bridge.cancelled:
        raise Cancelled()  # the callback saved a checkpoint at this step first
    train_seconds = time.monotonic() - started
    metrics = trainer.evaluate() if validation is not None else {}
    if trainer.is_world_process_zero() is False:
        return StepResult()
    summary = _summary(
        config, result, metrics, trainer, counter, data_stats, estimate, train_seconds, model_path
    )
    summary["eval_loss_before"] = before
    summary["distillation"] = distillation
    if pruned:
        summary["pruned_from_layers"] = pruned["layers"]
    if teacher is not None:
        summary["kl_to_teacher_before"] = kl_before
        summary["kl_to_teacher"] = _kl_to_teacher(trainer, teacher, validation or train)
        report(
            Log(
                f"KL to the teacher on {'validation' if validation else 'training'} tokens: "
                f"{kl_before:.4f} -> {summary['kl_to_teacher']:.4f}"
            )
        )
    report(
        Metrics(
            step=trainer.state.global_step,
            values={
                k: v for k, v in {"eval_loss": metrics.get("eval_loss")}.items() if v is not None
            },
        )
    )
    report(Progress(trainer.state.global_step, trainer.state.global_step, "saving"))
    artifacts = _save_outputs(trainer, tokenizer, config, model_path, workdir, summary, report)
    if pruned:  # the untrained student, for the evaluation's "before" column
        artifacts.append(
            (
                "model",
                "student_base",
                {
                    "name": f"pruned base ({pruned['kept']} of {pruned['layers']} layers)",
                    "base_model": config.base_model,
                    "method": "pruned",
                },
            )
        )
    shutil.rmtree(workdir / CHECKPOINT_DIR, ignore_errors=True)  # done: resume no longer needed
    report(Log(format_summary(summary)))
    return StepResult(artifacts=artifacts, summary=summary)


# --- memory estimate ---------------------------------------------------------------------------


def estimate_memory(
    arch: dict[str, Any],
    config: FinetuneConfig,
    cuda: bool,
    available: int | None = None,
    teacher_arch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rough bytes for weights, adapter, gradients + optimizer states, activations, and the
    teacher's weights and logits when distilling on logits.

    Activations assume a decoder layer keeps ~34 * hidden values per token (Korthikanti et al.,
    2022; the 5 * heads * length attention scores are not kept by SDPA, transformers' default)
    in 32-bit on CPU, 16-bit on GPU, at the full max length; the logits are counted apart.
    """
    h, inter, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    if config.keep_layers:
        layers = min(layers, config.keep_layers)
    heads, vocab = arch["num_attention_heads"], arch["vocab_size"]
    kv = arch.get("num_key_value_heads") or heads
    head_dim = arch.get("head_dim") or h // heads
    params = count_parameters({**arch, "num_hidden_layers": layers})
    act_bytes = 2 if cuda else 4
    weight_bytes = 0.55 if config.method == "qlora" else act_bytes
    if config.method == "full":
        trainable = params
    else:
        linear_dims = [
            (h, heads * head_dim),
            (h, kv * head_dim),
            (h, kv * head_dim),
            (heads * head_dim, h),
            (h, inter),
            (h, inter),
            (inter, h),
        ]
        trainable = layers * sum(config.lora_r * (a + b) for a, b in linear_dims)
    tokens = config.batch_size * config.max_seq_len
    per_token_layer = 34 * h
    kept_layers = 1 if config.gradient_checkpointing else layers
    activations = (
        tokens
        * (kept_layers * per_token_layer + layers * h * config.gradient_checkpointing)
        * act_bytes
    )
    logits = tokens * vocab * 4 * 2  # fp32 logits and their gradient
    estimate = {
        "parameters": params,
        "trainable": trainable,
        "weights": params * weight_bytes,
        "adapter": 0 if config.method == "full" else trainable * 4,
        "optimizer": trainable * 4 * 3,  # gradient + two Adam moments, fp32
        "activations": activations + logits,
        "teacher": 0,
    }
    if teacher_arch:  # frozen weights plus its logits for the batch (no gradients)
        estimate["teacher"] = count_parameters(teacher_arch) * act_bytes + tokens * vocab * 4
    estimate["total"] = sum(
        estimate[k] for k in ("weights", "adapter", "optimizer", "activations", "teacher")
    )
    estimate["available"] = available
    estimate["fits"] = None if available is None else estimate["total"] < 0.9 * available
    return estimate


def count_parameters(arch: dict[str, Any]) -> int:
    """Parameters of a decoder from its config numbers (attention, MLP, embeddings)."""
    h, inter, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    head_dim = arch.get("head_dim") or h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter
    embed = arch["vocab_size"] * h * (1 if arch.get("tie_word_embeddings", True) else 2)
    return layers * per_layer + embed


def format_estimate(estimate: dict[str, Any]) -> str:
    gb = 1024**3
    parts = [
        f"{k} {estimate[k] / gb:.2f} GB"
        for k in ("weights", "adapter", "optimizer", "activations", "teacher")
        if k != "teacher" or estimate.get("teacher")
    ]
    text = f"about {estimate['total'] / gb:.2f} GB ({', '.join(parts)})"
    if estimate["available"]:
        text += f"; {estimate['available'] / gb:.1f} GB available"
    if estimate["fits"] is False:
        text += (
            ". It may not fit: lower the batch size or max length, turn on gradient "
            "checkpointing, or use LoRA/QLoRA instead of full finetuning"
            + (", or distil from the teacher's answers only" if estimate.get("teacher") else "")
            + "."
        )
    return text


def model_arch(spec: str) -> dict[str, Any] | None:
    """Architecture numbers from a model's config.json without loading it (None if unknown)."""
    from pipelines.models import BUNDLED_ALIASES, models_dir

    if spec.strip() in BUNDLED_ALIASES:
        return BUNDLED_ARCH
    path = Path(spec).expanduser() / "config.json"
    if not path.exists():
        path = models_dir() / spec / "config.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data = data.get("text_config", data)
    needed = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    )
    return data if all(k in data for k in needed) else None


def _arch(model_path: str) -> dict[str, Any]:
    arch = model_arch(model_path)
    if arch is None:
        raise StepError(f"{model_path} has no usable config.json (hidden_size, layers, ...).")
    return arch


def _available_memory(cuda: bool) -> int:
    if cuda:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    import psutil

    return psutil.virtual_memory().available


# --- data --------------------------------------------------------------------------------------


def _load_data(config: FinetuneConfig, tokenizer: Any) -> tuple[Any, Any, dict[str, int]]:
    """Tokenize train/validation with labels (-100 where no loss is taken) and lengths."""
    import datasets

    folder = Path(config.dataset_dir)
    if not (folder / "train.jsonl").exists():
        raise StepError(f"{folder} has no train.jsonl: pick a dataset imported in the Data tab.")
    files = {"train": str(folder / "train.jsonl")}
    if (folder / "validation.jsonl").exists() and (folder / "validation.jsonl").stat().st_size:
        files["validation"] = str(folder / "validation.jsonl")
    raw = datasets.load_dataset("json", data_files=files)
    if config.max_samples:
        raw["train"] = raw["train"].select(range(min(config.max_samples, len(raw["train"]))))
    if config.text_template:
        missing = _template_columns(config.text_template) - set(raw["train"].column_names)
        if missing:
            raise StepError(
                f"text_template uses {sorted(missing)}, but the dataset's columns are "
                f"{raw['train'].column_names}."
            )

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        return _encode(row, tokenizer, config)

    stats = {"truncated": 0, "no_labels": 0}
    out = {}
    for split, data in raw.items():
        encoded = data.map(encode, remove_columns=data.column_names, desc=f"tokenizing {split}")
        stats["truncated"] += sum(encoded["truncated"])
        kept = encoded.filter(lambda r: r["has_labels"])
        stats["no_labels"] += len(encoded) - len(kept)
        out[split] = kept.remove_columns(["truncated", "has_labels"])
    if len(out["train"]) == 0:
        raise StepError(
            "no training example is left: every row was cut before its answer. Raise max length."
        )
    stats["train_examples"] = len(out["train"])
    stats["validation_examples"] = len(out["validation"]) if "validation" in out else 0
    stats["train_tokens"] = sum(out["train"]["length"])
    return out["train"], out.get("validation"), stats


def _template_columns(template: str) -> set[str]:
    import string

    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _encode(row: dict[str, Any], tokenizer: Any, config: FinetuneConfig) -> dict[str, Any]:
    if config.text_template:
        text = config.text_template.replace("\\n", "\n").format_map(row) + tokenizer.eos_token
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        labels = list(ids)
    else:
        ids, labels = chat_labels(tokenizer, row["messages"], config.assistant_only_loss)
    truncated = len(ids) > config.max_seq_len
    ids, labels = ids[: config.max_seq_len], labels[: config.max_seq_len]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": labels,
        "length": len(ids),
        "truncated": truncated,
        "has_labels": any(label != -100 for label in labels),
    }


def chat_labels(
    tokenizer: Any, messages: list[dict[str, str]], assistant_only: bool
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the chat template, and labels with -100 on every token that
    is not part of an assistant turn (when `assistant_only`).

    Works with any template that renders a conversation's prefix as a prefix of its text (no
    `{% generation %}` markers needed, which SmolLM2's template lacks): each assistant turn spans
    from the end of the rendered prefix with a generation prompt to the end of the rendered turn.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if not assistant_only:
        return ids, list(ids)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(start) and text.startswith(end)):
            raise StepError(
                "this model's chat template does not render a conversation's start "
                "as the start of the whole, so answers can't be told from prompts: "
                "turn off 'Loss on answers only'."
            )
        spans.append((len(start), len(end)))
    labels = [-100] * len(ids)
    for t, (a, b) in enumerate(encoding["offset_mapping"]):
        if any(s <= a and b <= e and b > a for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


# --- model and trainer -------------------------------------------------------------------------


def _bitsandbytes_works() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def _load_model(model_path: str, config: FinetuneConfig, cuda: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _train_dtype(cuda)
    kwargs: dict[str, Any] = {"dtype": dtype}
    path = Path(model_path)
    if path.is_file():  # a .gguf file
        kwargs["gguf_file"], model_path = path.name, str(path.parent)
    if config.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["dtype"] = dtype if cuda else torch.float32
    if cuda:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False
    if config.method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    targets = config.target_modules.strip()
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets
        if targets == "all-linear"
        else [t.strip() for t in targets.split(",") if t.strip()],
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # e.g. target modules not found in the model
        raise StepError(f"LoRA can't be applied: {e}") from None
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def _teacher_path(config: FinetuneConfig, tokenizer: Any, report: Reporter) -> tuple[str, str]:
    """(the teacher's folder or "", how the student learns): logits need the same vocabulary."""
    from pipelines.models import load_tokenizer, resolve_model

    if not config.teacher_model.strip():
        return "", "answers only" if not config.keep_layers else "answers only (pruned student)"
    path = resolve_model(config.teacher_model)
    teacher_vocab = load_tokenizer(path).get_vocab()
    if teacher_vocab != tokenizer.get_vocab():
        report(
            Log(
                f"the teacher's vocabulary ({len(teacher_vocab)} tokens) differs from the "
                f"student's ({len(tokenizer.get_vocab())}): token-level distillation needs the "
                "same one, so the student learns from the teacher's answers only "
                "(sequence-level). Pick a student from the teacher's family, or a pruned copy.",
                level="warning",
            )
        )
        return "", "sequence-level (vocabularies differ)"
    return path, (
        f"logits ({config.distill_loss}, temperature {config.distill_temperature:g}, "
        f"weight {config.distill_weight:g}) from {config.teacher_model}"
    )


def _load_teacher(path: str, cuda: bool) -> Any:
    from pipelines.models import load_causal_lm

    teacher, _ = load_causal_lm(path, dtype=_train_dtype(cuda))
    if cuda:
        teacher.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    teacher.requires_grad_(False)
    return teacher


def _distill_loss(
    student_logits, teacher_logits, labels, config: FinetuneConfig, temperature: float = 0.0
):
    """Divergence from the teacher's next-token distribution on the answer tokens (TRL's
    generalized JSD: beta 0 is the forward KL, 0.5 the symmetric JSD)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])  # padded embedding rows
    return GKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1, :vocab],
        teacher_logits[:, :-1, :vocab],
        labels=labels[:, 1:],
        beta=0.0 if config.distill_loss == "kl" else 0.5,
        temperature=temperature or config.distill_temperature,
    )


def _kl_to_teacher(trainer, teacher, data, rows: int = 32) -> float:
    """Mean KL(teacher || student) per answer token on a few rows (temperature 1)."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    total, batches = 0.0, 0
    kl = dataclass_replace(trainer.distill_config, distill_loss="kl")
    with torch.no_grad():
        subset = data.select(range(min(rows, len(data))))
        for batch in trainer.get_eval_dataloader(subset):
            batch = {k: v.to(model.device) for k, v in batch.items() if k != "length"}
            student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            teacher_out = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
            total += float(
                _distill_loss(student.logits, teacher_out.logits, batch["labels"], kl, 1.0)
            )
            batches += 1
    model.train(was_training)
    return round(total / max(batches, 1), 5)


def _train_dtype(cuda: bool) -> Any:
    import torch

    if not cuda:
        return torch.float32  # no fast bf16 on most CPUs: a step is ~20x slower (measured)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def _trainer(
    model,
    tokenizer,
    train,
    validation,
    config: FinetuneConfig,
    workdir: Path,
    report: Reporter,
    cuda: bool,
    teacher: Any = None,
):
    import torch
    from transformers import (
        DataCollatorForSeq2Seq,
        EarlyStoppingCallback,
        TrainingArguments,
    )

    bf16 = cuda and torch.cuda.is_bf16_supported()
    evaluate = validation is not None and config.eval_steps > 0
    steps_per_epoch = math.ceil(len(train) / (config.batch_size * config.gradient_accumulation))
    total = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    args = TrainingArguments(
        output_dir=str(workdir / CHECKPOINT_DIR),
        max_steps=total,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        seed=config.seed,
        logging_steps=1 if total <= 200 else max(1, total // 200),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps or None,
        save_strategy="steps",
        save_steps=config.eval_steps if config.early_stopping_patience else config.save_steps,
        save_total_limit=2,
        load_best_model_at_end=bool(config.early_stopping_patience),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        use_cpu=not cuda,
        bf16=bf16,
        fp16=cuda and not bf16,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim="paged_adamw_32bit" if config.method == "qlora" and cuda else "adamw_torch",
        train_sampling_strategy="group_by_length"
        if config.batching == "length_grouped"
        else "random",
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    counter = _PaddingCounter(
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    bridge = _bridge(report)
    callbacks = [bridge]
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    trainer = _trainer_class(teacher, config)(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation if evaluate else None,
        data_collator=counter,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if not evaluate and validation is not None:
        trainer.eval_dataset = validation  # still evaluated once at the end
    trainer.distill_config = config
    return trainer, bridge, counter


def _trainer_class(teacher: Any, config: FinetuneConfig):
    """The HF Trainer, or with a teacher one whose training loss mixes in the divergence from
    the teacher's logits (validation loss stays the plain loss, comparable across runs)."""
    from transformers import Trainer

    if teacher is None:
        return Trainer

    class DistillTrainer(Trainer):
        distill_sum, distill_count = 0.0, 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                import torch

                with torch.no_grad():
                    teacher_logits = teacher(
                        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                    ).logits
                divergence = _distill_loss(outputs.logits, teacher_logits, inputs["labels"], config)
                self.distill_sum += float(divergence.detach())
                self.distill_count += 1
                weight = config.distill_weight
                loss = (1 - weight) * loss + weight * divergence
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self.distill_count:
                logs["distill_loss"] = self.distill_sum / self.distill_count
                self.distill_sum, self.distill_count = 0.0, 0
            super().log(logs, *args, **kwargs)

    return DistillTrainer


class _PaddingCounter:
    """Wraps the collator to count real and padded tokens (the Runs tab shows the padding share)."""

    def __init__(self, collator):
        self.collator, self.real, self.computed = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.real += int(batch["attention_mask"].sum())
        self.computed += int(batch["attention_mask"].numel())
        return batch


def _bridge(report: Reporter):
    """A TrainerCallback that forwards progress and metrics; a cancel saves, then stops."""
    from transformers import TrainerCallback

    class Bridge(TrainerCallback):
        cancelled = False

        def _send(self, event, control) -> None:
            try:
                report(event)
            except Cancelled:
                self.cancelled = True
                control.should_save = True  # so that resume continues at this very step
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            message = f"step {state.global_step}/{state.max_steps}" + (
                f" · loss {loss:.3f}" if loss is not None else ""
            )
            self._send(Progress(state.global_step, state.max_steps, message), control)
            _agree_on_cancel(self, control, args.device)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            skip = ("epoch", "total_flos", "train_runtime", "num_input_tokens_seen")
            values = {
                k: float(v)
                for k, v in (logs or {}).items()
                if isinstance(v, (int, float)) and k not in skip
            }
            if "train_tokens_per_second" in values:  # non-padding tokens (see TrainingArguments)
                values["tokens_per_s"] = values.pop("train_tokens_per_second")
            values["memory_mb"] = _memory_mb()
            if values:
                self._send(Metrics(step=state.global_step, values=values), control)

    return Bridge()


def _agree_on_cancel(bridge, control, device) -> None:
    """Under several processes every rank must stop at the same step, or the others hang."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    flag = torch.tensor([int(bridge.cancelled)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not bridge.cancelled:
        bridge.cancelled = True
        control.should_save = True
        control.should_training_stop = True


def _memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --- outputs -----------------------------------------------------------------------------------


def _save_outputs(
    trainer,
    tokenizer,
    config: FinetuneConfig,
    model_path: str,
    workdir: Path,
    summary: dict[str, Any],
    report: Reporter,
) -> list[tuple[str, str, dict]]:
    meta = {
        "base_model": config.base_model,
        "base_path": model_path,
        "method": config.method,
        "dataset_dir": config.dataset_dir,
        "eval_loss": summary.get("eval_loss"),
    }
    if config.method == "full":
        _save_atomically(
            workdir / "model",
            lambda tmp: (trainer.model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
        )
        return [("model", "model", {**meta, "name": f"{Path(config.dataset_dir).name} full"})]
    lora = {
        k: getattr(config, k)
        for k in (
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "use_rslora",
            "use_dora",
        )
    }
    _save_atomically(
        workdir / "adapter",
        lambda tmp: (trainer.model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
    )
    artifacts = [("adapter", "adapter", {**meta, **lora, "name": "adapter"})]
    if config.merge:
        report(Progress(1, 1, "merging the adapter into the base"))
        _save_atomically(
            workdir / "merged", lambda tmp: merge_adapter(model_path, workdir / "adapter", tmp)
        )
        artifacts.append(("model", "merged", {**meta, **lora, "name": "merged"}))
    return artifacts


def merge_adapter(base_path: str, adapter_dir: Path, out: Path) -> None:
    """Merge an adapter into a full-precision copy of its base (never into a 4-bit one)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.models import load_tokenizer

    path = Path(base_path)
    kwargs = {"gguf_file": path.name} if path.is_file() else {}
    base = AutoModelForCausalLM.from_pretrained(
        path.parent if path.is_file() else path, dtype=torch.float32, **kwargs
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(out)
    load_tokenizer(str(adapter_dir)).save_pretrained(out)  # with the chat template


def _save_atomically(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _summary(
    config, result, metrics, trainer, counter, data_stats, estimate, train_seconds, model_path
) -> dict[str, Any]:
    history = trainer.state.log_history
    first_loss = next((h["loss"] for h in history if "loss" in h), None)
    tokens = trainer.state.num_input_tokens_seen or counter.real
    params = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "method": config.method,
        "base_model": config.base_model,
        "base_path": model_path,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "train_loss_first": first_loss,
        "train_loss": result.training_loss,
        "eval_loss_before": None,
        "eval_loss": metrics.get("eval_loss"),
        "perplexity": math.exp(metrics["eval_loss"]) if "eval_loss" in metrics else None,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds else None,
        "padding_share": round(1 - counter.real / counter.computed, 3)
        if counter.computed
        else None,
        "batching": config.batching,
        "parameters": params,
        "trainable_parameters": trainable,
        "memory_estimate_gb": round(estimate["total"] / 1024**3, 2),
        "peak_memory_mb": round(_memory_mb()),
        **data_stats,
    }


def format_summary(summary: dict[str, Any]) -> str:
    def num(key, fmt="{:.4g}"):
        value = summary.get(key)
        return "n/a" if value is None else fmt.format(value)

    return (
        f"{summary['method']} on {summary['base_model']}: {summary['steps']} steps, "
        f"train loss {num('train_loss_first')} -> {num('train_loss')}, validation loss "
        f"{num('eval_loss_before')} -> {num('eval_loss')}, {num('tokens_per_s')} tokens/s, "
        f"padding {num('padding_share', '{:.0%}')} of computed tokens, "
        f"{summary['trainable_parameters']:,} of {summary['parameters']:,} parameters trained"
    )


def launch_distributed(
    config: FinetuneConfig, workdir: Path, report: Reporter, processes: int, cuda: bool = True
) -> StepResult:
    """Several GPUs: the same step under `accelerate launch`, one process per GPU; rank 0 reports
    through a JSONL file that this process forwards, and a stop file carries a cancel."""
    import subprocess
    import sys

    from pipelines.base import config_to_dict

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config_to_dict(config)))
    events, stop = workdir / "events.jsonl", workdir / "stop"
    events.unlink(missing_ok=True)
    stop.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu" if cuda else "--cpu",
        "--num_processes",
        str(processes),
        "-m",
        "pipelines.finetune",
        "--config",
        str(workdir / "config.json"),
        "--workdir",
        str(workdir),
        "--events",
        str(events),
        "--stop-file",
        str(stop),
    ]
    where = f"{processes} GPUs" if cuda else f"{processes} CPU processes"
    report(Log(f"training on {where}: {' '.join(command[2:])}"))
    proc = subprocess.Popen(command, start_new_session=False)
    offset, result = 0, None
    while True:
        done = proc.poll() is not None
        if events.exists():
            with events.open() as f:
                f.seek(offset)
                for line in f:
                    item = json.loads(line)
                    if item["type"] == "result":
                        result = item
                    else:
                        try:
                            report(_event_from_json(item))
                        except Cancelled:
                            stop.touch()
                offset = f.tell()
        if done:
            break
        time.sleep(0.5)
    if stop.exists() and result is None:  # (a cancel that came after the end changes nothing)
        raise Cancelled()
    if proc.returncode != 0 or result is None:
        raise StepError(f"distributed training failed (exit code {proc.returncode}); see the log")
    return StepResult(artifacts=[tuple(a) for a in result["artifacts"]], summary=result["summary"])


def _event_from_json(item: dict[str, Any]):
    kind = item.pop("type")
    return {"progress": Progress, "metrics": Metrics, "log": Log}[kind](**item)


def _distributed_main() -> None:
    """Entry of each rank under accelerate: events go to a file, a stop file cancels."""
    import argparse
    from dataclasses import asdict

    from pipelines.base import config_from_dict

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--stop-file", required=True)
    args = parser.parse_args()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    events, stop = Path(args.events), Path(args.stop_file)

    def report(event) -> None:
        if rank0:
            kind = {Progress: "progress", Metrics: "metrics", Log: "log"}[type(event)]
            with events.open("a") as f:
                f.write(json.dumps({"type": kind, **asdict(event)}) + "\n")
        if stop.exists():
            raise Cancelled()

    config = config_from_dict(FinetuneConfig, json.loads(Path(args.config).read_text()))
    result = run(config, Path(args.workdir), report)
    if rank0:
        with events.open("a") as f:
            f.write(
                json.dumps(
                    {"type": "result", "artifacts": result.artifacts, "summary": result.summary}
                )
                + "\n"
            )


if __name__ == "__main__":
    import sys as _sys

    if "--events" in _sys.argv:
        _distributed_main()
    else:
        main(FinetuneConfig, run)
