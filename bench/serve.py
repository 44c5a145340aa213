"""The local runtime on the bundled model in int4, in one run: onnxruntime-genai's own decode
loop, then `slmops serve` with one streaming client, then with 4 concurrent clients (the
official openai client, the same prompts, 64 tokens each).

Run as: python bench/serve.py [--model ONNX_DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    json.loads(line)["messages"][:1]
    for line in (ROOT / "pipelines" / "samples" / "heldout_chat.jsonl").read_text().splitlines()
]
TOKENS = 64


def raw_decode_tokens_per_s(folder: str, prompts) -> float:
    """onnxruntime-genai's Generator, one prompt at a time: decode tokens/s after the first."""
    import onnxruntime_genai as og

    from pipelines.lib.onnx_model import load_model

    model = load_model(folder)  # the same threads as the server
    tokenizer = og.Tokenizer(model)
    tokens, seconds = 0, 0.0
    for messages in prompts:
        ids = tokenizer.encode(
            tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        )
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        started, count = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        tokens, seconds = tokens + count, seconds + time.perf_counter() - started
    return tokens / seconds


def ask(api, messages) -> dict[str, float]:
    """One streamed completion: time to the first token, tokens, decode seconds after it."""
    started = time.perf_counter()
    first, usage = None, None
    for chunk in api.chat.completions.create(
        model="bundled",
        messages=messages,
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            usage = chunk.usage
    total = time.perf_counter() - started
    return {"ttft": first or total, "tokens": usage.completion_tokens, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="an ONNX Runtime GenAI folder (default: build int4)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the 12 prompts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = args.model
        if not folder:
            from pipelines import quantize
            from pipelines.lib.models import bundled_model_dir

            config = quantize.QuantizeConfig(model=str(bundled_model_dir()), gate=False)
            quantize.run(config, Path(tmp), lambda event: None)
            folder = str(Path(tmp) / "onnx")
        prompts = PROMPTS * args.rounds
        raw = raw_decode_tokens_per_s(folder, PROMPTS[:4])
        print(f"onnxruntime-genai loop: {raw:.1f} decode tokens/s", flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "studio.cli", "serve", f"bundled={folder}", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "STUDIO_RUNTIME_API_KEY": ""},
        )
        try:
            from openai import OpenAI

            api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
            deadline = time.monotonic() + 120
            while True:
                try:
                    api.models.list()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
            ask(api, PROMPTS[0])  # warm-up
            started = time.perf_counter()
            single = [ask(api, p) for p in prompts]
            single_wall = time.perf_counter() - started
            started = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                several = list(pool.map(lambda p: ask(api, p), prompts))
            several_wall = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(10)
    one = sum(r["tokens"] for r in single) / single_wall
    four = sum(r["tokens"] for r in several) / several_wall
    decode = sum(r["tokens"] - 1 for r in single) / sum(r["total"] - r["ttft"] for r in single)
    ttfts = sorted(r["ttft"] for r in several)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    print(
        f"one client: {one:.1f} tokens/s ({decode:.1f} decode), time to first token p50 "
        f"{sorted(r['ttft'] for r in single)[len(single) // 2]:.3f} s; 4 clients: {four:.1f} "
        f"tokens/s, time to first token p50 {ttfts[len(ttfts) // 2]:.3f} s, p95 {p95:.3f} s",
        flush=True,
    )
    print(f"BENCH serve_4_clients_over_1_tokens_per_s {four / one:.2f} >= 1.1", flush=True)
    print(f"BENCH serve_4_clients_first_token_p95_s {p95:.3f} < 0.5", flush=True)
    print(f"BENCH serve_decode_over_raw_loop {decode / raw:.2f} >= 0.9", flush=True)


if __name__ == "__main__":
    main()
