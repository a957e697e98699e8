"""`--quantize int8|int8-all`: dynamic int8 weights, per output channel.

`int8` quantizes the text towers only. `int8-all` also quantizes the image encoder: its features
are stored in the index, so it is the user's explicit choice, with its cosine to fp32 recorded.
`int8-beside` keeps the fp32 text towers and writes the int8 ones beside them (bundle.INT8_TWINS):
which one a query runs is then measured on each CPU (text_precision.py), since int8 is faster only
where the CPU's integer kernels are (VNNI, AMX), and the bundle is made on one CPU and run on others.

Weights are quantised to 7 bits (`reduce_range`): a bundle is made on one CPU and run on others, and
onnxruntime's uint8 x int8 kernels on CPUs without VNNI (AVX2 only) add pairs of products in saturating
16-bit lanes. With 8-bit weights the tiny test CLIP text tower fell to cosine 0.863 against fp32 on an
AVX2-only AMD EPYC (0.9992 with 7 bits, the same graph); VNNI CPUs lose almost nothing by it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from uclip_cli.sessions import SessionFactory

from .fuse import unfused
from .parity import compare, graph_session, merge, onnx_outputs

# Gather covers the word-embedding table, the largest part of a multilingual text tower.
QUANTIZED_OPS = ["MatMul", "Gather"]


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # quantize_dynamic advises shape pre-processing on the root logger, every time
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=QUANTIZED_OPS)
    finally:
        root.setLevel(level)


def cosine_to_fp32(fp32: Path, int8: Path, batches: list[dict[str, np.ndarray]],
                   sessions: SessionFactory) -> dict[str, float]:
    """The int8 graph's cosine to the fp32 graph's outputs on the same batches (both opened by `sessions`)."""
    reference, quantized = graph_session(sessions, fp32), graph_session(sessions, int8)
    figures = merge([compare(onnx_outputs(reference, f), onnx_outputs(quantized, f)) for f in batches])
    return {"min_cosine": figures["min_cosine"], "mean_cosine": figures["mean_cosine"]}


def quantize_towers(directory: Path, feeds: dict[str, list[dict[str, np.ndarray]]], sessions: SessionFactory,
                    *, log: Callable[[str], Any] = print, beside: bool = False) -> dict[str, Any]:
    """Replace each named fp32 graph in `directory` by its int8 version (beside: write it as the graph's
    int8 twin, bundle.INT8_TWINS, and keep the fp32 one); returns the manifest's quantization record.

    `sessions` opens the graphs that are compared (SessionFactory.create_as_written)."""
    from uclip_cli.bundle import INT8_TWINS

    files: dict[str, dict[str, float]] = {}
    for name, batches in feeds.items():
        fp32 = directory / name
        int8 = directory / f"{name}.int8"
        quantize_int8(unfused(fp32), int8)   # the graph as exported: the quantizer knows its plain MatMuls (fuse.py)
        files[name] = cosine_to_fp32(fp32, int8, batches, sessions)
        files[name]["fp32_bytes"] = fp32.stat().st_size
        files[name]["int8_bytes"] = int8.stat().st_size
        if beside:
            files[name]["file"] = INT8_TWINS[name]
        os.replace(int8, directory / INT8_TWINS[name] if beside else fp32)
        log(f"  {name}: int8{' beside fp32' if beside else ''}, cosine to fp32 min {files[name]['min_cosine']:.4f} "
            f"mean {files[name]['mean_cosine']:.4f}, {files[name]['fp32_bytes'] / 1e6:.1f} MB -> "
            f"{files[name]['int8_bytes'] / 1e6:.1f} MB")
    return {"mode": "int8", "weights": "QInt8", "per_channel": True, "dynamic": True, "ops": QUANTIZED_OPS,
            "files": files}
