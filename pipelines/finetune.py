"""Finetuning of a causal LM (LoRA, QLoRA or full) on a dataset folder made by the dataset step.

Run as: python -m pipelines.finetune --config cfg.json --workdir out/
"""

from __future__ import annotations

import math
import os
import shutil
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
from pipelines.lib import launch, training
from pipelines.lib.memory import (
    arch_of,
    available_memory,
    estimate_memory,
    format_estimate,
    process_memory_mb,
)
from pipelines.lib.merge import merge_adapter, save_atomically
from pipelines.lib.templates import chat_labels
from pipelines.lib.training import PaddingCounter, kl_to_teacher, train_dtype, trainer_class
from pipelines.reports import for_step

METHODS = ("lora", "qlora", "full")


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

    @property
    def outputs(self) -> dict[str, str]:
        """Full finetuning writes `model`; LoRA/QLoRA `adapter` and (merged) `merged`; a pruned
        student also keeps its untrained base as `student_base`."""
        if self.method == "full":
            outputs = {"model": "model"}
        else:
            outputs = {"adapter": "adapter", **({"merged": "model"} if self.merge else {})}
        return outputs | ({"student_base": "model"} if self.keep_layers else {})


CONFIG = FinetuneConfig


def run(config: FinetuneConfig, workdir: Path, report: Reporter) -> StepResult:
    """Train, save the adapter (and the merged model), and summarize; resumes from checkpoints."""
    import torch

    from pipelines.lib.models import load_tokenizer, prune_layers, resolve_model

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
        arch_of(model_path),
        config,
        cuda,
        available_memory(cuda),
        teacher_arch=arch_of(teacher_path) if teacher_path else None,
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
        return launch.launch(
            "pipelines.finetune", config, workdir, report, min(gpus, config.gpus or gpus)
        )

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
    kl_before = kl_to_teacher(trainer, teacher, validation or train) if teacher else None
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
        summary["kl_to_teacher"] = kl_to_teacher(trainer, teacher, validation or train)
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
    report(Log(for_step("finetune", summary).text()))
    return StepResult(artifacts=artifacts, summary=summary)


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


def _bitsandbytes_works() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def _load_model(model_path: str, config: FinetuneConfig, cuda: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = train_dtype(cuda)
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
    from pipelines.lib.models import load_tokenizer, resolve_model

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
    from pipelines.lib.models import load_causal_lm

    teacher, _ = load_causal_lm(path, dtype=train_dtype(cuda))
    if cuda:
        teacher.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    teacher.requires_grad_(False)
    return teacher


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
    counter = PaddingCounter(
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    bridge = training.bridge(report)
    callbacks = [bridge]
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    trainer = trainer_class(teacher, config)(
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
        save_atomically(
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
    save_atomically(
        workdir / "adapter",
        lambda tmp: (trainer.model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
    )
    artifacts = [("adapter", "adapter", {**meta, **lora, "name": "adapter"})]
    if config.merge:
        report(Progress(1, 1, "merging the adapter into the base"))
        save_atomically(
            workdir / "merged", lambda tmp: merge_adapter(model_path, workdir / "adapter", tmp)
        )
        artifacts.append(("model", "merged", {**meta, **lora, "name": "merged"}))
    return artifacts


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
        "peak_memory_mb": round(process_memory_mb()),
        **data_stats,
    }


if __name__ == "__main__":
    if "--events" in sys.argv:  # one rank under accelerate (lib/launch.py)
        launch.rank_main(FinetuneConfig, run)
    else:
        main(FinetuneConfig, run)
