"""Every dropdown's choices, as (label, value) pairs, from the store: the datasets, models,
ONNX folders, servers, reports and runs a viewer may pick (the owner's only, when given)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio import store
from studio.store import RunStatus

BUNDLED = ("SmolLM2-135M-Instruct (bundled)", "bundled")


def datasets(home: Path, owner: str | None = None) -> list[tuple[str, str]]:
    """(label, folder) of every imported or generated dataset, newest first."""
    return [
        (f"{a['name']} · {_meta(a).get('rows', '?')} rows · run {a['run_id']}", _path(home, a))
        for a in _artifacts(home, owner, "dataset")
    ]


def models(home: Path, owner: str | None = None) -> list[tuple[str, str]]:
    """The bundled model, then every model and adapter made here (newest first)."""
    rows = _artifacts(home, owner, "model", "adapter")
    return [BUNDLED] + [
        (
            f"{a['kind']} {a['name']} · run {a['run_id']} · {_meta(a).get('method', '')} on "
            f"{short_model(_meta(a).get('base_model', ''))}",
            _path(home, a),
        )
        for a in rows
    ]


def onnx_models(home: Path, owner: str | None = None) -> list[tuple[str, str]]:
    """(label, folder) of every ONNX model made here, with its gate's verdict."""
    return [
        (
            f"{a['name']} · run {a['run_id']} · {_meta(a).get('verdict') or 'no gate'}",
            _path(home, a),
        )
        for a in _artifacts(home, owner, "onnx")
    ]


def playground_models(home: Path, owner: str | None = None) -> list[tuple[str, str]]:
    """What the Playground can chat with: transformers models and adapters, then ONNX ones."""
    onnx = [(f"onnx {label}", path) for label, path in onnx_models(home, owner)]
    return models(home, owner) + onnx


def publishable(home: Path, owner: str | None = None) -> list[tuple[str, str]]:
    rows = _artifacts(home, owner, "dataset", "adapter", "model", "onnx")
    return [(f"{a['kind']} {a['name']} · run {a['run_id']}", _path(home, a)) for a in rows]


def gate_prompts(home: Path, owner: str | None = None) -> list[tuple[str, str]]:
    """The quality gate's prompts: the built-in ones, or a dataset's held-out rows."""
    return [("12 built-in general prompts", ""), *datasets(home, owner)]


def servers(home: Path, owner: str | None = None) -> list[tuple[str, int]]:
    with store.connect(home) as db:
        rows = store.servers(db, live_only=True, owner=owner)
    return [(f"{r['id']}: {', '.join(r['models'])} on port {r['port']}", r["id"]) for r in rows]


def reports(home: Path, owner: str | None = None) -> list[tuple[str, str]]:
    """Finished student-vs-teacher evaluations, newest first."""
    with store.connect(home) as db:
        rows = store.list_runs(db, step="evaluate", status=RunStatus.SUCCEEDED, owner=owner)
    return [(f"{r['name'] or r['id']} · {r['id']}", r["id"]) for r in rows]


def runs(home: Path, owner: str | None = None) -> list[tuple[str, str]]:
    with store.connect(home) as db:
        rows = store.list_runs(db, limit=200, owner=owner)
    return [(f"{r['id']} · {r['step']} · {r['name']} · {r['status']}", r["id"]) for r in rows]


def short_model(spec: str) -> str:
    return "bundled SmolLM2" if spec in ("", "bundled") else Path(spec).name or spec


def _artifacts(home: Path, owner: str | None, *kinds: str) -> list[dict[str, Any]]:
    with store.connect(home) as db:
        rows = [a for kind in kinds for a in store.artifacts(db, kind=kind, owner=owner)]
    return sorted(rows, key=lambda a: a["id"], reverse=True)


def _meta(artifact: dict[str, Any]) -> dict[str, Any]:
    return json.loads(artifact["meta_json"] or "{}")


def _path(home: Path, artifact: dict[str, Any]) -> str:
    return str(Path(home) / artifact["path"])


def fill_on_focus(dropdown: Any, lookup: Any, home: Path, limits: Any) -> None:
    """Refresh a dropdown's choices (the viewer's own) each time it is opened."""
    import gradio as gr

    from studio.ui import session

    def refill(owner: str | None) -> Any:
        return gr.update(choices=lookup(home, owner))

    refill.__name__ = f"choices_{lookup.__name__}"
    dropdown.focus(session.for_viewer(limits, refill), outputs=[dropdown])
