"""Merging a LoRA adapter into a full-precision copy of its base, and writing folders atomically."""

from __future__ import annotations

import shutil
from pathlib import Path


def merge_adapter(base_path: str, adapter_dir: Path, out: Path) -> None:
    """Merge an adapter into a full-precision copy of its base (never into a 4-bit one)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.lib.models import load_tokenizer

    path = Path(base_path)
    kwargs = {"gguf_file": path.name} if path.is_file() else {}
    base = AutoModelForCausalLM.from_pretrained(
        path.parent if path.is_file() else path, dtype=torch.float32, **kwargs
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(out)
    load_tokenizer(str(adapter_dir)).save_pretrained(out)  # with the chat template


def save_atomically(target: Path, write) -> None:
    """Call write(tmp) on a temporary folder, then rename it to `target` (never half-written)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
