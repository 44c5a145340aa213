"""A TEST DOUBLE of the Hugging Face Hub: a local HTTP server answering the few endpoints that
`huggingface_hub` calls to check a token, create a repo and commit files (whoami-v2, repos/create,
validate-yaml, preupload, commit). It keeps what it received so tests can check it. It is not the
Hub: it accepts any YAML and keeps every file in memory."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """Use as a context manager; `url` goes into HF_ENDPOINT."""

    def __init__(self, token: str, user: str = "tester"):
        self.token, self.user = token, user
        self.repos: dict[str, dict] = {}  # repo id -> {"type", "private"}
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content
        self.commits: list[dict] = []
        self.requests: list[str] = []  # "METHOD path" of every request, in order
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if given == hub.token:
                    return True
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append(f"GET {self.path}")
                if self.path.startswith("/api/whoami-v2"):
                    if self._authorized():
                        self._send(200, {"type": "user", "name": hub.user, "auth": {}})
                    return
                self._send(404, {"error": f"not in the test double: GET {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                hub.requests.append(f"POST {self.path}")
                body = self._body()
                if not self._authorized():
                    return
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    repo_id = f"{data.get('organization') or hub.user}/{data['name']}"
                    hub.repos[repo_id] = {
                        "type": data.get("type") or "model",
                        "private": data.get("visibility", "public") == "private"
                        or bool(data.get("private")),
                    }
                    hub.files.setdefault(repo_id, {})
                    self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                    return
                if self.path == "/api/validate-yaml":
                    self._send(200, {"errors": [], "warnings": []})
                    return
                match = re.match(r"^/api/(models|datasets)/(.+?)/(preupload|commit)/", self.path)
                if match and match.group(3) == "preupload":
                    files = json.loads(body)["files"]
                    self._send(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        },
                    )
                    return
                if match:
                    repo_id = match.group(2)
                    if repo_id not in hub.repos:
                        self._send(404, {"error": f"Repository {repo_id} not found"})
                        return
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    added = {
                        x["value"]["path"]: base64.b64decode(x["value"]["content"])
                        for x in lines
                        if x["key"] == "file"
                    }
                    hub.files[repo_id].update(added)
                    hub.commits.append(
                        {"repo_id": repo_id, "summary": header.get("summary"), "files": added}
                    )
                    oid = f"{len(hub.commits):040x}"
                    self._send(
                        200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid}
                    )
                    return
                self._send(404, {"error": f"not in the test double: POST {self.path}"})

        return Handler
