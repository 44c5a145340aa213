"""The evaluate step's report: the student's share of the teacher's quality, time and memory saved,
then each model side by side."""

from __future__ import annotations

from typing import Any

from pipelines.lib.stats import says, with_interval
from pipelines.reports import Report, fmt, pct

COLUMNS = [
    ("agreement", "agrees with teacher", "{:.3g}"),
    ("perplexity", "perplexity", "{:.4g}"),
    ("latency_p50_s", "latency p50 (s)", "{:.3g}"),
    ("latency_p95_s", "latency p95 (s)", "{:.3g}"),
    ("tokens_per_s", "tokens/s", "{:.4g}"),
    ("peak_memory_mb", "memory (MB)", "{:.0f}"),
    ("parameters", "parameters", "{:,}"),
    ("size_mb", "size (MB)", "{:.0f}"),
]


def report(summary: dict[str, Any]) -> Report:
    ratios = summary["ratios"]
    kept_ci = ratios.get("quality_kept_ci") or [None, None]
    interval = f" (95% CI {pct(kept_ci[0])}–{pct(kept_ci[1])})" if kept_ci[0] is not None else ""
    r = Report().line(
        f"The student keeps **{pct(ratios.get('quality_kept_pct'))}**{interval} of the teacher's "
        "quality, "
        f"takes **{pct(ratios.get('time_saved_pct'))}** less time per answer and "
        f"**{pct(ratios.get('memory_saved_pct'))}** less memory ({summary['task']}, "
        f"{summary['metric']} on {summary['rows']} {summary['split']} rows; teacher "
        f"{summary['teacher']})."
    )
    r.table(
        ["model", f"{summary['metric']} [95% CI]", *(label for _, label, _ in COLUMNS)],
        [
            [
                role.replace("_", " "),
                with_interval(
                    result.get("metric"),
                    result.get("ci_low"),
                    result.get("ci_high"),
                    result.get("scored_rows", summary["rows"]),
                ),
                *(fmt(result.get(k), spec) for k, _, spec in COLUMNS),
            ]
            for role, result in summary["models"].items()
        ],
    )
    for pair in summary.get("pairs", []):
        names = [pair[k].replace("_", " ") for k in ("a", "b")]
        r.line(f"{summary['metric'].capitalize()}: {says(*names, pair)}.")
    if ratios.get("gain_over_base") is not None:
        r.line(
            f"Training changed the student's {summary['metric']} by "
            f"**{ratios['gain_over_base']:+.3f}** over its untrained base."
        )
    return r
