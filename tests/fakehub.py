"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for testing `wiola push` up to the network.

It answers the endpoints that huggingface_hub's `create_repo`, `create_branch` and `create_commit` call
(huggingface_hub 2.x: `POST /api/repos/create`, `/api/validate-yaml`, `/api/models/{id}/branch/{b}`,
`/api/models/{id}/preupload/{rev}` and `/api/models/{id}/commit/{rev}`, an ndjson body whose small files
come inline as base64) and records every request. `preupload` answers "regular" for every file, so no LFS
or Xet transfer happens: keep test files small. `fail_with = 401` makes every request fail with that status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)

    def ndjson(self) -> list[dict]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclass
class FakeHub:
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict] = field(default_factory=dict)  # repo id -> {"private", "branches", "files": {rev: {path: bytes}}}
    fail_with: int | None = None
    url: str = ""

    def commits(self) -> list[Request]:
        return [r for r in self.requests if "/commit/" in r.path]

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def _handle(self, method: str) -> None:
                parsed = urlparse(self.path)
                request = Request(method, unquote(parsed.path), parse_qs(parsed.query), dict(self.headers), self._body())
                hub.requests.append(request)
                if hub.fail_with:
                    self._send(hub.fail_with, {"error": "Invalid credentials in Authorization header"})
                    return
                status, payload = hub.answer(request)
                self._send(status, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, r: Request) -> tuple[int, dict]:
        parts = r.path.strip("/").split("/")
        if r.method == "POST" and r.path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if r.method == "POST" and r.path == "/api/repos/create":
            payload = r.json()
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = {"private": payload.get("visibility") == "private" or payload.get("private") is True, "branches": {"main"}, "files": {}}
            return 200, {"url": f"{self.url}/{repo_id}"}
        if r.method == "POST" and len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo_id, action, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}
            if action == "branch":
                if rev in repo["branches"]:
                    return 409, {"error": "Branch already exists"}
                repo["branches"].add(rev)
                return 200, {}
            if rev not in repo["branches"]:
                return 404, {"error": f"Invalid rev id: {rev}"}
            if action == "preupload":
                files = r.json()["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                       for f in files]}
            if action == "commit":
                stored = repo["files"].setdefault(rev, {})
                for line in r.ndjson():
                    if line["key"] == "file":
                        assert line["value"]["encoding"] == "base64"
                        stored[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    elif line["key"] != "header":
                        return 400, {"error": f"this stand-in takes inline files only, got {line['key']}"}
                oid = hashlib.sha1(r.body).hexdigest()
                return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        return 404, {"error": f"not handled by the stand-in: {r.method} {r.path}"}
