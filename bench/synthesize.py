"""Teacher throughput, side by side in one run: batched local generation against one prompt at a
time (the bundled SmolLM2-135M, same prompts, greedy; the BENCH line is the engine's throughput,
and the answer tokens the step actually gets are printed too), and concurrent endpoint requests
against sequential ones (a local OpenAI-compatible server that answers after a fixed delay).

Run as: python bench/synthesize.py [--prompts 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines import dataset  # noqa: E402
from pipelines.lib.generation import Endpoint, LocalModel, Sampling, TeacherFields  # noqa: E402
from tests.openai_server import FakeOpenAI  # noqa: E402


def prompts(n: int) -> list[list[dict[str, str]]]:
    with dataset.SAMPLE_DATASET.open() as f:
        lines = [line.rsplit(",", 1)[0].strip('"') for line in list(f)[1 : n + 1]]
    return [
        [
            {"role": "system", "content": dataset.SAMPLE_SYSTEM_PROMPT},
            {"role": "user", "content": text},
        ]
        for text in lines
    ]


def tokens_per_s(model: LocalModel, chats, batch: int, sampling: Sampling) -> float:
    """Answer tokens per second as the synthesize step gets them (each answer ends at its
    end-of-sequence; a batch runs until its longest answer is done)."""
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(chats), batch):
        tokens += sum(r.completion_tokens for r in model.generate(chats[i : i + batch], sampling))
    return tokens / (time.perf_counter() - started)


def engine_tokens_per_s(model: LocalModel, chats, batch: int, new_tokens: int) -> float:
    """Generated positions per second with every answer running to `new_tokens` (the engine's
    throughput, independent of where answers happen to end)."""
    import torch

    started, tokens = time.perf_counter(), 0
    for i in range(0, len(chats), batch):
        inputs = model.tokenizer.apply_chat_template(
            chats[i : i + batch],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
            padding=True,
        )
        with torch.no_grad():
            out = model.model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id,
            )
        tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("STUDIO_HOME", tempfile.mkdtemp())
    chats = sorted(prompts(args.prompts), key=lambda c: len(str(c)))  # as the step batches
    sampling = Sampling(max_new_tokens=args.tokens)
    model = LocalModel("bundled")
    model.generate(chats[:2], sampling)  # warm-up
    one = engine_tokens_per_s(model, chats, 1, args.tokens)
    eight = engine_tokens_per_s(model, chats, 8, args.tokens)
    print(
        f"local bundled model: batch 1 {one:.1f} tokens/s, batch 8 {eight:.1f} tokens/s", flush=True
    )
    answers_one = tokens_per_s(model, chats, 1, sampling)
    answers_eight = tokens_per_s(model, chats, 8, sampling)
    print(
        f"answer tokens as the step gets them (each stops at its end): batch 1 "
        f"{answers_one:.1f} tokens/s, batch 8 {answers_eight:.1f} tokens/s "
        f"({answers_eight / answers_one:.2f}x)",
        flush=True,
    )

    delay, requests = 0.2, 32
    with FakeOpenAI(answer=lambda messages: "billing", delay_s=delay) as server:
        fields = TeacherFields(teacher="m", endpoint=server.url, concurrency=8)
        times = {}
        for concurrency in (1, 8):
            endpoint = Endpoint(
                server.url, "m", "", dataclasses.replace(fields, concurrency=concurrency)
            )
            started = time.perf_counter()
            replies = endpoint.generate(chats[:1] * requests, sampling)
            times[concurrency] = time.perf_counter() - started
            endpoint.close()
            assert all(r.text == "billing" for r in replies)
            print(
                f"endpoint ({delay:g} s per answer), {concurrency} at once: {requests} answers "
                f"in {times[concurrency]:.2f} s"
            )
    print(
        f"BENCH synthesize_local_batch8_over_batch1_tokens_per_s {eight / one:.2f} >= 3", flush=True
    )
    print(
        f"BENCH synthesize_endpoint_8_concurrent_over_sequential {times[1] / times[8]:.2f} >= 6",
        flush=True,
    )


if __name__ == "__main__":
    main()
