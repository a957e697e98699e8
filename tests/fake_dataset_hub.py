"""A local HTTP server that answers the Hugging Face hub's dataset endpoints for a few tiny repos.

Point HF_ENDPOINT at `FakeDatasetHub.url` and `datasets` / `huggingface_hub` talk to it as to the hub:
    GET  /api/datasets/{repo}[/revision/{rev}]          repo info (sha, siblings)
    GET  /api/datasets/{repo}/tree/{rev}[/{path}]        file listing (?recursive=true)
    POST /api/datasets/{repo}/paths-info/{rev}            info of given paths
    HEAD/GET /datasets/{repo}/resolve/{rev}/{path}        file bytes (Range requests, ETag, X-Repo-Commit)
Unknown repos answer 404 with `X-Error-Code: RepoNotFound`, as the hub does; everything else unknown is
a plain 404 (and is logged in `unexpected`, so a test can see an endpoint this server lacks).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class FakeRepo:
    files: dict[str, bytes]                       # path in the repo -> content
    sha: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeDatasetHub:
    repos: dict[str, FakeRepo]
    requests: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __enter__(self) -> "FakeDatasetHub":
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_POST(self):
                hub._answer(self, body=True)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ routing

    def _answer(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        parsed = urlparse(h.path)
        path, query = unquote(parsed.path), parse_qs(parsed.query)
        self.requests.append(f"{h.command} {path}")
        if h.command == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            payload = h.rfile.read(length) if length else b""
        else:
            payload = b""
        for pattern, method in self._routes():
            m = re.fullmatch(pattern, path)
            if m:
                repo = self.repos.get(m["repo"])
                if repo is None:
                    return self._send(h, 404, {"error": "Repository not found"}, body,
                                      headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                return method(h, repo, m, query, payload, body)
        self.unexpected.append(f"{h.command} {h.path}")
        self._send(h, 404, {"error": "not served by the fake hub"}, body)

    def _routes(self):
        repo = r"(?P<repo>[^/]+/[^/]+)"
        rev = r"(?P<rev>[^/]+)"
        return [
            (rf"/api/datasets/{repo}(?:/revision/{rev})?", self._info),
            (rf"/api/datasets/{repo}/tree/{rev}(?:/(?P<path>.*))?", self._tree),
            (rf"/api/datasets/{repo}/paths-info/{rev}", self._paths_info),
            (rf"/datasets/{repo}/resolve/{rev}/(?P<path>.+)", self._resolve),
        ]

    # ------------------------------------------------------------------ endpoints

    def _known_revision(self, repo: FakeRepo, rev: str | None) -> bool:
        return rev in (None, "main", repo.sha)

    def _info(self, h, repo, m, query, payload, body):
        if not self._known_revision(repo, m["rev"]):
            return self._revision_missing(h, body)
        self._send(h, 200, {"id": m["repo"], "sha": repo.sha, "private": False, "gated": False, "disabled": False,
                            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                            "cardData": {}, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z"}, body)

    def _entries(self, repo: FakeRepo, folder: str, recursive: bool) -> list[dict]:
        folder = folder.strip("/")
        prefix = f"{folder}/" if folder else ""
        files, dirs = [], set()
        for path, content in sorted(repo.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    dirs.add(prefix + "/".join(parts[:i]))
            files.append(self._file_entry(path, content))
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)] + files

    @staticmethod
    def _file_entry(path: str, content: bytes) -> dict:
        return {"type": "file", "oid": hashlib.sha1(content).hexdigest(), "size": len(content), "path": path}

    def _tree(self, h, repo, m, query, payload, body):
        if not self._known_revision(repo, m["rev"]):
            return self._revision_missing(h, body)
        folder = m["path"] or ""
        if folder and not any(p.startswith(folder.strip("/") + "/") for p in repo.files):
            return self._send(h, 404, {"error": "path not found"}, body, headers={"X-Error-Code": "EntryNotFound"})
        self._send(h, 200, self._entries(repo, folder, query.get("recursive", ["false"])[0].lower() == "true"), body)

    def _paths_info(self, h, repo, m, query, payload, body):
        if not self._known_revision(repo, m["rev"]):
            return self._revision_missing(h, body)
        try:
            wanted = json.loads(payload or b"{}").get("paths", [])
        except ValueError:
            wanted = parse_qs(payload.decode()).get("paths", [])
        out = []
        for p in wanted:
            if p in repo.files:
                out.append(self._file_entry(p, repo.files[p]))
            elif any(f.startswith(p.rstrip("/") + "/") for f in repo.files):
                out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": p})
        self._send(h, 200, out, body)

    def _resolve(self, h, repo, m, query, payload, body):
        if not self._known_revision(repo, m["rev"]):
            return self._revision_missing(h, body)
        content = repo.files.get(m["path"])
        if content is None:
            return self._send(h, 404, {"error": "Entry not found"}, body,
                              headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha})
        etag = f'"{hashlib.sha1(content).hexdigest()}"'
        headers = {"ETag": etag, "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status, chunk = 200, content
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", h.headers.get("Range") or "")
        if ranged:
            start_s, end_s = ranged.groups()
            if start_s:
                start, end = int(start_s), min(int(end_s) if end_s else len(content) - 1, len(content) - 1)
            else:                               # a suffix: the last N bytes
                start, end = max(len(content) - int(end_s), 0), len(content) - 1
            if start >= len(content):
                return self._send(h, 416, b"", body, headers={"Content-Range": f"bytes */{len(content)}"})
            status, chunk = 206, content[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(h, status, chunk, body, headers=headers)

    def _revision_missing(self, h, body):
        self._send(h, 404, {"error": "Invalid rev id"}, body,
                   headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})

    # ------------------------------------------------------------------ output

    @staticmethod
    def _send(h, status: int, payload, body: bool, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if not isinstance(payload, bytes):
            h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Connection", "close")       # no kept-alive connection outlives the server
        h.close_connection = True
        h.end_headers()
        if body:
            h.wfile.write(data)


def parquet_bytes(columns: dict[str, list]) -> bytes:
    """A parquet file holding these columns (pyarrow comes with the `datasets` library)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, row_group_size=4)
    return buffer.getvalue()
