"""Exact search: canonical scores, the float32 pass and the int8 copy give the same top-k on adversarial data."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from uclip_cli.index import exact as search, int8_kernel
from uclip_cli.sessions import SessionFactory
from uclip_cli.index import int8_copy
from uclip_cli.index.exact import exact_scores, top_k, top_k_quantized
from uclip_cli.index.int8_copy import QuantizedRows, quantize_rows, verify_quantized

BLOCK = 64


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 64 rows and the int8 pass from the first block on, so small arrays exercise it."""
    monkeypatch.setattr(search, "QUANT_MIN_ROWS", 0)


CPU = SessionFactory(device="cpu")   # makes the int8 kernel's session


def quantized_copy(vectors: np.ndarray, block: int = BLOCK) -> QuantizedRows:
    blocks = len(vectors) // block
    codes = np.empty((blocks, vectors.shape[1], block), np.int8)
    stats = np.empty((blocks, len(int8_copy.STATS), block), np.float32)
    for b in range(blocks):
        c, s = quantize_rows(vectors[b * block:(b + 1) * block])
        codes[b], stats[b] = c.T, s
    return QuantizedRows(codes, stats)


def brute_force(vectors, query, k, mask=None, min_score=None):
    """The contract, literally: canonical scores of every row, filtered, sorted by (score desc, row asc)."""
    scores = exact_scores(vectors, np.arange(len(vectors)), query)
    keep = ~np.isnan(scores)
    if mask is not None:
        keep &= mask
    if min_score is not None:
        keep &= scores >= min_score
    rows = np.flatnonzero(keep)
    order = np.lexsort((rows, -scores[rows]))[:k]
    return rows[order].tolist(), scores[rows][order]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def adversarial(seed: int, n: int = 6 * BLOCK + 40, d: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Rows crowding around the query's top-k inside the int8 error, exact duplicates across blocks and in
    the uncovered tail, last-bit near-ties, rows at the worst quantisation points, zero and long rows."""
    rng = np.random.default_rng(seed)
    query = unit(rng.standard_normal(d))
    v = unit(rng.standard_normal((n, d)))
    crowd = rng.choice(n, 40, replace=False)
    v[crowd] = unit(query * 0.8 + unit(rng.standard_normal((40, d))) * 0.6 + rng.standard_normal((40, d)) * 1e-3)
    v[rng.choice(n, 8, replace=False)] = v[crowd[0]]               # exact ties with a crowd row (tail included)
    v[-3] = v[crowd[1]]
    for a, b in zip(crowd[2:8], rng.choice(n, 6, replace=False)):  # one-ulp neighbours
        v[b] = v[a]
        j = rng.integers(d)
        v[b, j] = np.nextafter(v[b, j], np.float32(np.inf))
    worst = rng.choice(n, 10, replace=False)                        # components half-way between code levels
    scale = 1 / 127
    v[worst] = (np.floor(rng.uniform(-60, 60, (10, d))) + 0.5) * scale
    v[worst, 0] = 1.0
    v[rng.integers(n)] = 0.0
    v[rng.choice(n, 5, replace=False)] *= 7.5                       # not unit: longer rows
    return v.astype(np.float32), query


def masks_for(v: np.ndarray, query: np.ndarray, rng: np.random.Generator):
    n = len(v)
    best = brute_force(v, query, 5)[0]
    no_best = np.ones(n, bool)
    no_best[best] = False
    return [None, rng.random(n) < 0.7, no_best, rng.random(n) < 0.03]


# ---------------------------------------------------------------------------- canonical scores


def test_canonical_score_of_a_row_does_not_depend_on_the_other_rows():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3000, 77)).astype(np.float32)
    q = rng.standard_normal(77).astype(np.float32)
    whole = exact_scores(v, np.arange(3000), q)
    for _ in range(5):
        rows = np.sort(rng.choice(3000, int(rng.integers(1, 300)), replace=False))
        assert np.array_equal(exact_scores(v[1:], rows[rows > 0] - 1, q).view(np.uint32), whole[rows[rows > 0]].view(np.uint32))
        assert np.array_equal(exact_scores(v, rows, q).view(np.uint32), whole[rows].view(np.uint32))
    # within one float32 ulp of the correctly rounded exact value
    exact = np.array([math.fsum(float(a) * float(b) for a, b in zip(row, q)) for row in v[:200]])
    assert np.all(np.abs(whole[:200] - exact) <= np.spacing(np.abs(exact).astype(np.float32)))


def test_float32_bounds_hold_under_cancellation():
    rng = np.random.default_rng(1)
    d = 64
    v = rng.standard_normal((2000, d)).astype(np.float32)
    v[:, :32] *= 1e4
    v[:, 32:] = -v[:, :32] + rng.standard_normal((2000, 32)).astype(np.float32)   # huge products cancel
    q = np.ones(d, np.float32)
    scores = exact_scores(v, np.arange(2000), q)
    for rows, low, high in search._float32_bounds(v, q, None, 512):
        assert np.all(low <= scores[rows]) and np.all(scores[rows] <= high)


# ---------------------------------------------------------------------------- float32 pass


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_is_the_contract_on_adversarial_data(seed: int):
    v, q = adversarial(seed)
    rng = np.random.default_rng(seed)
    for mask in masks_for(v, q, rng):
        seventh = float(brute_force(v, q, 7, mask)[1][-1])
        for min_score in (None, seventh, 10.0):
            for k in (1, 10, 50, len(v) + 5):
                rows, scores = top_k(v, q, k, mask=mask, min_score=min_score, chunk_rows=100)
                want_rows, want_scores = brute_force(v, q, k, mask, min_score)
                assert rows.tolist() == want_rows
                assert np.array_equal(scores.view(np.uint32), want_scores.view(np.uint32))
                assert rows.dtype == np.int64 and scores.dtype == np.float32


def test_top_k_ties_at_min_score_and_rows_that_are_not_finite():
    v = np.array([[1, 0], [1, 0], [0.5, 0], [np.nan, 0], [np.inf, 0], [2, 0]], np.float32)
    q = np.array([1, 0], np.float32)
    rows, scores = top_k(v, q, 10, min_score=1.0)
    assert rows.tolist() == [4, 5, 0, 1] and scores.tolist() == [np.inf, 2, 1, 1]
    assert top_k(v, q, 0)[0].size == 0
    assert top_k(v, q, 3, mask=np.zeros(len(v), bool))[0].size == 0
    assert top_k(v, np.zeros(2, np.float32), 3)[0].tolist() == [0, 1, 2]   # all scores 0 (NaN rows excluded)


# ---------------------------------------------------------------------------- int8 copy


def test_quantised_rows_carry_true_bounds():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((500, 40)).astype(np.float32) * rng.uniform(1e-3, 1e3, (500, 1)).astype(np.float32)
    v[7] = 0
    codes, stats = quantize_rows(v)
    scale, colsum, err, norm = stats
    approx = codes.astype(np.float64) * scale.astype(np.float64)[:, None]
    assert np.abs(codes).max() <= 127 and np.array_equal(colsum, codes.sum(axis=1))
    assert np.all(err >= np.linalg.norm(v.astype(np.float64) - approx, axis=1))
    assert np.all(norm >= np.linalg.norm(v.astype(np.float64), axis=1))
    assert np.all(norm >= np.linalg.norm(approx, axis=1))
    assert np.all(err <= scale * np.sqrt(40) * 0.51)   # within half a code step per component
    assert err[7] == norm[7] == np.float32(2.0 ** -126) and np.all(codes[7] == 0)


def test_int8_bounds_hold_for_every_row():
    v, q = adversarial(4)
    copy = quantized_copy(v)
    _, (_, _, err, norm) = quantize_rows(v)
    kernel = int8_kernel.int8_kernel(v.shape[1], CPU)
    assert kernel is not None, "onnxruntime's integer kernel should be exact on this CPU"
    for query in (q, q * 1e3, q * 1e-3, np.where(np.arange(len(q)) == 3, 50.0, q).astype(np.float32)):
        rows, low, high, bad = search._int8_bounds(copy, kernel, query, 10**6, None, None)   # k above the rows: keep all
        assert rows.tolist() == list(range(copy.rows))
        scores = exact_scores(v, rows, query)
        assert np.all(low <= scores) and np.all(scores <= high)
        # no wider than quantising the row and the query demands: ||v - v^|| ||q|| + ||v|| ||q - q^||, where
        # ||q - q^|| <= sqrt(d) s_q / 2 and s_q = max|q| / half range (63 or 127, by what this CPU's kernel does exactly)
        q_norm, q_step = float(np.linalg.norm(query)), float(np.abs(query).max()) / kernel.half_range
        needed = err[rows] * q_norm + norm[rows] * np.sqrt(len(query)) * q_step / 2
        assert np.all(high - low <= 2 * needed * (1 + 2.0 ** -18) + 2.0 ** -100)
        if np.abs(query).max() < 0.5 * q_norm:     # a spread query: the bounds are tight in absolute terms too
            assert np.median(high - low) < 0.05 * q_norm


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_int8_path_equals_the_float32_pass_on_adversarial_data(seed: int):
    v, q = adversarial(seed)
    copy = quantized_copy(v)
    rng = np.random.default_rng(seed)
    for query in (q, q * 3, unit(q + rng.standard_normal(len(q)).astype(np.float32) * 0.3)):
        for mask in masks_for(v, query, rng):
            sparse = mask is not None and mask.mean() < search.QUANT_SPARSE_SHARE
            seventh = float(brute_force(v, query, 7, mask)[1][-1])
            for min_score in (None, seventh, 10.0):
                for k in (1, 10, 60):
                    info: dict = {}
                    rows, scores = top_k_quantized(v, copy, query, k, mask=mask, min_score=min_score, info=info, sessions=CPU)
                    want_rows, want_scores = top_k(v, query, k, mask=mask, min_score=min_score)
                    assert info["path"] == ("float32" if sparse else "int8")
                    assert rows.tolist() == want_rows.tolist()
                    assert np.array_equal(scores.view(np.uint32), want_scores.view(np.uint32))


def test_int8_path_rescoring_stays_small_and_covers_the_tail():
    rng = np.random.default_rng(8)
    v = unit(rng.standard_normal((20 * BLOCK + 50, 64)))
    q = unit(rng.standard_normal(64))
    v[-1] = q                                   # the best row lies past the int8 copy
    copy = quantized_copy(v)
    info: dict = {}
    rows, _ = top_k_quantized(v, copy, q, 10, info=info, sessions=CPU)
    assert rows[0] == len(v) - 1 and rows.tolist() == brute_force(v, q, 10)[0]
    assert info == {"path": "int8", "candidates": info["candidates"], "rescored": info["rescored"]}
    assert 10 <= info["rescored"] <= info["candidates"] < len(v) / 10


def test_candidates_bounded_again_in_float32_leave_about_k_rows_to_rescore():
    """The int8 bounds leave more than k candidates to re-score; their float32 products (bounds ~100x
    tighter) leave k or barely more, with the float32 pass's result."""
    rng = np.random.default_rng(18)
    v = unit(rng.standard_normal((20000, 64)))
    copy = quantized_copy(v)
    for _ in range(5):
        q = unit(rng.standard_normal(64))
        info: dict = {}
        rows, scores = top_k_quantized(v, copy, q, 10, info=info, sessions=CPU, path="int8")
        want = top_k(v, q, 10)
        assert rows.tolist() == want[0].tolist() and scores.tolist() == want[1].tolist()
        assert info["rescored"] <= 12, info        # 25 re-scored by the int8 bounds alone here


def test_a_float32_row_contradicting_its_int8_bounds_is_left_out_as_damaged():
    """A row whose float32 bytes were changed after its int8 copy was made: its float32 bounds and its int8
    bounds do not meet, so it is damaged, left out and reported; the answer is the one without it."""
    rng = np.random.default_rng(19)
    v = unit(rng.standard_normal((4000, 64)))
    q = unit(rng.standard_normal(64))
    copy = quantized_copy(v)
    best = int(brute_force(v, q, 1)[0][0])
    damaged = v.copy()
    damaged[best] = -v[best]                           # its int8 copy says it is the best row
    info: dict = {}
    rows, _ = top_k_quantized(damaged, copy, q, 10, info=info, sessions=CPU, path="int8")
    assert info["damaged"] == [best]
    keep = np.ones(len(v), bool)
    keep[best] = False
    assert rows.tolist() == brute_force(damaged, q, 10, mask=keep)[0]


def test_int8_path_falls_back_where_it_cannot_help():
    v, q = adversarial(9)
    copy = quantized_copy(v)
    for query, k in ((np.zeros_like(q), 5), (np.full_like(q, np.nan), 5), (q, 0)):
        info: dict = {}
        rows, scores = top_k_quantized(v, copy, query, k, info=info, sessions=CPU)
        assert info["path"] == "float32"
        assert rows.tolist() == brute_force(v, query, k)[0]
    for mask in (np.zeros(len(v), bool), np.arange(len(v)) >= copy.rows):   # nothing, or only the tail
        rows, _ = top_k_quantized(v, copy, q, 5, mask=mask, sessions=CPU)
        assert rows.tolist() == brute_force(v, q, 5, mask)[0]
    with pytest.raises(ValueError, match="covers"):
        top_k_quantized(v[:BLOCK], copy, q, 3, sessions=CPU)


def test_blocks_quantised_at_once_are_the_blocks_quantised_one_by_one():
    v, _ = adversarial(11)
    v = v[:5 * BLOCK]
    together = int8_copy.quantize_blocks(v, BLOCK)
    one_by_one = [int8_copy.quantize_block(v[b * BLOCK:(b + 1) * BLOCK]) for b in range(5)]
    for part in range(3):                                    # codes, statistics, check records
        assert together[part] == b"".join(block[part] for block in one_by_one)
    with pytest.raises(ValueError, match="whole blocks"):
        int8_copy.quantize_blocks(v[:BLOCK + 1], BLOCK)


@pytest.mark.parametrize("block", [BLOCK, 1 << 16])
def test_check_sums_are_the_exact_sums_of_every_blocks_products(block):
    """Narrow blocks sum in int32 (no sum can reach 2^31), wide ones in int64: both are the exact sums."""
    rng = np.random.default_rng(block)
    d = 512
    codes = np.where(rng.random((2, d, block)) < 0.5, np.int8(-127), np.int8(127))   # the largest sums there are
    codes[1] = 127
    stats = np.ones((2, len(int8_copy.STATS), block), np.float32)
    copy = QuantizedRows(codes, stats, int8_copy.blocks_checks(codes, stats))
    shifted = np.full(d, 254, np.uint8)
    want = np.einsum("j,bjr->b", shifted.astype(np.int64), codes.astype(np.int64))
    got = copy.check_sums(shifted)
    assert got.dtype == (np.int32 if block == BLOCK else np.int64)
    assert got.tolist() == want.tolist()
    kernel = int8_kernel.int8_kernel(d, CPU)      # the search's way: the kernel sums the records' base-128 digits
    shifted = np.full(d, 2 * kernel.half_range, np.uint8)
    want = np.einsum("j,bjr->b", shifted.astype(np.int64), codes.astype(np.int64))
    assert copy.check_sums(shifted, kernel).tolist() == want.tolist()
    assert copy.check_digits().shape[2] <= (3 if block == BLOCK else 4) * 2


def test_check_sums_by_the_kernel_match_numpys_on_random_and_signed_records():
    """Digits of negative, zero and mixed sums, a random query: the kernel's sums equal numpy's exactly."""
    rng = np.random.default_rng(7)
    d, blocks = 96, 37
    codes = rng.integers(-127, 128, (blocks, d, BLOCK), dtype=np.int8)
    codes[3] = -127
    codes[4] = 0
    stats = np.ones((blocks, len(int8_copy.STATS), BLOCK), np.float32)
    copy = QuantizedRows(codes, stats, int8_copy.blocks_checks(codes, stats))
    kernel = int8_kernel.int8_kernel(d, CPU)
    shifted = rng.integers(0, 2 * kernel.half_range + 1, d).astype(np.uint8)
    assert copy.check_sums(shifted, kernel).tolist() == copy.check_sums(shifted).tolist()


@pytest.mark.parametrize("min_score", [None, 0.2])
def test_rescoring_stops_early_with_the_same_result(monkeypatch, min_score):
    """Re-scoring by highest upper bound first and stopping below the k-th score found gives the result of
    re-scoring every candidate: ties at the k-th score across chunks, rows whose bound is NaN, a damaged row."""
    monkeypatch.setattr(search, "RESCORE_ROWS", 8)
    v, query = adversarial(12)
    rows = np.arange(len(v))
    scores = exact_scores(v, rows, query).astype(np.float64)
    width = np.random.default_rng(12).uniform(1e-3, 0.2, len(v))
    _, first, count = np.unique(scores, return_index=True, return_counts=True)
    width[np.isin(scores, scores[first[count > 1]])] = 0.0  # tied rows: bounds as tight as they get (high == score)
    low, high = scores - width, scores + width
    low[5], high[5] = np.nan, np.nan                       # proves nothing
    v = v.copy()
    v[7] = -v[7]                                           # damaged: outside its (intact) bounds
    low[7], high[7] = 1.5, 2.0                             # ... and bounds that put it first
    for k in (1, 5, 17, 60):
        found: list[int] = []
        got = search.rank_exactly(v, query, k, rows, min_score, bounds=(low, high), damaged=found)
        keep = np.ones(len(v), bool)
        keep[7] = False
        want = brute_force(v, query, k, keep, min_score)
        assert got[0].tolist() == want[0] and 7 in found


def test_rescoring_stops_only_below_the_kth_score(monkeypatch):
    """A row tied with the k-th score found, whose upper bound is that score exactly, is still re-scored: on
    a tie the lower row ranks first."""
    monkeypatch.setattr(search, "RESCORE_ROWS", 2)
    query = np.array([1.0, 0.0], np.float32)
    v = unit(np.array([[0.1, 1.0], [0.5, 0.6], [0.9, 0.1], [0.5, 0.6], [0.2, 1.0], [0.1, 1.0]]))
    scores = exact_scores(v, np.arange(6), query).astype(np.float64)
    high = np.array([scores[0] + 0.01, scores[1], scores[2] + 0.1, scores[3] + 0.1, scores[4], scores[5]])
    rows, _ = search.rank_exactly(v, query, 2, np.arange(6), None, bounds=(scores - 0.1, high))
    assert rows.tolist() == [2, 1]               # row 1 (re-scored after rows 2 and 3) ties row 3 and ranks first


def test_verify_finds_the_first_damaged_block():
    v, _ = adversarial(10)
    copy = quantized_copy(v)
    assert verify_quantized(copy, v, spacing=BLOCK) == copy.codes.shape[0]
    copy.codes[3, :, -1] = 0                    # a zero-filled end of block 3
    assert verify_quantized(copy, v, spacing=BLOCK) == 3
    assert verify_quantized(copy, v, spacing=2 * BLOCK) == 2      # checked in pairs of blocks: from block 2 on
    assert verify_quantized(copy, v, spacing=4 * BLOCK) == 0      # blocks 0-3 as one group, which ends there
    assert verify_quantized(copy, v, spacing=8 * BLOCK) == 6      # one group of all 6, ending elsewhere: unseen here
                                                                  # (the per-search check records catch it)
    copy = quantized_copy(v)
    copy.stats[2, 2, 10] = np.nan               # a statistic the spot check would not read
    assert verify_quantized(copy, v) == 2
    assert verify_quantized(quantized_copy(v), v * 2) == 0   # built from other vectors


class SaturatingSession:
    """Adds pairs of uint8 x int8 products in 16-bit saturating lanes, as some CPUs' kernels do."""

    def run(self, _outputs, feeds):
        a = feeds["a"].reshape(-1).astype(np.int64)
        codes = feeds["codes"].astype(np.int64)
        products = a[None, :, None] * codes
        if len(a) % 2:
            products = np.concatenate([products, np.zeros_like(products[:, :1])], axis=1)
        pairs = np.clip(products[:, 0::2] + products[:, 1::2], -32768, 32767)
        return [pairs.sum(axis=1)[:, None, :].astype(np.int32)]


def test_kernel_check_lowers_the_query_range_on_saturating_cpus():
    assert not int8_kernel.Int8Kernel(SaturatingSession(), 127).exact_on(48)
    assert int8_kernel.Int8Kernel(SaturatingSession(), 63).exact_on(48)
    assert int8_kernel.int8_kernel(48, CPU).exact_on(48)


def test_kernel_graph_is_valid_onnx():
    import onnx

    model = onnx.load_from_string(int8_kernel.matmul_integer_model())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["MatMulInteger"]
    assert [i.name for i in model.graph.input] == ["a", "codes"]


# ---------------------------------------------------------------------------- which pass this CPU runs faster


def test_the_faster_pass_is_chosen_from_measured_times():
    choose = int8_kernel.choose
    assert choose({"int8": 0.170, "float32": 0.085}) == "float32"   # Xeon with AMX (issue 11): no integer GEMV
    assert choose({"int8": 0.034, "float32": 0.190}) == "int8"      # AVX2 / AVX-512 VNNI: the GEMV reads 1/4 of the bytes
    assert choose({"int8": 0.05, "float32": 0.05}) == "int8"
    assert choose({"float32": 0.05}) == "float32"                   # no exact integer kernel here
    assert choose({"int8": float("nan"), "float32": 0.05}) == "float32"


def test_the_choice_is_measured_once_per_machine_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(int8_kernel.PATH_ENV, raising=False)
    monkeypatch.setattr(int8_kernel, "_CHOSEN", {})
    calls = []

    def measure(d):
        calls.append(d)
        return {"int8": 0.2, "float32": 0.1}

    assert int8_kernel.preferred_path(48, measure) == "float32" and calls == [48]
    assert int8_kernel.preferred_path(48, measure) == "float32" and calls == [48]        # in this process
    monkeypatch.setattr(int8_kernel, "_CHOSEN", {})
    assert int8_kernel.preferred_path(48, lambda d: pytest.fail("measured again")) == "float32"   # from the file
    remembered = json.loads((tmp_path / "cache" / "uclip" / int8_kernel.CALIBRATION_FILE).read_text())
    (key, value), = remembered.items()
    assert key == int8_kernel.machine_key(48) and "d 48" in key and "ort " in key
    assert value == {"path": "float32", "seconds": {"int8": 0.2, "float32": 0.1}}
    assert int8_kernel.preferred_path(64, lambda d: {"int8": 0.1, "float32": 0.3}) == "int8"      # another d
    monkeypatch.setenv(int8_kernel.PATH_ENV, "int8")
    assert int8_kernel.preferred_path(48, lambda d: pytest.fail("forced")) == "int8"


def test_a_large_copy_takes_the_pass_this_machine_runs_faster_with_the_same_result(monkeypatch):
    rows = search.CALIBRATE_FROM_ROWS
    rng = np.random.default_rng(11)
    v = unit(rng.standard_normal((rows, 16)))
    copy = quantized_copy(v, block=4096)
    q = v[77]
    monkeypatch.setattr(int8_kernel, "preferred_path", lambda d, measure: "int8")
    monkeypatch.setattr(search, "preferred_path", lambda d, measure: "float32")
    info: dict = {}
    rows_f, scores_f = top_k_quantized(v, copy, q, 5, info=info, sessions=CPU)
    assert info["path"] == "float32"
    monkeypatch.setattr(search, "preferred_path", lambda d, measure: "int8")
    info = {}
    rows_i, scores_i = top_k_quantized(v, copy, q, 5, info=info, sessions=CPU)
    assert info["path"] == "int8" and rows_i.tolist() == rows_f.tolist() and np.array_equal(scores_i, scores_f)


def test_calibration_times_both_whole_passes_on_this_cpu():
    seconds = search.measure_passes(32, CPU, rows=2 * 8192)
    assert set(seconds) == {"int8", "float32"} and all(0 < s < 10 for s in seconds.values())
    assert search.measure_passes(32, None, rows=8192)["int8"] == float("inf")    # no kernel: int8 never wins


def test_the_int8_kernel_is_made_by_the_callers_factory_on_the_cpu_with_its_threads(monkeypatch):
    """`uclip query --threads 1 --device auto`: the search kernel's session is the caller's, pinned to the CPU."""
    made = []
    real = SessionFactory.create_graph

    def recording(self, graph, name):
        made.append((name, self.device, self.threads))
        return real(self, graph, name)

    monkeypatch.setattr(SessionFactory, "create_graph", recording)
    monkeypatch.setattr(int8_kernel, "_KERNELS", {})
    assert int8_kernel.int8_kernel(48, SessionFactory(device="auto", threads=1)).exact_on(48)
    assert int8_kernel.int8_kernel(48, SessionFactory(device="auto", threads=2)).exact_on(48)
    assert made == [("uclip_int8_dots", "cpu", 1), ("uclip_int8_dots", "cpu", 2)]
    assert int8_kernel.int8_kernel(48, SessionFactory(device="cpu", threads=1)) is not None and len(made) == 2  # kept
    assert int8_kernel.int8_kernel(48, None) is None       # no factory: no session made, the float32 pass answers
    v = unit(np.random.default_rng(3).standard_normal((4 * BLOCK, 48)))
    info: dict = {}
    rows, _ = top_k_quantized(v, quantized_copy(v), v[5], 3, info=info)
    assert info["path"] == "float32" and rows[0] == 5 and len(made) == 2


def test_a_damaged_row_quantises_without_numpy_warnings_and_its_bounds_are_not_finite():
    """`uclip check --repair` printed numpy's "invalid value encountered in cast" (issue 19, item 8)."""
    import warnings

    v = unit(np.random.default_rng(4).standard_normal((4, 16)))
    v[1, 3], v[2, 5] = np.nan, np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes, stats = quantize_rows(v)
    assert codes[1, 3] == 0 and codes[2, 5] == 0 and not np.isfinite(stats[2, 1:3]).all()
    assert np.isfinite(stats[:, 0]).all() and np.isfinite(stats[:, 3]).all()
