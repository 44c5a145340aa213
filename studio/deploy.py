"""Deploy, web-process side: local runtimes started as their own processes (so they outlive a
restart of the studio) and tracked in the store, chats streamed through them, endpoint snippets,
and the lineage a publish run carries into its model card."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from pipelines.lib.onnx_model import is_onnx_folder
from studio import procs, quota, store
from studio.settings import Limits

API_KEY_ENV = "STUDIO_RUNTIME_API_KEY"  # as studio.runtime reads it (not imported: no onnx here)


class DeployError(Exception):
    """Something the user can fix (a busy port, a model that is not ONNX); shown as is."""


def start_server(
    home: Path,
    models: dict[str, str],
    port: int = 0,
    api_key: str = "",
    owner: str | None = None,
    limits: Limits | None = None,
) -> int:
    """Start `slmops serve` for `models` (name -> ONNX folder) in its own session; the row's
    status moves from starting to serving once /health answers (see `refresh`). A hosted
    studio's `owner` serves only their own models, and at most `limits.servers` at once."""
    if not models:
        raise DeployError("Pick at least one ONNX model to serve (quantize one first).")
    if limits is not None and owner is not None:
        live = [s for s in refresh(home, owner) if s["status"] in store.SERVER_LIVE]
        if limits.servers and len(live) >= limits.servers:
            raise DeployError(
                f"You serve {len(live)} model{'s' * (len(live) != 1)} already, and this shared "
                f"studio allows {limits.servers} per user: stop one in Deploy → Serve first."
            )
        with store.connect(home) as db:
            try:
                quota.check_paths(db, Path(home), owner, models)
            except PermissionError as e:
                raise DeployError(str(e)) from e
    for name, path in models.items():
        if not is_onnx_folder(Path(path)):
            raise DeployError(
                f"'{name}' is not an ONNX Runtime GenAI folder: quantize it first (Quantize tab)"
            )
    host = "127.0.0.1"
    port = int(port) if port else free_port(host)
    if not _port_free(host, port):
        raise DeployError(f"Port {port} is in use: pick another one (or leave it empty).")
    logs = Path(home) / "servers"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{port}.log"
    command = ["studio.cli", "serve", "--host", host, "--port", str(port)]
    command += [f"{name}={path}" for name, path in models.items()]
    proc = procs.start(command, log_path=log_path, **{API_KEY_ENV: api_key})
    _children[proc.pid] = proc
    with store.connect(home) as db:
        server_id = store.add_server(
            db, models, host, port, bool(api_key), str(log_path), owner=owner or "", pid=proc.pid
        )
    return server_id


def refresh(home: Path, owner: str | None = None) -> list[dict[str, Any]]:
    """The servers (the owner's only, when given), newest first, with starting/serving/stopped/
    failed brought up to date."""
    with store.connect(home) as db:
        for row in store.servers(db, live_only=True):
            if not _alive(row["pid"]):
                if row["status"] == "starting":
                    tail = procs.log_tail(Path(row["log_path"]), lines=8)
                    store.set_server(db, row["id"], "failed", error=tail or "it exited at start")
                else:
                    store.set_server(db, row["id"], "stopped", error="its process is gone")
            elif row["status"] == "starting" and _healthy(row):
                store.set_server(db, row["id"], "serving")
        return store.servers(db, owner=owner)


def stop_server(home: Path, server_id: int, owner: str | None = None) -> bool:
    """Ask the runtime to stop (SIGTERM to its process group); it exits within a few seconds."""
    with store.connect(home) as db:
        row = store.get_server(db, server_id)
        if row["status"] not in store.SERVER_LIVE or owner not in (None, row["owner"]):
            return False
        if _alive(row["pid"]):
            procs.signal_group(row["pid"], signal.SIGTERM)
        return store.set_server(db, server_id, "stopped")


def wait_serving(home: Path, server_id: int, timeout: float = 60.0) -> dict[str, Any]:
    """Block until the server answers (or fails); for the CLI, tests and the playground."""
    deadline = time.monotonic() + timeout
    while True:
        row = next(r for r in refresh(home) if r["id"] == server_id)
        if row["status"] != "starting" or time.monotonic() > deadline:
            return row
        time.sleep(0.2)


def ever_served(home: Path, path: str) -> bool:
    """Was the folder at `path` served here before (by any server, running or not)?"""
    target = str(Path(path).resolve())
    with store.connect(home) as db:
        return any(
            str(Path(p).resolve()) == target
            for row in store.servers(db)
            for p in row["models"].values()
        )


def url(row: dict[str, Any]) -> str:
    return f"http://{row['host']}:{row['port']}/v1"


def serving(home: Path, path: str) -> tuple[dict[str, Any], str] | None:
    """A live server that serves the folder `path`, and the model's name there."""
    target = str(Path(path).resolve())
    for row in refresh(home):
        if row["status"] in store.SERVER_LIVE:
            for name, served in row["models"].items():
                if str(Path(served).resolve()) == target:
                    return row, name
    return None


def stream_chat(
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    api_key: str = "",
) -> Iterator[str]:
    """Stream a reply from an OpenAI-compatible endpoint, piece by piece."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.stream(
            "POST", f"{base_url}/chat/completions", json=body, headers=headers, timeout=120
        ) as response:
            if response.status_code >= 400:
                response.read()
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:200]
                hint = " Type the server's API key." if response.status_code == 401 else ""
                raise DeployError(f"the runtime answered {response.status_code}: {message}.{hint}")
            for line in response.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise DeployError(chunk["error"].get("message", "generation failed"))
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
    except httpx.TransportError as e:
        raise DeployError(f"Can't reach the runtime at {base_url}: {e}") from None


def snippets(base_url: str, model: str, key_required: bool) -> str:
    """Markdown with copyable openai-client and curl calls for a served model."""
    key = "YOUR_KEY" if key_required else "unused"
    auth = f' \\\n  -H "Authorization: Bearer {key}"' if key_required else ""
    return (
        f"**Endpoint:** `{base_url}` · model `{model}`"
        + (" · API key required" if key_required else "")
        + "\n\n```python\nfrom openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{base_url}", api_key="{key}")\n'
        "stream = client.chat.completions.create(\n"
        f'    model="{model}",\n'
        '    messages=[{"role": "user", "content": "Hello!"}],\n'
        "    stream=True,\n)\n"
        "for chunk in stream:\n"
        '    print(chunk.choices[0].delta.content or "", end="")\n```\n\n'
        f"```bash\ncurl {base_url}/chat/completions{auth} \\\n"
        '  -H "Content-Type: application/json" \\\n'
        f'  -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
        "```"
    )


def lineage_of(home: Path, path: str) -> dict[str, Any]:
    """How the artifact at `path` was made (for its model card); {} if the studio didn't make it."""
    home = Path(home).resolve()
    target = Path(path).resolve()
    with store.connect(home) as db:
        for a in store.artifacts(db):
            if (home / a["path"]).resolve() == target:
                return store.ancestry(db, a["id"])
    return {}


def free_port(host: str = "127.0.0.1", start: int = 8000) -> int:
    for port in range(start, start + 100):
        if _port_free(host, port):
            return port
    raise DeployError(f"No free port between {start} and {start + 99}.")


_children: dict[int, subprocess.Popen] = {}  # servers this process started (reaped on poll)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _alive(pid: int | None) -> bool:
    """A runtime this process started is reaped here (else it stays a zombie); others by pid."""
    child = _children.get(pid or 0)
    if child is not None:
        return child.poll() is None
    return procs.alive(pid, "serve")


def _healthy(row: dict[str, Any]) -> bool:
    try:
        return httpx.get(f"http://{row['host']}:{row['port']}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False
