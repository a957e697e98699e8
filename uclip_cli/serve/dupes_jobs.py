"""GET /api/dupes without holding up the server: near-duplicate groups computed in a worker thread of their
own, once per served snapshot and request, while searches go on.

Why. A dupes answer costs seconds at 100,000 photos (near_pairs.py), searches cost milliseconds. The
state's lock (live.py) serialises catalogue reads, so a dupes computation that held it would stall every
search behind it. dupes.find_dupes takes the lock only for its catalogue reads (the rows and exact copies
before, the paths and metadata of the grouped rows after); the pair search between them reads the
snapshot's memory-mapped features, which the state keeps open while the job uses it (live.Library.use).

One worker. Jobs run one at a time in one thread (`uclip-dupes`): a page that asks for several
thresholds queues them rather than taking every core from the searches. The request's own thread waits
for the answer (it is one of the server's pool threads, and no lock is held while it waits).

Cached per snapshot. An answer is kept under (State.serial, threshold, folder): the same question about the
same snapshot is answered from memory, and a request that comes while the same job runs waits for that job
rather than starting another. A new snapshot (an index commit, a retrained bundle) has a new serial, so
its first request computes afresh; answers of older snapshots are dropped then. At most CACHED answers
are kept (a page trying thresholds), the oldest dropped first.

Shutting down: `close` stops taking jobs and makes a running one stop at its next progress report
(near_pairs reports after each cell or block row), so the server exits promptly.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable

from .live import Unavailable

CACHED = 8


class DupesJobs:
    """Answers computed once per key in one worker thread (module docstring). `find`: the pair search handed
    to dupes.find_dupes (None: near_pairs.find_pairs; tests inject a slow one)."""

    def __init__(self, find: Callable | None = None):
        self.find = find
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="uclip-dupes")
        self._lock = threading.Lock()
        self._answers: OrderedDict[Hashable, Future] = OrderedDict()
        self._closed = False
        self.computed = 0            # jobs run (a cached answer runs none)

    def answer(self, key: tuple, compute: Callable[[Callable], dict]) -> dict:
        """The answer for `key` (its first item: the snapshot's serial): cached, being computed, or computed
        now by `compute(progress)` in the worker; `progress` raises once the server is closing."""
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            future = self._answers.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._executor.submit(self._run, compute)
                self._answers[key] = future
                for old in [k for k in self._answers if k[0] < key[0]]:
                    del self._answers[old]                    # an older snapshot's: never asked again
                while len(self._answers) > CACHED:
                    self._answers.popitem(last=False)
            self._answers.move_to_end(key)
        return future.result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, compute: Callable[[Callable], dict]) -> dict:
        self.computed += 1
        return compute(self._progress)

    def _progress(self, stage: str, done: int, total: int) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down")
