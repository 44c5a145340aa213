"""Events, result type, errors and JSON config helpers shared by every pipeline step."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Progress:
    done: int
    total: int | None = None
    message: str = ""


@dataclass(frozen=True)
class Metrics:
    step: int
    values: dict[str, float]


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"


Event = Progress | Metrics | Log


class Reporter(Protocol):
    def __call__(self, event: Event) -> None: ...  # may raise Cancelled


@dataclass
class StepResult:
    """What a step produced: artifacts as (kind, path relative to workdir, meta) and a summary.

    Every step config also has two properties: `queue` (which job queue runs it) and `outputs`
    (output name -> kind; the name is its path under the workdir), so that the studio can name a
    run's outputs before it has run, and never builds a run's paths itself."""

    artifacts: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class StepError(Exception):
    """A failure the user can fix (bad input, missing model); the message is shown verbatim."""


class Cancelled(Exception):  # noqa: N818 - the name is the contract (DESIGN.md)
    """Raised by a Reporter when the user asked to stop this run."""


def option(default: Any = dataclasses.MISSING, label: str = "", help: str = "") -> Any:  # noqa: A002
    """A config field with the label and help text that its form shows."""
    metadata = {"label": label, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


CHECKPOINT_DIR = (
    "checkpoints"  # a step that can resume keeps its checkpoints in workdir/checkpoints
)


def fmt(value: float | None, spec: str = "{:.3g}", unit: str = "") -> str:
    """A figure for a report line: formatted, or n/a when it was not measured."""
    return "n/a" if value is None else spec.format(value) + unit


def config_to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build `cls` from JSON data; unknown keys (written by another version) are ignored."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"ignoring unknown {cls.__name__} keys: {unknown}", stacklevel=2)
    return cls(**{k: v for k, v in data.items() if k in known})


def config_help(cls: type) -> dict[str, str]:
    """Field name -> help text, from the dataclass metadata."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def print_event(event: Event) -> None:
    """A Reporter that prints events; used when a step runs alone from the command line."""
    if isinstance(event, Progress):
        total = f"/{event.total}" if event.total else ""
        print(f"[{event.done}{total}] {event.message}", flush=True)
    elif isinstance(event, Metrics):
        values = " ".join(f"{k}={v:.4g}" for k, v in event.values.items())
        print(f"step {event.step}: {values}", flush=True)
    else:
        print(f"{event.level}: {event.message}", flush=True)


def main(config_cls: type, run: Callable[[Any, Path, Reporter], StepResult]) -> None:
    """Command line of a step: python -m pipelines.<step> --config cfg.json --workdir DIR."""
    parser = argparse.ArgumentParser(description=(sys.modules[run.__module__].__doc__ or ""))
    parser.add_argument("--config", required=True, help="JSON file with the step's config")
    parser.add_argument("--workdir", required=True, help="folder for the step's outputs")
    args = parser.parse_args()
    try:
        config = config_from_dict(config_cls, json.loads(Path(args.config).read_text()))
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(config, workdir, print_event)
    except (StepError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({"artifacts": result.artifacts, "summary": result.summary}, indent=2))
