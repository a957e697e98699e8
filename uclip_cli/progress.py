"""Progress for long jobs: a live line with rate and ETA on a terminal, plain periodic lines otherwise.

A live line has no newline while it is redrawn. Anything else printed to the terminal meanwhile (a
note, a warning, the error or "interrupted" line) must start on a line of its own, never glued to
"elapsed 00:00": `finish_live_lines()` ends every live line first, and the CLI calls it before each
message it prints; the next redraw starts on a fresh line.
"""
from __future__ import annotations

import sys
import time
from typing import NamedTuple, TextIO

_open_lines: list["Progress"] = []   # live lines drawn and not yet ended by a newline


def finish_live_lines() -> None:
    """End every live progress line now on the terminal, so that the next output starts on its own line."""
    for progress in list(_open_lines):
        progress.finish_line()


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
        self.reported_rate: float | None = None   # a rate measured by the job itself, when it has one
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = -1

    def rate(self) -> float:
        if self.reported_rate is not None:
            return self.reported_rate
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

    def advance(self, n: int = 1, *, rate: float | None = None) -> None:
        self.done += n
        if rate is not None:
            self.reported_rate = rate
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        self._shown = self.done
        if self.live:
            self.stream.write("\r\x1b[2K" + self.line())
            if self not in _open_lines:
                _open_lines.append(self)
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish_line(self) -> None:
        """End the live line (a newline), if one is drawn; the next redraw starts below it."""
        if self in _open_lines:
            _open_lines.remove(self)
            self.stream.write("\n")
            self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._shown != self.done:
            self._emit()
        self.finish_line()


class _Event(NamedTuple):
    stage: str
    done: int
    total: int
    unit: str


class StageProgress:
    """Progress for a job of several stages, fed events with .stage, .done, .total, .unit and optional .info."""

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._current: Progress | None = None
        self._stage = ""

    def __call__(self, event) -> None:
        if event.unit == "epochs":      # a summary between steps: a line of its own, the step bar goes on
            if self.enabled:
                info = getattr(event, "info", None) or {}
                finish_live_lines()
                self.stream.write(f"epoch {event.done}/{event.total}  {_format_info(info)}\n")
                self.stream.flush()
            return
        if event.stage != self._stage:
            if self._current:
                self._current.close()
            self._stage = event.stage
            self._current = Progress(event.stage.replace("_", " "), event.total, unit=event.unit,
                                     stream=self.stream, enabled=self.enabled)
        assert self._current is not None
        self._current.advance(event.done - self._current.done, rate=getattr(event, "rate", None))

    def step(self, stage: str, done: int, total: int, unit: str = "steps") -> None:
        """The same, for callers that report (stage, done, total) rather than an event."""
        self(_Event(stage, done, total, unit))

    def close(self) -> None:
        if self._current:
            self._current.close()
            self._current = None


def _format_info(info: dict) -> str:
    parts = []
    for key, value in info.items():
        if value is None:
            continue
        if isinstance(value, dict):
            parts.append(f"{key}: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()))
        else:
            parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    return "  ".join(parts)
