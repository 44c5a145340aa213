"""Distillation on tiny models: task checks, teachers (local and a scripted OpenAI-compatible
server with faults), the success gate, resume after a kill, pruned students, logit
distillation and the evaluation report."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import evaluate, finetune, synthesize
from pipelines.base import Log, StepError
from pipelines.lib import generation, memory, models
from pipelines.lib.models import prune_layers
from pipelines.lib.tasks import build_task, label_bias, rouge_l
from pipelines.reports import for_step
from tests.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent


def number(prompt: str) -> int:
    """The row number in a tiny_dataset prompt (-1 for the connection check's prompt)."""
    found = re.findall(r"\d+", prompt)
    return int(found[-1]) if found else -1


def label_of(messages):
    """The scripted teacher: the right label of a tiny_dataset row (odd numbers are good)."""
    row = number(messages[-1]["content"])
    return "OK" if row < 0 else "good" if row % 2 else "bad"


def rows_answered(server: FakeOpenAI) -> int:
    return sum(n for prompt, n in server.answered.items() if number(prompt) >= 0)


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(generation, "BACKOFF_S", 0.01)


def test_task_checks_extract_answers():
    classify = build_task("classification", labels=["billing", "shipping"])
    assert "billing, shipping" in classify.system_prompt
    assert classify.check("Billing.") == ("billing", "")
    assert classify.check("This is about shipping, I think") == ("shipping", "")
    assert classify.check("billing or shipping")[0] is None  # two labels: ambiguous
    assert classify.check("")[1] == "empty reply"
    choice = build_task("multiple_choice")
    assert choice.check("The answer is (C) because...")[0] == "C"
    assert choice.check("B. Paris")[0] == "B"
    assert build_task("nli").check("Contradiction: the premise says...")[0] == "contradiction"
    math = build_task("math", chain_of_thought=True)
    assert "step by step" in math.system_prompt and math.keeps_full_reply
    assert math.check("3 + 4 = 7, so\nAnswer: 1,007")[0] == "1007"
    assert math.score("Answer: 42.0", "#### 42") == 1.0
    summary = build_task("summarization")
    assert summary.check("word " * 81)[1] == "longer than 80 words"
    custom = build_task("custom", answer_pattern=r"label=(\w+)")
    assert custom.check("ok label=yes")[0] == "yes" and custom.metric == "exact_match"
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("a b", "c d") == 0.0
    assert label_bias({"a": 5, "b": 5}, ("a", "b")) == 0.0
    assert label_bias({"a": 10}, ("a", "b")) == 0.5


def test_local_teacher_writes_answers(tiny_lm, tiny_dataset, tmp_path, events):
    config = synthesize.SynthesizeConfig(
        dataset_dir=str(tiny_dataset),
        task="conversation",
        teacher=str(tiny_lm),
        max_new_tokens=6,
        batch_size=4,
        max_rows=10,
        min_success_ratio=0.0,
    )
    result = synthesize.run(config, tmp_path, events.append)
    out = tmp_path / "dataset"
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    summary = result.summary
    assert summary["rows"] == 20 and summary["valid"] + sum(summary["rejected"].values()) == 20
    assert rows and all(r["messages"][-1]["content"] == r["teacher_reply"] for r in rows)
    assert summary["completion_tokens"] > 0 and summary["engine"] == "transformers"
    assert (
        set(summary["splits"]) == {"train", "validation"}
        and (out / "flat" / "train.jsonl").exists()
    )
    assert result.artifacts[0][0] == "dataset" and "tiny-lm" in result.artifacts[0][2]["teacher"]
    assert not (tmp_path / "checkpoints").exists()  # the answer cache goes once all is written


def test_endpoint_teacher_retries_faults_and_counts_usage(tiny_dataset, tmp_path, fast_retries):
    faults = {"1": "429", "2": "500", "3": "timeout", "4": "malformed"}

    def fault(prompt, attempt):  # each kind of fault once, on the first try of some rows
        return faults.get(str(number(prompt))[-1]) if attempt == 0 and number(prompt) >= 0 else None

    with FakeOpenAI(answer=label_of, faults=fault, key="sk-test") as server:
        os.environ["TEST_TEACHER_KEY"] = "sk-test"
        config = synthesize.SynthesizeConfig(
            dataset_dir=str(tiny_dataset),
            teacher="big-model",
            endpoint=server.url,
            api_key_env="TEST_TEACHER_KEY",
            concurrency=4,
            timeout_s=1.0,
            price_input_per_m=1.0,
            price_output_per_m=2.0,
        )
        assert config.queue == "network"
        result = synthesize.run(config, tmp_path, lambda event: None)
    summary = result.summary
    assert summary["success_ratio"] == 1.0 and summary["rows"] == 48
    assert summary["teacher_accuracy_on_references"] == 1.0
    assert summary["answer_labels"] == {"bad": 24, "good": 24} and summary["answer_bias"] == 0.0
    assert summary["prompt_tokens"] == 480 and summary["cost"] == pytest.approx(0.000576)
    assert 1 < server.max_in_flight <= 4
    faulty = [p for p in server.calls if number(p) >= 0 and str(number(p))[-1] in faults]
    assert faulty and all(server.calls[p] == 2 for p in faulty)  # retried once, then answered
    assert "sk-test" not in (tmp_path / "dataset" / "README.md").read_text()


def test_success_gate_fails_clearly_and_writes_nothing(tiny_dataset, tmp_path, fast_retries):
    def answer(messages):  # a third of the answers are not a label at all
        return (
            "I cannot say"
            if label_of(messages) == "good" and "3" in messages[-1]["content"]
            else label_of(messages)
        )

    def fault(prompt, attempt):
        return "500" if number(prompt) % 3 == 0 else None

    with FakeOpenAI(answer=answer, faults=fault) as server:
        config = synthesize.SynthesizeConfig(
            dataset_dir=str(tiny_dataset), teacher="m", endpoint=server.url, max_retries=1
        )
        with pytest.raises(StepError, match=r"only \d+ of 48 rows got a valid teacher answer"):
            synthesize.run(config, tmp_path, lambda event: None)
    assert not (tmp_path / "dataset").exists()
    failed = [json.loads(x) for x in (tmp_path / "failed.jsonl").read_text().splitlines()]
    assert len(failed) == 16 and all("HTTP 500" in f["error"] for f in failed)


def test_connection_check_answers_quickly_either_way(tmp_path):
    with FakeOpenAI(key="right") as server:
        fields = synthesize.SynthesizeConfig(dataset_dir="-", teacher="m", endpoint=server.url)
        assert "connected" in generation.check_connection(fields, key="right")
        with pytest.raises(StepError, match="refused the API key"):
            generation.check_connection(fields, key="wrong")
    started = time.monotonic()
    closed = synthesize.SynthesizeConfig(
        dataset_dir="-", teacher="m", endpoint="http://127.0.0.1:9/v1"
    )
    with pytest.raises(StepError, match="can't connect"):
        generation.check_connection(closed, key="")
    assert time.monotonic() - started < 10
    with pytest.raises(StepError, match="not a local folder"):
        generation.check_connection(synthesize.SynthesizeConfig(dataset_dir="-", teacher="nope"))


@pytest.mark.slow
def test_synthesis_resumes_after_a_kill_without_asking_twice(tiny_dataset, tmp_path):
    with FakeOpenAI(answer=label_of, delay_s=0.05) as server:
        config = {
            "dataset_dir": str(tiny_dataset),
            "teacher": "m",
            "endpoint": server.url,
            "concurrency": 2,
        }
        (tmp_path / "cfg.json").write_text(json.dumps(config))
        workdir = tmp_path / "out"
        cache = workdir / "checkpoints" / "answers.jsonl"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines.synthesize",
                "--config",
                str(tmp_path / "cfg.json"),
                "--workdir",
                str(workdir),
            ],
            cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if cache.exists() and len(cache.read_text().splitlines()) >= 10:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.3)  # requests in flight at the kill still reach the server
        asked_before = rows_answered(server)
        kept = len(cache.read_text().splitlines())
        assert 10 <= kept < 48
        result = synthesize.run(synthesize.SynthesizeConfig(**config), workdir, lambda event: None)
    assert result.summary["valid"] == 48
    lost_in_flight = asked_before - kept
    assert rows_answered(server) == 48 + lost_in_flight  # the rest were never re-asked
    assert lost_in_flight <= 2


def test_pruned_student_keeps_layers_evenly_and_generates(tmp_path):
    from safetensors.torch import load_file

    from tests.tiny import build_tiny_causal_lm

    teacher = build_tiny_causal_lm(tmp_path / "teacher", hidden_size=32, layers=4)
    counts = prune_layers(str(teacher), 2, tmp_path / "student")
    assert counts == {"layers": 4, "kept": 2}
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    before, after = (
        load_file(teacher / "model.safetensors"),
        load_file(tmp_path / "student" / "model.safetensors"),
    )
    key = "model.layers.{}.mlp.down_proj.weight"
    assert (after[key.format(1)] == before[key.format(3)]).all()  # first and last kept
    student = generation.LocalModel(str(tmp_path / "student"))
    reply = student.generate(
        [[{"role": "user", "content": "hello"}]] * 2, generation.Sampling(max_new_tokens=4)
    )
    assert len(reply) == 2 and reply[0].completion_tokens >= 1
    assert student.parameters < generation.LocalModel(str(teacher)).parameters
    with pytest.raises(StepError, match="between 1 and 4"):
        prune_layers(str(teacher), 5, tmp_path / "bad")


def test_logit_distillation_lowers_the_kl_to_the_teacher(tiny_dataset, tmp_path):
    from tests.tiny import build_tiny_causal_lm

    teacher = build_tiny_causal_lm(tmp_path / "teacher", seed=3, hidden_size=32, layers=4)
    config = finetune.FinetuneConfig(
        dataset_dir=str(tiny_dataset),
        base_model=str(teacher),
        keep_layers=2,
        teacher_model=str(teacher),
        distill_weight=1.0,
        method="full",
        max_steps=15,
        learning_rate=5e-3,
        batch_size=8,
        eval_steps=0,
        merge=False,
    )
    events = []
    result = finetune.run(config, tmp_path / "run", events.append)
    summary = result.summary
    assert summary["distillation"].startswith("logits (kl")
    assert summary["kl_to_teacher"] < 0.8 * summary["kl_to_teacher_before"]
    assert any("distill_loss" in getattr(e, "values", {}) for e in events)
    kinds = {(kind, path) for kind, path, _ in result.artifacts}
    assert ("model", "student_base") in kinds and ("model", "model") in kinds


def test_different_vocabularies_fall_back_to_answers(tiny_lm, tiny_dataset, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_lm, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(other)
    config = finetune.FinetuneConfig(
        dataset_dir=str(tiny_dataset),
        base_model=str(tiny_lm),
        teacher_model=str(other),
        max_steps=2,
        eval_steps=0,
        merge=False,
    )
    events = []
    summary = finetune.run(config, tmp_path / "run", events.append).summary
    assert summary["distillation"] == "sequence-level (vocabularies differ)"
    assert any(isinstance(e, Log) and "vocabulary" in e.message for e in events)


def test_memory_estimate_counts_the_teacher():
    config = finetune.FinetuneConfig(dataset_dir="-", teacher_model="bundled")
    alone = memory.estimate_memory(models.BUNDLED_ARCH, config, cuda=False)
    both = memory.estimate_memory(
        models.BUNDLED_ARCH, config, cuda=False, teacher_arch=models.BUNDLED_ARCH
    )
    assert both["teacher"] > 0.5e9 and both["total"] > alone["total"]
    assert "teacher" in memory.format_estimate(both)
    pruned = memory.estimate_memory(
        models.BUNDLED_ARCH, finetune.FinetuneConfig(dataset_dir="-", keep_layers=10), False
    )
    assert pruned["parameters"] < alone["parameters"]


def test_evaluate_report_has_every_figure(tiny_dataset, tmp_path, events):
    from tests.tiny import build_tiny_causal_lm

    teacher = build_tiny_causal_lm(tmp_path / "teacher", seed=1, hidden_size=64, layers=4)
    prune_layers(str(teacher), 1, tmp_path / "student")
    # references the teacher gets right: its own greedy answers
    rows = [json.loads(x) for x in (tiny_dataset / "validation.jsonl").read_text().splitlines()]
    model = generation.LocalModel(str(teacher))
    task = build_task("conversation")
    replies = model.generate(
        [task.messages(r) for r in rows], generation.Sampling(max_new_tokens=4)
    )
    data = tmp_path / "data"
    data.mkdir()
    with (data / "test.jsonl").open("w") as f:
        for row, reply in zip(rows, replies, strict=True):
            row["messages"][-1]["content"] = reply.text or "empty"
            f.write(json.dumps(row) + "\n")
    config = evaluate.EvaluateConfig(
        dataset_dir=str(data),
        task="conversation",
        teacher=str(teacher),
        student=str(tmp_path / "student"),
        student_base=str(tmp_path / "student"),
        max_rows=5,
        max_new_tokens=4,
    )
    result = evaluate.run(config, tmp_path / "out", events.append)
    summary = result.summary
    for role in ("teacher", "student", "student_base"):
        figures = summary["models"][role]
        for key in (
            "metric",
            "valid_answers",
            "perplexity",
            "latency_p50_s",
            "latency_p95_s",
            "tokens_per_s",
            "peak_memory_mb",
            "parameters",
            "size_mb",
        ):
            assert figures[key] is not None, (role, key)
    assert summary["models"]["teacher"]["metric"] == 1.0
    assert summary["models"]["student"]["agreement"] is not None
    ratios = summary["ratios"]
    assert all(ratios[k] is not None for k in ratios)
    assert ratios["memory_saved_pct"] > 0 and ratios["size_saved_pct"] > 0
    assert (tmp_path / "out" / "report.json").exists() and len(summary["samples"]) == 5
    assert "keeps" in for_step("evaluate", summary).text()
