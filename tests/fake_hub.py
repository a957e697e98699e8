"""A local HTTP server standing in for the Hugging Face hub (and for any https/http file host).

It answers what `huggingface_hub.hf_hub_download` asks (huggingface_hub 0.2x-2.x, file_download.py):
- HEAD /{repo}/resolve/{revision}/{file}: 200 with `X-Repo-Commit` (the commit the revision resolves
  to), `ETag` (the file's sha256, as the hub gives LFS files) and `Content-Length`; 404 with
  `X-Error-Code: RepoNotFound`, `RevisionNotFound` or `EntryNotFound` otherwise (hf_raise_for_status
  maps those headers to RepositoryNotFoundError / RevisionNotFoundError / EntryNotFoundError);
- GET of the same URL, honouring `Range: bytes=N-` with 206 (how huggingface_hub resumes a cut download).
Revisions: "main" and the commit id resolve to the repo's files. Damage for tests: `cut_after` (close the
connection after N bytes of a file, `cuts` times), `stall` (send part of a file, then hang), and tests replace published bytes to tamper with a file.
It also serves plain files under /files/NAME (an archive at a URL), with the same Range and cut support.
"""
from __future__ import annotations

import hashlib
import http.server
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)   # repo id -> file name -> bytes
    commits: dict[str, str] = field(default_factory=dict)              # repo id -> commit id
    files: dict[str, bytes] = field(default_factory=dict)               # /files/NAME -> bytes
    cut_after: dict[str, int] = field(default_factory=dict)            # file name -> bytes sent before cutting
    cuts: dict[str, int] = field(default_factory=dict)                 # file name -> how many GETs are cut
    stall: dict[str, int] = field(default_factory=dict)               # file name -> bytes sent before hanging
    honour_range: bool = True
    requests: list[str] = field(default_factory=list)

    def publish(self, repo: str, folder: Path) -> str:
        """Serve every file of `folder` as the repo's content at a new commit; returns the commit id."""
        self.repos[repo] = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in self.repos[repo].items()))
                              .encode()).hexdigest()
        self.commits[repo] = digest
        return digest


def _handler(hub: FakeHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:   # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _error(self, code: int, error_code: str) -> None:
            self.send_response(code)
            self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            files = re.fullmatch(r"/files/([^/?]+)", self.path)
            if files:
                data = hub.files.get(files.group(1))
                if data is None:
                    return self._error(404, "EntryNotFound")
                return self._send(files.group(1), data, {}, body)
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/([^/?]+)", self.path)
            if not match:
                return self._error(404, "RepoNotFound")
            repo, revision, name = match.groups()
            if repo not in hub.repos:
                return self._error(401, "RepoNotFound")
            if revision not in ("main", hub.commits[repo]):
                return self._error(404, "RevisionNotFound")
            data = hub.repos[repo].get(name)
            if data is None:
                return self._error(404, "EntryNotFound")
            return self._send(name, data, {"X-Repo-Commit": hub.commits[repo],
                                           "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)

        def _send(self, name: str, data: bytes, headers: dict[str, str], body: bool) -> None:
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if body and ranged and hub.honour_range:
                start = int(ranged.group(1))
            self.send_response(206 if start else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Accept-Ranges", "bytes" if hub.honour_range else "none")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            payload = data[start:]
            if name in hub.stall:   # send part of the file, then hang (the client is killed meanwhile)
                self.wfile.write(payload[:hub.stall[name]])
                self.wfile.flush()
                time.sleep(60)
                return
            if hub.cuts.get(name, 0) > 0:
                hub.cuts[name] -= 1
                self.wfile.write(payload[:hub.cut_after.get(name, 0)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)   # the connection drops mid-file
                return
            self.wfile.write(payload)

    return Handler


class Server:
    """`with Server(hub) as url:` serves `hub` on 127.0.0.1 (optionally over TLS) for the block."""

    def __init__(self, hub: FakeHub, ssl_context=None):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.httpd.daemon_threads = True
        scheme = "http"
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
