"""The benchmark step's report: latency, first token, decode and overall speed, server memory."""

from __future__ import annotations

from typing import Any

from pipelines.reports import Report, fmt


def report(s: dict[str, Any]) -> Report:
    return Report().line(
        f"**{s['requests']}** requests to `{s['model']}` ({s['hardware']}): latency avg "
        f"{fmt(s['latency_avg_s'], '{:.2f}', ' s')}, p95 {fmt(s['latency_p95_s'], '{:.2f}', ' s')}"
        f"; first token avg {fmt(s['ttft_avg_s'], '{:.3f}', ' s')}, p95 "
        f"{fmt(s['ttft_p95_s'], '{:.3f}', ' s')}; decode "
        f"**{fmt(s['decode_tokens_per_s'], '{:.1f}', ' tokens/s')}**, overall "
        f"{fmt(s['tokens_per_s'], '{:.1f}', ' tokens/s')}; server peak memory "
        f"{fmt(s['peak_memory_mb'], '{:.0f}', ' MB')}"
    )
