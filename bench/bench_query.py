"""Cold `uclip query` (a new process each time) on an index of 100,000 vectors, full-size text tower.

    python bench/bench_query.py                  # fp32 and int8 text towers, 7 runs each, median
    python bench/bench_query.py --runs 11 --rows 300 --variants fp32

The bundle (full-size multilingual tower of paraphrase-multilingual-MiniLM-L12-v2's shape with the
real XLM-R tokenizer (250,002 pieces; the query's token count is printed), random trained-shaped heads) and a synthetic index of random unit vectors
are built once and cached under $UCLIP_BENCH_CACHE (see bench/common.py).

For each variant, runs alternate so that all of them meet the same machine load:
  uclip     the installed `uclip query` as a user runs it;
  before    the same command with this round's start-up work switched off (sessions from the
            bundle's own graphs with weight prepacking and spinning threads, the whole tokenizer
            file): what the optimisations buy, measured in the same run.
Each process runs with UCLIP_TIMINGS=1, which makes `uclip query` print its stages to stderr; the
breakdown shows their medians, "start+exit" being wall time minus the time inside the process
(interpreter start, site, process exit). One extra run under `python -X importtime` splits imports.
A first query after export (writing the optimised copy and the vocabulary arrays) is timed apart.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

QUERY = "dvě kočky spí na červené pohovce"   # Czech: "two cats sleep on a red sofa"
STAGES = ("start+exit", "cli", "imports", "bundle", "index", "sessions", "tokenizer", "encode", "search", "output")
# The command line itself with this round's start-up work switched off: sessions from the bundle's own
# graphs with prepacking and spinning threads (onnxruntime's defaults), and the whole tokenizer file.
BEFORE = ("import sys; import uclip_cli.text as t, uclip_cli.sessions as s\n"
          "t.PieceVocabulary.open = staticmethod(lambda path: None)\n"
          "s.optimized_copy = lambda *args: None\n"
          "_options = s.SessionFactory._options\n"
          "def _defaults(self, ort):\n"
          "    self.one_shot = False\n"
          "    options = _options(self, ort)\n"
          "    options.add_session_config_entry('session.intra_op.allow_spinning', '1')\n"
          "    return options\n"
          "s.SessionFactory._options = _defaults\n"
          "from uclip_cli.cli import main; sys.argv[0] = 'uclip'; main()")


def query_args(bundle: Path, index: Path) -> list[str]:
    return ["query", QUERY, "--bundle", str(bundle), "--index", str(index), "--top", "10", "--format", "json"]


def command(kind: str, args: list[str]) -> list[str]:
    if kind == "before":
        return [sys.executable, "-c", BEFORE, *args]
    return common.uclip_command() + args


def run_once(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed ({done.returncode}):\n{done.stderr}")
    hits = json.loads(done.stdout)["results"]
    assert len(hits) == 10, done.stdout
    line = next(l for l in done.stderr.splitlines() if l.startswith("uclip timings "))
    stages = json.loads(line[len("uclip timings "):])
    stages["start+exit"] = wall - stages["in_process"]
    stages["wall"] = wall
    stages["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return stages


def import_times(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Cumulative import time (ms) of each package `uclip query` imports (at any depth), one run under -X importtime."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "uclip_cli.cli", *args],
                          env=env, capture_output=True, text=True)
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+([\w]+)$", line)   # packages, not their submodules
        if m:
            totals[m.group(2)] = totals.get(m.group(2), 0.0) + int(m.group(1)) / 1000
    return totals


def first_query(cmd: list[str], env: dict[str, str]) -> float:
    """Wall time of the first query after an export: empty cache dir (optimised copy, vocabulary arrays, checksums)."""
    cache = Path(env["XDG_CACHE_HOME"]) / "uclip"
    shutil.rmtree(cache, ignore_errors=True)
    return run_once(cmd, env)["wall"]


def row(label: str, runs: list[dict[str, float]]) -> str:
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", *STAGES)}
    spread = f"{min(r['wall'] for r in runs):.2f}-{max(r['wall'] for r in runs):.2f}"
    stages = " ".join(f"{1000 * med[k]:>9.0f}" for k in STAGES)
    return f"{label:<14} {med['wall']:6.3f} ({spread}) {med['cpu']:6.3f}  {stages}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--variants", nargs="+", choices=("fp32", "int8"), default=["fp32", "int8"])
    parser.add_argument("--no-before", action="store_true", help="skip the runs with the optimisations switched off")
    parser.add_argument("--index", choices=common.KINDS, default="random", help="the synthetic index's vectors "
                        "(common.unit_vectors): random unit vectors, or caption embeddings with real structure")
    args = parser.parse_args()

    bundles = {v: common.bundle(None if v == "fp32" else v) for v in args.variants}
    indexes = {v: common.synthetic_index(b, args.rows, kind=args.index) for v, b in bundles.items()}
    env = common.bench_env(UCLIP_TIMINGS="1")
    kinds = ["uclip"] + ([] if args.no_before else ["before"])
    jobs = [(v, k) for v in args.variants for k in kinds]

    firsts = {v: first_query(command("uclip", query_args(bundles[v], indexes[v])), env) for v in args.variants}
    for v in args.variants:   # warm: page cache, optimised copies, vocabulary arrays
        run_once(command("uclip", query_args(bundles[v], indexes[v])), env)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {job: [] for job in jobs}
    load_before = common.load_note()
    for _ in range(args.runs):
        for v, k in jobs:
            runs[(v, k)].append(run_once(command(k, query_args(bundles[v], indexes[v])), env))
    imports = import_times(query_args(bundles[args.variants[0]], indexes[args.variants[0]]), env)

    print(f"cold `uclip query` on {args.rows:,} {args.index} vectors (512-d), full-size multilingual tower "
          f"(12 x 384, 250,002 pieces) + random heads; {args.runs} runs each, interleaved, median seconds")
    print(common.cpu_note())
    print(f"query {QUERY!r} ({common.token_counts(bundles[args.variants[0]], [QUERY])[0]} tokens, real XLM-R "
          f"vocabulary, <s> and </s> included); {load_before} before, {common.load_note()} after")
    print(f"{'':<14} {'wall':>6} {'(min-max)':<11} {'cpu':>6}  " + " ".join(f"{s:>9}" for s in STAGES) + "   (stages in ms)")
    for v, k in jobs:
        print(row(f"{v} {k}", runs[(v, k)]))
    print("first query after an export (writes the optimised copy and vocabulary arrays): "
          + ", ".join(f"{v} {t:.2f} s" for v, t in firsts.items()))
    top = [(name, ms) for name, ms in sorted(imports.items(), key=lambda kv: -kv[1]) if ms >= 5]
    print("imports (ms, one run under -X importtime; each package with what it imports, so nested ones overlap): "
          + ", ".join(f"{name} {ms:.0f}" for name, ms in top))
    print("'before' imports its patched modules ahead of the command line: their import time lands in start+exit.")


if __name__ == "__main__":
    main()
