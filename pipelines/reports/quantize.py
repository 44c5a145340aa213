"""The quantize step's report: the gate's verdict and each check, both models side by side, greedy
agreement and template/end-of-sequence parity, what to try next, sample answers, the command."""

from __future__ import annotations

from typing import Any

from pipelines.lib.stats import says, with_interval
from pipelines.reports import Report, fmt

COLUMNS = [
    ("perplexity", "perplexity", "{:.3g}"),
    ("decode_tokens_per_s", "decode tokens/s", "{:.1f}"),
    ("first_token_p50_s", "first token p50 (s)", "{:.3f}"),
    ("latency_p50_s", "answer p50 (s)", "{:.2f}"),
    ("memory_mb", "memory (MB)", "{:.0f}"),
    ("size_mb", "size (MB)", "{:.0f}"),
    ("stopped", "stopped on its own", "{}"),
]


def report(summary: dict[str, Any]) -> Report:
    r = Report()
    gate = summary.get("gate")
    head = f"Quantized **{summary['recipe']}** from `{summary['model']}`."
    if not gate:
        r.line(head)
    else:
        verdict = "PASS" if gate["verdict"] == "pass" else "FAIL"
        r.line(
            f"**{verdict}** · {head} Quality gate on {gate['prompts']} (quality by "
            f"{gate['quality_by']}), measured on {gate['measured_on']}."
        )
        r.table(
            ["check", "measured", "target", ""],
            [
                [
                    c["name"],
                    fmt(c["value"]),
                    f"≥ {c['target']}",
                    "pass" if c["passed"] else ("FAIL: " + c["why"] if c.get("why") else "FAIL"),
                ]
                for c in gate["checks"]
            ],
        )
        if gate.get("pair", {}).get("rows"):
            r.line(f"Task metric: {says('source', 'quantized', gate['pair'])}.")
        r.table(
            ["model", "task metric [95% CI]", *(label for _, label, _ in COLUMNS)],
            [
                [
                    role,
                    with_interval(
                        result.get("metric"),
                        result.get("ci_low"),
                        result.get("ci_high"),
                        result.get("scored_rows", 0),
                    ),
                    *(fmt(result.get(k), spec) for k, _, spec in COLUMNS),
                ]
                for role, result in gate["models"].items()
            ],
        )
        parity, agreement = gate["parity"], gate["agreement"]
        template = (
            f" Chat template: **{'same' if parity['chat_template'] else 'different'}**; prompt "
            f"tokens **{'same' if parity['tokens'] else 'different'}**; end-of-sequence ids "
            f"{parity['eos_quantized']} (source {parity['eos_source']})."
            if "chat_template" in parity
            else ""
        )
        r.line(
            f"Greedy answers share **{agreement['prefix_match']:.0%}** of their tokens (as a "
            f"prefix) and **{agreement['identical']:.0%}** are identical; both models stop the "
            f"same way on **{parity['stop_parity']:.0%}** of the prompts.{template}"
        )
        if gate.get("note"):
            r.line(f"Note: {gate['note']}")
        if gate.get("suggestion"):
            r.line(f"**Next:** {gate['suggestion']}")
        r.table(
            ["prompt", "source", "quantized"],
            [
                [s["prompt"][:120], s["source"][:160], s["quantized"][:160]]
                for s in gate.get("samples", [])
            ],
        )
    if summary.get("builder_command"):
        r.line(f"Built in {summary.get('build_seconds')} s with")
        r.code(summary["builder_command"])
    return r
