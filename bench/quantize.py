"""The default int4 recipe on the bundled SmolLM2-135M-Instruct, side by side with its fp32
PyTorch source in one run: size on disk, decode tokens/s and perplexity on held-out answers. The
figures are the quantize step's own quality gate (12 built-in prompts, greedy, one at a time),
so the bench measures what a user of the Quantize tab sees.

Run as: python bench/quantize.py [--precision int4] [--extra_options KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines import quantize  # noqa: E402
from pipelines.base import print_event  # noqa: E402
from pipelines.lib.models import bundled_model_dir  # noqa: E402
from pipelines.reports import for_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--extra_options", nargs="*", default=[])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    source = bundled_model_dir()
    config = quantize.QuantizeConfig(
        model=str(source),
        precision=args.precision,
        extra_options=" ".join(args.extra_options),
        max_rows=args.rows,
        max_new_tokens=args.tokens,
    )
    print(f"recipe: {config.recipe()} {' '.join(args.extra_options)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as workdir:
        started = time.perf_counter()
        summary = quantize.run(config, Path(workdir), print_event).summary
        print(f"whole step: {time.perf_counter() - started:.0f} s")
    print(for_step("quantize", summary).text())
    gate = summary["gate"]
    source_model, quantized = gate["models"]["source"], gate["models"]["quantized"]
    print(
        f"size: {quantized['size_mb']:.0f} MB vs {source_model['size_mb']:.0f} MB fp32 "
        f"safetensors; decode: {quantized['decode_tokens_per_s']} vs "
        f"{source_model['decode_tokens_per_s']} tokens/s; perplexity: "
        f"{quantized['perplexity']} vs {source_model['perplexity']}"
    )
    name = args.precision
    print(f"BENCH quantize_{name}_size_over_fp32 {gate['size_ratio']:.3f} <= 0.25", flush=True)
    print(f"BENCH quantize_{name}_decode_over_pytorch_fp32 {gate['speedup']:.2f} >= 5", flush=True)
    print(
        f"BENCH quantize_{name}_perplexity_over_fp32 {gate['perplexity_ratio']:.3f} <= 1.08",
        flush=True,
    )


if __name__ == "__main__":
    main()
