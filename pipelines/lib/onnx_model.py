"""An ONNX Runtime GenAI folder as a model that answers chats, with the interface of LocalModel
(generate, perplexity, memory, size): quantize's quality gate and evaluate use either."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipelines.base import StepError

GENAI_CONFIG = "genai_config.json"
ADAPTER_FILE = "adapter_weights.onnx_adapter"
ONNX_SUFFIXES = (".onnx", ".data", ".onnx_adapter")


def is_onnx_folder(path: str | Path) -> bool:
    return (Path(path) / GENAI_CONFIG).is_file()


def eos_ids(folder: str | Path) -> list[int]:
    """The end-of-sequence token ids a genai_config.json stops at."""
    value = json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"].get("eos_token_id")
    return sorted(value if isinstance(value, list) else [value] if value is not None else [])


def load_model(path: str | Path, on_cpu: bool = False) -> Any:
    """og.Model for a folder, on every CPU core this process may use, unless its genai_config sets
    a thread count. ONNX Runtime's own default was one thread on the 2-core test machine: prompt
    0.50 s -> 0.26 s, decode 22 -> 13 ms per token with both cores (SmolLM2-135M int4)."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    if on_cpu:
        config.clear_providers()
    decoder = json.loads((Path(path) / GENAI_CONFIG).read_text())["model"]["decoder"]
    if "intra_op_num_threads" not in decoder.get("session_options", {}):
        threads = {"intra_op_num_threads": len(os.sched_getaffinity(0))}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    return og.Model(config)


class OnnxModel:
    """Greedy or sampled answers from an ONNX Runtime GenAI model, one chat at a time."""

    engine = "onnxruntime-genai"

    def __init__(self, path: str | Path, on_cpu: bool = False, adapter: str | Path | None = None):
        import onnxruntime_genai as og
        import psutil

        self.path = self.spec = str(path)
        self.on_cpu, self.adapter = on_cpu, adapter
        process = psutil.Process()
        before = process.memory_info().rss
        try:
            self.model = load_model(self.path, on_cpu)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as e:  # onnxruntime-genai raises plain RuntimeErrors
            raise StepError(f"ONNX Runtime GenAI could not load {path}: {e}") from None
        self.adapters = None
        if adapter:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter), "adapter")
        self.loaded_bytes = max(0, process.memory_info().rss - before)
        self.eos = set(eos_ids(path))
        self.parameters = None
        self._hf_tokenizer = None

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """A chat rendered by the folder's own chat template, ready for the answer."""
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def generate(self, prompts: list[list[dict[str, str]]], sampling: Any) -> list[Any]:
        """One reply per chat; each is generated alone and timed to its first token."""
        return [self._one(messages, sampling) for messages in prompts]

    def _one(self, messages: list[dict[str, str]], sampling: Any) -> Any:
        import onnxruntime_genai as og

        from pipelines.lib.sampling import Reply, cut_at_stop

        ids = self.tokenizer.encode(self.prompt_text(messages))
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": len(ids) + sampling.max_new_tokens}
        if sampling.temperature > 0:
            options.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                random_seed=sampling.seed,
            )
        else:
            options.update(do_sample=False)
        params.set_search_options(**options)
        started = time.perf_counter()
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "adapter")
        generator.append_tokens(ids)
        first, tokens = None, []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            if first is None:
                first = time.perf_counter() - started
        seconds = time.perf_counter() - started
        stopped = bool(tokens) and tokens[-1] in self.eos
        text = self.tokenizer.decode(tokens[:-1] if stopped else tokens)
        return Reply(
            text=cut_at_stop(text, sampling.stop).strip(),
            prompt_tokens=len(ids),
            completion_tokens=len(tokens),
            seconds=seconds,
            first_token_s=first,
            stopped=stopped,
        )

    def perplexity(self, conversations: list[list[dict[str, str]]]) -> float | None:
        """exp(mean loss) on the assistant tokens, tokenized exactly as LocalModel does."""
        import math

        import numpy as np

        from pipelines.lib.templates import chat_labels

        total, count = 0.0, 0
        for messages in conversations:
            ids, labels = chat_labels(self.hf_tokenizer(), messages, assistant_only=True)
            targets = np.array(labels[1:])
            mask = targets != -100
            if not mask.any():
                continue
            logits = self._logits(ids)[:-1].astype(np.float64)
            peak = logits.max(-1, keepdims=True)
            log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
            picked = logits[np.arange(len(targets)), np.where(mask, targets, 0)]
            total += float((log_z - picked)[mask].sum())
            count += int(mask.sum())
        return round(math.exp(total / count), 3) if count else None

    def _logits(self, ids: list[int]) -> Any:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "adapter")
        generator.append_tokens(ids)
        return generator.get_output("logits")[0]

    def hf_tokenizer(self) -> Any:
        """The folder's tokenizer as transformers reads it (the builder copies its files)."""
        if self._hf_tokenizer is None:
            from transformers import AutoTokenizer

            self._hf_tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._hf_tokenizer

    def memory_bytes(self) -> int:
        """Resident memory the model took when it loaded (weights and session buffers)."""
        return self.loaded_bytes

    def size_bytes(self) -> int:
        return size_on_disk(self.path)

    def close(self) -> None:
        import gc

        self.adapters = None
        del self.model, self.tokenizer
        gc.collect()


def size_on_disk(folder: str | Path) -> int:
    """Bytes of the model files (graph, external weights, adapters) of an ONNX folder."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.endswith(ONNX_SUFFIXES))
