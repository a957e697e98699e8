"""How long `uclip train`'s default closed-form fit takes, by the number of captions (issue 13).

The default keeps the closed form (train/closed_form.py): the language and modality subspaces, the ridge
map, and the kernel Head_B's Nyström fit (one pass over the anchors per kernel width, then a grid of
(d + m + 1)-square solves). Its cost grows with the captions; this prints it for CLIP-sized features
(d_clip 512, d_multi 384, 1,024 landmarks, a 4,000-row image memory) on random unit vectors: the fit's
arithmetic does not depend on what the vectors mean.

    python bench/bench_closed_form.py                       # 10,000 and 100,000 captions
    python bench/bench_closed_form.py --captions 200000 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_note, load_note, say  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from uclip_cli.train.config import TrainConfig
    from uclip_cli.train.data import TrainInputs
    from uclip_cli.train.head_setup import build_heads

    torch.set_num_threads(args.threads)
    say(cpu_note())
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    for n in args.captions:
        inputs = TrainInputs(unit(rng.standard_normal((n, 512))), unit(rng.standard_normal((n, 384))),
                             unit(rng.standard_normal((4000, 512))), unit(rng.standard_normal((4000, 384))))
        started = time.perf_counter()
        _, info = build_heads(inputs, TrainConfig())
        print(f"{n:>9,} captions: closed-form fit {time.perf_counter() - started:6.1f} s ({info['head_b']}; "
              f"{args.threads} threads) [{load_note()}]", flush=True)


if __name__ == "__main__":
    main()
