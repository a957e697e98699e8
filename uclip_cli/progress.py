"""Progress for long jobs: a live line with rate and ETA on a terminal, plain periodic lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, label: str, total: int | None = None, *, unit: str = "images", stream: TextIO | None = None,
                 enabled: bool = True, interval: float | None = None):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.live else 10.0)
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        parts = [f"{self.label}: {self.done}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"]
        if self.total:
            parts[0] = f"{self.label}: {100 * self.done / self.total:5.1f}% {self.done}/{self.total} {self.unit}"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_duration(time.monotonic() - self.start)}")
        return "  ".join(parts)

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._emit()
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
