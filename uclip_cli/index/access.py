"""How the rest of uclip opens an index: `open_index(path, identity, mode)`, the one door.

It gives the store the registered vector index kinds (kinds.py) and the caller's ONNX Runtime session
factory (for the int8 kernel: the caller's `--threads` reach the search), so that the store itself
imports neither. `identity` is `IndexIdentity.of(bundle)` for the bundle the caller encodes with (None:
a reader that only lists or checks files).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .identity import IndexIdentity
from .kinds import INDEX_KINDS
from .store import IndexStore

if TYPE_CHECKING:
    from ..sessions import SessionFactory


def open_index(path: str | os.PathLike, identity: IndexIdentity | None = None, mode: str = "read", *,
               sessions: SessionFactory | None = None) -> IndexStore:
    """The index at `path` opened in `mode` (read | write | create | rebuild: see IndexStore.open)."""
    return IndexStore.open(path, identity, mode=mode, kinds=INDEX_KINDS, sessions=sessions)
