"""Training pieces around the HF Trainer: the distillation loss against a teacher's logits, the
callback that forwards progress and honours a cancel, and the padding counter."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Protocol

from pipelines.base import Cancelled, Metrics, Progress, Reporter
from pipelines.lib.memory import process_memory_mb


class DistillSettings(Protocol):
    """What the distillation loss reads (FinetuneConfig has these fields)."""

    distill_loss: str
    distill_temperature: float
    distill_weight: float


def distill_loss(
    student_logits, teacher_logits, labels, config: DistillSettings, temperature: float = 0.0
):
    """Divergence from the teacher's next-token distribution on the answer tokens (TRL's
    generalized JSD: beta 0 is the forward KL, 0.5 the symmetric JSD)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])  # padded embedding rows
    return GKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1, :vocab],
        teacher_logits[:, :-1, :vocab],
        labels=labels[:, 1:],
        beta=0.0 if config.distill_loss == "kl" else 0.5,
        temperature=temperature or config.distill_temperature,
    )


def kl_to_teacher(trainer, teacher, data, rows: int = 32) -> float:
    """Mean KL(teacher || student) per answer token on a few rows (temperature 1)."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    total, batches = 0.0, 0
    kl = replace(trainer.distill_config, distill_loss="kl")
    with torch.no_grad():
        subset = data.select(range(min(rows, len(data))))
        for batch in trainer.get_eval_dataloader(subset):
            batch = {k: v.to(model.device) for k, v in batch.items() if k != "length"}
            student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            teacher_out = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
            total += float(
                distill_loss(student.logits, teacher_out.logits, batch["labels"], kl, 1.0)
            )
            batches += 1
    model.train(was_training)
    return round(total / max(batches, 1), 5)


def train_dtype(cuda: bool) -> Any:
    import torch

    if not cuda:
        return torch.float32  # no fast bf16 on most CPUs: a step is ~20x slower (measured)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def trainer_class(teacher: Any, config: DistillSettings):
    """The HF Trainer, or with a teacher one whose training loss mixes in the divergence from
    the teacher's logits (validation loss stays the plain loss, comparable across runs)."""
    from transformers import Trainer

    if teacher is None:
        return Trainer

    class DistillTrainer(Trainer):
        distill_sum, distill_count = 0.0, 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                import torch

                with torch.no_grad():
                    teacher_logits = teacher(
                        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                    ).logits
                divergence = distill_loss(outputs.logits, teacher_logits, inputs["labels"], config)
                self.distill_sum += float(divergence.detach())
                self.distill_count += 1
                weight = config.distill_weight
                loss = (1 - weight) * loss + weight * divergence
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self.distill_count:
                logs["distill_loss"] = self.distill_sum / self.distill_count
                self.distill_sum, self.distill_count = 0.0, 0
            super().log(logs, *args, **kwargs)

    return DistillTrainer


class PaddingCounter:
    """Wraps the collator to count real and padded tokens (the Runs tab shows the padding share)."""

    def __init__(self, collator):
        self.collator, self.real, self.computed = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.real += int(batch["attention_mask"].sum())
        self.computed += int(batch["attention_mask"].numel())
        return batch


def bridge(report: Reporter):
    """A TrainerCallback that forwards progress and metrics; a cancel saves, then stops."""
    from transformers import TrainerCallback

    class Bridge(TrainerCallback):
        cancelled = False

        def _send(self, event, control) -> None:
            try:
                report(event)
            except Cancelled:
                self.cancelled = True
                control.should_save = True  # so that resume continues at this very step
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            message = f"step {state.global_step}/{state.max_steps}" + (
                f" · loss {loss:.3f}" if loss is not None else ""
            )
            self._send(Progress(state.global_step, state.max_steps, message), control)
            _agree_on_cancel(self, control, args.device)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            skip = ("epoch", "total_flos", "train_runtime", "num_input_tokens_seen")
            values = {
                k: float(v)
                for k, v in (logs or {}).items()
                if isinstance(v, (int, float)) and k not in skip
            }
            if "train_tokens_per_second" in values:  # non-padding tokens (see TrainingArguments)
                values["tokens_per_s"] = values.pop("train_tokens_per_second")
            values["memory_mb"] = process_memory_mb()
            if values:
                self._send(Metrics(step=state.global_step, values=values), control)

    return Bridge()


def _agree_on_cancel(bridge, control, device) -> None:
    """Under several processes every rank must stop at the same step, or the others hang."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    flag = torch.tensor([int(bridge.cancelled)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not bridge.cancelled:
        bridge.cancelled = True
        control.should_save = True
        control.should_training_stop = True
