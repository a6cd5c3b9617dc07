"""A fake Hugging Face Hub for tests: just enough of the HTTP API for `create_repo` + `upload_folder`.

Endpoints, as huggingface_hub 2.x calls them without hf_xet (set HF_HUB_DISABLE_XET=1, or patch
`huggingface_hub.constants.HF_HUB_DISABLE_XET`; the xet path needs a CAS server this does not fake):

    POST /api/repos/create                                  create_repo (409 if it exists)
    GET  /api/models/{ns}/{name}[/revision/{rev}]           model_info
    POST /api/models/{ns}/{name}/branch/{branch}            create_branch (409 if it exists)
    POST /api/validate-yaml                                 README.md metadata check (always fine)
    POST /api/models/{ns}/{name}/preupload/{rev}            upload mode: lfs for *.safetensors, else regular
    POST /{ns}/{name}.git/info/lfs/objects/batch            LFS batch: a basic-transfer upload href per object
    PUT  /lfs-upload/{oid}                                  that href (no auth, like a presigned S3 URL)
    POST /api/models/{ns}/{name}/commit/{rev}               ndjson commit: header, file (base64), lfsFile

Every request is recorded (method, path, lower-cased headers, body) in `FakeHub.requests`; committed
files are in `FakeHub.repos[repo_id].branches[rev]`, as bytes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)  # the ndjson header value of each commit


class FakeHub:
    """Threaded HTTP server on 127.0.0.1, random port. `token`: the only Bearer token accepted."""

    def __init__(self, token: str):
        self.token = token
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        for conn in self._connections:  # end kept-alive connections too: the hub is gone for every client
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # --- the API; each returns (status, JSON-able body) ---

    def route(self, req: Request) -> tuple[int, object]:
        path = unquote(urlsplit(req.path).path)
        if req.method == "PUT" and (m := re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)):
            if hashlib.sha256(req.body).hexdigest() != m["oid"]:
                return 400, {"error": "sha256 mismatch"}
            self.lfs_objects[m["oid"]] = req.body
            return 200, {}
        if req.method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if req.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if req.method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(req.body))
        if req.method == "GET" and (
            m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>.+))?", path)
        ):
            repo = self.repos.get(m["repo"])
            if repo is None:
                return 404, {"error": "Repository not found"}
            return 200, {"id": m["repo"], "private": repo.private, "sha": "0" * 40}
        if req.method == "POST" and (
            m := re.fullmatch(rf"/api/models/{_REPO}/(?P<op>branch|preupload|commit)/(?P<rev>.+)", path)
        ):
            repo = self.repos.get(m["repo"])
            if repo is None:
                return 404, {"error": "Repository not found"}
            if m["op"] == "branch":
                if m["rev"] in repo.branches:
                    return 409, {"error": "Reference already exists"}
                repo.branches[m["rev"]] = dict(repo.branches["main"])
                return 200, {}
            if m["rev"] not in repo.branches:
                return 404, {"error": f"Invalid rev id: {m['rev']}"}
            if m["op"] == "preupload":
                files = json.loads(req.body)["files"]
                return 200, {
                    "files": [
                        {
                            "path": f["path"],
                            "shouldIgnore": False,
                            "oid": None,
                            "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                        }
                        for f in files
                    ]
                }
            return self._commit(m["repo"], repo, m["rev"], req.body)
        if req.method == "POST" and (m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)):
            if m["repo"] not in self.repos:
                return 404, {"error": "Repository not found"}
            objects = json.loads(req.body)["objects"]
            return 200, {
                "transfer": "basic",
                "objects": [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "authenticated": True,
                        "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}},
                    }
                    for o in objects
                ],
            }
        return 404, {"error": f"fake hub: no route for {req.method} {path}"}

    def _create(self, payload: dict) -> tuple[int, object]:
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id}

    def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes) -> tuple[int, object]:
        files = repo.branches[rev]
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                repo.commits.append(value)
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    return 422, {"error": f"LFS object {value['oid']} was not uploaded"}
                files[value["path"]] = data
            else:
                return 400, {"error": f"fake hub: unsupported commit key {item['key']}"}
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with hub._lock:
                hub._connections.append(self.connection)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            req = Request(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self._read_body()
            )
            with hub._lock:
                hub.requests.append(req)
                status, payload = hub.route(req)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if req.method == "PUT":
                self.send_header("ETag", '"fake"')
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _handle

        def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
            pass

    return Handler
