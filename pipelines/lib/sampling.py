"""What a generation asks for (Sampling) and what it gives back (Reply), for every kind of model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 42


@dataclass
class Reply:
    text: str | None  # None when the request failed
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None  # time to the first token (local models, one at a time)
    stopped: bool | None = None  # ended at an end-of-sequence token, not at the length limit


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text
