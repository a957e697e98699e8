"""A local HTTP server standing in for the Hugging Face hub (and for any https/http file host).

It answers what `huggingface_hub.hf_hub_download` asks (huggingface_hub 0.2x-2.x, file_download.py), for two
kinds of repos:
- `publish(repo, folder)` (flat file names; the original behaviour): HEAD /{repo}/resolve/{revision}/{file} gives
  200 with `X-Repo-Commit` (the commit the revision resolves to), `ETag` (the file's sha256, as the hub gives LFS
  files) and `Content-Length`; GET of the same URL serves the bytes.
- `publish_files(repo, {path: bytes}, lfs_suffixes=(".onnx",))` (nested paths such as `visual/model.onnx`, also
  URL-quoted), as the real hub serves them: a file whose name ends in one of `lfs_suffixes` is an LFS file, and
  HEAD/GET of its /resolve/ URL answer 302 with `Location: {cdn}/cdn/{sha256}`, `X-Repo-Commit`,
  `X-Linked-Etag: "<sha256>"`, `X-Linked-Size` and the redirect's own `ETag`; GET {cdn}/cdn/{sha256} serves the
  bytes. {cdn} is a second port of the same Server (`Server.cdn_url`): another origin, as the real CDN is, so
  huggingface_hub keeps the hub's headers instead of following the redirect during its HEAD. Any other file is
  answered directly: 200 with `ETag: "<git blob sha1>"` (sha1 of b"blob N\0" + bytes), `X-Repo-Commit` and
  `Content-Length`. A missing path's 404 carries `X-Repo-Commit` too (huggingface_hub caches the absence).
  With `resolve_cache=True` such a small file is first redirected (307, relative Location, `X-Repo-Commit`) to
  /api/resolve-cache/models/{repo}/{commit}/{path}, which answers the 200 (an approximation of the hub's cache
  redirect; huggingface_hub follows relative redirects).
  `tamper(repo, path, data)` changes the bytes served (on /resolve/ and on the CDN) but not the commit, ETag or
  X-Linked-Etag / X-Linked-Size announced; `remove(repo, path)` deletes a file, same commit (the CDN no longer serves it).
Errors: 404 with `X-Error-Code: EntryNotFound` (missing path) or `RevisionNotFound` (revision neither "main" nor
the commit id), 401 `RepoNotFound` for an unknown repo (as the hub answers anonymous callers); huggingface_hub's
hf_raise_for_status maps those headers to EntryNotFoundError / RevisionNotFoundError / RepositoryNotFoundError.
Every GET of file bytes honours `Range: bytes=N-` with 206 and Content-Range (how huggingface_hub resumes a cut
download). Damage for tests, keyed by the file's path in its repo (or the /files/ NAME) and applied where the bytes
are sent (/resolve/, /cdn/, /files/): `cut_after` (close the connection after N bytes of a file, `cuts` times),
`stall` (send part of a file, then hang); tests also replace published bytes to tamper with a file.
It also serves plain files under /files/NAME (an archive at a URL), with the same Range and cut support.
`requests` logs "METHOD path" of every request, on both ports (e.g. to assert a file was never fetched).
"""
from __future__ import annotations

import hashlib
import http.server
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob: what the hub sends as the ETag of a file that is not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Announced:
    """What the hub says about a file of a `publish_files` repo (kept when a test tampers with the bytes)."""
    lfs: bool
    etag: str      # sha256 for an LFS file, the git blob sha1 otherwise
    size: int


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)   # repo id -> file path -> bytes served
    commits: dict[str, str] = field(default_factory=dict)              # repo id -> commit id
    files: dict[str, bytes] = field(default_factory=dict)               # /files/NAME -> bytes
    cut_after: dict[str, int] = field(default_factory=dict)            # file path -> bytes sent before cutting
    cuts: dict[str, int] = field(default_factory=dict)                 # file path -> how many GETs are cut
    stall: dict[str, int] = field(default_factory=dict)               # file path -> bytes sent before hanging
    honour_range: bool = True
    requests: list[str] = field(default_factory=list)
    resumed: list[tuple[str, int]] = field(default_factory=list)     # (file path, first byte) of every Range GET
    announced: dict[str, dict[str, Announced]] = field(default_factory=dict)   # publish_files repos only
    resolve_cache: bool = False   # small files of publish_files repos: 307 to /api/resolve-cache/... first

    def publish(self, repo: str, folder: Path) -> str:
        """Serve every file of `folder` as the repo's content at a new commit; returns the commit id."""
        self.announced.pop(repo, None)
        self.repos[repo] = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        self.commits[repo] = self._commit(self.repos[repo])
        return self.commits[repo]

    def publish_files(self, repo: str, files: dict[str, bytes], *, lfs_suffixes: tuple[str, ...] = (".onnx",)) -> str:
        """Serve `files` ({path with slashes: bytes}) as the repo's content at a new commit, as the real hub does:
        paths ending in one of `lfs_suffixes` are LFS files (302 to the CDN). Returns the commit id."""
        self.repos[repo] = dict(files)
        self.announced[repo] = {
            path: (Announced(True, hashlib.sha256(data).hexdigest(), len(data)) if path.endswith(tuple(lfs_suffixes))
                   else Announced(False, git_blob_sha1(data), len(data)))
            for path, data in files.items()}
        self.commits[repo] = self._commit(self.repos[repo])
        return self.commits[repo]

    def tamper(self, repo: str, path: str, data: bytes) -> None:
        """Serve `data` for an existing file without changing the commit or what the hub announces about it
        (for a `publish` repo, whose ETag is computed from the bytes served, the ETag follows the new bytes)."""
        if path not in self.repos[repo]:
            raise KeyError(f"{repo} has no file {path!r}")
        self.repos[repo][path] = data

    def remove(self, repo: str, path: str) -> None:
        """Delete a file: its /resolve/ URL answers 404 EntryNotFound and the CDN stops serving it (same commit)."""
        del self.repos[repo][path]
        self.announced.get(repo, {}).pop(path, None)

    @staticmethod
    def _commit(files: dict[str, bytes]) -> str:
        return hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                            .encode()).hexdigest()

    def _cdn_file(self, sha256: str) -> tuple[str, bytes] | None:
        """(repo path, bytes served) of a published LFS file announced with this sha256, if any is still there."""
        for repo, announced in self.announced.items():
            for path, info in announced.items():
                if info.lfs and info.etag == sha256 and path in self.repos.get(repo, {}):
                    return path, self.repos[repo][path]
        return None


def _handler(hub: FakeHub, server: "Server"):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:   # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _error(self, code: int, error_code: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("X-Error-Code", error_code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
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
            path = urlsplit(self.path).path
            cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
            if cdn:
                found = hub._cdn_file(cdn.group(1))
                if found is None:
                    return self._error(404, "EntryNotFound")
                return self._send(found[0], found[1], {"ETag": f'"{cdn.group(1)}"'}, body)
            cached = re.fullmatch(r"/api/resolve-cache/models/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path)
            match = cached or re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not match:
                return self._error(404, "RepoNotFound")
            repo, revision, name = match.group(1), unquote(match.group(2)), unquote(match.group(3))
            if repo not in hub.repos:
                return self._error(401, "RepoNotFound")
            commit = hub.commits[repo]
            if revision not in ("main", commit):
                return self._error(404, "RevisionNotFound")
            data = hub.repos[repo].get(name)
            if repo not in hub.announced:   # publish(): flat names, sha256 ETag, bytes served directly
                if data is None or "/" in name:
                    return self._error(404, "EntryNotFound")
                return self._send(name, data, {"X-Repo-Commit": commit,
                                               "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)
            if data is None:
                return self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
            info = hub.announced[repo].get(name) or Announced(False, git_blob_sha1(data), len(data))
            if not info.lfs and hub.resolve_cache and not cached:
                self.send_response(307)
                self.send_header("Location", f"/api/resolve-cache/models/{repo}/{commit}/{quote(name)}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if not info.lfs:
                return self._send(name, data, {"X-Repo-Commit": commit, "ETag": f'"{info.etag}"'}, body)
            location = f"{server.cdn_url}/cdn/{info.etag}"
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{info.etag}"')
            self.send_header("X-Linked-Size", str(info.size))
            self.send_header("ETag", f'W/"{hashlib.sha1(location.encode()).hexdigest()[:27]}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send(self, name: str, data: bytes, headers: dict[str, str], body: bool) -> None:
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if body and ranged and hub.honour_range:
                start = int(ranged.group(1))
                hub.resumed.append((name, start))
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
    """`with Server(hub) as url:` serves `hub` on 127.0.0.1 (optionally over TLS) for the block.

    LFS files of `publish_files` repos redirect to `cdn_url`, a second port: another origin, as the real CDN is.
    """

    def __init__(self, hub: FakeHub, ssl_context: ssl.SSLContext | None = None):
        self.httpds = []
        for _ in ("hub", "cdn"):
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, self))
            httpd.daemon_threads = True
            if ssl_context is not None:
                httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True)
            self.httpds.append(httpd)
        self.httpd = self.httpds[0]
        scheme = "http" if ssl_context is None else "https"
        self.url, self.cdn_url = (f"{scheme}://127.0.0.1:{h.server_address[1]}" for h in self.httpds)

    def __enter__(self) -> str:
        for httpd in self.httpds:
            threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.url

    def __exit__(self, *exc) -> None:
        for httpd in self.httpds:
            httpd.shutdown()
            httpd.server_close()
