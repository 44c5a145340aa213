"""GPU check for a machine with CUDA (under 8 minutes): bf16 LoRA and QLoRA (bitsandbytes 4-bit
NF4, paged AdamW) on the bundled SmolLM2-135M and the sample dataset, tokens/s and peak memory;
then the LoRA model exported to ONNX int4 for CUDA and to bitsandbytes NF4, each with its
quality gate.

Run as: python bench/gpu_check.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines import dataset, finetune, quantize  # noqa: E402
from pipelines.reports import for_step  # noqa: E402


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a machine with an NVIDIA GPU")
    print(
        f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"bf16 {torch.cuda.is_bf16_supported()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("STUDIO_HOME", str(tmp))
        dataset.run(
            dataset.DatasetConfig(
                name="sample",
                files=[str(dataset.SAMPLE_DATASET)],
                system_prompt=dataset.SAMPLE_SYSTEM_PROMPT,
            ),
            tmp / "data",
            lambda event: None,
        )
        results = {}
        for method in ("lora", "qlora"):
            torch.cuda.reset_peak_memory_stats()
            config = finetune.FinetuneConfig(
                dataset_dir=str(tmp / "data" / "dataset"),
                method=method,
                max_steps=60,
                batch_size=16,
                learning_rate=3e-4,
                eval_steps=0,
                save_steps=1000,
            )
            started = time.monotonic()
            summary = finetune.run(config, tmp / method, lambda event: None).summary
            results[method] = summary
            print(
                f"{method}: {summary['tokens_per_s']:.0f} tokens/s, peak "
                f"{summary['peak_memory_mb']:.0f} MB, validation loss "
                f"{summary['eval_loss_before']:.3f} -> {summary['eval_loss']:.3f}, "
                f"{time.monotonic() - started:.0f} s",
                flush=True,
            )
        gates = {}
        for fmt in ("onnx", "bitsandbytes"):
            config = quantize.QuantizeConfig(
                model=str(tmp / "lora" / "merged"),
                format=fmt,
                execution_provider="cuda",
                dataset_dir=str(tmp / "data" / "dataset"),
                split="validation",
                max_rows=8,
                max_new_tokens=16,
            )
            started = time.monotonic()
            summary = quantize.run(config, tmp / f"q-{fmt}", lambda event: None).summary
            gates[fmt] = summary["gate"]
            print(for_step("quantize", summary).text(), flush=True)
            print(f"{fmt}: {time.monotonic() - started:.0f} s", flush=True)
    lora, qlora = results["lora"], results["qlora"]
    print(f"BENCH gpu_lora_bf16_tokens_per_s {lora['tokens_per_s']:.0f} >= 1000")
    print(
        f"BENCH gpu_qlora_over_lora_peak_memory "
        f"{qlora['peak_memory_mb'] / lora['peak_memory_mb']:.2f} <= 1"
    )
    print(
        f"BENCH gpu_qlora_validation_loss_drop "
        f"{qlora['eval_loss_before'] - qlora['eval_loss']:.3f} > 0"
    )
    print(f"BENCH gpu_onnx_int4_cuda_size_over_fp32 {gates['onnx']['size_ratio']:.3f} <= 0.25")
    print(f"BENCH gpu_bnb_nf4_size_over_fp32 {gates['bitsandbytes']['size_ratio']:.3f} <= 0.5")


if __name__ == "__main__":
    main()
