"""The registry of derived vector index kinds (vector_index.py's interface, one module each).

The store keeps whichever kinds it is given and imports none of them; `access.open_index` gives these.
A new kind is one module beside the others and one line here.
"""
from __future__ import annotations

from .ann_index import AnnIndex
from .exact_index import ExactIndex
from .vector_index import VectorIndex

INDEX_KINDS: tuple[type[VectorIndex], ...] = (ExactIndex, AnnIndex)
