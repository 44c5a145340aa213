"""Memory: what a training run will need (weights, adapter, optimizer, activations, a teacher),
what the machine has free, and what this process holds now."""

from __future__ import annotations

from typing import Any, Protocol

from pipelines.base import StepError


class TrainingShape(Protocol):
    """The training settings the estimate reads (FinetuneConfig has them)."""

    method: str
    lora_r: int
    batch_size: int
    max_seq_len: int
    gradient_checkpointing: bool
    keep_layers: int


def estimate_memory(
    arch: dict[str, Any],
    config: TrainingShape,
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


def arch_of(model_path: str) -> dict[str, Any]:
    from pipelines.lib.models import model_arch

    arch = model_arch(model_path)
    if arch is None:
        raise StepError(f"{model_path} has no usable config.json (hidden_size, layers, ...).")
    return arch


def available_memory(cuda: bool) -> int:
    if cuda:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    import psutil

    return psutil.virtual_memory().available


def process_memory_mb() -> float:
    """Peak CUDA memory of this process when it uses a GPU, else its resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20
