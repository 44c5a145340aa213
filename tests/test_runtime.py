"""The local runtime through `slmops serve` on a tiny int4 model, driven by the official `openai`
client: models, completions, streaming, concurrent clients, an API key, and 4xx for bad input."""

import os
import queue
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from studio import runtime

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-runtime-test"
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tiny_onnx):
    """`slmops serve` on the tiny model in int4, with an API key from the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, runtime.API_KEY_ENV: KEY}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "serve",
            f"tiny={tiny_onnx}",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("slmops serve did not start: " + proc.stdout.read())
    yield url
    proc.terminate()
    proc.wait(10)


def client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_openai_client_lists_completes_and_streams(server):
    api = client(server)
    assert [m.id for m in api.models.list()] == ["tiny"]
    reply = api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    pieces, finish = [], None
    for chunk in api.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0, stream=True
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == choice.message.content  # greedy: the same answer either way
    assert finish == choice.finish_reason


def test_concurrent_clients_all_get_answers(server):
    api = client(server)

    def ask(i):
        return api.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"hello {i}"}],
            max_tokens=12,
            temperature=0.7,
            seed=i,
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert all(r.usage.completion_tokens >= 1 for r in replies)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": HELLO}, 400, "model"),
        ({"model": "nope", "messages": HELLO}, 404, "model"),
        ({"model": "tiny"}, 400, "messages"),
        ({"model": "tiny", "messages": "hi"}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "messages"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": "8"}, 400, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "temperature": 5}, 400, "temperature"),
        ({"model": "tiny", "messages": HELLO, "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "messages": HELLO, "stop": [3]}, 400, "stop"),
        ({"model": "tiny", "messages": HELLO, "stream": "yes"}, 400, "stream"),
        ({"model": "tiny", "messages": HELLO, "n": 2}, 400, "n"),
        ({"model": "tiny", "messages": HELLO, "seed": 2**70}, 400, "seed"),
        ({"model": "tiny", "messages": HELLO, "seed": -1}, 400, "seed"),
        ([1, 2], 400, None),
    ],
)
def test_bad_requests_get_a_4xx_with_an_openai_error_body(server, body, status, param):
    reply = httpx.post(
        f"{server}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["param"] == param


def test_broken_json_a_wrong_key_and_unknown_routes(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    broken = httpx.post(
        f"{server}/v1/chat/completions", content=b"{not json", headers=auth, timeout=10
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    surrogate = httpx.post(  # JSON text may escape a lone surrogate; no tokenizer reads one
        f"{server}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        headers=auth,
        timeout=10,
    )
    assert surrogate.status_code == 400 and "not valid Unicode" in surrogate.text
    huge = httpx.post(
        f"{server}/v1/chat/completions", content=b" " * (2 << 20), headers=auth, timeout=10
    )
    assert huge.status_code == 413 and "over 1 MiB" in huge.json()["error"]["message"]
    nested = httpx.post(
        f"{server}/v1/chat/completions", content=b"[" * 100_000, headers=auth, timeout=10
    )
    assert nested.status_code == 400 and "nests too deeply" in nested.json()["error"]["message"]
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        client(server, key="sk-wrong").models.list()
    assert httpx.get(f"{server}/v1/nothing", headers=auth, timeout=10).status_code == 404
    assert httpx.get(f"{server}/v1/chat/completions", headers=auth, timeout=10).status_code == 405
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["models"] == ["tiny"]
    assert 0 < health["memory"]["rss_mb"] <= health["memory"]["peak_rss_mb"] < 4096


def test_only_onnx_folders_are_served(tmp_path, bpe_lm):
    with pytest.raises(ValueError, match="not an ONNX Runtime GenAI folder"):
        runtime.model_names([str(bpe_lm)])
    run = subprocess.run(
        [sys.executable, "-m", "studio.cli", "serve", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "quantize the model first" in run.stderr


def test_stop_strings_cut_the_answer_where_the_source_would(server):
    api = client(server)
    full = api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 3, text
    stop = text[1:3]
    cut = api.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_pooled_prefix_answers_exactly_like_a_fresh_start(tiny_onnx):
    """The second chat reuses the first one's cache for their shared system prompt; its
    greedy answer is the one a fresh model gives."""
    system = {"role": "system", "content": "the a is good bad system user assistant " * 3}

    def ask(model, text):
        events = queue.Queue()
        chat = runtime.Chat(
            model="t",
            messages=[system, {"role": "user", "content": text}],
            max_tokens=12,
            temperature=0,
        )
        model.submit(chat, events.put)
        pieces = []
        while (event := events.get(timeout=60))[0] == "token":
            pieces.append(event[1])
        assert event[0] == "done"
        return "".join(pieces)

    pooled = runtime.ServedModel("t", tiny_onnx)
    fresh = runtime.ServedModel("t", tiny_onnx)
    try:
        ask(pooled, "hello world")
        assert pooled.reused == {"chats": 0, "tokens": 0}
        second = ask(pooled, "good bad")
        assert pooled.reused["chats"] == 1 and pooled.reused["tokens"] >= 8
        assert second == ask(fresh, "good bad")
    finally:
        pooled.close()
        fresh.close()


def test_chats_are_capped_per_model_and_health_says_when_a_model_broke(tiny_onnx, monkeypatch):
    """Each chat holds a cache up to its length, so a model takes at most MAX_CHATS at once
    (the next gets 429); /health answers 503 once a model's generation thread is gone."""
    from fastapi.testclient import TestClient

    monkeypatch.setattr(runtime, "MAX_CHATS", 1)
    model = runtime.ServedModel("t", tiny_onnx)
    try:
        events = queue.Queue()
        chat = runtime.Chat(model="t", messages=HELLO, max_tokens=8, temperature=0)
        model.submit(chat, events.put)
        with pytest.raises(runtime.RequestError, match="answering 1 chats") as refused:
            model.submit(chat, lambda event: None)
        assert refused.value.status == 429
        while events.get(timeout=60)[0] == "token":
            pass
        assert model.chats == 0  # a finished chat makes room
        client = TestClient(runtime.build_app({"t": model}))
        assert client.get("/health").json()["status"] == "ok"
    finally:
        model.close()
    broken = client.get("/health")
    assert broken.status_code == 503 and broken.json()["errors"] == {"t": "its thread stopped"}
