"""Row shapes: which shape a file's columns reveal (chat messages, ShareGPT, Alpaca,
prompt/response, question/answer, classification, raw text); one row turned into chat messages."""

from __future__ import annotations

import json
from typing import Any

from pipelines.base import StepError

SHAPES = (
    "messages",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "question_answer",
    "classification",
    "text",
)
# Which mapping roles each shape reads; a role maps to a source column.
SHAPE_ROLES = {
    "messages": ("messages",),
    "sharegpt": ("messages",),
    "alpaca": ("prompt", "input", "response"),
    "prompt_completion": ("prompt", "response"),
    "question_answer": ("prompt", "input", "response"),
    "classification": ("text", "label"),
    "text": ("text",),
}
OPTIONAL_ROLES = ("input", "system")
ROLES = ("messages", "prompt", "input", "response", "text", "label", "system")
CHAT_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    # ShareGPT speaker names
    "human": "user",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
# Column names that reveal a shape, tried in order; every name is compared lowercased.
_DETECT = (
    ("messages", {"messages": ("messages",)}),
    ("sharegpt", {"messages": ("conversations", "conversation")}),
    ("alpaca", {"prompt": ("instruction",), "response": ("output",), "input": ("input",)}),
    ("prompt_completion", {"prompt": ("prompt",), "response": ("completion", "response")}),
    ("question_answer", {"prompt": ("question",), "response": ("answer",), "input": ("context",)}),
    (
        "classification",
        {
            "text": ("text", "sentence", "utterance", "review", "content"),
            "label": ("label", "labels", "intent", "category", "class", "sentiment"),
        },
    ),
    ("text", {"text": ("text", "content")}),
)
_SYSTEM_COLUMNS = ("system", "system_prompt")


class Drop(Exception):  # noqa: N818 - a row the import leaves out, and why
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def detect_shape(
    columns: list[str], first_row: dict[str, Any]
) -> tuple[str, dict[str, str]] | None:
    """Guess (shape, role -> column) from column names; None if nothing matches."""
    lower = {c.lower(): c for c in columns}
    for shape, wanted in _DETECT:
        roles = {}
        for role, names in wanted.items():
            column = next((lower[n] for n in names if n in lower), None)
            if column is not None:
                roles[role] = column
        if all(r in roles for r in wanted if r not in OPTIONAL_ROLES):
            if shape in ("messages", "sharegpt"):
                shape = _turn_format(first_row.get(roles["messages"]), shape)
            system = next((lower[n] for n in _SYSTEM_COLUMNS if n in lower), None)
            if system:
                roles["system"] = system
            return shape, roles
    return None


def _turn_format(turns: Any, default: str) -> str:
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        return "sharegpt" if "from" in turns[0] else "messages"
    return default


def resolve_mapping(
    columns: list[str], first_row: dict[str, Any], shape: str, mapping: dict[str, str], where: str
) -> tuple[str, dict[str, str]]:
    mapping = {k: v for k, v in mapping.items() if v}
    detected = detect_shape(columns, first_row)
    if shape == "auto":
        if detected is None and not mapping:
            raise StepError(
                f"{where}: can't tell the shape from the columns {columns}. Expected "
                "messages, conversations, instruction/output, prompt/completion, "
                "question/answer, text/label or text; choose the shape and the columns "
                "in the column mapping."
            )
        shape = detected[0] if detected else _shape_from_roles(mapping)
    roles = dict(detected[1]) if detected and detected[0] == shape else {}
    roles.update(mapping)
    missing = [r for r in SHAPE_ROLES[shape] if r not in OPTIONAL_ROLES and r not in roles]
    if missing:
        raise StepError(
            f"{where}: shape '{shape}' needs a column for {', '.join(missing)}; "
            f"columns found: {columns}. Set it in the column mapping."
        )
    absent = [f"{role}={col}" for role, col in roles.items() if col not in columns]
    if absent:
        raise StepError(
            f"{where}: mapped columns not found: {', '.join(absent)}; columns found: {columns}."
        )
    return shape, roles


def _shape_from_roles(mapping: dict[str, str]) -> str:
    if "messages" in mapping:
        return "messages"
    if "label" in mapping:
        return "classification"
    if "prompt" in mapping:
        return "prompt_completion"
    return "text"


def _text(row: dict[str, Any], column: str | None, role: str, required: bool = True) -> str:
    if column is None:
        return ""
    value = row.get(column)
    if value is None:
        if required:
            raise Drop("missing_field", f"no value in column '{column}' ({role})")
        return ""
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, ensure_ascii=False)
        if isinstance(value, (list, dict))
        else str(value)
    )
    if required and not text.strip():
        raise Drop("empty", f"column '{column}' ({role}) is empty")
    return text.strip()


def normalize_row(
    row: dict[str, Any], shape: str, roles: dict[str, str], system_prompt: str
) -> tuple[dict[str, Any], str | None]:
    """Return (output row with `messages` and the original columns, label or None), or Drop."""
    label = None
    if shape in ("messages", "sharegpt"):
        messages = _turns(row.get(roles["messages"]), roles["messages"])
    elif shape == "text":
        messages = [{"role": "assistant", "content": _text(row, roles["text"], "text")}]
    elif shape == "classification":
        label = _text(row, roles["label"], "label")
        messages = [
            {"role": "user", "content": _text(row, roles["text"], "text")},
            {"role": "assistant", "content": label},
        ]
    else:
        prompt = _text(row, roles["prompt"], "prompt")
        extra = _text(row, roles.get("input"), "input", required=False)
        if extra:
            prompt = (
                f"{extra}\n\n{prompt}" if shape == "question_answer" else f"{prompt}\n\n{extra}"
            )
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(row, roles["response"], "response")},
        ]
    system = _text(row, roles.get("system"), "system", required=False) or system_prompt.strip()
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    out = {k: v for k, v in row.items() if k != "messages"}
    out["messages"] = messages
    return out, label


def _turns(value: Any, column: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Drop("malformed", f"column '{column}' is not a JSON list of turns") from None
    if value is None:
        raise Drop("missing_field", f"no value in column '{column}'")
    if not isinstance(value, list):
        raise Drop("malformed", f"column '{column}' holds a {type(value).__name__}, not a list")
    if not value:
        raise Drop("empty", f"column '{column}' is an empty list")
    messages = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            raise Drop("malformed", f"turn {i} is not an object")
        speaker = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if speaker is None or content is None:
            raise Drop("missing_field", f"turn {i} lacks role/content (or from/value)")
        role = CHAT_ROLES.get(str(speaker).lower())
        if role is None:
            raise Drop("invalid_role", f"turn {i} has role '{speaker}'")
        if not str(content).strip():
            raise Drop("empty", f"turn {i} ({role}) is empty")
        messages.append({"role": role, "content": str(content).strip()})
    if not any(m["role"] == "assistant" for m in messages):
        raise Drop("missing_field", "no assistant turn to learn from")
    return messages
