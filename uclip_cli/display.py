"""Paths as a terminal shows them: the real path, never a character the terminal would act on.

A file name may hold any byte but "/" and NUL: an escape sequence (which a terminal executes, so the
printed name is not the file's), a newline (which splits line-based output into two "paths" that do not
exist), or bidirectional-text controls (which reorder what is shown). `shown_path` leaves every other
path exactly as it is, and quotes one with such characters as bash's $'...' (GNU ls does the same), so
that what is printed is still the real path: a shell turns it back into the file's name. Machine output
that must carry any name unchanged uses NUL separators instead (`uclip query --format paths -0`, like
`find -print0`), or JSON, whose strings escape control characters.
"""
from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, and the Unicode bidirectional formatting characters.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'"}


def needs_quoting(text: str) -> bool:
    return _UNSAFE.search(text) is not None


def shown_path(path: str) -> str:
    """`path` itself when it holds no control character; else its bash $'...' quoting."""
    path = str(path)
    if not needs_quoting(path):
        return path
    return "$'" + "".join(_escape(c) for c in path) + "'"


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    if _UNSAFE.match(c):
        return f"\\x{ord(c):02x}" if ord(c) < 0x80 else f"\\u{ord(c):04x}"
    return c
