"""Fewer, bigger kernels for the multilingual text tower (issue 22, item 3).

PyTorch's exporter writes each transformer layer as dozens of small operators (reshapes, transposes,
adds, the softmax's pieces, LayerNorm's and GELU's arithmetic): a 12-layer MiniLM runs 492-498 kernels
per query, and ONNX Runtime's own load-time optimisations do not merge them. ONNX Runtime's transformer
optimizer (`onnxruntime.transformers.optimizer`, model_type "bert", which also covers XLM-R) rewrites
each layer into its fused contrib kernels: Attention, SkipLayerNormalization (residual add + LayerNorm),
BiasGelu, and EmbedLayerNormalization where the embeddings match: 115-123 kernels per query, 5-8 % less
time per query on an Intel Xeon with AVX-512 VNNI (bench/README.md, bench/bench_text_fusion.py).

The fused graph is kept only if it passes the export's own parity check, the one the unfused graph
passed: its outputs against PyTorch's on the verification texts, within twice the float32 rounding bound
of each row (parity.PARITY_RULE; the bound from perturbed float64 runs, export/rounding.py). Otherwise,
or when the optimizer finds no layer to fuse (another architecture), the unfused graph stays. The
decision depends on the graphs alone, never on a timing, so the same export gives the same bytes.
Without verification (`verify=False`) nothing is fused: there would be no parity check to keep it by.

Quantization (`--quantize`) reads the unfused graph (`UNFUSED`, removed before the bundle is published):
the int8 kernels and the dynamic quantizer know the plain MatMuls, and the int8 towers' figures stay those
the tests and bench measured.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from uclip_cli.sessions import SessionFactory

from . import ExportError
from .parity import verify_tower

UNFUSED = ".unfused"     # staging name of the graph as exported, beside its fused replacement
FUSED_KERNELS = ("Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization", "FastGelu", "Gelu")


def fuse_graph(path: Path, target: Path, *, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Write the transformer-fused graph of `path` to `target`; returns how many of each fused kernel it has
    ({} and nothing written when no layer matched)."""
    from onnxruntime.transformers.optimizer import optimize_model

    quiet = [logging.getLogger(name) for name in ("onnxruntime.transformers", "fusion", "")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        model = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
        fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v and k in FUSED_KERNELS}
        if fused.get("Attention") or fused.get("SkipLayerNormalization"):
            model.save_model_to_file(str(target))
            return fused
        return {}
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def fuse_verified(name: str, path: Path, config: Any, batches: list[dict[str, np.ndarray]],
                  references: list[np.ndarray], bounds: list[np.ndarray], sessions: SessionFactory,
                  log: Callable[[str], Any]) -> dict[str, Any]:
    """Replace the graph at `path` by its fused version when that passes the parity check; the graph as exported
    stays beside it as `path` + UNFUSED. Returns the manifest's record of what was done."""
    fused = path.with_name(path.name + ".fused")
    try:
        kernels = fuse_graph(path, fused, num_heads=int(config.num_attention_heads), hidden_size=int(config.hidden_size))
    except Exception as e:  # noqa: BLE001 - the optimizer does not know this graph: keep it as exported
        fused.unlink(missing_ok=True)
        return {"fused": False, "why": f"the optimizer failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"}
    if not kernels:
        return {"fused": False, "why": "no transformer layer matched the optimizer's patterns"}
    try:
        figures = verify_tower(f"{name} (fused)", fused, batches, references, bounds, sessions)
    except ExportError as e:
        fused.unlink(missing_ok=True)
        log(f"  {name}: fused graph kept out ({e})")
        return {"fused": False, "why": str(e)}
    nodes = {"exported": node_count(path), "fused": node_count(fused)}
    os.replace(path, path.with_name(path.name + UNFUSED))
    os.replace(fused, path)
    log(f"  {name}: fused ({', '.join(f'{k} {v}' for k, v in sorted(kernels.items()))}; {nodes['exported']} -> "
        f"{nodes['fused']} nodes), {figures['error_to_bound']:.3f} of the float32 rounding bound")
    return {"fused": True, "kernels": kernels, "nodes": nodes, "parity": figures}


def unfused(path: Path) -> Path:
    """The graph as exported: `path` itself unless it was fused."""
    original = path.with_name(path.name + UNFUSED)
    return original if original.is_file() else path
