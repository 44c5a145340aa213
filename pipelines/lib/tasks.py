"""Distillation task presets: the prompts a teacher (and later the student) sees, the check that
extracts a valid answer from a reply, and the metric that scores answers against references."""

from __future__ import annotations

import re
import string
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.base import option

TaskName = Literal[
    "classification",
    "conversation",
    "multiple_choice",
    "nli",
    "math",
    "summarization",
    "custom",
]
TASKS = typing.get_args(TaskName)
NLI_LABELS = ("entailment", "neutral", "contradiction")
LETTERS = ("A", "B", "C", "D", "E")
MAX_SUMMARY_WORDS = 80


@dataclass(frozen=True)
class Task:
    """A preset resolved for one dataset: prompts, answer check and metric."""

    name: str
    system_prompt: str
    user_template: str  # {prompt} is the row's last user message; {column} any original column
    labels: tuple[str, ...] = ()  # the answer set of label tasks
    answer_pattern: str = ""  # custom: a regex whose group 1 (or whole match) is the answer
    chain_of_thought: bool = False

    @property
    def metric(self) -> str:
        """accuracy for tasks with one right answer, ROUGE-L (word overlap) for free text."""
        if self.name in ("classification", "multiple_choice", "nli", "math"):
            return "accuracy"
        if self.name == "custom" and self.answer_pattern:
            return "exact_match"
        return "rouge_l"

    @property
    def keeps_full_reply(self) -> bool:
        """Whether the student learns the whole reply (free text, reasoning) or only its answer."""
        return self.metric == "rouge_l" or (self.name == "math" and self.chain_of_thought)

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The prompt for one dataset row: system (if any) and the filled user template."""
        turns = row.get("messages") or []
        prompt = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
        values = {k: v for k, v in row.items() if k != "messages"}
        values["prompt"] = prompt
        user = self.user_template.replace("\\n", "\n").format_map(_Missing(values))
        system = self.system_prompt or next(
            (m["content"] for m in turns if m["role"] == "system"), ""
        )
        out = [{"role": "system", "content": system}] if system else []
        return out + [{"role": "user", "content": user}]

    def check(self, reply: str) -> tuple[str | None, str]:
        """(the answer in a reply, "") or (None, why the reply is rejected)."""
        text = (reply or "").strip()
        if not text:
            return None, "empty reply"
        if self.name in ("classification", "nli"):
            label = match_label(text, self.labels)
            return (label, "") if label else (None, "no label from the set")
        if self.name == "multiple_choice":
            letter = _letter(text)
            return (letter, "") if letter else (None, "no letter A-E")
        if self.name == "math":
            number = _number(text)
            return (number, "") if number else (None, "no final number")
        if self.name == "summarization":
            words = len(text.split())
            if words > MAX_SUMMARY_WORDS:
                return None, f"longer than {MAX_SUMMARY_WORDS} words"
            return text, ""
        if self.name == "custom" and self.answer_pattern:
            found = re.search(self.answer_pattern, text, re.IGNORECASE | re.DOTALL)
            if not found:
                return None, "does not match the answer pattern"
            return (found.group(1) if found.groups() else found.group(0)).strip(), ""
        return text, ""

    def target(self, reply: str, answer: str) -> str:
        """What the student learns to write for a valid reply."""
        return reply.strip() if self.keeps_full_reply else answer

    def reference(self, row: dict[str, Any]) -> str | None:
        """The dataset's own answer for a row (its last assistant message), if it has one."""
        turns = row.get("messages") or []
        return next((m["content"] for m in reversed(turns) if m["role"] == "assistant"), None)

    def score(self, reply: str, reference: str) -> float:
        """1/0 for a right/wrong answer (accuracy, exact match), or ROUGE-L F1 for free text."""
        if self.metric == "rouge_l":
            return rouge_l(reply, reference)
        answer, _ = self.check(reply)
        expected, _ = self.check(reference)
        expected = expected or reference.strip()
        if answer is None:
            return 0.0
        if self.name == "math":
            return float(_same_number(answer, expected))
        return float(_norm(answer) == _norm(expected))

    def agreement(self, reply: str, teacher_reply: str) -> float:
        """How far a reply agrees with the teacher's: same answer (1/0), or ROUGE-L for text."""
        if self.metric == "rouge_l":
            return rouge_l(reply, teacher_reply)
        a, _ = self.check(reply)
        b, _ = self.check(teacher_reply)
        if a is None or b is None:
            return float(a is None and b is None)
        return float(_same_number(a, b) if self.name == "math" else _norm(a) == _norm(b))


@dataclass(frozen=True, kw_only=True)
class TaskFields:
    """The task preset and its overrides (shared by the synthesize and evaluate configs)."""

    task: TaskName = option(
        "classification",
        "Task",
        "What the teacher does with each row: sets the prompts, the answer check and the metric.",
    )
    system_prompt: str = option(
        "", "System prompt", "Replaces the preset's system prompt ({labels} lists the labels)."
    )
    user_template: str = option(
        "",
        "User template",
        "The user message: {prompt} is the row's question, {column} any original column.",
    )
    answer_pattern: str = option(
        "",
        "Answer pattern",
        "Custom task: a regular expression a valid answer matches (group 1 is the answer).",
    )
    chain_of_thought: bool = option(
        False, "Chain of thought", "Math: the teacher reasons step by step before answering."
    )

    def check_task(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.answer_pattern:
            try:
                re.compile(self.answer_pattern)
            except re.error as e:
                raise ValueError(f"answer_pattern is not a valid regular expression: {e}") from None

    def build(self, labels: list[str] | tuple[str, ...] = ()) -> Task:
        return build_task(
            self.task,
            system_prompt=self.system_prompt,
            user_template=self.user_template,
            answer_pattern=self.answer_pattern,
            chain_of_thought=self.chain_of_thought,
            labels=labels,
        )


PRESETS: dict[str, dict[str, str]] = {
    "classification": {
        "label": "Classification (labels from the data)",
        "system": (
            "Classify the user's message. Reply with exactly one label from this list and "
            "nothing else: {labels}."
        ),
        "user": "{prompt}",
    },
    "conversation": {
        "label": "Conversation (free answers)",
        "system": "",
        "user": "{prompt}",
    },
    "multiple_choice": {
        "label": "Question answering / multiple choice (A-E)",
        "system": (
            "Answer the multiple-choice question. Reply with the letter of the correct option "
            "(A, B, C, D or E) only."
        ),
        "user": "{prompt}",
    },
    "nli": {
        "label": "Natural language inference (3 labels)",
        "system": (
            "Decide how the hypothesis relates to the premise. Reply with one word: "
            "entailment, neutral or contradiction."
        ),
        "user": "{prompt}",
    },
    "math": {
        "label": "Math word problems",
        "system": "Solve the math problem. Give the final answer on the last line as "
        "'Answer: <number>'.",
        "user": "{prompt}",
    },
    "summarization": {
        "label": f"Summarization (at most {MAX_SUMMARY_WORDS} words)",
        "system": f"Summarize the text in at most {MAX_SUMMARY_WORDS} words. Reply with the "
        "summary only.",
        "user": "{prompt}",
    },
    "custom": {
        "label": "Custom (write the prompts)",
        "system": "",
        "user": "{prompt}",
    },
}
COT_SYSTEM = (
    "Solve the math problem. Think step by step, then give the final answer on the last line "
    "as 'Answer: <number>'."
)


def build_task(
    name: str,
    *,
    system_prompt: str = "",
    user_template: str = "",
    answer_pattern: str = "",
    chain_of_thought: bool = False,
    labels: list[str] | tuple[str, ...] = (),
) -> Task:
    """A preset with the user's overrides; classification needs its label set."""
    if name not in PRESETS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    preset = PRESETS[name]
    if name == "nli":
        labels = NLI_LABELS
    elif name == "multiple_choice":
        labels = LETTERS
    system = system_prompt or (COT_SYSTEM if name == "math" and chain_of_thought else "")
    system = system or preset["system"]
    if "{labels}" in system:
        system = system.replace("{labels}", ", ".join(labels))
    return Task(
        name=name,
        system_prompt=system,
        user_template=user_template or preset["user"],
        labels=tuple(labels),
        answer_pattern=answer_pattern,
        chain_of_thought=chain_of_thought,
    )


def label_bias(counts: dict[str, int], labels: tuple[str, ...]) -> float | None:
    """Total variation distance of an answer distribution from uniform over the label set
    (0 = perfectly balanced, near 1 = always the same label)."""
    total = sum(counts.values())
    if not labels or not total:
        return None
    return round(0.5 * sum(abs(counts.get(k, 0) / total - 1 / len(labels)) for k in labels), 3)


def match_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label a reply names: an exact match, else the one label mentioned (by whole word)."""
    clean = _norm(text)
    by_norm = {_norm(label): label for label in labels}
    if clean in by_norm:
        return by_norm[clean]
    first_line = _norm(text.splitlines()[0]) if text.splitlines() else clean
    if first_line in by_norm:
        return by_norm[first_line]
    mentioned = [
        label
        for key, label in by_norm.items()
        if key and re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", clean)
    ]
    return mentioned[0] if len(mentioned) == 1 else None


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of lowercase words."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return round(2 * precision * recall / (precision + recall), 4)


class _Missing(dict):
    """format_map that leaves unknown {names} as they are instead of failing."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _norm(text: str) -> str:
    return text.strip().strip(string.punctuation + " \"'`").strip().lower()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _letter(text: str) -> str | None:
    found = re.search(r"answer\s*(?:is)?\s*[:\-]?\s*\(?([A-E])\b", text, re.IGNORECASE)
    if found:
        return found.group(1).upper()
    found = re.match(r"\s*\(?([A-E])\)?(?:[.:)\s]|$)", text)
    if found:
        return found.group(1)
    letters = re.findall(r"\b([A-E])\b", text)
    return letters[0] if len(set(letters)) == 1 else None


def _number(text: str) -> str | None:
    found = re.search(r"(?:answer\s*[:=]?|####)\s*\$?\s*(-?[\d,]*\.?\d+)", text, re.IGNORECASE)
    numbers = [found.group(1)] if found else re.findall(r"-?[\d,]*\.?\d+", text)
    return numbers[-1].replace(",", "") if numbers else None


def _same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b
