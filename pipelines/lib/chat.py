"""Chat replies from transformers models and adapters, streamed token by token.

Run as (the studio starts it for the chat panel): python -m pipelines.lib.chat
It reads one JSON request per line on stdin and answers with JSON lines on stdout.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from pipelines.base import StepError

_loaded: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
KEEP_LOADED = 2  # side by side needs two


def load(spec: str) -> tuple[Any, Any]:
    """(model, tokenizer) for a model spec or an adapter folder; the last two stay loaded."""
    from pipelines.lib.models import load_causal_lm, resolve_model

    path = resolve_model(spec)
    if path in _loaded:
        _loaded.move_to_end(path)
        return _loaded[path]
    _loaded[path] = load_causal_lm(path)
    while len(_loaded) > KEEP_LOADED:
        _loaded.popitem(last=False)
    return _loaded[path]


def stream(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Iterator[str]:
    """Yield the reply's text piece by piece (greedy when temperature is 0)."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    kwargs = {
        **inputs,
        "max_new_tokens": max_new_tokens,
        "streamer": streamer,
        "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id,
        **sampling,
    }
    thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


def reply(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 32
) -> str:
    """The whole greedy reply."""
    return "".join(stream(model, tokenizer, messages, max_new_tokens)).strip()


def serve() -> None:
    """Answer requests {"model", "messages", "max_new_tokens", "temperature", "top_p"}."""
    for line in sys.stdin:
        request = json.loads(line)
        try:
            model, tokenizer = load(request["model"])
            for piece in stream(
                model,
                tokenizer,
                request["messages"],
                int(request.get("max_new_tokens", 256)),
                float(request.get("temperature", 0.0)),
                float(request.get("top_p", 1.0)),
            ):
                _send({"delta": piece})
            _send({"done": True})
        except StepError as e:
            _send({"error": str(e)})
        except (OSError, ValueError, RuntimeError) as e:  # e.g. a broken model folder
            _send({"error": f"{type(e).__name__}: {e}"})


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    serve()
