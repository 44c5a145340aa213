"""Chat templates: a conversation's token ids and the labels that take the loss on answers only."""

from __future__ import annotations

from typing import Any

from pipelines.base import StepError


def chat_labels(
    tokenizer: Any, messages: list[dict[str, str]], assistant_only: bool
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the chat template, and labels with -100 on every token that
    is not part of an assistant turn (when `assistant_only`).

    Works with any template that renders a conversation's prefix as a prefix of its text (no
    `{% generation %}` markers needed, which SmolLM2's template lacks): each assistant turn spans
    from the end of the rendered prefix with a generation prompt to the end of the rendered turn.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if not assistant_only:
        return ids, list(ids)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(start) and text.startswith(end)):
            raise StepError(
                "this model's chat template does not render a conversation's start "
                "as the start of the whole, so answers can't be told from prompts: "
                "turn off 'Loss on answers only'."
            )
        spans.append((len(start), len(end)))
    labels = [-100] * len(ids)
    for t, (a, b) in enumerate(encoding["offset_mapping"]):
        if any(s <= a and b <= e and b > a for s, e in spans):
            labels[t] = ids[t]
    return ids, labels
