"""The index wing: the catalogue and row files (the source of truth), the store that keeps them and the
derived vector indexes in step, the vector index kinds, search over them, and `uclip check`.

Open an index with `access.open_index(path, IndexIdentity.of(bundle), mode)`.
"""
