"""The dataset step's report: rows read, kept and dropped (why, with examples), splits, token
lengths, roles and labels."""

from __future__ import annotations

from typing import Any

from pipelines.reports import Report


def report(stats: dict[str, Any]) -> Report:
    dropped = sum(stats.get("dropped", {}).values())
    r = Report().line(
        f"**{stats['rows_read']}** rows read · **{stats['rows_kept']}** kept · **{dropped}** "
        f"dropped · shape **{stats['shape']}**"
    )
    if stats.get("stopped_at_max_rows"):
        r.line(
            f"Only the first **{stats['stopped_at_max_rows']:,}** rows were read (Max rows, or "
            "this shared studio's limit per dataset); the file has more."
        )
    if stats.get("splits"):
        r.line("Splits: " + ", ".join(f"{k} **{v}**" for k, v in stats["splits"].items()))
    r.table(
        ["dropped", "rows", "examples"],
        [
            [
                reason.replace("_", " "),
                n,
                "; ".join(
                    f"{e['where']}: {e['detail']}" for e in stats["drop_examples"].get(reason, [])
                ),
            ]
            for reason, n in stats.get("dropped", {}).items()
        ],
    )
    tokens = stats.get("tokens")
    if tokens:
        r.line(
            f"Tokens per row ({stats.get('tokenizer', '')} tokenizer, chat template applied): "
            f"min {tokens['min']} · mean {tokens['mean']} · p50 {tokens['p50']} · p95 "
            f"{tokens['p95']} · max {tokens['max']} · total {tokens['total']}"
        )
    if stats.get("roles"):
        r.line(
            "Conversations with each role: "
            + ", ".join(f"{k} {v}" for k, v in stats["roles"].items())
            + " · turns per conversation: "
            + ", ".join(f"{k}: {v}" for k, v in stats.get("turns", {}).items())
        )
    labels = stats.get("labels") or {}
    total = sum(labels.values()) or 1
    r.table(
        ["label", "rows", "share"],
        [[k, v, f"{100 * v / total:.1f}%"] for k, v in labels.items()],
    )
    if stats.get("content_hash"):
        r.line(f"Content hash: `{stats['content_hash'][:16]}…`")
    return r
