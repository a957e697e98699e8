"""How the export judges a graph it wrote: its outputs against a reference's, row by row.

Two checks use it: `build.py` holds every exported graph against PyTorch's outputs of the same batches
(`verify_tower`: within float32 rounding, PARITY_RULE), and `quantize.py` records each int8 graph's
cosine to its fp32 original. Both need the same few pieces: a session on the file as written, made by
the SessionFactory the export was given (`SessionFactory.create_as_written`: the CPU, no optimised
copy), one run's outputs, and the per-row figures. They live here, below both, so the export's
modules import one way: build -> quantize -> parity, build -> parity. No torch is imported here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from uclip_cli.sessions import OrtModel, SessionFactory

from . import ExportError

# Real-looking text for the parity checks (the export's, and the default model's fusion at assembly):
# several scripts, lengths that force padding, one that truncates.
VERIFY_TEXTS = [
    "A dog runs on the beach.",
    "Dvě kočky spí na červené pohovce vedle okna, zatímco venku prší.",
    "Kaksi lasta leikkii puistossa.",
    "Un bărbat merge cu bicicleta pe o stradă aglomerată din centrul orașului, lângă o cafenea.",
    "Egy piros kanapé.",
    "浜辺を走る犬と、その後ろを歩く二人の子供。",
    "Собака бежит по пляжу.",
    " ".join(["a very long caption about a small wooden boat on a calm lake"] * 20),
]

# ONNX Runtime and PyTorch are two float32 runs: each lies within its float32 rounding bound of the exact
# result (export/rounding.py, per output row), so they may differ by both bounds together.
PARITY_RULE = "|onnx - torch| <= 2 x the float32 rounding bound of each row (uclip_cli/export/rounding.py)"


def graph_session(sessions: SessionFactory, path: Path) -> OrtModel:
    """A CPU session on the graph file at `path` as written, made by `sessions`."""
    return sessions.create_as_written(path)


def onnx_outputs(model: OrtModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return model.run(feeds)   # every bundle graph has exactly one output


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max absolute difference and min / mean cosine between row-matched embeddings."""
    cos = np.sum(reference * candidate, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1) + 1e-12)
    return {"max_abs_diff": float(np.max(np.abs(reference - candidate))),
            "min_cosine": float(np.min(cos)), "mean_cosine": float(np.mean(cos))}


def merge(figures: list[dict[str, float]]) -> dict[str, float]:
    return {"max_abs_diff": max(f["max_abs_diff"] for f in figures),
            "min_cosine": min(f["min_cosine"] for f in figures),
            "mean_cosine": float(np.mean([f["mean_cosine"] for f in figures]))}


def verify_tower(name: str, path: Path, batches: list[dict[str, np.ndarray]],
                 references: list[np.ndarray], bounds: list[np.ndarray], sessions: SessionFactory) -> dict[str, float]:
    """ONNX Runtime against the PyTorch outputs of the same batches; ExportError beyond both rounding bounds.

    `bounds` holds, per reference row, how far a float32 run may lie from the exact result; ONNX Runtime
    is another float32 run, so the two may differ by twice that (PARITY_RULE).
    """
    model = graph_session(sessions, path)
    figures, ratios = [], []
    for feeds, reference, bound in zip(batches, references, bounds):
        got = onnx_outputs(model, feeds)
        if got.shape != reference.shape:
            raise ExportError(f"{name} returns shape {got.shape} where PyTorch returns {reference.shape}: export failed")
        figures.append(compare(reference, got))
        allowed = 2 * np.broadcast_to(bound, reference.shape).astype(np.float64)
        error = np.abs(got.astype(np.float64) - reference)
        ratios.append(float(np.max(error / allowed)))
    merged = merge(figures)
    merged["bound"] = float(max(2 * np.max(b) for b in bounds))
    merged["error_to_bound"] = max(ratios)
    if not merged["error_to_bound"] <= 1.0:
        raise ExportError(f"{name} differs from PyTorch by {merged['max_abs_diff']:.2e}, {merged['error_to_bound']:.0f}x "
                          f"what float32 rounding explains (min cosine {merged['min_cosine']:.6f}): export failed")
    return merged
