"""The integer kernel of the exact int8 pass: c_i . a for every row code c_i of an int8 copy, exactly.

The kernel is onnxruntime's MatMulInteger on a one-node graph, created by the one session factory
(sessions.SessionFactory.create_graph). With one query row, no zero points and the codes as the
right-hand operand (uint8 x int8), onnxruntime's MLAS library runs its integer GEMV, which reads the
codes once without repacking them. Some CPUs' kernels add pairs of uint8 x int8 products in saturating
16-bit lanes (AVX2's vpmaddubsw): `exact_on` checks a saturating input, and the query range is lowered
to 63 (pairs then stay below 2^15) where the full range is not exact. A kernel that is not exact is
never used: exact.top_k_quantized then scans the float32 rows (slower, same result).
"""
from __future__ import annotations

import threading

import numpy as np

from .onnx_bytes import INT8, INT32, UINT8, single_node_model

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
        codes = rng.choice(np.array([-CODE_RANGE, CODE_RANGE, 0, 1, -1], np.int8), size=(2, d, 64))
        codes[0, :, :8] = CODE_RANGE
        codes[0, :, 8:16] = -CODE_RANGE
        codes[0, ::2, 16:24] = -CODE_RANGE
        a_values = [np.full(d, 2 * self.half_range, np.uint8), rng.integers(0, 2 * self.half_range + 1, d, dtype=np.uint8)]
        for a in a_values:
            want = np.einsum("j,bjr->br", a.astype(np.int64), codes.astype(np.int64))
            if not np.array_equal(self.dots(codes, a), want):
                return False
        return True


_KERNELS: dict[int, Int8Kernel | None] = {}
_LOCK = threading.Lock()


def int8_kernel(d: int) -> Int8Kernel | None:
    """The integer kernel for d-dimensional rows, checked exact on this CPU once per process; else None."""
    with _LOCK:
        if d not in _KERNELS:
            _KERNELS[d] = _make_kernel(d)
        return _KERNELS[d]


def _make_kernel(d: int) -> Int8Kernel | None:
    from .sessions import SessionFactory

    try:
        session = SessionFactory(device="cpu").create_graph(matmul_integer_model(), "uclip_int8_dots").session
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
