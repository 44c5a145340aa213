"""The local runtime: ONNX Runtime GenAI models behind an OpenAI-compatible HTTP API
(GET /v1/models, POST /v1/chat/completions with streaming, GET /health). Concurrent chats take
turns token by token, so a new request waits for the prompts ahead of it, not for the other
answers to finish; finished chats stay cached, so a prompt that shares their start (the next turn,
the same system prompt) computes only the rest. No torch. Run as: slmops serve MODEL_DIR ..."""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pipelines.lib.onnx_model import GENAI_CONFIG, eos_ids, is_onnx_folder, load_model
from studio import store
from studio.settings import Settings

API_KEY_ENV = "STUDIO_RUNTIME_API_KEY"  # the key, so that it never shows in `ps`
# A chat's key/value cache is allocated for its whole length at once (322 MB for SmolLM2's 8192
# tokens, 33 MB for 1024), so a request without max_tokens gets this many, not the full context.
DEFAULT_MAX_TOKENS = 1024
MIN_SHARED_TOKENS = 8  # a shorter shared prefix is not worth a pooled cache
POOL_SIZE = 4  # finished chats kept for their prompt prefix (the next turn, a shared system prompt)
PROMPTS_PER_ROUND = 4  # new chats started between two rounds of tokens
GREEDY = ("greedy",)
WARM_LENGTH = 1280  # the pool starts with this many greedy caches of the template's opening
ROLES = ("system", "user", "assistant")


MAX_CHATS = 16  # per model, queued or answering; the next one gets 429
MAX_BODY_BYTES = 1 << 20  # a chat request fills a context of a few thousand tokens: 1 MiB is ample


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes MAX_BODY_BYTES, before any more is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


class RequestError(Exception):
    """A bad request: answered with an OpenAI-style error body and a 4xx status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = ""):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "invalid_request_error"}.get(
            self.status, "invalid_request_error"
        )
        return {
            "error": {
                "message": str(self),
                "type": kind,
                "param": self.param,
                "code": self.code or None,
            }
        }


@dataclass
class Chat:
    """One validated /v1/chat/completions request."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def parse(cls, body: Any, models: dict[str, ServedModel]) -> Chat:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(400, "'model' is required: one of " + ", ".join(models), "model")
        if model not in models:
            raise RequestError(
                404,
                f"the model '{model}' is not served here; available: {', '.join(models)}",
                "model",
                "model_not_found",
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise RequestError(
                    400, f"messages[{i}] needs a role among {', '.join(ROLES)}", "messages"
                )
            content = message.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise RequestError(400, f"messages[{i}]: only text content", "messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}].content must be a string", "messages")
            try:
                content.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (\ud800) no tokenizer can read
                raise RequestError(
                    400, f"messages[{i}].content is not valid Unicode text", "messages"
                ) from None
            clean.append({"role": message["role"], "content": content})
        chat = cls(model=model, messages=clean, stream=_bool(body, "stream"))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise RequestError(400, "'max_tokens' must be a positive integer", "max_tokens")
            chat.max_tokens = limit
        chat.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        chat.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if chat.top_p == 0:
            raise RequestError(400, "'top_p' must be greater than 0", "top_p")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
        ):
            raise RequestError(400, "'stop' must be a string or a list of strings", "stop")
        chat.stop = (stop or [])[:4]
        seed = body.get("seed")
        if seed is not None and (
            not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63
        ):
            raise RequestError(400, "'seed' must be an integer from 0 to 2**63 - 1", "seed")
        chat.seed = seed
        options = body.get("stream_options") or {}
        chat.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        if body.get("n", 1) != 1:
            raise RequestError(400, "only n=1 is supported", "n")
        return chat


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(400, f"'{key}' must be true or false", key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be a number from {low:g} to {high:g}", key)
    return float(value)


class ServedModel:
    """One ONNX Runtime GenAI folder and the thread that generates for it: requests are handed to
    that thread, which starts each (its prompt in one pass), then gives every live chat one
    token per round and passes the text back."""

    def __init__(self, name: str, path: str | Path):
        import onnxruntime_genai as og

        self.name, self.path = name, str(path)
        self.created = int(time.time())
        self.model = load_model(self.path)
        self.tokenizer = og.Tokenizer(self.model)
        self.error = ""
        self.reused = {"chats": 0, "tokens": 0}  # prompts started from a pooled prefix
        genai = json.loads((Path(path) / GENAI_CONFIG).read_text())["model"]
        self.context_length = int(genai.get("context_length") or 2048)
        self.eos = set(eos_ids(path))
        self._inbox: queue.Queue = queue.Queue()
        self.chats, self._count_lock = 0, threading.Lock()  # chats queued or answering
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._pump, name=f"model-{name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error:
            raise RuntimeError(f"{name}: {self.error}")

    def prompt_ids(self, messages: list[dict[str, str]]) -> Any:
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def submit(self, chat: Chat, sink: Callable[[tuple], None]) -> Callable[[], None]:
        """Start a chat; `sink` gets ("token", text), then ("done", finish, usage) or
        ("error", message). Returns a function that cancels the chat."""
        ids = self.prompt_ids(chat.messages)
        room = self.context_length - len(ids)
        if room < 1:
            raise RequestError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is "
                f"{self.context_length}: shorten the messages",
                "messages",
                "context_length_exceeded",
            )
        if self.error:
            raise RuntimeError(f"the model {self.name} stopped: {self.error}")
        with self._count_lock:  # each chat holds a cache up to its length: a bounded number
            if self.chats >= MAX_CHATS:
                raise RequestError(
                    429,
                    f"the model {self.name} is answering {self.chats} chats, its limit: "
                    "retry in a few seconds",
                    code="rate_limit_exceeded",
                )
            self.chats += 1
        ticket = {"cancel": False}
        limit = min(chat.max_tokens or DEFAULT_MAX_TOKENS, room)
        self._inbox.put((ids, chat, limit, self._counted(sink), ticket))
        return lambda: ticket.update(cancel=True)

    def _counted(self, sink: Callable[[tuple], None]) -> Callable[[tuple], None]:
        """The sink, and the chat stops counting once it is done or failed."""

        def counted(event: tuple) -> None:
            if event[0] in ("done", "error"):
                with self._count_lock:
                    self.chats -= 1
            sink(event)

        return counted

    def alive(self) -> bool:
        """Its generation thread runs and nothing broke it."""
        return self._thread.is_alive() and not self.error

    def close(self) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(10)

    def _pump(self) -> None:
        live: list[dict[str, Any]] = []
        self._pool: list[dict[str, Any]] = []
        try:
            self._warm()
            self._ready.set()
            self._steps(live)
        except Exception as e:  # the runtime broke: fail what waits, refuse what comes
            self.error = f"{type(e).__name__}: {e}"
            for entry in live:
                entry["sink"](("error", self.error))
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item is not None:
                    item[3](("error", self.error))

    def _steps(self, live: list[dict[str, Any]]) -> None:
        """Interleave the live chats one token each, starting up to PROMPTS_PER_ROUND new chats
        (their prompts) between rounds: a new request waits for the prompts ahead of it, never
        for the other answers to end."""
        waiting: list[tuple] = []
        while not self._stopped.is_set():
            if not live and not waiting:
                waiting.append(self._inbox.get())  # idle: wait for work
            while True:
                try:
                    waiting.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            waiting = [item for item in waiting if item is not None]
            # new prompts first (a few per round, so that live chats pause briefly at most)
            for item in waiting[:PROMPTS_PER_ROUND]:
                try:
                    live.append(self._start(*item))
                except Exception as e:  # a request the runtime refuses
                    item[3](("error", f"the request could not start: {e}"))
            del waiting[:PROMPTS_PER_ROUND]
            for entry in list(live):
                finish = self._step(entry)
                if finish is None:
                    continue
                live.remove(entry)
                self._keep(entry)
                entry["generator"] = None
                usage = {
                    "prompt_tokens": entry["prompt_tokens"],
                    "completion_tokens": entry["tokens"],
                    "total_tokens": entry["prompt_tokens"] + entry["tokens"],
                }
                entry["sink"](("done", finish, usage))

    def _step(self, entry: dict[str, Any]) -> str | None:
        """One token for one chat; its finish reason when it ended, else None."""
        if entry["ticket"]["cancel"]:
            return "cancel"
        generator = entry["generator"]
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        entry["tokens"] += 1
        if token not in self.eos:
            entry["text"] += entry["stream"].decode(token)
        cut = _stop_at(entry["text"], entry["stops"])
        ended = (
            cut is not None
            or token in self.eos
            or entry["tokens"] >= entry["limit"]  # a reused cache may be longer than needed
            or generator.is_done()
        )
        # text that may be the start of a stop string waits until it is known not to be
        upto = cut if cut is not None else len(entry["text"]) - (0 if ended else entry["hold"])
        if upto > entry["sent"]:
            entry["sink"](("token", entry["text"][entry["sent"] : upto]))
            entry["sent"] = upto
        if not ended:
            return None
        if cut is None and token not in self.eos and entry["tokens"] >= entry["limit"]:
            return "length"
        return "stop"

    def _start(self, ids, chat: Chat, limit: int, sink, ticket) -> dict[str, Any]:
        import onnxruntime_genai as og

        # rounded up, so that the cache fits the next turn or a similar prompt when pooled
        length = min(self.context_length, -(-(len(ids) + limit) // 256) * 256)
        options: dict[str, Any] = {"max_length": length, "do_sample": False}
        key: tuple | None = GREEDY  # which pooled caches fit: the same sampling settings
        if chat.temperature > 0:
            options.update(do_sample=True, temperature=chat.temperature, top_p=chat.top_p)
            key = ("sample", chat.temperature, chat.top_p)
            if chat.seed is not None:  # starts afresh, so that the seed alone decides
                options["random_seed"], key = chat.seed, None
        reused = self._reuse(ids, key, options["max_length"])
        if reused is None:
            params = og.GeneratorParams(self.model)
            params.set_search_options(**options)
            generator, done = og.Generator(self.model, params), 0
        else:
            generator, done, _ = reused
        generator.append_tokens(ids[done:])  # the prompt, or what the reused prefix lacks
        return {
            "generator": generator,
            "key": key,
            "max_length": options["max_length"] if reused is None else reused[2],
            "sink": sink,
            "ticket": ticket,
            "stream": self.tokenizer.create_stream(),
            "text": "",
            "sent": 0,
            "stops": chat.stop,
            "hold": max((len(s) - 1 for s in chat.stop), default=0),  # a stop may be half out
            "tokens": 0,
            "limit": limit,
            "prompt_tokens": len(ids),
            "ids": ids,
        }

    def _reuse(self, ids: Any, key: Any, max_length: int) -> tuple[Any, int, int] | None:
        """A finished chat with the same sampling whose tokens share the longest prefix with
        `ids`, rewound to that prefix: only the rest of the prompt is computed again."""
        best, shared = None, 0
        for entry in self._pool:
            if key is None or entry["key"] != key or entry["max_length"] < max_length:
                continue
            tokens = entry["tokens"]
            n = min(len(tokens), len(ids) - 1)  # at least one prompt token is fed again
            same = int(np.argmin(np.append(tokens[:n] == ids[:n], False)))
            if same > shared:
                best, shared = entry, same
        if best is None or shared < MIN_SHARED_TOKENS:
            return None
        self._pool.remove(best)
        best["generator"].rewind_to(shared)
        self.reused["chats"] += 1
        self.reused["tokens"] += shared
        return best["generator"], shared, best["max_length"]

    def _warm(self) -> None:
        """Fill the pool with greedy caches of the chat template's opening (its default system
        prompt, the user turn's start), so that the first concurrent chats skip that part."""
        import onnxruntime_genai as og

        ids = self.prompt_ids([{"role": "user", "content": ""}])
        length = min(self.context_length, WARM_LENGTH)
        for _ in range(POOL_SIZE):
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=length, do_sample=False)
            generator = og.Generator(self.model, params)
            generator.append_tokens(ids)
            self._pool.append(
                {"generator": generator, "tokens": ids, "key": GREEDY, "max_length": length}
            )

    def _keep(self, entry: dict[str, Any]) -> None:
        """Pool a finished chat's generator (its cache holds prompt and answer)."""
        if entry["key"] is None or entry["ticket"]["cancel"]:
            return
        tokens = np.asarray(entry["generator"].get_sequence(0), dtype=np.int32)
        self._pool.append(
            {
                "generator": entry["generator"],
                "tokens": tokens,
                "key": entry["key"],
                "max_length": entry["max_length"],
            }
        )
        del self._pool[:-POOL_SIZE]  # the oldest go first


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in the text, if one is there."""
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def build_app(models: dict[str, ServedModel], api_key: str = "") -> Any:
    """The FastAPI app serving `models` (name -> ServedModel), with an optional API key."""
    app = FastAPI(title="SLMOps Studio runtime", docs_url=None, redoc_url=None)

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise RequestError(401, "invalid or missing API key (Authorization: Bearer ...)")

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError) -> JSONResponse:
        return error(e)

    @app.exception_handler(404)
    async def on_not_found(request: Request, e: Exception) -> JSONResponse:
        return error(RequestError(404, f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def on_bad_method(request: Request, e: Exception) -> JSONResponse:
        return error(RequestError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.get("/health")
    async def health() -> Any:
        broken = {
            name: m.error or "its thread stopped" for name, m in models.items() if not m.alive()
        }
        body = {
            "status": "failing" if broken else "ok",
            "models": list(models),
            "memory": memory_mb(),
            "prefix_cache": {name: m.reused for name, m in models.items()},
            "chats": {name: m.chats for name, m in models.items()},
        }
        if broken:
            return JSONResponse({**body, "errors": broken}, status_code=503)
        return body

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": m.created, "owned_by": "slmops"}
                for name, m in models.items()
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        try:
            body = json.loads(await _read_body(request) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise RequestError(400, "the request body nests too deeply") from None
        chat = Chat.parse(body, models)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = models[chat.model].submit(
            chat, lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        )
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if chat.stream:
            return StreamingResponse(
                _sse(chat, events, cancel, reply_id, created), media_type="text/event-stream"
            )
        text, finish, usage = [], "stop", {}
        try:
            while True:
                event = await events.get()
                if event[0] == "token":
                    text.append(event[1])
                elif event[0] == "done":
                    finish, usage = event[1], event[2]
                    break
                else:
                    return JSONResponse(
                        {"error": {"message": event[1], "type": "server_error"}}, status_code=500
                    )
        except asyncio.CancelledError:
            cancel()
            raise
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(text)},
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }

    return app


async def _sse(
    chat: Chat, events: asyncio.Queue, cancel, reply_id: str, created: int
) -> AsyncIterator[str]:
    """Server-sent chat.completion.chunk events, as the OpenAI API streams them."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event[0] == "token":
                yield chunk({"content": event[1]})
            elif event[0] == "done":
                finished = True
                yield chunk({}, event[1])
                if chat.include_usage:
                    body = {
                        "id": reply_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": chat.model,
                        "choices": [],
                        "usage": event[2],
                    }
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:
                finished = True
                yield f"data: {json.dumps({'error': {'message': event[1]}})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away: stop generating for it
            cancel()


def memory_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak (VmHWM starts afresh at exec)."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError):
        return {}
    return {"rss_mb": fields.get("VmRSS"), "peak_rss_mb": fields.get("VmHWM")}


def model_names(paths: list[str]) -> dict[str, str]:
    """NAME=DIR or DIR (named after the folder, or its run for runs/<id>/out/onnx)."""
    named = {}
    for item in paths:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        folder = Path(path).expanduser().resolve()
        if not is_onnx_folder(folder):
            raise ValueError(
                f"{path} is not an ONNX Runtime GenAI folder (no genai_config.json): quantize "
                "the model first (Quantize tab or slmops quantize)"
            )
        if not name:  # a run's output is named after the run
            name = store.run_of_path(Settings.from_env().home, folder) or folder.name
        if name in named:
            raise ValueError(f"two models are named '{name}': use NAME=DIR")
        named[name] = str(folder)
    return named


def serve(paths: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str = "") -> None:
    """Load the models and serve them until interrupted."""
    import uvicorn

    models = {name: ServedModel(name, path) for name, path in model_names(paths).items()}
    print(
        f"serving {', '.join(models)} at http://{host}:{port}/v1"
        + (" (API key required)" if api_key else ""),
        flush=True,
    )
    try:
        uvicorn.run(
            build_app(models, api_key),
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=5,  # SIGTERM ends it even with a client still connected
        )
    finally:
        for model in models.values():
            model.close()
