"""End to end on the bundled SmolLM2-135M-Instruct and the sample dataset, through the CLI: import
and a short LoRA run (the tuned model answers the sample task better than the base), then a
distillation of that tuned model into a pruned student, with its report, and the tuned model
quantized to int4 with its quality gate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.dataset import SAMPLE_DATASET, SAMPLE_SYSTEM_PROMPT

ROOT = Path(__file__).resolve().parent.parent


def _accuracy(model: str, rows: list[dict]) -> float:
    from pipelines.lib import chat

    loaded, tokenizer = chat.load(model)
    hits = 0
    for row in rows:
        prompt = [m for m in row["messages"] if m["role"] != "assistant"]
        answer = chat.reply(loaded, tokenizer, prompt, max_new_tokens=4).lower().split()
        hits += bool(answer) and answer[0].strip(".,:") == row["label"]
    return hits / len(rows)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The CLI finetune of the bundled model on the sample data: (home, exported folder, result)."""
    tmp = tmp_path_factory.mktemp("e2e")
    home, out = tmp / "home", tmp / "exported"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "--home",
            str(home),
            "finetune",
            "--data_files",
            str(SAMPLE_DATASET),
            "--system-prompt",
            SAMPLE_SYSTEM_PROMPT,
            "--method",
            "lora",
            "--max_steps",
            "16",
            "--batch_size",
            "8",
            "--learning_rate",
            "8e-4",
            "--output_path",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return home, out, result


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture's finetune runs inside the first test's time
def test_lora_on_the_bundled_model_learns_the_sample_task(tuned):
    home, out, result = tuned
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "copied merged/" in result.stdout and (out / "adapter" / "adapter_config.json").exists()
    from studio import store

    with store.connect(home) as db:
        summary = json.loads(store.list_runs(db, step="finetune")[0]["summary_json"])
    assert summary["eval_loss"] < summary["eval_loss_before"]  # the validation loss went down
    dataset = next(home.glob("runs/*/out/dataset"))
    rows = [json.loads(x) for x in (dataset / "validation.jsonl").read_text().splitlines()][:24]
    base, tuned_accuracy = _accuracy("bundled", rows), _accuracy(str(out / "merged"), rows)
    print(f"sample task accuracy: base {base:.0%}, tuned {tuned_accuracy:.0%}")
    assert tuned_accuracy >= base + 0.25


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_distill_the_tuned_model_into_a_pruned_student(tuned, tmp_path):
    """The tuned 135M model teaches a 10-layer copy of itself (answers and logits)."""
    home, out, result = tuned
    assert result.returncode == 0, result.stderr[-2000:]
    dataset = next(home.glob("runs/*/out/dataset"))
    spec = {
        "dataset_dir": str(dataset),
        "logits": True,
        "synthesize": {
            "task": "classification",
            "teacher": str(out / "merged"),
            "splits": "train",
            "max_rows": 40,
            "max_new_tokens": 5,
            "temperature": 0.0,
        },
        "finetune": {
            "base_model": str(out / "merged"),
            "keep_layers": 10,
            "method": "full",
            "max_steps": 12,
            "batch_size": 8,
            "learning_rate": 1e-4,
            "eval_steps": 0,
        },
        "evaluate": {"max_rows": 8},
    }
    (tmp_path / "distill.json").write_text(json.dumps(spec))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "--home",
            str(home),
            "distill",
            "--config",
            str(tmp_path / "distill.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout[-1500:])
    from studio import store

    with store.connect(home) as db:
        report = json.loads(store.list_runs(db, step="evaluate")[0]["summary_json"])
        synthesis = json.loads(store.list_runs(db, step="synthesize")[0]["summary_json"])
    assert synthesis["success_ratio"] >= 0.7
    models, ratios = report["models"], report["ratios"]
    assert set(models) == {"teacher", "student", "student_base"}
    assert models["student"]["parameters"] < 0.6 * models["teacher"]["parameters"]
    assert ratios["memory_saved_pct"] > 20 and ratios["size_saved_pct"] > 40
    assert all(ratios[k] is not None for k in ("quality_kept_pct", "time_saved_pct"))
    assert "of the teacher's quality" in run.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quantize_the_tuned_model_to_int4(tuned, tmp_path):
    """The tuned model in int4 for the CPU (default recipe) through the CLI: it sees the prompts
    the source sees, answers with a label and stops at the source's end-of-sequence token."""
    home, out, result = tuned
    assert result.returncode == 0, result.stderr[-2000:]
    dataset = next(home.glob("runs/*/out/dataset"))
    (tmp_path / "gate.json").write_text(json.dumps({"max_rows": 8, "max_new_tokens": 8}))
    run = subprocess.run(
        [
            sys.executable, "-m", "studio.cli", "--home", str(home), "quantize",
            "--config", str(tmp_path / "gate.json"),
            "-m", str(out / "merged"), "-p", "int4", "-e", "cpu",
            "--dataset", str(dataset), "--task", "classification",
            "-o", str(out / "quantized"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout[-2500:])
    from pipelines.lib.onnx_model import OnnxModel
    from pipelines.lib.sampling import Sampling
    from studio import store

    with store.connect(home) as db:
        summary = json.loads(store.list_runs(db, step="quantize")[0]["summary_json"])
    gate = summary["gate"]
    parity = gate["parity"]
    assert parity["chat_template"] and parity["tokens"] and parity["eos_match"]
    assert parity["stop_parity"] == 1.0 and gate["quality_by"] == "accuracy"
    assert gate["size_ratio"] < 0.3 and gate["speedup"] > 1.5
    rows = [json.loads(x) for x in (dataset / "validation.jsonl").read_text().splitlines()][:6]
    model = OnnxModel(out / "quantized" / "onnx")
    labels = {"account", "billing", "product", "returns", "shipping", "technical"}
    for row in rows:
        prompt = [m for m in row["messages"] if m["role"] != "assistant"]
        reply = model.generate([prompt], Sampling(max_new_tokens=16))[0]
        assert reply.stopped, reply  # ended at <|im_end|>, not at the length limit
        assert reply.text.lower().strip(".") in labels, reply.text
