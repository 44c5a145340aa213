"""Finetuning throughput on mixed-length data: this project's length-grouped batches against plain
random padded batches, same model (the bundled SmolLM2-135M), data and LoRA settings, one run.

Run as: python bench/finetune.py [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines import dataset, finetune  # noqa: E402
from pipelines.base import Log  # noqa: E402

SENTENCE = "We checked the order history and the payment records for this customer. "


def mixed_length_rows(n: int = 480) -> list[dict]:
    """Support questions with answers from one line to a long explanation (long-tailed)."""
    rng = random.Random(0)
    with dataset.SAMPLE_DATASET.open() as f:
        prompts = [line.rsplit(",", 1)[0].strip('"') for line in list(f)[1:]]
    rows = []
    for i in range(n):
        sentences = min(30, int(rng.expovariate(1 / 5)))
        answer = "The intent is clear. " + SENTENCE * sentences
        rows.append({"prompt": prompts[i % len(prompts)], "completion": answer.strip()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("STUDIO_HOME", str(tmp))
        (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed_length_rows()))
        dataset.run(
            dataset.DatasetConfig(name="mixed", files=[str(tmp / "rows.jsonl")]),
            tmp / "data",
            lambda event: None,
        )
        results = {}
        for batching in ("padded", "length_grouped"):
            config = finetune.FinetuneConfig(
                dataset_dir=str(tmp / "data" / "dataset"),
                batching=batching,
                max_steps=args.steps,
                batch_size=8,
                max_seq_len=512,
                eval_steps=0,
                save_steps=1000,
                merge=False,
                warmup_ratio=0.0,
            )
            started = time.monotonic()
            summary = finetune.run(config, tmp / batching, _quiet).summary
            results[batching] = summary
            print(
                f"{batching:>15}: {summary['tokens_per_s']:.1f} real tokens/s, padding "
                f"{summary['padding_share']:.0%} of computed tokens, "
                f"{time.monotonic() - started:.0f} s for {args.steps} steps",
                flush=True,
            )
    ratio = results["length_grouped"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"BENCH finetune_length_grouped_over_padded_tokens_per_s {ratio:.2f} >= 1.5")


def _quiet(event) -> None:
    if isinstance(event, Log) and event.level == "warning":
        print(event.message, flush=True)


if __name__ == "__main__":
    main()
