"""The integer kernel of the exact int8 pass: c_i . a for every row code c_i of an int8 copy, exactly.

The kernel is onnxruntime's MatMulInteger on a one-node graph, made by the caller's session factory
(sessions.SessionFactory.create_graph) pinned to the CPU, so its thread count (`--threads`) is the
caller's. With one query row, no zero points and the codes as the right-hand operand (uint8 x int8),
onnxruntime's MLAS library runs its integer GEMV, which reads the codes once without repacking them. Some CPUs' kernels add pairs of uint8 x int8 products in saturating
16-bit lanes (AVX2's vpmaddubsw): `exact_on` checks a saturating input, and the query range is lowered
to 63 (pairs then stay below 2^15) where the full range is not exact. A kernel that is not exact is
never used: exact.top_k_quantized then scans the float32 rows (slower, same result).
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..calibration import cache_file, cpu_identity, ort_version, read_json, remember
from ..onnx_bytes import INT8, INT32, UINT8, single_node_model
from ..threads import THREADS_ENV

if TYPE_CHECKING:
    from ..sessions import SessionFactory

QUANT_BLOCK = 64         # rows per block of an int8 copy (codes stored transposed per block): see below
CODE_RANGE = 127          # row codes lie in [-127, 127]
HALF_RANGES = (127, 63)   # query code ranges tried, widest first


class Int8Kernel:
    """dots[b, r] = sum_j a[j] * codes[b, j, r] (codes int8 [blocks, d, rows], a uint8 [d]), int32."""

    def __init__(self, session, half_range: int):
        self.session = session
        self.half_range = half_range

    def dots(self, codes: np.ndarray, a: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {"a": a.reshape(1, 1, -1), "codes": codes})[0]
        return out.reshape(codes.shape[0], codes.shape[2])

    def exact_on(self, d: int) -> bool:
        """True when the kernel gives the exact integer products on saturating and random input."""
        rng = np.random.default_rng(d)
        codes = rng.choice(np.array([-CODE_RANGE, CODE_RANGE, 0, 1, -1], np.int8), size=(2, d, max(64, QUANT_BLOCK)))
        codes[0, :, :8] = CODE_RANGE
        codes[0, :, 8:16] = -CODE_RANGE
        codes[0, ::2, 16:24] = -CODE_RANGE
        a_values = [np.full(d, 2 * self.half_range, np.uint8), rng.integers(0, 2 * self.half_range + 1, d, dtype=np.uint8)]
        for a in a_values:
            want = np.einsum("j,bjr->br", a.astype(np.int64), codes.astype(np.int64))
            if not np.array_equal(self.dots(codes, a), want):
                return False
        return True


_KERNELS: dict[tuple[int, int | None], Int8Kernel | None] = {}
_LOCK = threading.Lock()


def int8_kernel(d: int, sessions: SessionFactory | None) -> Int8Kernel | None:
    """The integer kernel for d-dimensional rows, made by `sessions` (None: no kernel) pinned to the CPU and
    checked exact on this CPU once per process and thread count; else None."""
    if sessions is None:
        return None
    cpu = dataclasses.replace(sessions, device="cpu")
    with _LOCK:
        key = (d, cpu.threads)
        if key not in _KERNELS:
            _KERNELS[key] = _make_kernel(d, cpu)
        return _KERNELS[key]


def _make_kernel(d: int, sessions: SessionFactory) -> Int8Kernel | None:
    try:
        session = sessions.create_graph(matmul_integer_model(), "uclip_int8_dots").session
    except Exception:  # noqa: BLE001 - no onnxruntime, or one without the kernel: the float32 pass serves
        return None
    for half_range in HALF_RANGES:
        kernel = Int8Kernel(session, half_range)
        try:
            if kernel.exact_on(d):
                return kernel
        except Exception:  # noqa: BLE001 - a kernel that fails on this input is not used
            return None
    return None


def matmul_integer_model() -> bytes:
    """ONNX graph dots = MatMulInteger(a uint8 [1, 1, d], codes int8 [blocks, d, rows])."""
    return single_node_model("MatMulInteger", [("a", UINT8, [1, 1, "d"]), ("codes", INT8, ["blocks", "d", "rows"])],
                             ("dots", INT32, ["blocks", 1, "rows"]), "uclip_int8_dots")


# ---------------------------------------------------------------------------- which pass this CPU runs faster
#
# The int8 pass reads a quarter of the float32 pass's bytes, so it wins where the integer GEMV runs near
# memory speed: AVX2 (the code range then 63), AVX-512 and AVX-512 VNNI, where onnxruntime's MLAS library
# has a GEMV for one query row. On CPUs with AMX (Xeon Sapphire Rapids and later) MLAS sends uint8 x int8
# GEMMs to its AMX kernel, which has no GEMV: it packs the whole right-hand operand (all the codes) into
# tiles on every call, which made the int8 pass twice as slow as the float32 one there (issue 11: 158-180 ms
# against 82-87 ms at 1M x 512). Which is faster is therefore measured, once per machine, by timing both
# whole exact passes on the same rows (exact.measure_passes, under a second; timing the kernels alone
# misjudged AMX the other way), and remembered in the user's cache folder under the CPU
# model and flags, onnxruntime's and numpy's versions, the dimension and the thread count (calibration.py).
#
# Blocks of QUANT_BLOCK = 64 rows (issue 22): the integer kernel runs on every block of a copy in one call
# (a batch of [d, block] right-hand operands), and MLAS's cost per row falls steeply with the block's width on
# the AMX Xeon: over 100,000 x 512 codes, one thread, CPU time per call 25.4 ms in blocks of 8,192 (the layout
# before), 12.9 ms in 1,024, 10.9 ms in 256, 8.4 ms in 128, 7.8 ms in 64, 7.8 ms in 32, 8.4 ms in 16 (same
# process, bench/README.md, issue 22); the float32 product of the same rows took 12.4 ms. Narrow blocks
# also leave at most 63 rows past the copy (scanned in float32 and checksummed), where 8,192 left up to 8,191.
# A copy keeps the block it was written with (meta quantized_block): an index whose copy was written in blocks
# of 8,192 is searched with them, exactly, until its next generation (`uclip index --rebuild`, compaction).

PATHS = ("int8", "float32")
PATH_ENV = "UCLIP_SEARCH_PATH"          # int8 | float32: skip the measurement (tests, or a user who knows)
CALIBRATION_FILE = "search-pass.json"   # whole passes timed (exact.measure_passes); search-path.json timed kernels
CALIBRATION_ROWS = 65_536
CALIBRATION_REPEATS = 3
_CHOSEN: dict[str, str] = {}


def choose(seconds: dict[str, float]) -> str:
    """The faster pass of measured {path: seconds for the same search}; int8 on a tie (less memory traffic
    under load). A pass that could not run (infinite) never wins."""
    int8, float32 = seconds.get("int8", np.inf), seconds.get("float32", np.inf)
    return "int8" if int8 <= float32 and np.isfinite(int8) else "float32"


def machine_key(d: int) -> str:
    """What the measurement depends on: CPU model and vector extensions, library versions, d, threads, and the
    block width of the copies it timed (which kernel MLAS runs depends on it)."""
    return (f"{cpu_identity()}|ort {ort_version()}|numpy {np.__version__}|d {d}|"
            f"threads {os.environ.get(THREADS_ENV, '')}|block {QUANT_BLOCK}")


def preferred_path(d: int, measure: Callable[[int], dict[str, float]]) -> str:
    """"int8" or "float32": the faster exact pass on this machine for d-dimensional rows, measured once by
    `measure(d)` -> {path: seconds} (exact.measure_passes) and remembered."""
    forced = os.environ.get(PATH_ENV, "")
    if forced in PATHS:
        return forced
    key = machine_key(d)
    if key in _CHOSEN:
        return _CHOSEN[key]
    cache = cache_file(CALIBRATION_FILE)
    remembered = read_json(cache).get(key)
    if isinstance(remembered, dict) and remembered.get("path") in PATHS:
        _CHOSEN[key] = remembered["path"]
        return _CHOSEN[key]
    seconds = measure(d)
    _CHOSEN[key] = choose(seconds)
    remember(cache, key, {"path": _CHOSEN[key], "seconds": {k: round(float(v), 6) for k, v in seconds.items()}})
    return _CHOSEN[key]
