"""The default model's multilingual tower, fused on the machine that assembles it (issue 22, item 3).

`uclip export` fuses the multilingual tower it writes (export/fuse.py: ONNX Runtime's transformer
optimizer turns each layer's attention, residual + LayerNorm and bias + GELU into single kernels, 498 ->
123 kernels per query, 4-8 % less time per query: bench/README.md) and keeps the fused graph only within
float32 rounding of the exact result. The default model's tower is not exported but published
(paraphrase-multilingual-MiniLM-L12-v2's onnx/model.onnx, unfused as optimum writes it), and the
machine that assembles it has no torch to compute an exact result with. So assembly (assemble.py)
fuses the downloaded graph with the same optimizer and holds both graphs against the published
graph's own float64 result and float32 rounding bound (onnx_rounding.py), on the export's
verification texts (export/parity.py: seven scripts padded into one batch, then one text alone; not the
one the tokenizer truncates to 128 tokens, which would triple the float64 work and test nothing a
40-token text does not), token embeddings compared where a token is real (padding is never pooled):

- the published graph, run in float32 as queries run it, must lie within the rule (onnx_rounding's
  PARITY_RULE); if it does not, the bound is not trusted for this graph and nothing is fused;
- the fused graph must take the same inputs, give the same output and lie within the rule too;
- every layer's attention must be fused (one Attention per two SkipLayerNormalization): a graph exported
  with PyTorch's scaled-dot-product attention fuses only its LayerNorms and GELUs, and that graph ran 8 %
  slower than as published, where a fully fused one ran 4.5 % faster (2-core AVX2, 17 tokens:
  bench/README.md);

and then it replaces the published file in the bundle. The manifest keeps the published file's
sha256 (`export.assembled.files`) and records what was done (`export.assembled.fusion`: the kernels,
node counts and parity figures, or why the published graph stayed). The decision depends on the graphs
alone, never on a timing, so the same download assembles the same bundle on every machine.

Needs the `onnx` package (the optimizer and the float64 graph are built with it) and `sympy` (the
optimizer's shape inference; onnxruntime does not install it): the cpu and gpu extras install both.
Without them the published graph stays and the log says what to install.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import bundle as B
from .families import GraphIO

Log = Callable[[str], Any]
FUSED_SUFFIX = ".fused"


def fuse_published_tower(path: Path, tokenizer: Path, settings: B.TokenizerSettings, io: GraphIO, sessions,
                         log: Log, *, shape: dict[str, int] | None = None) -> dict[str, Any]:
    """Replace the graph at `path` by its fused version when it passes (module docstring); returns the
    manifest's record of what was done: {"fused": True, "kernels", "nodes", "parity"} or {"fused": False, "why"}.
    `shape`: the transformer's num_attention_heads and hidden_size (its config.json), which the optimizer's
    attention fusion needs where it cannot read them off the graph."""
    shape = shape or {}
    try:
        import onnx  # noqa: F401 - the optimizer and onnx_rounding need it
        import sympy  # noqa: F401 - the optimizer's shape inference needs it (onnxruntime does not install it)
        from onnxruntime.transformers import optimizer  # noqa: F401
    except ImportError as e:
        missing = (e.name or "onnx").split(".")[0]
        log(f"note: the multilingual tower stays unfused (queries about 5 % slower): the {missing} package is missing; "
            "`pip install onnx sympy` before the default model is assembled fuses it")
        return {"fused": False, "why": f"the {missing} package is not installed (pip install onnx sympy)"}
    from .export.fuse import fuse_graph, node_count
    from .onnx_rounding import Unmodelled, release_memory

    fused = path.with_name(path.name + FUSED_SUFFIX)
    try:
        try:
            kernels = fuse_graph(path, fused, num_heads=shape.get("num_attention_heads", 0),
                                 hidden_size=shape.get("hidden_size", 0))     # 0: the optimizer reads them off the graph
        except Exception as e:  # noqa: BLE001 - the optimizer does not know this graph: keep it as published
            return _kept(f"the optimizer failed: {_first_line(e)}", log)
        release_memory()
        if not kernels:
            return _kept("no transformer layer matched the optimizer's patterns", log)
        layers, attention = kernels.get("SkipLayerNormalization", 0) // 2, kernels.get("Attention", 0)
        if attention < max(layers, 1):
            return _kept(f"the optimizer fused the attention of {attention} of its {layers} layers (a graph fused "
                         "but for its attention ran 8 % slower than as published)", log)
        try:
            if sessions.inspect(fused) != sessions.inspect(path):
                return _kept("the fused graph's inputs or outputs differ from the published graph's", log)
            parity = _parity(path, fused, tokenizer, settings, io, sessions)
        except Unmodelled as e:
            return _kept(f"no float32 rounding bound for its op {e}", log)
        except Exception as e:  # noqa: BLE001 - a check that cannot run (memory, a missing float64 kernel) proves nothing
            return _kept(f"the check could not run ({_first_line(e)})", log)
        if parity["published"] > 1:
            return _kept(f"the published graph itself lies {parity['published']:.1f}x outside its float32 rounding "
                         "bound here: the bound is not trusted for it", log)
        if parity["fused"] > 1:
            return _kept(f"the fused graph differs from the published graph's exact result by {parity['fused']:.1f}x "
                         "what float32 rounding explains", log)
        nodes = {"published": node_count(path), "fused": node_count(fused)}
        os.replace(fused, path)
    finally:
        fused.unlink(missing_ok=True)
    log(f"  multilingual tower fused ({', '.join(f'{k} {v}' for k, v in sorted(kernels.items()))}; {nodes['published']} -> "
        f"{nodes['fused']} nodes), {parity['fused']:.2g} of what float32 rounding allows")
    return {"fused": True, "kernels": kernels, "nodes": nodes, "parity": {
        "rule": _rule(), "error_to_bound": {"published": round(parity["published"], 6), "fused": round(parity["fused"], 6)}}}


def _parity(published: Path, fused: Path, tokenizer: Path, settings: B.TokenizerSettings, io: GraphIO,
            sessions) -> dict[str, float]:
    """The largest error-to-allowance ratio of each graph over the verification batches."""
    from .export.parity import VERIFY_TEXTS
    from .onnx_rounding import Reference, error_to_bound, release_memory
    from .text import TextTokenizer

    tokenize = TextTokenizer(tokenizer, settings)
    ids = np.int32 if io.ids == "int32" else np.int64
    batches = []
    for texts in (VERIFY_TEXTS[:-1], VERIFY_TEXTS[1:2]):     # not the one that truncates: module docstring
        tokens = tokenize(list(texts))
        tokens["token_type_ids"] = np.zeros_like(tokens["input_ids"])
        batches.append(({io.inputs[role]: v.astype(ids) for role, v in tokens.items() if role in io.inputs},
                        tokens["attention_mask"] if io.pooling == "mean" else None))
    reference = Reference(published, sessions)
    exact = [reference.exact_and_bound(feeds, valid=valid) for feeds, valid in batches]
    del reference                       # one large session at a time: the float64 graph holds twice the weights
    worst = {}
    for name, path in (("published", published), ("fused", fused)):
        model = sessions.create_as_written(path)
        worst[name] = max(error_to_bound(model.run(feeds), *answer, valid) for (feeds, valid), answer in zip(batches, exact))
        del model
    release_memory()
    return worst


def _rule() -> str:
    from .onnx_rounding import PARITY_RULE

    return PARITY_RULE


def _kept(why: str, log: Log) -> dict[str, Any]:
    log(f"  multilingual tower kept as published: {why}")
    return {"fused": False, "why": why}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
