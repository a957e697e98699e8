"""Memory-based soft retrieval (method.md, step 2), exact and streaming.

    target(q) = normalise( Σ_j softmax_j(⟨q, m_j⟩ / τ) · m_j )   over the whole memory

The memory is visited in blocks of rows; an online log-sum-exp keeps, per query, the running
maximum logit, the running sum of exp(logit - max) and the running weighted sum of rows, so no
[queries x memory] matrix is ever built and RAM stays bounded by one [query_chunk x memory_chunk]
block. Because the encoders are frozen and retrieval has no gradient, the targets are computed
once (`precompute_targets`) and reused by every epoch.

The top-k variant keeps, per query, only the k largest logits over the whole memory (streamed
the same way) and also the exact normaliser, so it reports the softmax mass its k rows capture.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import ProgressEvent, ProgressFn

ArrayLike = np.ndarray | torch.Tensor


def _as_float_tensor(block: ArrayLike, device: torch.device) -> torch.Tensor:
    if isinstance(block, np.ndarray):
        block = torch.from_numpy(np.array(block, dtype=np.float32, copy=True))  # memmap slices are read-only
    return block.to(device=device, dtype=torch.float32)


def _normalise_(x: torch.Tensor) -> torch.Tensor:
    """In-place L2 normalisation of rows (F.normalize semantics, without a second block in RAM)."""
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12))


def _memory_blocks(memory: ArrayLike, chunk: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, L2-normalised float32 block) over the memory; the caller drops a block before the next."""
    for start in range(0, memory.shape[0], chunk):
        block = memory[start:start + chunk]
        fresh = isinstance(block, np.ndarray) or block.device != device or block.dtype != torch.float32
        block = _as_float_tensor(block, device)
        yield start, (_normalise_(block) if fresh else F.normalize(block, dim=-1))


class _ExactState:
    """Online log-sum-exp accumulation of softmax-weighted memory rows."""

    def __init__(self, n: int, d: int, device: torch.device):
        self.max = torch.full((n,), float("-inf"), device=device)
        self.sum = torch.zeros(n, device=device)
        self.acc = torch.zeros(n, d, device=device)

    def update(self, rows: slice, logits: torch.Tensor, block: torch.Tensor, start: int) -> None:
        new_max = torch.maximum(self.max[rows], logits.max(dim=1).values)
        rescale = torch.exp(self.max[rows] - new_max)
        weights = logits.sub_(new_max[:, None]).exp_()          # in place: logits are not needed again
        self.sum[rows] = self.sum[rows] * rescale + weights.sum(dim=1)
        self.acc[rows] = self.acc[rows] * rescale[:, None] + weights @ block
        self.max[rows] = new_max

    def finish(self, memory: ArrayLike, query_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.acc, dim=-1), torch.ones_like(self.sum)


class _TopkState:
    """Running top-k logits and their memory rows, plus the exact normaliser (for the captured mass)."""

    def __init__(self, n: int, k: int, device: torch.device):
        self.k = k
        self.values = torch.full((n, k), float("-inf"), device=device)
        self.index = torch.zeros((n, k), dtype=torch.long, device=device)
        self.max = torch.full((n,), float("-inf"), device=device)
        self.sum = torch.zeros(n, device=device)

    def update(self, rows: slice, logits: torch.Tensor, block: torch.Tensor, start: int) -> None:
        local = logits.topk(min(self.k, logits.shape[1]), dim=1)
        values = torch.cat([self.values[rows], local.values], dim=1)
        index = torch.cat([self.index[rows], local.indices + start], dim=1)
        best = values.topk(self.k, dim=1)
        self.values[rows] = best.values
        self.index[rows] = index.gather(1, best.indices)
        new_max = torch.maximum(self.max[rows], logits.max(dim=1).values)
        self.sum[rows] = self.sum[rows] * torch.exp(self.max[rows] - new_max) + \
            logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        self.max[rows] = new_max

    def finish(self, memory: ArrayLike, query_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, device = self.values.shape[0], self.values.device
        out, mass = [], torch.empty(n, device=device)
        for r0 in range(0, n, query_chunk):
            rows = slice(r0, r0 + query_chunk)
            values, index = self.values[rows], self.index[rows]
            weights = torch.softmax(values, dim=1)               # -inf (memory smaller than k) -> weight 0
            picked = index.flatten().cpu().numpy()
            vectors = F.normalize(_as_float_tensor(memory[picked], device), dim=-1).view(*index.shape, -1)
            out.append(F.normalize(torch.einsum("nk,nkd->nd", weights, vectors), dim=-1))
            mass[rows] = torch.exp(values - self.max[rows, None]).sum(dim=1) / self.sum[rows]
        return torch.cat(out), mass


def _retrieve(queries: torch.Tensor, memory: ArrayLike, tau: float, *, query_chunk: int, memory_chunk: int,
              topk: int | None, progress: ProgressFn | None, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, device = queries.shape[0], queries.device
    if memory.shape[0] == 0:
        raise ValueError("soft retrieval needs a non-empty memory")
    if memory.shape[1] != queries.shape[1]:
        raise ValueError(f"queries are {queries.shape[1]}-d but the memory is {memory.shape[1]}-d")
    queries = F.normalize(queries.float(), dim=-1)
    state = _ExactState(n, queries.shape[1], device) if topk is None else _TopkState(n, topk, device)
    started = time.perf_counter()
    for start, block in _memory_blocks(memory, memory_chunk, device):
        for r0 in range(0, n, query_chunk):
            rows = slice(r0, r0 + query_chunk)
            logits = (queries[rows] @ block.T).div_(tau)
            state.update(rows, logits, block, start)
            del logits
        done = start + block.shape[0]
        del block                      # before the generator reads the next one: one block in RAM at a time
        if progress:
            progress(ProgressEvent(stage, done, memory.shape[0], done / max(time.perf_counter() - started, 1e-9), "rows"))
    return state.finish(memory, query_chunk)


@torch.no_grad()
def soft_retrieve(queries: torch.Tensor, memory: ArrayLike, tau: float, *, memory_chunk: int | None = None,
                  topk: int | None = None) -> torch.Tensor:
    """normalise(softmax(q mᵀ/τ) m) for a batch of queries; memory_chunk=None reads the memory as one block."""
    chunk = memory_chunk or memory.shape[0]
    targets, _ = _retrieve(queries, memory, tau, query_chunk=max(queries.shape[0], 1), memory_chunk=chunk,
                           topk=topk, progress=None, stage="retrieve")
    return targets


@torch.no_grad()
def precompute_targets(queries: ArrayLike, memory: ArrayLike, tau: float, *, query_chunk: int = 1024,
                       memory_chunk: int = 32768, topk: int | None = None, device: str | torch.device = "cpu",
                       progress: ProgressFn | None = None, stage: str = "retrieve",
                       return_mass: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Soft-retrieval target of every query, [N, d] float32, reading the memory once, block by block.

    Extra RAM: the output and per-query state ([N, d] + 2 [N]) plus one [query_chunk, memory_chunk]
    logits block and one [memory_chunk, d] memory block. `memory` may be a numpy memmap.
    With return_mass, also the softmax mass each target keeps (1 for exact; < 1 with top-k).
    """
    device = torch.device(device)
    q = _as_float_tensor(queries, device)
    targets, mass = _retrieve(q, memory, tau, query_chunk=query_chunk, memory_chunk=memory_chunk, topk=topk,
                              progress=progress, stage=stage)
    targets_np = targets.cpu().numpy()
    return (targets_np, mass.cpu().numpy()) if return_mass else targets_np


# ---------------------------------------------------------------- per-language retrieval (issue 13)

def balanced_languages(n_queries: int, codes: np.ndarray, seed: int) -> np.ndarray:
    """The language each query retrieves from: every code in turn over a seeded shuffle of the queries,
    so each language gets n_queries / len(codes) queries (within one)."""
    codes = np.asarray(codes)
    order = np.random.default_rng(seed).permutation(n_queries)
    assigned = np.empty(n_queries, dtype=codes.dtype)
    assigned[order] = codes[np.arange(n_queries) % len(codes)]
    return assigned


def _rows_of(memory: ArrayLike, rows: np.ndarray) -> ArrayLike:
    """memory[rows] as a view when the rows are one contiguous range (a memmap stays on disk), else a copy."""
    if rows[-1] - rows[0] == len(rows) - 1:
        return memory[int(rows[0]):int(rows[-1]) + 1]
    return np.asarray(memory[rows]) if isinstance(memory, np.ndarray) else memory[torch.from_numpy(rows)]


@torch.no_grad()
def precompute_targets_per_language(queries: ArrayLike, memory: ArrayLike, memory_language: np.ndarray, tau: float, *,
                                    seed: int = 0, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft retrieval within one language's memory per query, languages balanced across the queries.

    One mixed softmax over all languages lets the language whose mean sits nearest the query's
    language win most of the weight (each language's rows share an offset), so the pseudo foreign
    texts of English anchors come mostly from one or two languages. Here query i retrieves only from
    the rows of language assigned[i] (balanced_languages), so every language supplies the same share
    of pseudo texts. Same cost as the mixed retrieval or less (each query visits one language's rows).
    Returns (targets [N, d], softmax mass kept [N] (1 when exact), assigned language [N]).
    kwargs: as precompute_targets (query_chunk, memory_chunk, topk, device, progress, stage).
    """
    labels = np.asarray(memory_language)
    codes = np.unique(labels)
    assigned = balanced_languages(queries.shape[0], codes, seed)
    targets = np.empty((queries.shape[0], memory.shape[1]), dtype=np.float32)
    mass = np.ones(queries.shape[0], dtype=np.float32)
    for code in codes:
        picked = np.flatnonzero(assigned == code)
        if len(picked) == 0:
            continue
        t, m = precompute_targets(queries[picked], _rows_of(memory, np.flatnonzero(labels == code)), tau,
                                  return_mass=True, **kwargs)
        targets[picked], mass[picked] = t, m
    return targets, mass, assigned
