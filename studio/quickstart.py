"""Quick start: the whole journey on the sample dataset as one chain of runs sized for a 2-core CPU:
import -> the bundled SmolLM2 answers (teacher) -> a pruned student learns its answers -> student
vs teacher report -> LoRA on the labels -> int4 with the quality gate; then the studio serves the
result, and `report` tells what was gained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.dataset import SAMPLE_DATASET, SAMPLE_SYSTEM_PROMPT, DatasetConfig
from pipelines.finetune import FinetuneConfig
from pipelines.lib.stats import says, with_interval
from pipelines.quantize import QuantizeConfig
from studio import distill, store
from studio.jobs import JobRunner

ORDER = ("dataset", "synthesize", "finetune", "evaluate", "lora", "quantize")
LABELS = {
    "dataset": "import the sample dataset",
    "synthesize": "the bundled SmolLM2 answers (teacher)",
    "finetune": "a pruned student learns its answers",
    "evaluate": "student vs teacher",
    "lora": "LoRA on the labels",
    "quantize": "int4 with the quality gate",
}
# sized for 2 CPU cores: 12 to 14 minutes in all (bench/quickstart.py measures it)
SPEC: dict[str, Any] = {
    "logits": False,  # the teacher's logits cost a 30-layer forward per step: answers only here
    # the bundled model is no classifier (5% of its answers name a label): it teaches the
    # student how it answers customers; the labels come with the LoRA step
    "synthesize": {
        "task": "conversation",
        "teacher": "bundled",
        "splits": "train",
        "max_rows": 48,
        "max_new_tokens": 32,
        "temperature": 0.0,
    },
    "finetune": {
        "base_model": "bundled",
        "keep_layers": 10,
        "method": "full",
        "max_steps": 24,
        "batch_size": 8,
        "learning_rate": 1e-4,
        "eval_steps": 0,
    },
    "evaluate": {"task": "classification", "max_new_tokens": 5},  # the whole test split
}
LORA: dict[str, Any] = {
    "method": "lora",
    "max_steps": 60,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "max_seq_len": 256,
    "eval_steps": 0,
}
GATE: dict[str, Any] = {"task": "classification", "max_new_tokens": 5}  # the whole test split


def submit(
    runner: JobRunner, name: str = "Quick start", owner: str | None = None
) -> dict[str, str]:
    """Queue the chain; returns the run id of each step (ORDER)."""
    home = runner.home
    runner.check(owner, [], room=len(ORDER))
    with store.connect(home) as db:
        chain_id = store.create_chain(db, "quickstart", name, owner or "")
    sample = store.keep_uploads(home, [str(SAMPLE_DATASET)], owner or "")
    dataset = DatasetConfig(
        name="support (quick start)",
        files=sample,
        system_prompt=SAMPLE_SYSTEM_PROMPT,
        train_ratio=0.8,
        validation_ratio=0.1,
        test_ratio=0.1,  # the held-out rows of the report and the quality gate
    )
    dataset_id = runner.submit(
        "dataset", dataset, name=f"{name} · import", owner=owner, chain=(chain_id, "dataset")
    )
    data = str(runner.output(dataset_id, "dataset"))
    chain = distill.submit(
        runner,
        {**SPEC, "dataset_dir": data},
        name=name,
        depends_on=dataset_id,
        owner=owner,
        chain_id=chain_id,
    )
    student = str(runner.output(chain["finetune"], "model"))
    lora = FinetuneConfig(dataset_dir=data, base_model=student, **LORA)
    lora_id = runner.submit(
        "finetune",
        lora,
        name=f"{name} · LoRA on the labels",
        depends_on=chain["evaluate"],
        owner=owner,
        chain=(chain_id, "lora"),
    )
    merged = str(runner.output(lora_id, "merged"))
    quantize = QuantizeConfig(model=merged, dataset_dir=data, **GATE)
    quantize_id = runner.submit(
        "quantize",
        quantize,
        name=f"{name} · int4",
        depends_on=lora_id,
        owner=owner,
        chain=(chain_id, "quantize"),
    )
    return {"dataset": dataset_id, **chain, "lora": lora_id, "quantize": quantize_id}


def latest(home: Path, owner: str | None = None) -> dict[str, str]:
    """The newest chain `submit` queued (found again after a closed tab or a restart); {} when
    there is none, or when one of its runs was deleted."""
    with store.connect(home) as db:
        runs = store.latest_chain(db, "quickstart", owner)
        rows = [store.get_run(db, run_id) for run_id in runs.values()]
    complete = set(runs) == set(ORDER) and all(r and not r["deleted"] for r in rows)
    return runs if complete else {}


def state(home: Path, runs: dict[str, str]) -> list[dict[str, Any]]:
    """Each step of the chain with its run's status, progress and message."""
    with store.connect(home) as db:
        rows = {step: store.get_run(db, run_id) for step, run_id in runs.items()}
    return [
        {
            "step": step,
            "label": LABELS[step],
            "run_id": runs[step],
            "status": rows[step]["status"] if rows[step] else "deleted",
            "progress": (rows[step] or {}).get("progress") or 0.0,
            "message": (rows[step] or {}).get("error") or (rows[step] or {}).get("message") or "",
            "row": rows[step],
        }
        for step in ORDER
        if step in runs
    ]


def onnx_folder(home: Path, runs: dict[str, str]) -> Path | None:
    """The quantized model, once the chain's last run succeeded."""
    with store.connect(home) as db:
        folder = store.output(db, home, runs["quantize"], "onnx")
    return folder if folder.is_dir() else None


def report(home: Path, runs: dict[str, str]) -> dict[str, Any]:
    """What was gained, each figure from the run that measured it side by side: accuracy of
    teacher, student, tuned student and int4 model on the same held-out rows (each with its 95%
    interval); distillation's time and memory saved (student vs teacher); quantization's
    speed-up and memory saved (int4 vs the fp32 student); size on disk of teacher and int4."""
    with store.connect(home) as db:
        evaluation = json.loads(store.get_run(db, runs["evaluate"])["summary_json"] or "{}")
        quantized = json.loads(store.get_run(db, runs["quantize"])["summary_json"] or "{}")
    gate = quantized.get("gate", {})
    models = evaluation.get("models", {})
    ratios = evaluation.get("ratios", {})
    gated = gate.get("models", {})
    figures: dict[str, Any] = {
        "metric": evaluation.get("metric"),
        "rows": evaluation.get("rows"),
        "gate_rows": gate.get("pair", {}).get("rows"),
    }
    for name, result in (
        ("teacher_quality", models.get("teacher", {})),
        ("student_quality", models.get("student", {})),
        ("tuned_student_quality", gated.get("source", {})),
        ("final_quality", gated.get("quantized", {})),
    ):
        figures[name] = result.get("metric")
        figures[f"{name}_ci_low"] = result.get("ci_low")
        figures[f"{name}_ci_high"] = result.get("ci_high")
    final = gated.get("quantized", {})
    return figures | {
        "distill_time_saved_pct": ratios.get("time_saved_pct"),
        "distill_memory_saved_pct": ratios.get("memory_saved_pct"),
        "int4_quality_kept_pct": gate.get("quality_kept_pct"),
        "int4_speedup": gate.get("speedup"),
        "int4_memory_saved_pct": gate.get("memory_saved_pct"),
        "decode_tokens_per_s": final.get("decode_tokens_per_s"),
        "size_mb": final.get("size_mb"),
        "teacher_size_mb": models.get("teacher", {}).get("size_mb"),
        "gate_verdict": gate.get("verdict"),
        "gate_says": says("the fp32 student", "int4", gate["pair"]) if gate.get("pair") else None,
    }


def format_report(r: dict[str, Any]) -> str:
    def num(value: Any, spec: str = "{:.3g}") -> str:
        return "n/a" if value is None else spec.format(value)

    def quality(name: str, rows: Any) -> str:
        return with_interval(r[name], r[f"{name}_ci_low"], r[f"{name}_ci_high"], rows or 0)

    smaller = (
        f"{r['teacher_size_mb'] / r['size_mb']:.1f}x smaller"
        if r["size_mb"] and r["teacher_size_mb"]
        else "n/a"
    )
    return (
        f"{r['metric']} (95% intervals): teacher {quality('teacher_quality', r['rows'])}, "
        f"distilled student {quality('student_quality', r['rows'])}, after LoRA "
        f"{quality('tuned_student_quality', r['gate_rows'])}, int4 "
        f"{quality('final_quality', r['gate_rows'])}. "
        f"Distillation: {num(r['distill_time_saved_pct'])}% less time per answer, "
        f"{num(r['distill_memory_saved_pct'])}% less memory than the teacher. "
        f"int4: {num(r['int4_speedup'])}x the fp32 student's decode speed "
        f"({num(r['decode_tokens_per_s'], '{:.0f}')} tokens/s), "
        f"{num(r['int4_memory_saved_pct'])}% less memory; {r['gate_says'] or 'not compared'}; "
        f"{num(r['size_mb'], '{:.0f}')} MB on disk against the teacher's "
        f"{num(r['teacher_size_mb'], '{:.0f}')} MB ({smaller}). Quality gate: {r['gate_verdict']}."
    )
