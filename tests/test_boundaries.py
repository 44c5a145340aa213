"""Import rules (DESIGN.md section 1), config help metadata, and README coverage of every step."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import STEPS

ROOT = Path(__file__).resolve().parent.parent
LIB_MODULES = sorted(
    f"pipelines.lib.{p.stem}"
    for p in (ROOT / "pipelines" / "lib").glob("*.py")
    if p.stem != "__init__"
)
PIPELINE_MODULES = ["pipelines", "pipelines.base", *LIB_MODULES, *[f"pipelines.{s}" for s in STEPS]]
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


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at the top or inside a function)."""
    graph: dict[str, set[str]] = {}
    for path in [*ROOT.glob("pipelines/**/*.py"), *ROOT.glob("studio/**/*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                file = ROOT / name.replace(".", "/")
                if file.with_suffix(".py").exists() or (file / "__init__.py").exists():
                    imported.add(name)
        graph[module] = imported - {module}
    return graph


def test_no_step_imports_another_step():
    """A step is a leaf: it imports pipelines.base and pipelines.lib, never another step."""
    steps = {f"pipelines.{s}" for s in STEPS}
    graph = _import_graph()
    crossings = {m: graph[m] & steps for m in graph if m.startswith("pipelines")}
    assert not {m: s for m, s in crossings.items() if s}


def test_no_import_cycles():
    graph, done, found = _import_graph(), set(), []

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            found.append(stack[stack.index(module) :] + [module])
            return
        if module in done:
            return
        for dependency in graph.get(module, ()):
            # importing a package runs its __init__, not its other modules: not an edge back
            if dependency != module.rsplit(".", 1)[0]:
                visit(dependency, [*stack, module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not found, " ; ".join(" -> ".join(cycle) for cycle in found)


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


def test_all_sql_and_run_folder_paths_live_in_the_store():
    """Only studio/store.py queries the database or knows where a run's files are."""
    import re

    sql = re.compile(r"db\[\"|db\.execute\(|db\.query\(|rows_where\(|/ \"runs\" /|/ \"out\"")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in ROOT.glob("studio/**/*.py")
        if path.name != "store.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if sql.search(line)
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("step", STEPS)
def test_every_step_has_a_presenter(step):
    """pipelines/reports/<step>.py renders the step's summary (UI Markdown and CLI text)."""
    assert (ROOT / "pipelines" / "reports" / f"{step}.py").exists()
