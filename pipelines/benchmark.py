"""The `benchmark` step: warm-up, then N rounds of a fixed prompt set against an OpenAI-compatible
endpoint (the studio's runtime, Foundry Local, vLLM, Ollama...), streamed and greedy: latency
average and p95, time to first token, tokens/s, and the server's peak memory if it reports it.

Run alone: python -m pipelines.benchmark --config cfg.json --workdir DIR
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.base import (
    Log,
    Metrics,
    Progress,
    Reporter,
    StepError,
    StepResult,
    main,
    option,
)
from pipelines.lib.hardware import hardware
from pipelines.reports import for_step

PROMPTS = Path(__file__).parent / "samples" / "bench_prompts.jsonl"
API_KEY_ENV = "STUDIO_RUNTIME_API_KEY"  # the runtime's key; the studio passes it to the run


@dataclass(frozen=True)
class BenchmarkConfig:
    url: str = option(
        "",
        "Endpoint URL",
        "Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.",
    )
    model: str = option("", "Model", "The served model's name; empty takes the first one listed.")
    model_dir: str = option(
        "",
        "Model folder",
        "The artifact being served: the results go to its lineage and model card.",
    )
    rounds: int = option(3, "Rounds", "How many times the whole prompt set is sent.")
    warmup: int = option(1, "Warm-up requests", "Requests sent first and not counted.")
    max_tokens: int = option(64, "Max tokens", "Longest answer per request.")
    prompts_file: str = option(
        "",
        "Prompts",
        "A JSONL file of {'messages': [...]} rows; empty uses the built-in set of 8 prompts.",
    )
    api_key_env: str = option(
        API_KEY_ENV, "API key variable", "The environment variable holding the endpoint's key."
    )
    timeout_s: float = option(120.0, "Timeout (s)", "Longest wait for one answer.")

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: '{self.url}' must start with http:// or https://")
        for name, low in (("rounds", 1), ("warmup", 0), ("max_tokens", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: {getattr(self, name)} must be at least {low}")
        if self.prompts_file and not Path(self.prompts_file).is_file():
            raise ValueError(f"prompts_file: no file at {self.prompts_file}")

    @property
    def queue(self) -> str:
        """Timing runs on the compute queue, so that no training shares the CPU with it."""
        return "compute"

    @property
    def outputs(self) -> dict[str, str]:
        return {"report.json": "report"}


CONFIG = BenchmarkConfig


def api_base(url: str) -> str:
    """'http://h:8000', 'http://h:8000/v1/' -> 'http://h:8000/v1'."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def load_prompts(path: str = "") -> list[list[dict[str, str]]]:
    """The conversations to send: every message but a final assistant answer."""
    rows = [json.loads(line) for line in Path(path or PROMPTS).read_text().splitlines() if line]
    prompts = []
    for row in rows:
        messages = row.get("messages") if isinstance(row, dict) else None
        if not messages:
            raise StepError(f"{path}: every line must be a JSON object with 'messages'")
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        prompts.append(messages)
    return prompts


def run(config: BenchmarkConfig, workdir: Path, report: Reporter) -> StepResult:
    import httpx

    base = api_base(config.url)
    key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    prompts = load_prompts(config.prompts_file)
    with httpx.Client(headers=headers, timeout=config.timeout_s) as client:
        model = config.model or _first_model(client, base)
        report(
            Log(
                f"benchmarking '{model}' at {base}: {config.warmup} warm-up, "
                f"{config.rounds} x {len(prompts)} prompts, greedy, {config.max_tokens} tokens"
            )
        )
        for i in range(config.warmup):
            _request(client, base, model, prompts[i % len(prompts)], config.max_tokens)
        samples = []
        total = config.rounds * len(prompts)
        started = time.perf_counter()
        for n in range(total):
            sample = _request(client, base, model, prompts[n % len(prompts)], config.max_tokens)
            samples.append(sample)
            report(Metrics(step=n + 1, values={k: v for k, v in sample.items() if v is not None}))
            report(Progress(n + 1, total, f"request {n + 1}/{total}"))
        wall = time.perf_counter() - started
        memory = _server_memory(client, base)
    summary = summarize(samples, wall)
    summary.update(
        url=base,
        model=model,
        rounds=config.rounds,
        prompts=len(prompts),
        max_tokens=config.max_tokens,
        peak_memory_mb=memory,
        hardware=hardware(),
    )
    (workdir / "report.json").write_text(json.dumps(summary, indent=2))
    report(Log(for_step("benchmark", summary).text()))
    return StepResult(
        artifacts=[("report", "report.json", {"name": f"benchmark of {model}"})], summary=summary
    )


def summarize(samples: list[dict[str, float | None]], wall_s: float) -> dict[str, Any]:
    """Latency and first-token average and p95, decode and overall tokens/s."""
    latency = [s["latency_s"] for s in samples]
    ttft = [s["ttft_s"] for s in samples if s["ttft_s"] is not None]
    tokens = sum(s["tokens"] for s in samples)
    decode = [s["decode_tokens_per_s"] for s in samples if s["decode_tokens_per_s"]]
    return {
        "requests": len(samples),
        "latency_avg_s": statistics.fmean(latency),
        "latency_p95_s": p95(latency),
        "ttft_avg_s": statistics.fmean(ttft) if ttft else None,
        "ttft_p95_s": p95(ttft) if ttft else None,
        "decode_tokens_per_s": statistics.fmean(decode) if decode else None,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "completion_tokens": tokens,
    }


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _request(client: Any, base: str, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed, greedy chat: its latency, first-token time, tokens and decode rate."""
    import httpx

    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    pieces = 0
    usage = None
    try:
        with client.stream("POST", f"{base}/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise StepError(_refusal(base, response))
            for line in response.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        pieces += 1
                        first = first if first is not None else time.perf_counter() - start
    except httpx.TransportError as e:
        raise StepError(_unreachable(base, e)) from None
    latency = time.perf_counter() - start
    tokens = int(usage["completion_tokens"]) if usage else pieces
    decode_time = latency - (first or 0)
    return {
        "latency_s": latency,
        "ttft_s": first,
        "tokens": tokens,
        "decode_tokens_per_s": (tokens - 1) / decode_time if tokens > 1 and decode_time else None,
    }


def _first_model(client: Any, base: str) -> str:
    import httpx

    try:
        response = client.get(f"{base}/models")
    except httpx.TransportError as e:
        raise StepError(_unreachable(base, e)) from None
    if response.status_code >= 400:
        raise StepError(_refusal(base, response))
    models = [m["id"] for m in response.json().get("data", [])]
    if not models:
        raise StepError(f"{base}/models lists no model: load one on that server first")
    return models[0]


def _server_memory(client: Any, base: str) -> float | None:
    """The studio's runtime reports its peak memory on /health; other servers don't."""
    import httpx

    try:
        health = client.get(base[: -len("/v1")] + "/health").json()
        return float(health["memory"]["peak_rss_mb"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _unreachable(base: str, error: Exception) -> str:
    return (
        f"Can't reach {base} ({type(error).__name__}: {error}). Start the model in the Deploy "
        "tab (or check the URL and port) and try again."
    )


def _refusal(base: str, response: Any) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    hint = " Give the endpoint's API key." if response.status_code in (401, 403) else ""
    return f"{base} answered {response.status_code}: {message}.{hint}"


if __name__ == "__main__":
    main(BenchmarkConfig, run)
