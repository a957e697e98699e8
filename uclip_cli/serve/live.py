"""The photos a server answers from: one bundle and one index, kept open, warm and current.

What "current" means
--------------------
`uclip index` (another process) commits batches, re-projects after `uclip train`, compacts; `uclip
train` rewrites the bundle's heads. The server must show each commit at the next request, never
mix vectors of two heads, and never write the index.

- Each request asks `Library.use()` for a *state*: a bundle, its warm encoders and one read-only
  index snapshot (a SQLite read transaction plus the row files it names: rows, paths and vectors
  always agree, see store.py). Before handing one out, `use` compares two cheap signatures with
  those of the current state: the catalogue's `PRAGMA data_version` (read on a connection of our
  own that never holds a transaction, so it changes exactly when another connection commits) with
  the catalogue file's inode, and manifest.json's (inode, size, mtime) (the bundle writes it last,
  by rename). Costs: a few microseconds per request.
- On a change a new state is built: a new snapshot, and new encoders only if the heads changed.
  A query vector must come from the heads that projected the index's vectors, so the pair is chosen
  by the index's heads fingerprint: the bundle's current heads when the index has them; the heads
  already loaded when the index still holds those (right after `uclip train`, before `uclip index`
  re-projects; the note says so); otherwise the previous state stays in force with a note. Sessions
  of the old heads stay in memory, so replacing their files on disk does not disturb them.
- A state in use by a request is closed only when its last user is done (reference counts), so a
  refresh never pulls a snapshot from under a running search. A replaced state's snapshot is closed
  promptly, which lets SQLite checkpoint the WAL while `uclip index` runs; `refresh_idle` (called
  by the server every few seconds) does the same when no request comes.

Threads: requests run in a thread pool. IndexStore is not thread-safe, so every catalogue read goes
through the state's lock; the search itself reads only memory maps (and the int8 copy, checked once
when the state is made) and runs outside it. Text encoding runs outside every lock (ONNX Runtime
sessions are thread-safe); its results are cached per heads and text (infinite scroll re-asks the
same query for the next page).
"""
from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .. import bundle as B
from ..encoders import Encoders
from ..errors import UclipError
from ..index.access import open_index
from ..index.catalogue import CATALOG
from ..index.identity import IndexIdentity
from ..index.store import IndexStore
from ..photo_search import ENGLISH_FILES, TEXT_FILES, UNTRAINED_NOTE
from ..sessions import SessionFactory

TEXT_CACHE = 512         # query texts whose vectors are kept per heads
_SERIALS = itertools.count(1)   # State.serial: each state made gets the next


class ServeError(UclipError):
    """A request that cannot be answered as asked: 400 with this one-line message."""

    status = 400


class NotFound(ServeError):
    status = 404


class Unavailable(ServeError):
    """The index or bundle cannot serve right now (missing, damaged, another image encoder): 503."""

    status = 503


def open_snapshot(index_path: Path, bundle: B.Bundle, sessions: SessionFactory) -> IndexStore:
    """A read-only snapshot of the index for `bundle` (the one place the server opens the index)."""
    return open_index(index_path, IndexIdentity.of(bundle), "read", sessions=sessions)


@dataclass
class _Heads:
    """A bundle as loaded, with warm encoders for text queries and their vector cache."""

    bundle: B.Bundle
    encoders: Encoders
    cache: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Search vectors of `texts` [n, d]: from the cache, the others encoded in one batch."""
        with self.lock:
            found = {t: self.cache[t] for t in texts if t in self.cache}
            for text in found:
                self.cache.move_to_end(text)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            vectors = self.encoders.encode_text_query(missing)
            found.update(zip(missing, vectors))
            with self.lock:
                self.cache.update(zip(missing, vectors))
                while len(self.cache) > TEXT_CACHE:
                    self.cache.popitem(last=False)
        return np.stack([found[t] for t in texts])


@dataclass
class State:
    heads: _Heads
    store: IndexStore
    notes: list[str]
    made_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)   # serialises catalogue reads
    users: int = 0
    retired: bool = False
    serial: int = field(default_factory=_SERIALS.__next__)   # which snapshot: results cached per state use it

    @property
    def bundle(self) -> B.Bundle:
        return self.heads.bundle


def _manifest_signature(bundle_path: Path) -> tuple | None:
    try:
        st = (bundle_path / B.MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Library:
    """The bundle + index a server answers from (see the module docstring)."""

    def __init__(self, index_path: Path, bundle_path: Path, sessions: SessionFactory,
                 log: Callable[[str], None] = lambda _: None):
        self.index_path = Path(index_path).expanduser()
        self.bundle_path = Path(bundle_path).expanduser()
        self.sessions = sessions
        self.log = log
        self._refresh_lock = threading.Lock()
        self._users_lock = threading.Lock()
        self._watch: sqlite3.Connection | None = None
        self._watch_lock = threading.Lock()
        self._state: State | None = None
        self._index_signature: tuple | None = None
        self._bundle_signature: tuple | None = None
        self._watch_inode: int | None = None
        self._on_disk: B.Bundle | None = None
        self.reloads = 0

    # ------------------------------------------------------------------ life

    def open(self) -> "Library":
        """Load the bundle (sessions warm) and the index; one-line errors when either cannot serve."""
        bundle_signature = _manifest_signature(self.bundle_path)
        bundle = B.load_bundle(self.bundle_path, verify="cached", only=())
        bundle.check_now(self._needed_files(bundle))
        heads = self._load_heads(bundle)
        index_signature = self._index_now()
        store = open_snapshot(self.index_path, heads.bundle, self.sessions)
        if store.needs_reprojection:
            store.close()
            raise Unavailable(f"the index {self.index_path} was projected with other heads than {self.bundle_path} has "
                              "now: run `uclip index` once to re-project it (no image is decoded)")
        self._state = self._new_state(heads, store, [])
        self._on_disk = heads.bundle
        self._index_signature, self._bundle_signature = index_signature, bundle_signature
        return self

    def close(self) -> None:
        with self._refresh_lock:
            if self._state is not None:
                self._retire(self._state)
                self._state = None
            with self._watch_lock:
                if self._watch is not None:
                    self._watch.close()
                    self._watch = None

    def __enter__(self) -> "Library":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def use(self) -> Iterator[State]:
        """The current state (refreshed first when the index or the bundle changed), held for one request."""
        state = self._current()
        try:
            yield state
        finally:
            self._release(state)

    def refresh_idle(self) -> None:
        """Take up a change without a request (so an old snapshot does not hold the WAL back)."""
        self._release(self._current())

    # ------------------------------------------------------------------ states

    def _current(self) -> State:
        if self._state is None:
            raise Unavailable("the server is shutting down")
        changed = self._index_now() != self._index_signature or _manifest_signature(self.bundle_path) != self._bundle_signature
        if changed:
            with self._refresh_lock:
                self._refresh()
        with self._users_lock:
            state = self._state
            if state is None:
                raise Unavailable("the server is shutting down")
            state.users += 1
            return state

    def _release(self, state: State) -> None:
        with self._users_lock:
            state.users -= 1
            done = state.retired and state.users == 0
        if done:
            state.store.close()

    def _retire(self, state: State) -> None:
        with self._users_lock:
            state.retired = True
            done = state.users == 0
        if done:
            state.store.close()

    def _refresh(self) -> None:
        """Under the refresh lock: build the state that matches the index and the bundle on disk now."""
        index_signature, bundle_signature = self._index_now(), _manifest_signature(self.bundle_path)
        if index_signature == self._index_signature and bundle_signature == self._bundle_signature:
            return    # another request refreshed while this one waited
        old = self._state
        signatures = (index_signature, bundle_signature)
        if bundle_signature != self._bundle_signature:
            try:
                self._on_disk = B.load_bundle(self.bundle_path, verify=False)
            except UclipError as e:
                return self._keep(old, f"the bundle cannot be read now ({e}); serving the one loaded", *signatures)
        newest = self._on_disk    # the bundle as it is on disk now (the state may still serve older heads)
        try:
            store = open_snapshot(self.index_path, newest, self.sessions)
        except UclipError as e:
            return self._keep(old, f"the index cannot be read now ({e}); showing it as it was", *signatures)
        notes: list[str] = []
        if not store.needs_reprojection:          # the index holds the newest bundle's heads
            heads = old.heads
            if newest.manifest != old.bundle.manifest:
                try:
                    heads = self._load_heads(B.load_bundle(self.bundle_path, verify="cached",
                                                              only=self._needed_files(newest)))
                except UclipError as e:
                    store.close()
                    return self._keep(old, f"the bundle's new files cannot be loaded ({e}); serving the ones loaded",
                                      *signatures)
        elif store.heads_fingerprint == old.bundle.heads_fingerprint:
            heads = old.heads
            notes.append("the bundle's heads changed (uclip train): results use the previous heads until "
                         "`uclip index` re-projects the index")
        else:
            store.close()
            return self._keep(old, "the index holds vectors of other heads than the bundle's: run `uclip index` "
                                   "to re-project it", *signatures)
        self._swap(self._new_state(heads, store, notes), *signatures)

    def _keep(self, old: State, note: str, index_signature, bundle_signature) -> None:
        """The old snapshot stays in force, with a note; the next change on disk is looked at again."""
        old.notes = [*(n for n in old.notes if n == _untrained(old.bundle)), note]
        self._index_signature, self._bundle_signature = index_signature, bundle_signature
        self.log(f"uclip serve: {note}")

    def _swap(self, state: State, index_signature, bundle_signature) -> None:
        old = self._state
        with self._users_lock:
            self._state = state
        self._index_signature, self._bundle_signature = index_signature, bundle_signature
        self.reloads += 1
        if old is not None:
            self._retire(old)

    def _new_state(self, heads: _Heads, store: IndexStore, notes: list[str]) -> State:
        store.warm()          # check the int8 copy once, here, so searches only read
        untrained = _untrained(heads.bundle)
        return State(heads, store, [untrained, *notes] if untrained else notes)

    @staticmethod
    def _needed_files(bundle: B.Bundle) -> tuple[str, ...]:
        return TEXT_FILES if bundle.has_heads else ENGLISH_FILES

    def _load_heads(self, bundle: B.Bundle) -> _Heads:
        """Encoders for text queries, sessions created and run once now (a server answers warm)."""
        encoders = Encoders(bundle, self.sessions, text_precision="auto")   # the faster text tower on this CPU
        encoders.warm_text_queries()
        return _Heads(bundle, encoders)

    def _index_now(self) -> tuple | None:
        """(catalogue inode, data_version): changes whenever another process commits to the index."""
        catalog = self.index_path / CATALOG
        try:
            inode = catalog.stat().st_ino
        except OSError:
            return None
        with self._watch_lock:
            return self._data_version(catalog, inode)

    def _data_version(self, catalog: Path, inode: int) -> tuple:
        try:
            if self._watch is None or self._watch_inode != inode:
                if self._watch is not None:
                    self._watch.close()
                self._watch = sqlite3.connect(str(catalog), isolation_level=None, check_same_thread=False, timeout=5)
                self._watch.execute("PRAGMA query_only = 1")
                self._watch_inode = inode
            return inode, self._watch.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            return inode, None


def _untrained(bundle: B.Bundle) -> str | None:
    return None if bundle.has_heads else UNTRAINED_NOTE.removeprefix("note: ")
