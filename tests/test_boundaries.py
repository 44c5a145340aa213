"""Import rules (DESIGN.md section 1), config help metadata, and README coverage of every step."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import STEPS

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_MODULES = [
    "pipelines",
    "pipelines.base",
    "pipelines.models",
    "pipelines.generation",
    "pipelines.onnx_model",
    "pipelines.gate",
    "pipelines.card",
    *[f"pipelines.{s}" for s in STEPS],
]
WEB_MODULES = [
    "app",
    "studio.ui.app",
    "studio.store",
    "studio.jobs",
    "studio.cli",
    "studio.worker",
    "studio.deploy",
    "studio.runtime",  # onnxruntime-genai only once a model is served, and never torch
]
HEAVY = ["torch", "transformers", "peft", "trl", "datasets", "onnxruntime_genai", "bitsandbytes"]


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize("module", PIPELINE_MODULES)
def test_pipelines_are_cheap_and_know_nothing_of_the_ui(module):
    loaded = _modules_after_import(module)
    assert not {"gradio", "studio"} & loaded
    assert not set(HEAVY) & loaded


@pytest.mark.parametrize("module", WEB_MODULES)
def test_web_process_never_loads_torch(module):
    assert not set(HEAVY) & _modules_after_import(module)


@pytest.mark.parametrize("step", STEPS)
def test_every_config_field_has_a_label_and_help(step):
    for f in dataclasses.fields(STEPS[step].CONFIG):
        assert f.metadata.get("help"), f"{step}.{f.name} has no help"
        assert f.metadata.get("label"), f"{step}.{f.name} has no label"


@pytest.mark.parametrize("step", STEPS)
def test_every_step_is_documented_in_the_readme(step):
    assert f"`{step}`" in (ROOT / "README.md").read_text()


def test_readme_file_tree_lists_every_source_file():
    readme = (ROOT / "README.md").read_text()
    tracked = subprocess.run(
        ["git", "ls-files", "studio", "pipelines", "bench", "app.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    missing = [
        p
        for p in tracked
        if p.endswith(".py") and not p.endswith("__init__.py") and Path(p).name not in readme
    ]
    assert not missing, f"add these to the README file tree: {missing}"


def test_ci_runs_exactly_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command in (ROOT / "README.md").read_text()
