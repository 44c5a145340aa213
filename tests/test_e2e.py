"""End to end on the bundled SmolLM2-135M-Instruct and the sample dataset, through the CLI: import,
a short LoRA run, and a check that the tuned model answers the sample task better than the base."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.dataset import SAMPLE_DATASET, SAMPLE_SYSTEM_PROMPT

ROOT = Path(__file__).resolve().parent.parent


def _accuracy(model: str, rows: list[dict]) -> float:
    from pipelines import chat

    loaded, tokenizer = chat.load(model)
    hits = 0
    for row in rows:
        prompt = [m for m in row["messages"] if m["role"] != "assistant"]
        answer = chat.reply(loaded, tokenizer, prompt, max_new_tokens=4).lower().split()
        hits += bool(answer) and answer[0].strip(".,:") == row["label"]
    return hits / len(rows)


@pytest.mark.slow
def test_lora_on_the_bundled_model_learns_the_sample_task(tmp_path):
    home, out = tmp_path / "home", tmp_path / "exported"
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
            "40",
            "--batch_size",
            "8",
            "--learning_rate",
            "3e-4",
            "--output_path",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "copied merged/" in result.stdout and (out / "adapter" / "adapter_config.json").exists()
    from studio import store

    with store.connect(home) as db:
        summary = json.loads(store.list_runs(db, step="finetune")[0]["summary_json"])
    assert summary["eval_loss"] < summary["eval_loss_before"]  # the validation loss went down
    dataset = next(home.glob("runs/*/out/dataset"))
    rows = [json.loads(x) for x in (dataset / "validation.jsonl").read_text().splitlines()]
    base, tuned = _accuracy("bundled", rows), _accuracy(str(out / "merged"), rows)
    print(f"sample task accuracy: base {base:.0%}, tuned {tuned:.0%}")
    assert tuned >= base + 0.25
