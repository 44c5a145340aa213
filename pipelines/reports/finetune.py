"""The finetune step's report: losses before and after, speed, padding, parameters trained, and
what the student learned from a teacher."""

from __future__ import annotations

from typing import Any

from pipelines.reports import Report, fmt


def report(s: dict[str, Any]) -> Report:
    r = Report().line(
        f"**{s['method']}** on `{s['base_model']}`: **{s['steps']}** steps "
        f"({fmt(s.get('epochs'))} epochs) on {s.get('train_examples', 'n/a')} rows, train loss "
        f"{fmt(s.get('train_loss_first'), '{:.4g}')} → **{fmt(s.get('train_loss'), '{:.4g}')}**"
        f", validation loss {fmt(s.get('eval_loss_before'), '{:.4g}')} → "
        f"**{fmt(s.get('eval_loss'), '{:.4g}')}** on {s.get('validation_examples', 0)} rows"
    )
    r.line(
        f"{fmt(s.get('tokens_per_s'), '{:.4g}')} real tokens/s · padding "
        f"{fmt(s.get('padding_share'), '{:.0%}')} of the computed tokens ({s.get('batching')}"
        f" batches) · {s['trainable_parameters']:,} of {s['parameters']:,} parameters trained · "
        f"peak memory {fmt(s.get('peak_memory_mb'), '{:.0f}', ' MB')} (estimate "
        f"{fmt(s.get('memory_estimate_gb'), '{:.2f}', ' GB')}) · {s.get('truncated', 0)} rows "
        f"cut to the max length"
    )
    if s.get("distillation"):
        kl = (
            f": KL to the teacher {fmt(s['kl_to_teacher_before'], '{:.4f}')} → "
            f"**{fmt(s['kl_to_teacher'], '{:.4f}')}**"
            if s.get("kl_to_teacher") is not None
            else ""
        )
        r.line(f"Learned from: {s['distillation']}{kl}")
    if s.get("pruned_from_layers"):
        r.line(f"Student: a pruned copy of the base ({s['pruned_from_layers']} layers before).")
    return r
