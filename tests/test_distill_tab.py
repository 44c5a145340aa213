"""Distill tab handlers: teacher test, student size, the whole chain from the form (inline
runner, tiny models), the report view, and API keys that never reach the disk."""

import json

import pytest

from studio import store
from studio.jobs import JobRunner
from studio.ui import choices, distill_tab, views
from tests.openai_server import FakeOpenAI
from tests.test_deploy import _assert_secret_nowhere
from tests.test_distill import label_of


def form(dataset, teacher, **changes):
    """The form's values by name, as the Start button sends them."""
    values = {
        "dataset_dir": str(dataset),
        "task": "conversation",
        "teacher_kind": "Local model",
        "teacher": str(teacher),
        "student": distill_tab.PRUNED,
        "keep_layers": 1,
        "method": "full",
        "logits": True,
        "eval_rows": 3,
        "finetune_max_steps": 2,
        "finetune_learning_rate": 1e-3,
        "finetune_batch_size": 4,
    }
    return values | changes


def test_answer_length_suits_the_task():
    assert distill_tab.answer_length("classification") == 16
    assert distill_tab.answer_length("math") == 256


def test_teacher_check_and_student_size(home):
    with FakeOpenAI(key="sk-right") as server:
        ok = distill_tab.check_teacher(
            home, None, None, "Endpoint", "gpt", server.url, "sk-right", ""
        )
        bad = distill_tab.check_teacher(
            home, None, None, "Endpoint", "gpt", server.url, "sk-wrong", ""
        )
    assert ok.startswith("✅") and bad.startswith("❌") and "API key" in bad
    assert "endpoint URL" in distill_tab.check_teacher(
        home, None, None, "Endpoint", "gpt", "", "", ""
    )
    assert distill_tab.check_teacher(
        home, None, None, "Local model", "bundled", "", "", ""
    ).startswith("✅")
    text = distill_tab.student_md("Local model", "bundled", "pruned", 10, "full", 4, True)
    assert "10 of 30 layers" in text and "teacher" in text and "64M" in text
    assert "needs a local teacher" in distill_tab.student_md(
        "Endpoint", "gpt", "pruned", 10, "full", 4, False
    )
    assert "between 1 and 30" in distill_tab.student_md(
        "Local model", "bundled", "pruned", 99, "full", 4, True
    )


def test_chain_from_the_form_with_a_local_teacher(home, tiny_lm, tiny_dataset):
    runner = JobRunner(home, inline=True)
    values = form(
        tiny_dataset,
        tiny_lm,
        synthesize_min_success_ratio=0.0,
        synthesize_max_new_tokens=4,
        synthesize_max_rows=8,
    )
    runs, status, key_box = distill_tab.submit_distill(runner, None, **values)
    assert list(runs) == ["synthesize", "finetune", "evaluate"] and key_box == ""
    with store.connect(home) as db:
        rows = {step: store.get_run(db, run_id) for step, run_id in runs.items()}
    assert {s: r["status"] for s, r in rows.items()} == dict.fromkeys(runs, "succeeded"), {
        s: r["error"] for s, r in rows.items()
    }
    tuned = json.loads(rows["finetune"]["summary_json"])
    assert tuned["distillation"].startswith("logits") and tuned["pruned_from_layers"] == 2
    assert "succeeded" in distill_tab.chain_md(home, runs)
    assert runs["evaluate"] in [value for _, value in choices.reports(home)]
    text, bars, samples = distill_tab.report_view(home, runs["evaluate"])
    assert "of the teacher's quality" in text and len(bars) == 4 and len(samples) == 3
    assert "student base" in text  # the untrained pruned copy is measured too
    assert "Teacher" in views.summary_md(rows["synthesize"])
    with store.connect(home) as db:  # lineage: the report used the student made by finetune
        inputs = store.lineage(db, runs["evaluate"])["inputs"]
    assert {i["made_by"] for i in inputs} >= {runs["finetune"], runs["synthesize"]}


def test_an_api_key_typed_in_never_lands_on_disk(home, tiny_lm, tiny_dataset):
    runner = JobRunner(home, inline=True)
    with FakeOpenAI(answer=label_of, key="sk-secret-123") as server:
        values = form(
            tiny_dataset,
            "big-model",
            task="classification",
            teacher_kind="Endpoint",
            endpoint=server.url,
            api_key="sk-secret-123",
            student=str(tiny_lm),
            logits=False,
            method="lora",
            synthesize_max_rows=8,
            synthesize_max_new_tokens=4,
        )
        runs, _, _ = distill_tab.submit_distill(runner, None, **values)
    with store.connect(home) as db:
        statuses = {s: store.get_run(db, r)["status"] for s, r in runs.items()}
    assert statuses == dict.fromkeys(runs, "succeeded")
    _assert_secret_nowhere(home, "sk-secret-123")


def test_logits_from_an_endpoint_are_refused(home, tiny_dataset):
    runner = JobRunner(home, inline=True)
    with pytest.raises(Exception, match="pruned copy needs a local teacher"):
        distill_tab.submit_distill(
            runner, None, **form(tiny_dataset, "m", teacher_kind="Endpoint", endpoint="http://x/v1")
        )
