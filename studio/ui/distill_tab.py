"""Distill tab: a dataset, a task preset and a teacher (tested with one click), a student, one
button for the synthesize -> finetune -> evaluate chain, and the student-vs-teacher report."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from pipelines.base import StepError
from pipelines.evaluate import EvaluateConfig
from pipelines.finetune import FinetuneConfig
from pipelines.lib import memory
from pipelines.lib.generation import API_KEY_ENV, check_connection
from pipelines.lib.models import model_arch
from pipelines.lib.tasks import PRESETS
from pipelines.reports import for_step
from pipelines.synthesize import SynthesizeConfig
from studio import distill, quota, store
from studio.jobs import JobRunner
from studio.quota import LimitReached
from studio.settings import Limits
from studio.ui import choices, forms, session

PRUNED = "pruned"
TEACHER_ADVANCED = (
    "temperature",
    "top_p",
    "max_new_tokens",
    "stop",
    "seed",
    "batch_size",
    "concurrency",
    "max_retries",
    "timeout_s",
    "min_success_ratio",
    "max_rows",
    "price_input_per_m",
    "price_output_per_m",
)
STUDENT_ADVANCED = ("lora_r", "lora_alpha", "max_seq_len", "distill_temperature", "distill_weight")


def build_tab(home: Path, runner: JobRunner) -> None:
    limits, nobody = runner.limits, session.page_owner(runner.limits)
    gr.Markdown(
        "A big **teacher** answers your dataset's prompts; a small **student** learns from "
        "those answers (and, with a local teacher, from its token probabilities); the report "
        "says how much of the teacher's quality the student keeps, and how much faster and "
        "smaller it is."
    )
    form = {**_data_section(home, nobody), **_teacher_section(home, limits, nobody)}
    form |= _student_section(home, limits, nobody)
    student_info = gr.Markdown(elem_id="distill-student")
    start = gr.Button("Start distillation", variant="primary", elem_id="distill-start")
    chain = gr.State({})
    status = gr.Markdown(elem_id="distill-status")
    _reports_section(home, limits, nobody)

    form["task"].change(
        answer_length, inputs=[form["task"]], outputs=[form["synthesize_max_new_tokens"]]
    )
    form["teacher_kind"].change(
        on_teacher_kind,
        inputs=[form["teacher_kind"]],
        outputs=[form["endpoint_row"], form["teacher"], form["logits"]],
    )
    form["test"].click(
        session.for_user(limits, functools.partial(check_teacher, home, limits)),
        inputs=[form[n] for n in ("teacher_kind", "teacher", "endpoint", "api_key", "api_key_env")],
        outputs=[form["connection"]],
    )
    info = ("teacher_kind", "teacher", "student", "keep_layers", "method")
    info_inputs = [form[n] for n in info] + [form["finetune_batch_size"], form["logits"]]
    for control in info_inputs:
        control.change(lambda *v: student_md(*v), inputs=info_inputs, outputs=[student_info])
    choices.fill_on_focus(form["dataset_dir"], choices.datasets, home, limits)
    choices.fill_on_focus(form["teacher"], choices.models, home, limits)
    values = {n: c for n, c in form.items() if n not in NOT_VALUES}
    start.click(
        session.for_user(limits, functools.partial(submit_distill, runner)),
        inputs_kwargs=values,
        outputs=[chain, status, form["api_key"]],
    )
    timer = gr.Timer(2.0)
    timer.tick(
        session.for_viewer(limits, lambda owner, c: chain_md(home, c, owner)),
        inputs=[chain],
        outputs=[status],
    )


NOT_VALUES = ("endpoint_row", "test", "connection")  # layout and buttons, not settings


def _data_section(home: Path, nobody: str | None) -> dict[str, Any]:
    gr.Markdown("### 1. Data and task")
    with gr.Row():
        dataset_dir = gr.Dropdown(
            label="Dataset",
            choices=choices.datasets(home, nobody),
            info="Imported in the Data tab.",
            elem_id="distill-dataset",
        )
        task = gr.Dropdown(
            label="Task",
            choices=[(p["label"], name) for name, p in PRESETS.items()],
            value="classification",
            info="Sets the teacher's prompts, the check a valid answer passes, and the metric.",
            elem_id="distill-task",
        )
    with gr.Accordion("Prompts (custom task, or override a preset)", open=False):
        prompts = {
            "system_prompt": gr.Textbox(lines=2, **_kwargs(SynthesizeConfig, "system_prompt"))
        }
        prompts["user_template"] = gr.Textbox(**_kwargs(SynthesizeConfig, "user_template"))
        with gr.Row():
            prompts["answer_pattern"] = gr.Textbox(**_kwargs(SynthesizeConfig, "answer_pattern"))
            prompts["chain_of_thought"] = gr.Checkbox(
                **_kwargs(SynthesizeConfig, "chain_of_thought")
            )
    return {"dataset_dir": dataset_dir, "task": task} | {
        f"synthesize_{n}": c for n, c in prompts.items()
    }


def _teacher_section(home: Path, limits: Limits | None, nobody: str | None) -> dict[str, Any]:
    gr.Markdown("### 2. Teacher")
    with gr.Row():
        teacher_kind = gr.Radio(
            choices=["Local model", "Endpoint"],
            value="Local model",
            label="Teacher runs",
            info="Here (a model on this machine), or behind an OpenAI-compatible API.",
        )
        teacher = gr.Dropdown(
            label="Teacher model",
            choices=choices.models(home, nobody),
            value="bundled",
            allow_custom_value=True,
            info="Local: a model made here, a folder or a Hub id. Endpoint: the model name.",
            elem_id="distill-teacher",
        )
    with gr.Row(visible=False) as endpoint_row:
        endpoint = gr.Textbox(
            **_kwargs(SynthesizeConfig, "endpoint"), placeholder="https://api.openai.com/v1"
        )
        api_key = gr.Textbox(
            label="API key",
            type="password",
            info="Used for these runs only: never stored, logged or shown again.",
        )
        # a shared studio's environment holds the host's keys, not its visitors'
        api_key_env = gr.Textbox(**_kwargs(SynthesizeConfig, "api_key_env"), visible=not limits)
    with gr.Row():
        test = gr.Button("Test connection", size="sm", elem_id="distill-test")
        connection = gr.Markdown(elem_id="distill-connection")
    with gr.Accordion("Teacher settings", open=False):
        settings = forms.build_form(SynthesizeConfig, exclude=_others(SynthesizeConfig))
        settings["max_rows"].elem_id = "distill-teacher-rows"
    settings["max_new_tokens"].value = answer_length("classification")  # the default task
    return {
        "teacher_kind": teacher_kind,
        "teacher": teacher,
        "endpoint_row": endpoint_row,
        "endpoint": endpoint,
        "api_key": api_key,
        "api_key_env": api_key_env,
        "test": test,
        "connection": connection,
    } | {f"synthesize_{n}": c for n, c in settings.items()}


def _student_section(home: Path, limits: Limits | None, nobody: str | None) -> dict[str, Any]:
    gr.Markdown("### 3. Student")
    with gr.Row():
        student = gr.Dropdown(
            label="Student",
            choices=[("Pruned copy of the teacher", PRUNED), *choices.models(home, nobody)],
            value=PRUNED,
            allow_custom_value=True,
            info="A pruned copy shares the teacher's tokenizer (so it can learn its logits).",
        )
        keep_layers = gr.Number(
            value=10,
            precision=0,
            label="Keep layers",
            info="Pruned copy: how many of the teacher's layers the student keeps.",
            elem_id="distill-keep",
        )
        method = gr.Radio(
            choices=["lora", "full"],
            value="full",
            label="Training",
            info="full suits a pruned student (its layers must relearn to work together).",
        )
    training = {}
    with gr.Row():
        training["epochs"] = gr.Number(**_kwargs(FinetuneConfig, "epochs"))
        training["max_steps"] = gr.Number(
            precision=0, elem_id="distill-steps", **_kwargs(FinetuneConfig, "max_steps")
        )
        if limits and limits.train_steps:  # a shared studio: whole epochs are not allowed
            training["max_steps"].value = limits.train_steps
            training["max_steps"].info = f"At most {limits.train_steps} on this shared studio."
        training["learning_rate"] = gr.Number(
            **{**_kwargs(FinetuneConfig, "learning_rate"), "value": 1e-4}
        )
        training["batch_size"] = gr.Number(precision=0, **_kwargs(FinetuneConfig, "batch_size"))
    with gr.Row():
        logits = gr.Checkbox(
            value=True,
            label="Learn the teacher's logits too",
            info="Token-level distillation; needs a local teacher with the student's vocabulary.",
        )
        training["distill_loss"] = gr.Radio(
            choices=["kl", "jsd"], **_kwargs(FinetuneConfig, "distill_loss")
        )
        eval_rows = gr.Number(
            precision=0,
            elem_id="distill-rows",
            **{**_kwargs(EvaluateConfig, "max_rows"), "label": "Report rows"},
        )
    with gr.Accordion("Student settings", open=False):
        training |= forms.build_form(FinetuneConfig, exclude=_others(FinetuneConfig))
    return {
        "student": student,
        "keep_layers": keep_layers,
        "method": method,
        "logits": logits,
        "eval_rows": eval_rows,
    } | {f"finetune_{n}": c for n, c in training.items()}


def _reports_section(home: Path, limits: Limits | None, nobody: str | None) -> None:
    gr.Markdown("### Reports")
    reports = choices.reports(home, nobody)
    latest = reports[0][1] if reports else None
    shown = report_view(home, latest, nobody)  # the newest report is on screen from the start
    with gr.Row():
        report_run = gr.Dropdown(
            label="Distillation report", choices=reports, value=latest, elem_id="distill-report"
        )
    report_md = gr.Markdown(shown[0], elem_id="distill-report-text")
    ratios_plot = gr.BarPlot(
        shown[1],
        x="ratio",
        y="percent",
        y_lim=y_limits(shown[1]),
        title="Student against teacher (%)",
        height=260,
    )
    samples = gr.Dataframe(shown[2], label="Answers side by side", wrap=True, interactive=False)
    choices.fill_on_focus(report_run, choices.reports, home, limits)
    report_run.change(
        session.for_viewer(limits, lambda owner, r: show_report(home, r, owner)),
        inputs=[report_run],
        outputs=[report_md, ratios_plot, samples],
    )


def _others(config_cls: type) -> list[str]:
    """The fields a settings accordion leaves out (it shows only its ADVANCED names)."""
    shown = TEACHER_ADVANCED if config_cls is SynthesizeConfig else STUDENT_ADVANCED
    return [f for f in forms.form_fields(config_cls) if f not in shown]


def _kwargs(config_cls: type, name: str) -> dict[str, Any]:
    return forms.field_kwargs(config_cls, name)


ANSWER_TOKENS = {"classification": 16, "nli": 16, "multiple_choice": 16, "summarization": 160}


def answer_length(task: str) -> int:
    """Max new tokens that suit a task: a label needs a few, reasoning and free text more (the
    report's models answer with the same cap, so a rambling base model costs no more)."""
    return ANSWER_TOKENS.get(task, 256)


def on_teacher_kind(kind: str):
    """Endpoint fields only for an endpoint; logits only from a local teacher."""
    local = kind != "Endpoint"
    return (
        gr.update(visible=not local),
        gr.update(value="bundled" if local else "", allow_custom_value=True),
        gr.update(value=local, interactive=local),
    )


def check_teacher(
    home: Path,
    limits: Limits | None,
    owner: str | None,
    kind: str,
    teacher: str,
    endpoint: str,
    key: str,
    key_env: str,
) -> str:
    """Answer within a few seconds whether the teacher can be used."""
    typed = key or None  # None: the key comes from the environment variable
    if limits is not None:  # a shared studio: the visitor's own key and models only
        typed, key_env = key or "", ""
        with store.connect(home) as db:
            if kind != "Endpoint":
                quota.check_paths(db, home, owner, {"teacher": teacher or ""})
            elif (endpoint or "").strip():
                quota.check_url(db, owner, endpoint.strip())
    try:
        fields = SynthesizeConfig(
            dataset_dir="-",
            teacher=(teacher or "").strip(),
            endpoint=(endpoint or "").strip() if kind == "Endpoint" else "",
            api_key_env=(key_env or "").strip(),
        )
        if kind == "Endpoint" and not fields.endpoint:
            raise ValueError("give the endpoint URL")
        return "✅ " + check_connection(fields, key=typed)
    except (StepError, ValueError) as e:
        return f"❌ {e}"


def student_md(
    kind: str,
    teacher: str,
    student: str,
    keep_layers: float,
    method: str,
    batch_size: float,
    logits: bool,
) -> str:
    """The student's size before training, against the teacher's, and a memory estimate."""
    pruned = student == PRUNED
    if pruned and kind == "Endpoint":
        return "⚠️ A pruned copy needs a local teacher: pick a student model instead."
    base = teacher if pruned else student
    arch = model_arch(base or "bundled")
    if arch is None:
        return "Student size: unknown until the model is downloaded."
    keep = int(keep_layers or 0) if pruned else 0
    layers = arch["num_hidden_layers"]
    if pruned and not 1 <= keep <= layers:
        return f"⚠️ Keep layers must be between 1 and {layers} (the teacher's layers)."
    params = memory.count_parameters({**arch, "num_hidden_layers": keep or layers})
    text = f"Student: **{params / 1e6:.0f}M** parameters, about **{params * 4 / 2**20:.0f} MB** "
    text += "in fp32"
    teacher_arch = model_arch(teacher or "bundled") if kind != "Endpoint" else None
    if teacher_arch:
        full = memory.count_parameters(teacher_arch)
        text += f" ({100 * params / full:.0f}% of the teacher's {full / 1e6:.0f}M)"
    if pruned:
        text += f"; {keep} of {layers} layers, chosen evenly"
    try:
        config = FinetuneConfig(
            dataset_dir="-",
            base_model=base or "bundled",
            method=method or "full",
            keep_layers=keep,
            batch_size=int(batch_size or 1),
        )
    except ValueError as e:
        return text + f". ⚠️ {e}"
    import psutil

    estimate = memory.estimate_memory(
        arch,
        config,
        False,
        psutil.virtual_memory().available,
        teacher_arch=teacher_arch if logits else None,
    )
    icon = "⚠️ " if estimate["fits"] is False else ""
    return text + f".\n\n{icon}Training memory: {memory.format_estimate(estimate)}."


def submit_distill(
    runner: JobRunner,
    owner: str | None,
    *,
    dataset_dir: str,
    task: str = "classification",
    teacher_kind: str = "Local model",
    teacher: str = "bundled",
    endpoint: str = "",
    api_key: str = "",
    api_key_env: str = "",
    student: str = PRUNED,
    keep_layers: float = 10,
    method: str = "full",
    logits: bool = True,
    eval_rows: float | None = None,
    **fields: Any,
) -> tuple[dict[str, str], str, str]:
    """Validate the whole chain, then queue it; the key goes to the runs' environment only.

    `fields` are form values named `synthesize_<field>` and `finetune_<field>` after the field of
    the config they set; a field left empty keeps the config's default."""
    if not dataset_dir:
        raise gr.Error("Pick a dataset (import one in the Data tab first).")
    on_endpoint = teacher_kind == "Endpoint"
    pruned = student == PRUNED
    if pruned and on_endpoint:
        raise gr.Error("A pruned copy needs a local teacher: pick a student model instead.")
    key_env = "" if runner.limits is not None else (api_key_env or "").strip()
    spec = {
        "dataset_dir": dataset_dir,
        "logits": bool(logits) and not on_endpoint,
        "synthesize": {
            **forms.config_values(SynthesizeConfig, fields, prefix="synthesize_"),
            "task": task or "classification",
            "teacher": (teacher or "").strip() or ("" if on_endpoint else "bundled"),
            "endpoint": (endpoint or "").strip() if on_endpoint else "",
            # a shared studio: the host's variables are not the visitor's
            "api_key_env": key_env,
        },
        "finetune": {
            **forms.config_values(FinetuneConfig, fields, prefix="finetune_"),
            "base_model": (teacher or "bundled").strip() if pruned else (student or "bundled"),
            "keep_layers": int(keep_layers or 0) if pruned else 0,
            "method": method or "full",
        },
        "evaluate": {"max_rows": int(eval_rows)} if eval_rows else {},
    }
    secrets = {API_KEY_ENV: api_key} if api_key and not key_env else {}
    try:
        runs = distill.submit(runner, spec, secrets=secrets, owner=owner)
    except (LimitReached, PermissionError) as e:
        raise gr.Error(str(e)) from e
    except (ValueError, TypeError) as e:
        raise gr.Error(f"Can't start: {e}") from e
    return runs, chain_md(runner.home, runs, owner), ""  # the key field is cleared


def chain_md(home: Path, runs: dict[str, str], owner: str | None = None) -> str:
    """One line per run of the chain: status, progress and message."""
    if not runs:
        return ""
    lines = []
    with store.connect(home) as db:
        for step, run_id in runs.items():
            row = store.get_run(db, run_id, owner)
            if row is None:
                continue
            progress = f"{100 * (row['progress'] or 0):.0f}%"
            lines.append(
                f"- **{step}** `{run_id}`: {row['status']} · {progress} · "
                f"{row['error'] or row['message'] or ''}"
            )
    return "\n".join(lines) + "\n\nThe Runs tab has each run's curves and log."


def show_report(home: Path, run_id: str, owner: str | None = None) -> tuple[str, Any, pd.DataFrame]:
    """report_view for the page: the bar chart's axis always holds 0 and 100%."""
    text, bars, samples = report_view(home, run_id, owner)
    return text, gr.update(value=bars, y_lim=y_limits(bars)), samples


def y_limits(bars: pd.DataFrame) -> list[float]:
    values = list(bars["percent"]) if len(bars) else [0.0]
    return [min(0.0, min(values)), max(100.0, max(values))]


def report_view(
    home: Path, run_id: str, owner: str | None = None
) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """The report's text and table, the three ratios as bars, and answers side by side."""
    if not run_id:
        return "", pd.DataFrame({"ratio": [], "percent": []}), pd.DataFrame()
    with store.connect(home) as db:
        row = store.get_run(db, run_id, owner)
    summary = json.loads(row["summary_json"] or "{}") if row else {}
    if "models" not in summary:
        return "This run has no report.", pd.DataFrame({"ratio": [], "percent": []}), pd.DataFrame()
    ratios = summary["ratios"]
    bars = pd.DataFrame(
        {
            "ratio": ["quality kept", "time saved", "memory saved", "size saved"],
            "percent": [
                ratios.get(k) or 0.0
                for k in (
                    "quality_kept_pct",
                    "time_saved_pct",
                    "memory_saved_pct",
                    "size_saved_pct",
                )
            ],
        }
    )
    return for_step("evaluate", summary).markdown(), bars, pd.DataFrame(summary.get("samples", []))
