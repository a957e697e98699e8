"""Single files of public Hugging Face hub repositories, pinned by commit and sha256, fetched with urllib.

The default model (assemble.py) is a handful of published files. huggingface_hub is not a runtime
dependency, and it is not needed for that: the hub serves any file of any commit at
`{endpoint}/{repo}/resolve/{commit}/{path}`, the same URL huggingface_hub itself builds, and says in
the headers what it serves (huggingface_hub's file_download.py reads the same ones):

- `X-Repo-Commit`: the commit the revision resolved to (a pinned commit resolves to itself);
- large (LFS/Xet) files answer 302 to a CDN with `X-Linked-Etag` = the file's sha256 and
  `X-Linked-Size`, so a file that is not the pinned one is refused before a byte of it is downloaded;
- small (git) files answer 200 with `ETag` = the git blob sha1 of their bytes, checked after download.

urllib is imported only when a file is fetched (a query never pays for it). `HF_ENDPOINT` (a mirror, or the stand-in server of the tests) and `HF_HUB_OFFLINE` /
`TRANSFORMERS_OFFLINE` are honoured as huggingface_hub honours them. The first request is a HEAD
with a short timeout and no retry: an unreachable hub is one line within seconds, never a minute of
retries. Downloads resume (downloads.py) from a `.part` file beside their destination, so an
interrupted assembly continues where it stopped.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UclipError
from .filecache import sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "HF_ENDPOINT"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 5.0       # the first request: a reachable hub answers a HEAD in well under a second
READ_TIMEOUT_S = 30.0
USER_AGENT = "uclip (default model assembly; urllib)"


class HubUnreachable(UclipError):
    """The hub cannot be reached (offline mode, no network, DNS, refused); the message says why."""


class HubFileError(UclipError):
    """A published file that is missing, or not the pinned one; the message names repo, commit and path."""

    missing = False


class HubFileMissing(HubFileError):
    """The repo has no such file at that commit."""

    missing = True


@dataclass(frozen=True)
class PinnedFile:
    """One file of a hub repo at one commit; sha256 and size where they are known (else checked as the hub says)."""

    repo: str
    revision: str
    path: str
    sha256: str | None = None
    size: int | None = None
    optional: bool = False     # a file whose absence the layout can do without (it has a default)

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.revision[:12]}:{self.path}"


@dataclass(frozen=True)
class FileMetadata:
    commit: str | None
    etag: str | None      # sha256 (LFS) or git blob sha1, as the hub reports it
    size: int | None


def endpoint() -> str:
    return (os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> str | None:
    """The variable that puts the hub offline, if one does."""
    for name in OFFLINE_ENVS:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def resolve_url(f: PinnedFile) -> str:
    import urllib.parse

    return (f"{endpoint()}/{f.repo}/resolve/{urllib.parse.quote(f.revision, safe='')}/"
            f"{urllib.parse.quote(f.path)}")


def _strip_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


def git_blob_sha1(path: Path) -> str:
    """The sha1 git names a file's content by (what the hub sends as the ETag of a small file)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def metadata(f: PinnedFile, *, timeout: float = PROBE_TIMEOUT_S) -> FileMetadata:
    """What the hub says about the file (HEAD, relative redirects followed); HubUnreachable / HubFileError."""
    import urllib.error
    import urllib.parse
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        """A HEAD must not follow the CDN redirect (urllib would re-send it as a GET of the whole file)."""

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None

    if name := offline():
        raise HubUnreachable(f"{name} is set (offline mode)")
    opener = urllib.request.build_opener(NoRedirect)
    url = resolve_url(f)
    for _ in range(5):   # the hub redirects small files to a cache path on itself (relative Location)
        request = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT})
        try:
            response = opener.open(request, timeout=timeout)
            headers, status = response.headers, response.status
            response.close()
        except urllib.error.HTTPError as e:
            headers, status = e.headers, e.code
            if status not in (301, 302, 303, 307, 308):
                raise _status_error(f, status, headers) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise HubUnreachable(f"cannot reach {endpoint()} ({reason})") from None
        location = headers.get("Location")
        linked = headers.get("X-Linked-Etag")
        if status in (301, 302, 303, 307, 308) and location and not linked:
            target = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(target).netloc == urllib.parse.urlsplit(url).netloc:
                url = target
                continue
        size = headers.get("X-Linked-Size") or (None if location else headers.get("Content-Length"))
        return FileMetadata(headers.get("X-Repo-Commit"), _strip_etag(linked or headers.get("ETag")),
                            int(size) if size and size.isdigit() else None)
    raise HubFileError(f"{f.where}: the hub redirected too many times")


def _status_error(f: PinnedFile, status: int, headers: Any) -> HubFileError:
    code = (headers or {}).get("X-Error-Code", "") if headers is not None else ""
    kind = HubFileMissing if code == "EntryNotFound" or (status == 404 and not code) else HubFileError
    return kind(_status_message(f, status, headers))


def _status_message(f: PinnedFile, status: int, headers: Any) -> str:
    code = (headers or {}).get("X-Error-Code", "") if headers is not None else ""
    if code == "EntryNotFound" or (status == 404 and not code):
        return f"{f.repo} has no {f.path} at commit {f.revision[:12]} (the hub answered {status})"
    if code == "RevisionNotFound":
        return f"{f.repo} has no commit {f.revision} (the hub answered {status})"
    if code in ("RepoNotFound", "GatedRepo") or status in (401, 403):
        return f"{f.repo} is not a public repo on {endpoint()} (the hub answered {status})"
    return f"{f.where}: the hub answered {status}; run the same command again later"


def fetch(f: PinnedFile, destination: Path, *, label: str, progress: bool, log: Callable[[str], Any]) -> str:
    """Download the pinned file to `destination` (resuming a `.part` beside it), verified; returns its sha256.

    Refused, with the part file removed, when the hub serves another commit, another sha256 or size than
    the pin, or bytes that do not match what the hub itself says they are.
    """
    from .downloads import DownloadFailed, HTTPStatusError, download

    info = metadata(f)
    if info.commit and len(f.revision) == 40 and info.commit != f.revision:
        raise HubFileError(f"{f.where}: the hub serves commit {info.commit[:12]} for the pinned commit")
    if f.sha256 and info.etag and len(info.etag) == 64 and info.etag != f.sha256:
        raise HubFileError(f"{f.where}: the hub's file has sha256 {info.etag[:12]}…, not the pinned {f.sha256[:12]}…; "
                           "nothing was installed")
    if f.size is not None and info.size is not None and info.size != f.size:
        raise HubFileError(f"{f.where}: the hub's file has {info.size} bytes, not the pinned {f.size}; nothing was installed")
    part = destination.with_name(destination.name + ".part")
    if f.size is not None and part.exists() and part.stat().st_size > f.size:
        part.unlink()
    try:
        download(resolve_url(f), part, label=label, progress=progress, log=log, timeout=READ_TIMEOUT_S,
                 headers={"User-Agent": USER_AGENT})
    except HTTPStatusError as e:
        raise _status_error(f, e.code, e.headers) from None
    except DownloadFailed as e:
        raise HubUnreachable(f"downloading {f.where} failed ({e.reason})") from None
    digest = sha256_file(part)
    problem = None
    if f.sha256 and digest != f.sha256:
        problem = f"its sha256 is {digest[:12]}…, not the pinned {f.sha256[:12]}…"
    elif f.size is not None and part.stat().st_size != f.size:
        problem = f"it has {part.stat().st_size} bytes, not the pinned {f.size}"
    elif not f.sha256 and info.etag and len(info.etag) == 64 and digest != info.etag:
        problem = f"its sha256 is {digest[:12]}…, not the {info.etag[:12]}… the hub reports"
    elif not f.sha256 and info.etag and len(info.etag) == 40 and git_blob_sha1(part) != info.etag:
        problem = "its bytes do not match the git hash the hub reports"
    if problem:
        part.unlink(missing_ok=True)
        raise HubFileError(f"{f.where} was downloaded but {problem} (changed on the hub, or damaged on the way); "
                           "nothing was installed")
    os.replace(part, destination)
    return digest
