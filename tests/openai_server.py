"""A scripted OpenAI-compatible chat endpoint for tests and benchmarks: answers from a function,
after a fixed delay, with injected faults (429, 500, timeouts, malformed bodies) per prompt."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    """Use as a context manager; `url` is the base URL (…/v1)."""

    def __init__(
        self,
        answer: Callable[[list[dict[str, str]]], str] = lambda messages: "OK",
        delay_s: float = 0.0,
        faults: Callable[[str, int], str | None] = lambda prompt, attempt: None,
        key: str = "",
    ):
        self.answer, self.delay_s, self.faults, self.key = answer, delay_s, faults, key
        self.calls: Counter[str] = Counter()  # user prompt -> requests received
        self.answered: Counter[str] = Counter()  # user prompt -> 200s sent
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> FakeOpenAI:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                prompt = body["messages"][-1]["content"]
                with fake._lock:
                    attempt = fake.calls[prompt]
                    fake.calls[prompt] += 1
                fault = fake.faults(prompt, attempt)
                if fault == "timeout":  # the client gives up first (not counted as in flight)
                    time.sleep(3)
                    return self._send(504, {"error": "too late"})
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    if fault == "429":
                        return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
                    if fault == "500":
                        return self._send(500, {"error": "boom"})
                    if fault == "malformed":
                        return self._send(200, "this is not json")
                    time.sleep(fake.delay_s)
                    text = fake.answer(body["messages"])
                    with fake._lock:
                        fake.answered[prompt] += 1
                    words = len(text.split())
                    self._send(
                        200,
                        {
                            "choices": [{"message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": 10, "completion_tokens": words},
                        },
                    )
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _send(self, status, payload, headers=None):
                data = payload if isinstance(payload, str) else json.dumps(payload)
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data.encode())))
                    self.end_headers()
                    self.wfile.write(data.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        return Handler
