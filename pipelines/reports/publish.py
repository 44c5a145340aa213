"""The publish step's report: where the artifact went (Hub repo or Foundry Local package)."""

from __future__ import annotations

from typing import Any

from pipelines.reports import Report


def report(s: dict[str, Any]) -> Report:
    if "zip" in s:
        return Report().line(
            f"Packaged **{s['name']}** for Foundry Local: folder `foundry/{s['name']}` and "
            f"`{s['zip']}`."
        )
    r = Report().line(f"Published **{s['repo_id']}**" + (f": {s['url']}" if s.get("url") else ""))
    if s.get("files"):
        r.line(f"{len(s['files'])} files in one commit, the model card among them.")
    return r
