"""Which of a text tower's two precisions a query runs on this CPU: measured once, remembered, forceable.

A bundle exported with `--quantize int8-beside` carries each text tower twice: float32 and int8 weights
(bundle.INT8_TWINS), the same inputs and outputs. Which is faster is a property of the CPU, not of the
bundle: with AVX-512 VNNI or AMX, onnxruntime's MLAS runs the int8 MatMuls in its integer kernels and a
query's encoding takes about half the float32 time (issue 22: 20.0 against 26.4 ms served on an AMD EPYC
with VNNI); on AVX2 alone the integer kernels gain nothing over float32 at this size (bench/README.md:
35.2 against 36.6 ms), and the int8 tower is then only a loss of accuracy. A bundle is made on one
machine and run on others, so the choice cannot be made at export, nor read off the CPU's flags with
confidence (AMX made the exact search's int8 pass *slower*: index/int8_kernel.py).

So it is measured where the query runs, the way the exact search calibrates its pass: the first query on
a machine creates both sessions through the caller's SessionFactory, runs one typical query (16 tokens,
or the tower's fixed length) through each, alternating, and keeps the faster (`calibrate`: a few tenths
of a second, once). The answer is remembered in the cache folder (`text-precision.json`) under the CPU
model and flags, onnxruntime's version, the factory's thread count and the two graphs' checksums
(calibration.py); `UCLIP_TEXT_PRECISION=fp32|int8` forces it. `uclip query` and `uclip serve` use the
choice (Encoders(text_precision="auto")); indexing, training and evaluation keep the float32 towers, whose
features the heads are trained on; `uclip doctor` shows the choice and the times it was made from.

The choice weighs speed only, on purpose (issue 22). Accuracy is a property of the bundle, the same on every
CPU, so it is judged where the twin is made, not measured anew on each machine: whoever exports with
`--quantize int8-beside` asks for the int8 twin where it is faster, and the export prints and records its
cosine to float32 (the manifest's quantization record). Its price on real weights is measured by
tests/test_real_e2e.py (multilingual-e5-small): caption recall@1 0.358 -> 0.343, recall@5 0.606 -> 0.584, one
of 24 six-language photo queries lost its right photo at rank 1. A rank-agreement check at the first query
would need queries and photos to rank, which a user's machine has not got then, and a threshold that no
measurement here could justify. A user who wants float32 anyway sets UCLIP_TEXT_PRECISION=fp32 (or exports
without the twins).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import bundle as B
from .calibration import cache_file, cpu_identity, ort_version, read_json, remember

if TYPE_CHECKING:
    from .sessions import SessionFactory

PRECISIONS = ("fp32", "int8")
PRECISION_ENV = "UCLIP_TEXT_PRECISION"      # fp32 | int8: skip the measurement (tests, or a user who knows)
CHOICES_FILE = "text-precision.json"
QUERY_TOKENS = 16      # a typical query: XM3600 captions in 36 languages have a median of about 15 tokens
REPEATS = 5            # timed runs of each precision, alternating, after one untimed warm-up run each
_CHOSEN: dict[str, "Choice"] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Choice:
    """The precision a text tower runs in, the file that holds it, and why."""

    precision: str                       # "fp32" | "int8"
    file: str                            # the bundle file the query's session loads
    why: str                             # "no int8 twin", "forced by $UCLIP_TEXT_PRECISION", "measured", "remembered"
    seconds: dict[str, float] = field(default_factory=dict)   # median seconds per query, when measured

    def describe(self) -> str:
        times = ", ".join(f"{p} {1000 * s:.1f} ms" for p, s in sorted(self.seconds.items()))
        return f"{self.precision} ({self.why}{f': {times} per {QUERY_TOKENS}-token query' if times else ''})"


def choose(seconds: dict[str, float]) -> str:
    """The faster precision of measured {precision: seconds}; fp32 on a tie (int8 only rounds more).
    One that could not run (infinite) never wins."""
    fp32, int8 = seconds.get("fp32", np.inf), seconds.get("int8", np.inf)
    return "int8" if int8 < fp32 else "fp32"


def machine_key(bundle: B.Bundle, graph: str, sessions: SessionFactory) -> str:
    """What the measurement depends on: the CPU, onnxruntime, threads, and the two graphs (by checksum)."""
    twin = bundle.int8_twin(graph) or ""
    return (f"{cpu_identity()}|ort {ort_version()}|threads {sessions.threads or ''}|{graph} "
            f"{bundle.files.get(graph, '')[:16]}/{bundle.files.get(twin, '')[:16]}")


def text_tower_choice(bundle: B.Bundle, graph: str, sessions: SessionFactory,
                      measure: Callable[[], dict[str, float]] | None = None) -> Choice:
    """Which file of text tower `graph` (B.TEXT_MULTILINGUAL / B.TEXT_CLIP) queries run here.

    `measure()` -> {precision: seconds} replaces the measurement in tests; else `calibrate` times both
    graphs with sessions made by `sessions` (the caller's factory: its device and threads are the query's)."""
    twin = bundle.int8_twin(graph)
    if twin is None:
        return Choice("fp32", graph, "the bundle has no int8 twin of this tower")
    files = {"fp32": graph, "int8": twin}
    forced = os.environ.get(PRECISION_ENV, "")
    if forced in PRECISIONS:
        return Choice(forced, files[forced], f"forced by ${PRECISION_ENV}")
    key = machine_key(bundle, graph, sessions)
    with _LOCK:
        if key in _CHOSEN:
            return _CHOSEN[key]
        cache = cache_file(CHOICES_FILE)
        remembered = read_json(cache).get(key)
        if isinstance(remembered, dict) and remembered.get("precision") in PRECISIONS:
            seconds = {k: float(v) for k, v in (remembered.get("seconds") or {}).items() if k in PRECISIONS}
            _CHOSEN[key] = Choice(remembered["precision"], files[remembered["precision"]],
                                  "measured on this machine earlier", seconds)
            return _CHOSEN[key]
        seconds = measure() if measure else calibrate(bundle, graph, sessions)
        precision = choose(seconds)
        _CHOSEN[key] = Choice(precision, files[precision], "measured now", seconds)
        remember(cache, key, {"precision": precision, "seconds": {k: round(float(v), 6) for k, v in seconds.items()}})
        return _CHOSEN[key]


def calibrate(bundle: B.Bundle, graph: str, sessions: SessionFactory) -> dict[str, float]:
    """Median seconds of one typical query through each precision's graph, alternating so that background
    load hits both alike. A graph that cannot be loaded or run here gets infinity (never chosen)."""
    io = bundle.graph_io(graph)
    settings = bundle.tokenizers["clip" if graph == B.TEXT_CLIP else "multilingual"]
    tokens = settings.max_length if settings.padding == "max_length" else min(QUERY_TOKENS, settings.max_length)
    ids = np.int32 if io.ids == "int32" else np.int64
    values = {"input_ids": np.full((1, tokens), 5, ids), "attention_mask": np.ones((1, tokens), ids),
              "token_type_ids": np.zeros((1, tokens), ids)}    # ids' values do not change the time
    values["input_ids"][0, 0], values["input_ids"][0, -1] = 0, 2
    feeds = {io.inputs[role]: v for role, v in values.items() if role in io.inputs}
    runs: dict[str, Callable[[], object]] = {}
    seconds: dict[str, list[float]] = {}
    for precision, name in (("fp32", graph), ("int8", bundle.int8_twin(graph))):
        try:
            model = sessions.create(bundle.file(name), expect=bundle.signature(graph))
            model.run(feeds)                                   # warm-up: first-run allocations, thread start
        except Exception:  # noqa: BLE001 - a twin that cannot run here is simply not chosen
            seconds[precision] = []
            continue
        runs[precision] = lambda model=model: model.run(feeds)
        seconds[precision] = []
    for _ in range(REPEATS):
        for precision, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[precision].append(time.perf_counter() - start)
    return {p: float(np.median(s)) if s else float("inf") for p, s in seconds.items()}
