"""The quality gate of the quantize step: the source and the quantized model answer the same
held-out prompts one at a time; quality (task metric or perplexity), greedy agreement, chat
template and end-of-sequence parity, size, decode speed, time to first token and memory, each
against the user's targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

from pipelines.base import Log, Progress, Reporter, StepError, fmt
from pipelines.lib import stats

CHECK_QUALITY, CHECK_SPEED = "quality kept (%)", "decode speed-up (x)"
CHECK_MEMORY, CHECK_PARITY = "memory saved (%)", "chat template and end of sequence"


class GateConfig(Protocol):
    """What the gate reads (QuantizeConfig has these fields, and TaskFields' build())."""

    format: str
    execution_provider: str
    task: str
    dataset_dir: str
    split: str
    max_rows: int
    max_new_tokens: int
    min_quality_pct: float
    min_speedup: float
    min_memory_saved_pct: float

    def build(self, labels: list[str]) -> Any: ...


BUILTIN_PROMPTS = Path(__file__).parent.parent / "samples" / "heldout_chat.jsonl"
MIN_STOP_PARITY = 0.8  # share of prompts where both models stop the same way


def quality_gate(
    config: GateConfig,
    source: Path,
    out: Path,
    report: Reporter,
    adapter_file: str | None = None,
) -> dict[str, Any]:
    """The source and the quantized model answer the same held-out prompts one at a time:
    quality (task metric or perplexity), greedy agreement, chat template and end-of-sequence
    parity, size, decode speed, time to first token and memory, against the user's gates."""
    from pipelines.lib.dataset_folder import dataset_labels, held_out
    from pipelines.lib.generation import LocalModel
    from pipelines.lib.sampling import Sampling
    from pipelines.lib.tasks import build_task

    if config.dataset_dir:
        folder = Path(config.dataset_dir)
        rows, split = held_out(folder, config.split, config.max_rows)
        labels = dataset_labels(folder) if config.task == "classification" else []
        task = config.build(labels)
        prompts_from = f"{len(rows)} {split} rows of {folder.parent.name or folder.name}"
    else:
        with BUILTIN_PROMPTS.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][: config.max_rows or None]
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
    from pipelines.lib.models import load_tokenizer

    tokenizer = load_tokenizer(str(source))
    parity = _parity(config, tokenizer, source, out, prompts, replies, adapter_file)
    scores = {}
    for role in results:
        texts = [r.text or "" for r in replies[role]]
        scores[role] = [
            task.score(t, ref) if ref else None for t, ref in zip(texts, references, strict=True)
        ]
        scored = stats.interval(scores[role])
        results[role].update(
            metric=scored["mean"],
            ci_low=scored["ci_low"],
            ci_high=scored["ci_high"],
            scored_rows=scored["rows"],
        )
    agreement = _agreement(tokenizer, replies["source"], replies["quantized"])
    pair = {"a": "source", "b": "quantized", **stats.compare(scores["source"], scores["quantized"])}
    gate = _gates(config, task.metric, results, pair)
    gate["pair"] = pair
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
            "name": CHECK_PARITY,
            "value": parity["stop_parity"],
            "op": ">=",
            "target": MIN_STOP_PARITY,
            "passed": parity["passed"],
        }
    )
    gate["verdict"] = "pass" if all(c["passed"] for c in gate["checks"]) else "fail"
    return gate


def _gate_device(config: GateConfig, out: Path) -> tuple[str, str]:
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
    from pipelines.lib.generation import LocalModel
    from pipelines.lib.onnx_model import OnnxModel

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
    from pipelines.lib.onnx_model import OnnxModel

    args = {
        "path": str(model.path),
        "onnx": isinstance(model, OnnxModel),
        "on_cpu": getattr(model, "on_cpu", False),
        "adapter": str(model.adapter) if getattr(model, "adapter", None) else None,
        "prompt": prompt,
        "max_new_tokens": min(16, sampling.max_new_tokens),
    }
    result = subprocess.run(
        [sys.executable, "-c", "from pipelines.lib import gate; gate._probe_child()", "--"]
        + [json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise StepError(f"measuring the memory of {model.path} failed: {result.stderr[-500:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _probe_child() -> None:
    import threading

    import psutil

    args = json.loads(sys.argv[-1])
    if args["onnx"]:  # an ONNX model is served without torch: its baseline has no torch either
        import onnxruntime_genai  # noqa: F401

        from pipelines.lib.onnx_model import OnnxModel as Model
    else:
        import torch
        import transformers  # noqa: F401

        from pipelines.lib.generation import LocalModel as Model
    from pipelines.lib.sampling import Sampling

    # the resident set sampled (ru_maxrss would keep the parent's peak from before the exec)
    process, done = psutil.Process(), threading.Event()
    base = process.memory_info().rss
    peak = [base]

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if args["onnx"]:
        model = Model(args["path"], on_cpu=args["on_cpu"], adapter=args["adapter"])
    else:
        model = Model(args["path"])
    model.generate([args["prompt"]], Sampling(max_new_tokens=args["max_new_tokens"]))
    done.set()
    sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    if not args["onnx"] and torch.cuda.is_available():
        print(torch.cuda.max_memory_allocated())
    else:
        print(peak[0] - base)


def _parity(config, tokenizer, source, out, prompts, replies, adapter_file) -> dict[str, Any]:
    """Does the quantized model see the prompts the source sees, and stop where it stops?"""
    checks: dict[str, Any] = {}
    if config.format == "onnx":
        from pipelines.lib.onnx_model import OnnxModel, eos_ids

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


def _gates(
    config: GateConfig, metric: str, results: dict[str, dict], pair: dict[str, Any]
) -> dict[str, Any]:
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
        (CHECK_QUALITY, "quality_kept_pct", config.min_quality_pct),
        (CHECK_SPEED, "speedup", config.min_speedup),
        (CHECK_MEMORY, "memory_saved_pct", config.min_memory_saved_pct),
    ]
    gate = {
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
    if quality_by == metric and pair["verdict"] == "too few rows to tell":
        # a share of quality kept means nothing when the rows can't tell the models apart
        quality_check = gate["checks"][0]
        quality_check["passed"] = False
        quality_check["why"] = (
            f"too few rows to tell: the 95% interval of the difference spans "
            f"{100 * (pair['ci_high'] - pair['ci_low']):.0f} points on {pair['rows']} rows; "
            "give the gate more held-out rows (a larger test split)"
        )
    return gate


def _describe(r: dict[str, Any]) -> str:
    return (
        f"perplexity {fmt(r['perplexity'])}, {fmt(r['decode_tokens_per_s'])} tokens/s, first "
        f"token {fmt(r['first_token_p50_s'], unit=' s')}, {fmt(r['memory_mb'], '{:.0f}', ' MB')} "
        f"memory, {fmt(r['size_mb'], '{:.0f}', ' MB')} on disk, stopped on its own "
        f"{r['stopped']}x"
    )


def flat(gate: dict[str, Any]) -> dict[str, float]:
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
