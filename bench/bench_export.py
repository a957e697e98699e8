"""Export time, file sizes, parity and int8 cosine for full-size towers (random weights).

    python bench/bench_export.py [--modes fp32 int8]

Checkpoints (built once and cached by bench/common.py under $UCLIP_BENCH_CACHE):
  CLIP ViT-B/32 at 224 px with a 512-d projection, and a paraphrase-multilingual-MiniLM-L12-v2
  shaped sentence encoder (12 layers, 384 hidden, 1536 ffn, 12 heads, 250,002 vocabulary).
Each mode runs `export_bundle` in a fresh child process (so its peak RSS is its own) into a
temporary directory, removed afterwards. Time includes loading the checkpoints, tracing, the
parity checks (and for int8, quantization and its cosine check); the per-step times come from
the export's own log lines. Random weights: the int8 cosines say nothing about a trained model.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, clip_checkpoint, load_note, multilingual_checkpoint  # noqa: E402

FILES = ("image_encoder.onnx", "text_clip.onnx", "text_multilingual.onnx", "tokenizer_clip.json",
         "tokenizer_multilingual.json")


def export_once(mode: str) -> dict:
    """Runs in the child: one timed export, returns the figures."""
    import torch

    from uclip_cli.export import export_bundle

    out = CACHE / f"bench-export-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    steps: list[tuple[float, str]] = []
    start = time.perf_counter()

    def log(message: str) -> None:
        steps.append((time.perf_counter() - start, message))
        print(f"  [{steps[-1][0]:6.1f} s] {message}", file=sys.stderr, flush=True)

    try:
        export_bundle(str(clip_checkpoint()), str(multilingual_checkpoint()), out,
                      quantize=None if mode == "fp32" else mode, log=log)
        total = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        sizes = {name: (out / name).stat().st_size for name in FILES}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "seconds": total, "torch_threads": torch.get_num_threads(), "sizes": sizes,
            "steps": steps, "parity": manifest["export"]["parity"],
            "quantization": manifest["export"]["quantization"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(mode: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_times(steps: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds per step, from the export's log lines: loading, each tower (trace + parity), quantization."""
    times: dict[str, float] = {}
    previous = 0.0
    for t, message in steps:
        words = message.split()
        if message.startswith("exporting "):
            times.setdefault("load checkpoints + tokenizers", t - previous)
            previous = t
        elif "max |onnx - torch|" in message:
            times[f"{words[0].rstrip(':')} (trace + parity)"] = t - previous
            previous = t
        elif ": int8," in message:
            times[f"{words[0].rstrip(':')} (quantize + cosine)"] = t - previous
            previous = t
    return times


def report(result: dict) -> None:
    print(f"\n{result['mode']}: export_bundle {result['seconds']:.1f} s in all, peak RSS "
          f"{result['peak_rss_mb']:.0f} MB, torch threads {result['torch_threads']}")
    for step, seconds in step_times(result["steps"]).items():
        print(f"  {step:48s} {seconds:6.1f} s")
    for name, figures in result["parity"].items():
        print(f"  parity {name:24s} max |onnx - torch| {figures['max_abs_diff']:.1e}, "
              f"min cosine {figures['min_cosine']:.7f}")
    for name, size in result["sizes"].items():
        print(f"  {name:31s} {size / 1e6:8.1f} MB")
    print(f"  {'bundle total':31s} {sum(result['sizes'].values()) / 1e6:8.1f} MB")
    if result["quantization"]:
        for name, q in result["quantization"]["files"].items():
            print(f"  int8 {name}: {q['fp32_bytes'] / 1e6:.1f} MB -> {q['int8_bytes'] / 1e6:.1f} MB, "
                  f"cosine to fp32 min {q['min_cosine']:.4f} mean {q['mean_cosine']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(export_once(args.child)))
        return
    clip_checkpoint(), multilingual_checkpoint()   # built (and timed) outside the measured exports
    print(f"bench_export: {load_note()}")
    for mode in args.modes:
        report(run_child(mode))


if __name__ == "__main__":
    main()
