"""Training speed of uclip's trainer against a faithful re-creation of the authors' training step,
and peak RAM of the retrieval-target precompute over a 2,000,000 x 512 memory.

    python bench/bench_train.py                      # default run, about 3 minutes on 2 cores
    python bench/bench_train.py --memory-rows 2000000 --captions 65536 --authors-batch 512   # paper scale

Authors' step (re-created from their release, uclip/model.py + train.py, on Hugging Face Trainer):
both frozen towers re-run on the batch's captions at every step (modules in train mode, so the
multilingual tower's dropout is on; CLIP text padded to 77 tokens as OpenCLIP's tokenizer does,
multilingual text padded to the batch's longest), a full softmax over both whole memories at every
step (the foreign memory re-normalised every step, as their retrieve_embedding does), Gaussian
perturbation, both heads, SymNCE x2 + 0.1 intra, backward, gradient clipping at 1.0, AdamW.

uclip's trainer: the towers run once per caption (eval mode, inference mode, CLIP padded to the
batch's longest as the bundle's tokenizer settings do), the retrieval targets once, then epochs of
head steps on features (train_heads). Towers: random-weight transformers built from configs at the
real sizes: CLIP ViT-B/32 text tower (12 layers, width 512, 8 heads, vocab 49,408, 63 M parameters)
and paraphrase-multilingual-MiniLM-L12-v2 (12 layers, width 384, 12 heads, vocab 250,037, 118 M).
Both sides use the same captions (random token ids, 10 to 24 tokens each, EOS last), the same
memory arrays, the same heads code and the same thread count. Head-training throughput does not
depend on feature values, so train_heads runs on random unit features of the towers' widths.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from uclip_cli.train.config import TrainConfig
from uclip_cli.train.heads import UCLIPHeads
from uclip_cli.train.losses import perturb, uclip_losses
from uclip_cli.train.retrieval import precompute_targets
from uclip_cli.train.data import TrainInputs
from uclip_cli.train.trainer import train_heads

CLIP_CONTEXT = 77
CLIP_EOS = 49407


# ---------------------------------------------------------------- towers and captions

def build_towers(seed: int):
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
        max_position_embeddings=CLIP_CONTEXT, projection_dim=512, eos_token_id=CLIP_EOS))
    multi = BertModel(BertConfig(
        vocab_size=250037, hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=512), add_pooling_layer=False)
    for p in (*clip.parameters(), *multi.parameters()):
        p.requires_grad_(False)
    return clip, multi


def make_captions(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Token ids of n captions, 10..24 tokens each (COCO-like lengths), the last one CLIP's EOS."""
    out = []
    for length in rng.integers(10, 25, size=n):
        ids = rng.integers(1000, 49000, size=length)
        ids[-1] = CLIP_EOS
        out.append(ids)
    return out


def pad(captions: list[np.ndarray], length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    length = length or max(len(c) for c in captions)
    ids = torch.zeros(len(captions), length, dtype=torch.long)
    mask = torch.zeros(len(captions), length, dtype=torch.long)
    for i, c in enumerate(captions):
        ids[i, :len(c)] = torch.from_numpy(c)
        mask[i, :len(c)] = 1
    return ids, mask


def encode_clip(clip, captions, context: int | None) -> torch.Tensor:
    ids, _ = pad(captions, context)          # OpenCLIP passes no mask: causal attention + EOS pooling
    return F.normalize(clip(input_ids=ids).text_embeds, dim=-1)


def encode_multi(multi, captions) -> torch.Tensor:
    ids, mask = pad(captions, None)
    hidden = multi(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


# ---------------------------------------------------------------- the authors' step

class AuthorsStep:
    def __init__(self, clip, multi, image_memory: torch.Tensor, foreign_memory: torch.Tensor, config: TrainConfig):
        self.clip, self.multi = clip.train(), multi.train()      # HF Trainer puts the whole model in train mode
        self.image_memory, self.foreign_memory, self.config = image_memory, foreign_memory, config
        torch.manual_seed(config.seed)
        self.heads = UCLIPHeads(384, 512, config.d_shared, config.hidden_mult).train()
        self.optimizer = torch.optim.AdamW(self.heads.parameters(), lr=config.lr, weight_decay=0.0)
        self.noise = torch.Generator().manual_seed(config.seed)

    def __call__(self, captions) -> float:
        c = self.config
        e_K = encode_multi(self.multi, captions)
        e_I = encode_clip(self.clip, captions, CLIP_CONTEXT)
        with torch.no_grad():
            q_multi = F.normalize(e_K, dim=-1)
            foreign = F.normalize(self.foreign_memory, dim=-1)
            v = F.normalize(torch.softmax(e_I @ self.image_memory.T / c.tau_retrieval, dim=-1) @ self.image_memory, dim=-1)
            k = F.normalize(torch.softmax(q_multi @ foreign.T / c.tau_retrieval, dim=-1) @ foreign, dim=-1)
        e_K, e_I, k, v = (perturb(x, c.sigma, self.noise) for x in (e_K, e_I, k, v))
        z = (self.heads.head_a(e_K), self.heads.head_b(e_I), self.heads.head_a(k), self.heads.head_b(v))
        loss = uclip_losses(*z, c)["total"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.heads.parameters(), 1.0)
        self.optimizer.step()
        return float(loss.detach())


def time_authors(step: AuthorsStep, captions, batch: int, steps: int) -> float:
    """Seconds per caption over `steps` timed steps after one warm-up step."""
    step(captions[:batch])
    started = time.perf_counter()
    for i in range(steps):
        step(captions[(i + 1) * batch:(i + 2) * batch])
    return (time.perf_counter() - started) / (steps * batch)


@torch.inference_mode()
def time_extraction(clip, multi, captions, batch: int) -> float:
    """Seconds per caption for uclip's one-time feature extraction (both towers, eval mode)."""
    clip.eval(), multi.eval()
    encode_clip(clip, captions[:8], None), encode_multi(multi, captions[:8])   # warm-up
    started = time.perf_counter()
    for i in range(0, len(captions), batch):
        encode_clip(clip, captions[i:i + batch], None)
        encode_multi(multi, captions[i:i + batch])
    return (time.perf_counter() - started) / len(captions)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ---------------------------------------------------------------- peak memory (child process)

def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """VmHWM of this process (ru_maxrss is not used: after fork + exec it keeps the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def peak_child(rows: int, dim: int, queries: int, query_chunk: int, memory_chunk: int) -> dict:
    rng = np.random.default_rng(0)
    memory = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 65536):       # filled in place, block by block
        block = memory[start:start + 65536]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    q = unit_rows(rng, queries, dim)
    reset_peak_rss()
    before = rss_now_bytes()
    started = time.perf_counter()
    precompute_targets(q, memory, 0.01, query_chunk=query_chunk, memory_chunk=memory_chunk)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {"memory_bytes": memory.nbytes, "rss_before": before, "peak": peak, "extra_peak": peak - before,
            "seconds": seconds, "queries": queries}


def measure_peak(args) -> dict:
    cmd = [sys.executable, __file__, "--_peak-child", json.dumps(
        [args.peak_rows, 512, args.peak_queries, args.query_chunk, args.memory_chunk])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=4096, help="captions uclip's trainer trains on")
    parser.add_argument("--memory-rows", type=int, default=100_000, help="rows of each memory (paper: 2,000,000)")
    parser.add_argument("--authors-batch", type=int, default=32, help="captions per timed authors' step (paper: 512)")
    parser.add_argument("--authors-steps", type=int, default=2, help="timed authors' steps (after one warm-up)")
    parser.add_argument("--extract-captions", type=int, default=128, help="captions timed through uclip's extraction")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the whole-run comparison (paper: 5)")
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs train_heads actually runs to time a step")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peak-rows", type=int, default=2_000_000)
    parser.add_argument("--peak-queries", type=int, default=256)
    parser.add_argument("--query-chunk", type=int, default=TrainConfig.retrieval_query_chunk)
    parser.add_argument("--memory-chunk", type=int, default=TrainConfig.retrieval_memory_chunk)
    parser.add_argument("--topk", type=int, default=0, help="also time brute-force top-k targets against exact")
    parser.add_argument("--skip-peak", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--_peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._peak_child:
        print(json.dumps(peak_child(*json.loads(args._peak_child))))
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, device cpu")

    if not args.skip_throughput:
        throughput(args)
    if not args.skip_peak:
        p = measure_peak(args)
        gib = 2 ** 30
        print(f"\nretrieval precompute over a {args.peak_rows:,} x 512 memory ({p['memory_bytes'] / gib:.2f} GiB, in RAM), "
              f"{p['queries']} queries, chunks {args.query_chunk} x {args.memory_chunk}:")
        print(f"  extra peak RSS {p['extra_peak'] / 2**20:,.0f} MiB (VmHWM, reset just before, minus RSS before), "
              f"{p['seconds']:.1f} s ({p['queries'] / p['seconds']:.1f} queries/s)")
        print(f"  a one-shot softmax would hold a {p['queries']} x {args.peak_rows:,} float32 logits matrix: "
              f"{p['queries'] * args.peak_rows * 4 / gib:.1f} GiB (arithmetic, not run); "
              f"at batch 512: {512 * args.peak_rows * 4 / gib:.1f} GiB")


def throughput(args) -> None:
    rng = np.random.default_rng(0)
    config = TrainConfig(batch_size=args.batch, epochs=args.train_epochs, heldout_fraction=0.0, refine=True)
    image_memory, foreign_memory = unit_rows(rng, args.memory_rows, 512), unit_rows(rng, args.memory_rows, 384)
    captions = make_captions(max((args.authors_steps + 1) * args.authors_batch, args.extract_captions), rng)
    t = time.perf_counter()
    clip, multi = build_towers(0)
    print(f"towers built in {time.perf_counter() - t:.1f} s: CLIP text {sum(p.numel() for p in clip.parameters()) / 1e6:.0f} M, "
          f"multilingual {sum(p.numel() for p in multi.parameters()) / 1e6:.0f} M parameters; "
          f"memories {args.memory_rows:,} x 512 and {args.memory_rows:,} x 384")

    authors = AuthorsStep(clip, multi, torch.from_numpy(image_memory), torch.from_numpy(foreign_memory), config)
    t_authors = time_authors(authors, captions, args.authors_batch, args.authors_steps)
    print(f"authors' step   : {1 / t_authors:10.1f} captions/s  (batch {args.authors_batch}, {args.authors_steps} timed steps)")
    t_extract = time_extraction(clip, multi, captions[:args.extract_captions], batch=64)
    print(f"uclip extraction: {1 / t_extract:10.1f} captions/s  (once per caption; {args.extract_captions} captions)")
    del authors, clip, multi

    result = train_heads(TrainInputs(unit_rows(rng, args.captions, 512), unit_rows(rng, args.captions, 384),
                                     image_memory, foreign_memory), config)
    t_retrieval = result.timings["retrieval_s"] / args.captions
    t_head = 1 / result.timings["captions_per_s"]
    print(f"uclip retrieval : {1 / t_retrieval:10.1f} captions/s  (targets once, {args.captions:,} captions, both memories)")
    print(f"uclip head steps: {1 / t_head:10.1f} captions/s  (train_heads, {args.train_epochs} epochs of {args.captions:,})")

    e = args.epochs
    one_time = t_extract + t_retrieval
    print(f"\nper caption: authors' step {1e3 * t_authors:.1f} ms every epoch; uclip {1e3 * t_extract:.1f} ms extraction "
          f"+ {1e3 * t_retrieval:.2f} ms retrieval once, then {1e3 * t_head:.3f} ms every epoch")
    rows = [
        ("per epoch, features and targets ready (steady state)", t_authors / t_head),
        (f"{e} epochs, retrieval once included, extraction excluded (features reused)",
         e * t_authors / (t_retrieval + e * t_head)),
        (f"{e} epochs, extraction and retrieval once included (amortised over the {e} epochs)",
         e * t_authors / (one_time + e * t_head)),
    ]
    print("speed-up of uclip over the authors' step (same captions, memories, threads; target >= 50x):")
    for label, ratio in rows:
        print(f"  {ratio:9.1f}x  {label}")
    print(f"  the whole-run ratio is capped by the one-time work: at most {e} x {t_authors / one_time:.1f} = "
          f"{e * t_authors / one_time:.1f}x whatever the head steps cost")
    if args.topk:
        time_topk(args, rng, image_memory)


def time_topk(args, rng, memory: np.ndarray) -> None:
    """Exact vs brute-force top-k targets for the same queries: time, cosine, captured softmax mass."""
    q = unit_rows(rng, min(args.captions, 1024), memory.shape[1])
    t = time.perf_counter()
    exact = precompute_targets(q, memory, 0.01)
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    approx, mass = precompute_targets(q, memory, 0.01, topk=args.topk, return_mass=True)
    t_topk = time.perf_counter() - t
    cos = (exact * approx).sum(axis=1)
    print(f"\ntop-k retrieval, k={args.topk}, {len(q)} queries over {memory.shape[0]:,} rows (random unit features): "
          f"exact {t_exact:.1f} s, top-k {t_topk:.1f} s; cosine to exact min {cos.min():.5f}; mass kept min {mass.min():.4f}")

if __name__ == "__main__":
    main()
