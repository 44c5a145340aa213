"""UI handlers called as plain functions, and the Blocks app built without launching."""

import dataclasses
import inspect
import json

import gradio as gr
import pytest

from pipelines import dataset
from studio import store
from studio.settings import Limits, Settings
from studio.ui import app, data_tab, runs_tab

ROLES = len(data_tab.MAPPING_ROLES)


@pytest.fixture
def settings(home):
    return Settings(home=home, max_upload_mb=1)


def _import(runner, settings, files, tokenizer, name="support", owner=None, **overrides):
    """The Import button's values by name (the tab sends only what its form holds)."""
    values = {
        "name": name,
        "tokenizer_model": str(tokenizer),
        "train_ratio": 0.9,
        "validation_ratio": 0.1,
        "test_ratio": 0.0,
    }
    return data_tab.submit_import(runner, settings, owner, files=files, **(values | overrides))


def test_upload_detects_shape_mapping_and_suggests_a_system_prompt():
    detected, shape, *rest = data_tab.inspect_upload([str(dataset.SAMPLE_DATASET)])
    roles, (system, preview, name) = rest[:ROLES], rest[ROLES:]
    assert shape == "classification" and "classification" in detected
    mapping = dict(zip(data_tab.MAPPING_ROLES, (r["value"] for r in roles)))
    assert mapping["text"] == "text" and mapping["label"] == "label"
    assert system == dataset.SAMPLE_SYSTEM_PROMPT
    assert len(preview) == 20 and preview[0][3] in {
        "billing",
        "shipping",
        "returns",
        "account",
        "technical",
        "product",
    }
    assert name == "support_intents"


def test_a_wrong_mapping_is_explained_not_raised(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("q,a\nx,y\n")
    detected, *_ = data_tab.inspect_upload([str(path)])
    assert "can't tell the shape" in detected
    roles = ["", "nope", "", "a", "", "", ""]
    message, rows = data_tab.apply_mapping([str(path)], "prompt_completion", *roles, "")
    assert "mapped columns not found: prompt=nope" in message and rows == []
    roles[1] = "q"
    message, rows = data_tab.apply_mapping([str(path)], "prompt_completion", *roles, "")
    assert "prompt_completion" in message and rows[0][1:] == ["", "x", "y"]


def test_import_from_the_tab_runs_and_shows_the_report(home, runner, settings, tiny_tokenizer_dir):
    run_id, status = _import(runner, settings, [str(dataset.SAMPLE_DATASET)], tiny_tokenizer_dir)
    assert run_id in status
    header, report, choices = data_tab.refresh_import(home, None, run_id)
    assert "succeeded" in header and "360" in report and "rows read" in report
    [(label, folder)] = choices["choices"]
    assert label.startswith("support · 360 rows")
    info, page = data_tab.show_dataset(home, None, folder, "validation", 2)
    assert data_tab.show_dataset(home, "mallory", folder, "train", 1)[0].startswith("Dataset not")
    assert "page 2 of 4" in info and page[0][0] == 11
    with store.connect(home) as db:  # the run reads its own copy of the upload
        config = json.loads(store.get_run(db, run_id)["config_json"])
    assert config["files"][0].startswith(str(home / "uploads"))


def test_import_refuses_bad_forms_with_gr_error(runner, settings, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(gr.Error, match="must be 1"):
        _import(
            runner,
            settings,
            [str(dataset.SAMPLE_DATASET)],
            tiny_tokenizer_dir,
            train_ratio=0.5,
        )
    big = tmp_path / "big.csv"
    big.write_bytes(b"text,label\n" + b"x,y\n" * 300_000)
    with pytest.raises(gr.Error, match="over the 1 MB upload limit"):
        _import(runner, settings, [str(big)], tiny_tokenizer_dir)
    with pytest.raises(gr.Error, match="files is empty"):
        _import(runner, settings, None, tiny_tokenizer_dir)


def test_runs_tab_lists_refreshes_and_controls_runs(home, runner, settings, fake_steps):
    run_id = runner.submit("fake", fake_steps.FakeConfig(steps=3), name="first")
    rows = runs_tab.runs_table(home)
    assert rows[0][:4] == [run_id, "first", "fake", "succeeded"]
    assert runs_tab.runs_table(home, status="failed") == []
    header, progress, summary, plot, log, config, command, artifacts = runs_tab.refresh_run(
        home, run_id
    )
    assert "first" in header and "100%" in progress and "started_at_step" in summary
    assert list(plot["key"].unique()) == ["loss"] and len(plot) == 3
    assert "succeeded" in log and json.loads(config)["steps"] == 3
    assert command == f"slmops run fake --config {home / 'runs' / run_id / 'config.json'} --follow"
    assert "result.txt" in artifacts
    new_id = runs_tab.rerun_run(runner, run_id)
    assert new_id != run_id and runs_tab.runs_table(home)[0][0] == new_id
    assert runs_tab.delete_run(runner, run_id) == ""
    assert [r[0] for r in runs_tab.runs_table(home)] == [new_id]
    with pytest.raises(gr.Error, match="no checkpoint"):
        runs_tab.resume_run(runner, new_id)
    with pytest.raises(gr.Error, match="Pick a run"):
        runs_tab.cancel_run(runner, "")


def test_build_app_returns_blocks_without_launching(home, runner, settings):
    demo = app.build_app(settings, runner)
    assert isinstance(demo, gr.Blocks)
    labels = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    top = ["Data", "Distill", "Finetune", "Quantize", "Deploy"]
    deploy = ["Serve", "Playground", "Foundry Local", "Hugging Face Hub"]
    assert labels[:10] == [*top, *deploy, "Runs"]


@pytest.mark.filterwarnings("ignore:Run .* has already finished")
@pytest.mark.parametrize("hosted", [False, True], ids=["local", "hosted"])
def test_every_event_returns_what_its_outputs_expect(
    home, runner, settings, fake_steps, monkeypatch, hosted
):
    """Call each wired handler with the components' values: a tick or change that returns the
    wrong number of values would break the page at run time, not at build time (on a
    single-user studio, and on a hosted one with a signed-in user)."""
    run_id = runner.submit("fake", fake_steps.FakeConfig(steps=2), owner="alice")
    # a start button with valid defaults (Quantize's bundled model) queues nothing real here
    monkeypatch.setattr(runner, "submit", lambda *args, **kwargs: run_id)
    monkeypatch.setattr(runner, "output", lambda run, name: store.workdir(home, run) / name)
    request = gr.Request(username="alice") if hosted else None
    if hosted:
        settings = dataclasses.replace(settings, limits=Limits(), users={"alice": "pw"})
        runner.limits = settings.limits
    demo = app.build_app(settings, runner)
    checked = 0
    for block_fn in demo.fns.values():
        if any(trigger == "select" for _, trigger in block_fn.targets):
            continue  # needs a browser event; select_row is covered through the browser test
        values = []
        for component in block_fn.inputs:
            if isinstance(component, gr.File):
                values.append([str(dataset.SAMPLE_DATASET)])
            elif (
                isinstance(component, gr.State) and isinstance(component.value, str)
            ) or component.elem_id == "runs-selected":
                values.append(run_id)
            else:
                values.append(component.value)
        names = list(block_fn.input_keyword_names or [])  # inputs_kwargs: values by name
        named = dict(zip(names, values[len(values) - len(names) :]))
        values, *_ = gr.helpers.special_args(
            block_fn.fn, values[: len(values) - len(names)], request
        )
        try:
            result = block_fn.fn(*values, **named)
            results = list(result) if inspect.isgenerator(result) else [result]
        except gr.Error:
            continue  # a message for the user, e.g. "Pick a run first."
        expected = len(block_fn.outputs)
        for result in results:
            got = len(result) if expected > 1 else 1
            assert got == expected, f"{block_fn.name}: {got} values for {expected} outputs"
        checked += 1
    assert checked >= 15


def test_compare_marks_differences_and_overlays_curves(home, runner, fake_steps):
    first = runner.submit("fake", fake_steps.FakeConfig(steps=3), name="a")
    with store.connect(home) as db:
        made = store.artifacts(db, run_id=first)[0]
    second = runner.submit(
        "fake", fake_steps.FakeConfig(steps=5, input_path=str(home / made["path"])), name="b"
    )
    configs, reports, curves, curve = runs_tab.compare(home, [first, second], None)
    diff = {row["setting"]: row[""] for _, row in configs.iterrows()}
    assert diff["steps"] == "≠" and diff["input_path"] == "≠" and diff["fail"] == ""
    assert list(configs["setting"][:2]) == ["input_path", "steps"]  # the differences first
    assert reports.iloc[0].tolist()[1:] == ["succeeded", "succeeded"]
    assert set(curves["run"]) == {first, second} and len(curves) == 8
    assert curve["value"] == "loss"
    assert runs_tab.compare(home, [first], None)[0] is None  # one run: nothing to compare

    picture = runs_tab.refresh_run(home, second)[-1]
    node = lambda run_id: "r" + run_id.replace("-", "_")  # noqa: E731
    assert "```mermaid" in picture and f"{node(first)} -->|text| {node(second)}" in picture
