"""One presenter per step: `pipelines/reports/<step>.py` turns a run's summary into a Report, which
renders as Markdown (the UI) or plain text (the CLI, logs, cards) from the same blocks."""

from __future__ import annotations

import html
import importlib
import json
import re
from typing import Any

from pipelines.base import fmt

__all__ = ["Report", "fmt", "for_step", "pct"]


class Report:
    """Paragraphs (with **bold** and `code`), tables and code blocks, in order."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def line(self, text: str) -> Report:
        self.blocks.append(("line", text))
        return self

    def table(self, header: list[str], rows: list[list[Any]]) -> Report:
        if rows:
            self.blocks.append(("table", (header, [[str(c) for c in r] for r in rows])))
        return self

    def code(self, text: str) -> Report:
        self.blocks.append(("code", text))
        return self

    def markdown(self) -> str:
        """For gr.Markdown: user text HTML-escaped, table cells on one line."""
        out = []
        for kind, value in self.blocks:
            if kind == "line":
                out.append(html.escape(value, quote=False))
            elif kind == "code":
                out.append(f"```\n{value}\n```")
            else:
                header, rows = value
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
        return "\n\n".join(out)

    def text(self) -> str:
        """For a terminal or a log: no markup, tables as aligned columns."""
        out = []
        for kind, value in self.blocks:
            if kind == "line":
                out.append(re.sub(r"\*\*|`", "", value))
            elif kind == "code":
                out.append("\n".join("    " + line for line in value.splitlines()))
            else:
                header, rows = value
                widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
                out.append(
                    "\n".join(
                        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                        for r in [header, *rows]
                    )
                )
        return "\n".join(out)


def for_step(step: str, summary: dict[str, Any]) -> Report:
    """The step's presenter applied to a summary; JSON for a step without one (or a summary its
    presenter can't read, e.g. one written by an older version)."""
    try:
        module = importlib.import_module(f"pipelines.reports.{step}")
        return module.report(summary)
    except (ModuleNotFoundError, KeyError, TypeError):
        return Report().code(json.dumps(summary, indent=2, ensure_ascii=False))


def pct(value: float | None, spec: str = "{:.0f}") -> str:
    return fmt(value, spec, "%")


def _cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")
