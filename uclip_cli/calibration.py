"""Choices measured once per machine and remembered in the user's cache folder.

Some choices have no right answer on paper: which of two equivalent computations is faster depends on
the CPU's vector extensions (AVX2, AVX-512, VNNI, AMX) and on which kernels onnxruntime's MLAS library
sends each one to. uclip measures them where they run, once, and keeps the result in a small JSON file
under the cache folder, keyed by everything the measurement depends on (`cpu_identity` plus what the
caller adds: library versions, thread count, the graph). Two such choices today: the exact search's
int8 or float32 pass (index/int8_kernel.py) and the text tower's int8 or float32 weights
(text_precision.py). A cache that cannot be read or written costs a measurement per process, never a
wrong answer.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")


@functools.cache
def cpu_identity() -> str:
    """The CPU's model name and the vector extensions that choose onnxruntime's kernels ("model|flag,flag").

    Read once per process: a served search asks for it with every query (the exact pass's choice is keyed
    by it), and reading /proc/cpuinfo cost 0.5-1.8 ms a time on a 2-core machine."""
    import platform

    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = ",".join(f for f in CPU_FLAGS if f in value.split())
                break
    except OSError:
        pass
    return f"{model}|{flags}"


def ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "none"


def cache_file(name: str) -> Path | None:
    from .config import cache_dir

    try:
        return cache_dir() / name
    except Exception:  # noqa: BLE001 - no home folder: measure each process
        return None


def read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def remember(path: Path | None, key: str, value: dict) -> None:
    """Add one machine's choice to the cache file, atomically; a cache that cannot be written costs speed only."""
    if path is None:
        return
    try:
        known = read_json(path)
        known[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
