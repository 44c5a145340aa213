"""Quick start: the chain of six runs it queues (each waiting for the one before, each reading
the previous one's output), found again after a closed tab, and the panel's status."""

import json
from pathlib import Path

from studio import quickstart, store
from studio.jobs import JobRunner
from studio.ui import quickstart_panel


def test_the_chain_waits_step_by_step_and_reads_each_output(home):
    runner = JobRunner(home)  # not started: the runs stay queued
    runs = quickstart.submit(runner)
    assert list(runs) == list(quickstart.ORDER)
    with store.connect(home) as db:
        rows = {step: store.get_run(db, run_id) for step, run_id in runs.items()}
    previous = None
    for step in quickstart.ORDER:
        assert rows[step]["status"] == "queued"
        assert rows[step]["depends_on"] == previous
        previous = runs[step]
    config = {step: json.loads(row["config_json"]) for step, row in rows.items()}
    out = {step: str(home / "runs" / run_id / "out") for step, run_id in runs.items()}
    data = f"{out['dataset']}/dataset"
    assert Path(config["dataset"]["files"][0]).is_relative_to(home)  # its own copy
    assert config["dataset"]["test_ratio"] > 0
    assert config["synthesize"]["dataset_dir"] == data
    assert config["synthesize"]["teacher"] == "bundled"
    assert config["finetune"]["dataset_dir"] == f"{out['synthesize']}/dataset"
    assert config["finetune"]["keep_layers"] == 10
    assert config["evaluate"]["student"] == f"{out['finetune']}/model"
    assert config["lora"]["base_model"] == f"{out['finetune']}/model"
    assert config["lora"]["dataset_dir"] == data and config["lora"]["method"] == "lora"
    assert config["quantize"]["model"] == f"{out['lora']}/merged"
    assert config["quantize"]["precision"] == "int4" and config["quantize"]["dataset_dir"] == data
    assert config["quantize"]["max_rows"] == 0 and config["evaluate"]["max_rows"] == 0  # all

    assert quickstart.latest(home) == runs  # a closed tab finds it again
    steps = quickstart.state(home, runs)
    assert [s["status"] for s in steps] == ["queued"] * 6
    assert quickstart.onnx_folder(home, runs) is None
    runs2, status, report, opened, *_ = quickstart_panel.tick(home, None, None, {}, False)
    assert runs2 == runs and status.count("<b>queued</b>") == 6 and report == "" and not opened


def test_the_report_reads_the_evaluation_and_the_gate(home):
    runner = JobRunner(home)
    runs = quickstart.submit(runner)
    evaluation = {
        "metric": "accuracy",
        "rows": 36,
        "models": {
            "teacher": {"metric": 0.9, "ci_low": 0.8, "ci_high": 0.97, "size_mb": 513.0},
            "student": {"metric": 0.85, "ci_low": 0.72, "ci_high": 0.94},
        },
        "ratios": {"time_saved_pct": 63.0, "memory_saved_pct": 40.0},
    }
    gate = {
        "verdict": "pass",
        "quality_kept_pct": 91.7,
        "speedup": 5.4,
        "memory_saved_pct": 70.0,
        "models": {
            "source": {"metric": 0.6, "ci_low": 0.44, "ci_high": 0.75},
            "quantized": {
                "metric": 0.55,
                "ci_low": 0.39,
                "ci_high": 0.7,
                "decode_tokens_per_s": 150.0,
                "size_mb": 40.0,
            },
        },
        "pair": {
            "rows": 36,
            "diff": -0.05,
            "ci_low": -0.14,
            "ci_high": 0.03,
            "verdict": "no difference found",
        },
    }
    with store.connect(home) as db:
        for step, summary in (("evaluate", evaluation), ("quantize", {"gate": gate})):
            db["runs"].update(runs[step], {"summary_json": json.dumps(summary)})
    report = quickstart.report(home, runs)
    assert report["tuned_student_quality"] == 0.6 and report["int4_speedup"] == 5.4
    text = quickstart.format_report(report)
    for fact in (
        "accuracy (95% intervals): teacher 0.9 [0.8, 0.97] on 36 rows",
        "after LoRA 0.6 [0.44, 0.75] on 36 rows, int4 0.55 [0.39, 0.7] on 36 rows",
        "63% less time per answer",
        "5.4x the fp32 student's decode speed (150 tokens/s)",
        "no difference found between the fp32 student and int4 (-0.050, 95% CI [-0.140, +0.030]",
        "40 MB on disk against the teacher's 513 MB (12.8x smaller)",
        "Quality gate: pass",
    ):
        assert fact in text, fact


def test_at_the_end_the_model_is_served_and_the_playground_opens(home, tiny_onnx):
    import shutil

    from studio import deploy

    runs = quickstart.submit(JobRunner(home))
    with store.connect(home) as db:
        for step in quickstart.ORDER:  # the chain as it ends
            store.set_status(db, runs[step], "running")
            store.set_status(db, runs[step], "succeeded", summary_json="{}")
    shutil.copytree(tiny_onnx, home / "runs" / runs["quantize"] / "out" / "onnx")
    try:
        _, status, report, opened, tabs, deploy_tabs, model_a = quickstart_panel.tick(
            home, None, None, runs, False
        )
        folder = quickstart.onnx_folder(home, runs)
        row, name = deploy.serving(home, str(folder))
        assert name == quickstart_panel.SERVED_NAME and row["status"] == "serving"
        assert deploy.url(row) in report and "What was gained" in report and opened
        assert tabs.selected == "deploy" and deploy_tabs.selected == "deploy-playground"
        assert model_a["value"] == str(folder)
        # later ticks leave the tabs alone
        again = quickstart_panel.tick(home, None, None, runs, True)
        assert again[3] is True and len(deploy.refresh(home)) == 1
        deploy.stop_server(home, row["id"])  # stopped by the user: not started again
        later = quickstart_panel.tick(home, None, None, runs, False)
        assert "start it again" in later[2] and deploy.serving(home, str(folder)) is None
    finally:
        for server in deploy.refresh(home):
            deploy.stop_server(home, server["id"])
