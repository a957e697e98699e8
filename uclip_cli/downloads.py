"""Resumable HTTP(S) downloads into a `.part` file, with urllib only (no extra dependency).

Used by `uclip pull URL` (transfer.py) and by the default model's assembly (hub_files.py). A cut
download resumes where it stopped with a `Range: bytes=N-` request: within one run (a few attempts)
and across runs (the `.part` file stays until the caller has verified and moved it). A server that
ignores the Range gets the file from the start. Callers check the bytes (sha256) themselves.
"""
from __future__ import annotations

import errno
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

CHUNK = 1 << 20
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
TIMEOUT_S = 30


class HTTPStatusError(Exception):
    """The server answered with an error status."""

    def __init__(self, code: int, reason: str, headers: Any = None):
        super().__init__(f"{code} {reason}")
        self.code, self.reason, self.headers = code, reason, headers


class DownloadFailed(Exception):
    """The connection failed or was cut `attempts` times; `reason` says how the last attempt ended."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def download(url: str, part: Path, *, label: str, progress: bool, log: Callable[[str], Any],
             attempts: int = 3, timeout: float = TIMEOUT_S, headers: dict[str, str] | None = None) -> None:
    """Append the rest of `url` to `part` (creating it), resuming after cuts; raises HTTPStatusError or DownloadFailed."""
    from .progress import Progress

    for attempt in range(1, attempts + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={**(headers or {}), **({"Range": f"bytes={have}-"} if have else {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:
                    have = 0   # the server ignored the Range: start over
                total = response.headers.get("Content-Length")
                total = int(total) + have if total and total.isdigit() else None
                bar = Progress(label, total, unit="bytes", enabled=progress)
                bar.advance(have)
                with open(part, "ab" if have else "wb") as f:
                    while chunk := response.read1(CHUNK):   # what has arrived: a Ctrl-C keeps every byte received
                        f.write(chunk)
                        bar.advance(len(chunk))
                bar.close()
                if total is not None and part.stat().st_size < total:
                    raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes")
                return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:   # asked past the end: the part file is already whole
                return
            raise HTTPStatusError(e.code, str(e.reason), e.headers) from None
        except (urllib.error.URLError, OSError, ConnectionError) as e:
            if isinstance(e, OSError) and e.errno in DISK_ERRORS:
                raise                    # the disk, not the network: the caller names the folder
            reason = getattr(e, "reason", None) or e
            reason = first_line(reason) if isinstance(reason, BaseException) else str(reason)
            if attempt == attempts:
                raise DownloadFailed(reason) from None
            log(f"download of {url} interrupted ({reason}); resuming")
            time.sleep(0.5 * attempt)
