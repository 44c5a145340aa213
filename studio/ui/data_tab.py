"""Data tab: upload files (or name a Hub dataset), check the detected shape and mapping, import."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines import dataset
from pipelines.base import StepError
from pipelines.dataset import SAMPLE_DATASET, SAMPLE_SYSTEM_PROMPT, DatasetConfig
from pipelines.lib import dataset_folder, readers, shapes
from pipelines.reports import for_step
from studio import store
from studio.jobs import JobRunner
from studio.settings import Settings
from studio.ui import choices, forms, runs_tab, session, views

MAPPING_ROLES = ("messages", "prompt", "input", "response", "text", "label", "system")
ROLE_LABELS = {
    "messages": "Messages / conversations column",
    "prompt": "Prompt column",
    "input": "Extra input column",
    "response": "Answer column",
    "text": "Text column",
    "label": "Label column",
    "system": "System prompt column",
}
HAND_LAID = (
    "name",
    "files",
    "hub_dataset",
    "hub_config",
    "hub_split",
    "shape",
    "mapping",
    "system_prompt",
    "train_ratio",
    "validation_ratio",
    "test_ratio",
    "max_file_mb",
)
PAGE_SIZE = 10
TABLE_HEADERS = ["#", "system", "user", "assistant"]


def build_tab(home: Path, runner: JobRunner, settings: Settings) -> None:
    gr.Markdown(
        "Upload CSV, TSV, JSON, JSONL, Parquet or TXT files. The studio detects the shape "
        "(chat messages, ShareGPT, Alpaca, prompt/completion, question/answer, "
        "classification or raw text) and turns every row into a chat conversation."
    )
    form = _source_section()
    detected, preview, mapping = _mapping_section()
    form |= mapping
    with gr.Row():
        form["name"] = gr.Textbox(**forms.field_kwargs(DatasetConfig, "name"), elem_id="data-name")
        for share in ("train_ratio", "validation_ratio", "test_ratio"):
            form[share] = gr.Number(**forms.field_kwargs(DatasetConfig, share))
    with gr.Accordion("Advanced", open=False):
        form |= forms.build_form(DatasetConfig, exclude=HAND_LAID)
    submit = gr.Button("Import dataset", variant="primary", elem_id="data-import")
    import_run = gr.State("")
    import_status = gr.HTML(elem_id="data-import-status")
    import_report = gr.Markdown()
    chosen = _browse_section(home, runner.limits)

    files, roles = form["files"], [form[f"mapping_{r}"] for r in MAPPING_ROLES]
    shown = [detected, form["shape"], *roles, form["system_prompt"], preview, form["name"]]
    files.upload(inspect_upload, inputs=[files], outputs=shown)
    form["sample"].click(lambda: [str(SAMPLE_DATASET)], outputs=[files]).then(
        inspect_upload, inputs=[files], outputs=shown
    )
    for control in (form["shape"], *roles):
        control.input(
            apply_mapping,
            inputs=[files, form["shape"], *roles, form["system_prompt"]],
            outputs=[detected, preview],
        )
    limits = runner.limits
    submit.click(
        session.for_user(limits, functools.partial(submit_import, runner, settings)),
        inputs_kwargs={n: c for n, c in form.items() if n != "sample"},
        outputs=[import_run, import_status],
    )
    timer = gr.Timer(1.0)
    timer.tick(
        session.for_viewer(limits, functools.partial(refresh_import, home)),
        inputs=[import_run],
        outputs=[import_status, import_report, chosen],
    )


def _source_section() -> dict[str, Any]:
    """Files (or the sample), or a Hub dataset."""
    with gr.Row():
        with gr.Column(scale=3):
            files = gr.File(
                label="Files",
                file_count="multiple",
                type="filepath",
                file_types=list(readers.FILE_TYPES),
                elem_id="data-files",
            )
            sample = gr.Button(
                "Use the sample dataset (360 support messages, 6 intents)",
                size="sm",
                elem_id="data-sample",
            )
        with (
            gr.Column(scale=2),
            gr.Accordion("…or a Hugging Face Hub dataset (online)", open=False),
        ):
            hub = {
                name: gr.Textbox(**forms.field_kwargs(DatasetConfig, name))
                for name in ("hub_dataset", "hub_config", "hub_split")
            }
    return {"files": files, "sample": sample, **hub}


def _mapping_section() -> tuple[gr.Markdown, gr.Dataframe, dict[str, Any]]:
    """What the upload holds, how its columns are read (shape, a column per role, the system
    prompt), and a preview of its first rows as they will be imported."""
    detected = gr.Markdown(elem_id="data-detected")
    with gr.Accordion("Column mapping", open=True):
        mapping = {
            "shape": gr.Dropdown(
                choices=["auto", *shapes.SHAPES],
                value="auto",
                label="Shape",
                info="How rows are read; 'auto' picks it from the column names.",
            )
        }
        with gr.Row():
            for role in MAPPING_ROLES:
                mapping[f"mapping_{role}"] = gr.Dropdown(
                    choices=[""], value="", label=ROLE_LABELS[role], allow_custom_value=True
                )
        mapping["system_prompt"] = gr.Textbox(
            lines=2, **forms.field_kwargs(DatasetConfig, "system_prompt")
        )
    preview = gr.Dataframe(
        headers=TABLE_HEADERS,
        label="Preview (first rows)",
        wrap=True,
        line_breaks=True,
        interactive=False,
    )
    return detected, preview, mapping


def _browse_section(home: Path, limits: Any) -> gr.Dropdown:
    """Imported datasets, page by page; returns the picker (an import refreshes it)."""
    gr.Markdown("### Imported datasets")
    with gr.Row():
        chosen = gr.Dropdown(
            label="Dataset",
            choices=choices.datasets(home, session.page_owner(limits)),
            value=None,
            scale=3,
            elem_id="data-chosen",
        )
        split = gr.Radio(choices=list(dataset_folder.SPLITS), value="train", label="Split", scale=2)
        page = gr.Number(value=1, precision=0, label="Page", minimum=1, scale=1)
    dataset_info = gr.Markdown()
    dataset_rows = gr.Dataframe(
        headers=TABLE_HEADERS, wrap=True, line_breaks=True, interactive=False
    )
    choices.fill_on_focus(chosen, choices.datasets, home, limits)
    for control in (chosen, split, page):
        control.change(
            session.for_viewer(limits, functools.partial(show_dataset, home)),
            inputs=[chosen, split, page],
            outputs=[dataset_info, dataset_rows],
        )
    return chosen


def inspect_upload(files: list[str] | str | None) -> tuple:
    """Right after an upload: detect shape and columns from the head of the first file."""
    paths = _paths(files)
    blank = (gr.update(choices=[""], value=""),) * len(MAPPING_ROLES)
    if not paths:
        return ("", "auto", *blank, "", [], "")
    try:
        found = dataset.preview(paths)
    except StepError as e:
        return (f"⚠️ {e}", "auto", *blank, "", [], Path(paths[0]).stem)
    choices = ["", *found["columns"]]
    updates = tuple(
        gr.update(choices=choices, value=found["mapping"].get(r, "")) for r in MAPPING_ROLES
    )
    system = ""
    if Path(paths[0]).resolve() == SAMPLE_DATASET.resolve():
        system = SAMPLE_SYSTEM_PROMPT
    elif found["labels"]:
        system = (
            "Classify the text. Answer with exactly one of these labels: "
            + ", ".join(found["labels"])
            + "."
        )
    return (
        _detected_md(found, paths),
        found["shape"],
        *updates,
        system,
        _preview_rows(found["examples"]),
        Path(paths[0]).stem,
    )


def apply_mapping(files: list[str] | str | None, shape: str, *values: str) -> tuple[str, list]:
    """Re-read the head with the shape and columns the user chose."""
    *role_values, system_prompt = values
    paths = _paths(files)
    if not paths:
        return "", []
    mapping = {r: v for r, v in zip(MAPPING_ROLES, role_values) if v}
    try:
        found = dataset.preview(paths, shape, mapping, system_prompt or "")
    except StepError as e:
        return f"⚠️ {e}", []
    return _detected_md(found, paths), _preview_rows(found["examples"])


def submit_import(
    runner: JobRunner,
    settings: Settings,
    owner: str | None,
    *,
    files: list[str] | str | None = None,
    **fields: Any,
) -> tuple[str, str]:
    """Validate the form, copy the uploads into STUDIO_HOME and queue a dataset run.

    `fields`: form values named after DatasetConfig's fields, and `mapping_<role>` columns."""
    paths = _paths(files)
    for path in paths:
        size_mb = Path(path).stat().st_size / 2**20
        if size_mb > settings.max_upload_mb:
            raise gr.Error(
                f"{Path(path).name} is {size_mb:.0f} MB, over the {settings.max_upload_mb}"
                " MB upload limit. Split it into smaller files."
            )
    limit_mb = runner.limits.upload_mb if runner.limits else 0
    total_mb = sum(Path(p).stat().st_size for p in paths) / 2**20
    if limit_mb and total_mb > limit_mb:
        raise gr.Error(
            f"These files hold {total_mb:.1f} MB, and this shared studio takes at most "
            f"{limit_mb} MB per import: upload fewer or smaller files."
        )
    values = forms.config_values(DatasetConfig, fields)
    hub = (values.get("hub_dataset") or "").strip()
    try:
        config = DatasetConfig(
            **{
                **values,
                "name": (values.get("name") or "").strip()
                or (Path(paths[0]).stem if paths else hub),
                "files": paths,
                "hub_dataset": hub,
                "mapping": {
                    r: fields[f"mapping_{r}"] for r in MAPPING_ROLES if fields.get(f"mapping_{r}")
                },
                "max_file_mb": settings.max_upload_mb,
            }
        )
    except (ValueError, TypeError) as e:
        raise gr.Error(f"Can't import: {e}") from e
    if paths:  # Gradio's temp copies can vanish; the run reads its own copy
        files = store.keep_uploads(runner.home, paths, owner or "")
        config = dataclasses.replace(config, files=files)
    run_id = runner.submit("dataset", config, name=config.name, owner=owner)
    with store.connect(runner.home) as db:
        row = store.get_run(db, run_id)
    return (
        run_id,
        f"Queued import run <code>{run_id}</code> (see the Runs tab)." + views.progress_html(row),
    )


def refresh_import(home: Path, owner: str | None, run_id: str) -> tuple:
    """Poll the import run: progress bar while it works, the report when it ends."""
    header, report = runs_tab.run_status(home, run_id, owner)
    done = bool(report) and "rows read" in report
    return header, report, gr.update(choices=choices.datasets(home, owner)) if done else gr.skip()


def show_dataset(
    home: Path, owner: str | None, folder: str | None, split: str, page: float | None
) -> tuple[str, list]:
    """A dataset's statistics and one page of one split (only a dataset the viewer may pick)."""
    if not folder:
        return "", []
    if folder not in [value for _, value in choices.datasets(home, owner)]:
        return "Dataset not found (deleted?).", []
    folder = Path(folder)
    stats = json.loads((folder / "stats.json").read_text())
    page = max(1, int(page or 1))
    items = dataset_folder.read_split(folder, split, (page - 1) * PAGE_SIZE, PAGE_SIZE)
    count = stats.get("splits", {}).get(split, 0)
    pages = max(1, -(-count // PAGE_SIZE))
    info = (
        f"`{folder}`\n\n"
        + for_step("dataset", stats).markdown()
        + f"\n\n**{split}**: page {page} of {pages}"
    )
    return info, [
        [(page - 1) * PAGE_SIZE + i + 1, *views.conversation_row(r["messages"])]
        for i, r in enumerate(items)
    ]


def _paths(files: list[str] | str | None) -> list[str]:
    if not files:
        return []
    items = [files] if isinstance(files, str) else files
    return [str(getattr(f, "name", f)) for f in items]


def _detected_md(found: dict[str, Any], paths: list[str]) -> str:
    mapping = ", ".join(f"{role} ← `{col}`" for role, col in found["mapping"].items())
    problems = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in found["problems"].items())
    text = (
        f"Detected shape **{found['shape']}** in `{Path(paths[0]).name}` "
        f"(columns: {', '.join(f'`{c}`' for c in found['columns'])}); mapping: {mapping}."
    )
    if found["labels"]:
        text += f" Labels seen: {', '.join(found['labels'])}."
    if problems:
        text += f" In the first rows: {problems} (these rows will be skipped and counted)."
    return text


def _preview_rows(examples: list[dict[str, Any]]) -> list[list[Any]]:
    return [[i + 1, *views.conversation_row(e["messages"])] for i, e in enumerate(examples)]
