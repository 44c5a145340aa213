"""Client of the chat process (`python -m pipelines.lib.chat`): the web process loads no model."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from studio import procs


class ChatError(Exception):
    """The chat process could not answer (unknown model, broken folder); shown to the user."""


class ChatClient:
    """Starts the chat process on first use and streams replies from it, one request at a time."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def stream(
        self,
        model: str,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Iterator[str]:
        """Yield pieces of the reply of `model` to `messages`."""
        request = {
            "model": model,
            "messages": messages,
            "max_new_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p),
        }
        with self._lock:
            proc = self._process()
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            finished = False
            try:
                for line in proc.stdout:
                    answer = json.loads(line)
                    if "delta" in answer:
                        yield answer["delta"]
                    elif "error" in answer:
                        finished = True
                        raise ChatError(answer["error"])
                    else:
                        finished = True
                        return
                raise ChatError("the chat process stopped; see chat.log in the studio folder")
            finally:
                if not finished and proc.poll() is None:  # the reader left early: drain the reply
                    for line in proc.stdout:
                        if "delta" not in json.loads(line):
                            break

    def close(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)

    def _process(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = procs.start(
                ["pipelines.lib.chat"],
                log_path=self.home / "chat.log",
                detached=False,  # it lives and dies with the web process
                pipes=True,
                STUDIO_HOME=str(self.home.resolve()),
            )
        return self._proc
