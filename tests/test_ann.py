"""The approximate index (FAISS IVF-PQ): agreement with exact search, incremental updates, filters,
re-projection, kill -9 during build and update, damage. Small indexes, the index forced on by its setting."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from optional import needs

needs("faiss", "the approximate index: pip install '.[ann]'")

from uclip_cli.index import ann_index, search  # noqa: E402
from uclip_cli.index.ann_index import AnnUnavailableError  # noqa: E402
from uclip_cli.index.exact import exact_scores, top_k  # noqa: E402
from uclip_cli.index.access import open_index  # noqa: E402
from uclip_cli.index.errors import IndexStoreError  # noqa: E402
from uclip_cli.index.identity import IndexIdentity  # noqa: E402
from uclip_cli.index.records import Embedded  # noqa: E402
from uclip_cli.index.store import IndexStore  # noqa: E402
from uclip_cli.index.search import search as index_search  # noqa: E402
from uclip_cli.walk import FileEntry  # noqa: E402

D = 32
ROWS = 1200
ROOT = Path("/photos")
FINGERPRINTS = dict(image_fingerprint="img-A", heads_fingerprint="heads-1", d_clip=D, d_search=D)


def clustered(n: int, seed: int, centres: int = 24) -> np.ndarray:
    """Unit vectors in clusters around a common direction (as CLIP image embeddings crowd); one set of
    cluster centres, `seed` draws the rows."""
    world = np.random.default_rng(0)
    base = world.standard_normal(D)
    c = base / np.linalg.norm(base) + world.standard_normal((centres, D)) / np.sqrt(D)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + rng.standard_normal((n, D)) * 0.6 / np.sqrt(D)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def entry(name: str) -> FileEntry:
    return FileEntry(path=ROOT / name, root=ROOT, size=1, mtime_ns=1)


def add(store: IndexStore, vectors: np.ndarray, prefix: str) -> None:
    store.add_batch([Embedded(entry(f"{prefix}/{i}.jpg"), f"{prefix}-{i}") for i in range(len(vectors))],
                    vectors, vectors)


def open_store(path: Path, mode: str = "create", **kw) -> IndexStore:
    return open_index(path, IndexIdentity(**{**FINGERPRINTS, **kw}), mode)


def queries(store: IndexStore, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, store.rows, n)
    q = np.asarray(store.vectors()[picks]) + rng.standard_normal((n, D)).astype(np.float32) * 0.15
    return list((q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))


def bits(x: np.ndarray) -> list[int]:
    return np.asarray(x, dtype=np.float32).view(np.uint32).tolist()


def assert_true_scores(store: IndexStore, query: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> None:
    """Scores are the canonical exact scores of the rows returned, best first."""
    assert bits(scores) == bits(exact_scores(store.vectors(), rows, query))
    assert np.all(np.diff(scores) <= 0)


@pytest.fixture
def probe_all(monkeypatch):
    """Every list probed and every row a candidate: the approximate path must then give the exact result
    (what is tested is the plumbing: tail, filters, re-scoring; recall has its own test)."""
    monkeypatch.setattr(ann_index, "DEFAULT_NPROBE_SHARE", 1.0)
    monkeypatch.setattr(search, "MIN_CANDIDATES", 10 * ROWS)


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss's OpenMP threads spin on a busy shared CPU (4x slower builds at load 10): one thread."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def built_once(tmp_path_factory, one_faiss_thread) -> Path:
    index = tmp_path_factory.mktemp("ann") / "idx"
    with open_store(index) as store:
        for b in range(4):
            add(store, clustered(ROWS // 4, seed=b), f"b{b}")
        store.set_setting("ann_mode", "on")
        assert store.index("ann").covered == ROWS
    return index


@pytest.fixture
def built(built_once, tmp_path) -> Path:
    """A copy of an index of ROWS rows in four folders, with its approximate index."""
    return Path(shutil.copytree(built_once, tmp_path / "idx", ignore=shutil.ignore_patterns("writer.lock")))


# ---------------------------------------------------------------------------- answers


def test_ann_answers_with_true_cosines_and_agrees_with_exact_search(built, probe_all):
    with open_index(built) as reader:
        for q in queries(reader, 25, seed=1):
            info: dict = {}
            rows, scores = index_search(reader, q, 10, info=info)
            want_rows, want_scores = index_search(reader, q, 10, exact=True)
            assert info["index"] == "ann" and info["ann_candidates"] == ROWS
            assert rows.tolist() == want_rows.tolist() and bits(scores) == bits(want_scores)
            assert want_rows.tolist() == top_k(reader.vectors(), q, 10)[0].tolist()


def test_default_probing_finds_nearly_all_of_the_exact_top_10(built):
    with open_index(built) as reader:
        assert 1 < reader.searcher("ann").nprobe < int(reader.meta["ann_nlist"])   # not every list
        recall = []
        for q in queries(reader, 40, seed=2):
            rows, scores = index_search(reader, q, 10)
            assert_true_scores(reader, q, rows, scores)
            recall.append(len(set(rows.tolist()) & set(index_search(reader, q, 10, exact=True)[0].tolist())) / 10)
        assert np.mean(recall) >= 0.9


def test_min_score_and_k_past_the_candidates(built, probe_all):
    with open_index(built) as reader:
        q = queries(reader, 1, seed=3)[0]
        tenth = float(index_search(reader, q, 10, exact=True)[1][-1])
        rows, scores = index_search(reader, q, 50, min_score=tenth)
        assert rows.tolist() == index_search(reader, q, 10, exact=True)[0].tolist()
        rows, scores = index_search(reader, q, 500)   # candidates past the covered rows: all of them, ranked exactly
        assert rows.tolist() == top_k(reader.vectors(), q, 500)[0].tolist()


# ---------------------------------------------------------------------------- incremental


def test_new_rows_are_found_at_once_then_folded_into_the_index(built, monkeypatch, probe_all):
    monkeypatch.setattr(ann_index, "TAIL_ROWS", 300)
    with open_store(built) as store:
        first_file = store.index("ann").file
        new = clustered(200, seed=10)
        add(store, new, "new1")                                  # a tail of 200 rows: exact scan
        assert store.index("ann").covered == ROWS and store.index("ann").file == first_file
        with open_index(built) as reader:
            info: dict = {}
            rows, _ = index_search(reader, new[7], 1, info=info)
            assert rows.tolist() == [ROWS + 7] and info["index"] == "ann"
        add(store, clustered(200, seed=11), "new2")              # 400 past the coverage: added to a new file
        assert store.index("ann").covered == ROWS + 400 and store.index("ann").file != first_file
        assert not (built / first_file).exists()                 # the replaced file is gone
        assert int(store.meta["ann_trained"]) == ROWS            # same quantiser
    with open_index(built) as reader:
        rows, _ = index_search(reader, new[7], 1)
        assert rows.tolist() == [ROWS + 7]
        for q in queries(reader, 10, seed=4):
            assert index_search(reader, q, 10)[0].tolist() == index_search(reader, q, 10, exact=True)[0].tolist()


def test_removed_rows_never_come_back(built, probe_all):
    with open_store(built) as store:
        gone = [ROOT / f"b1/{i}.jpg" for i in range(ROWS // 4)]
        kept = [r.path for r in store.catalogue.records() if Path(r.path) not in set(gone)]
        removed_rows = {store.catalogue.lookup(p).row for p in gone}
        store.catalogue.remove_missing(ROOT, kept)
    with open_index(built) as reader:
        mask = reader.catalogue.search_mask()
        for row in sorted(removed_rows)[:20]:
            rows, _ = index_search(reader, np.asarray(reader.vectors()[row]), 10, mask=mask)
            assert not set(rows.tolist()) & removed_rows and len(rows) == 10


def test_the_quantiser_is_trained_again_when_the_collection_outgrows_it(built, monkeypatch):
    monkeypatch.setattr(ann_index, "RETRAIN_GROWTH", 1.5)
    with open_store(built) as store:
        add(store, clustered(ROWS, seed=20), "grown")
        assert store.index("ann").covered == int(store.meta["ann_trained"]) == 2 * ROWS


def test_reprojection_builds_an_index_of_the_new_vectors(built, probe_all):
    rotation = np.linalg.qr(np.random.default_rng(5).standard_normal((D, D)))[0].astype(np.float32)
    with open_store(built, heads_fingerprint="heads-2") as store:
        store.reproject(lambda f: f @ rotation, heads_fingerprint="heads-2", d_search=D)
        assert store.index("ann").file.startswith("vectors.1.") and store.index("ann").covered == ROWS
    with open_index(built, IndexIdentity(heads_fingerprint="heads-2"), "read") as reader:
        assert sorted(p.name for p in built.glob("*.faiss")) == [reader.index("ann").file]
        projected = np.asarray(reader.features()[123]) @ rotation
        info: dict = {}
        rows, _ = index_search(reader, projected, 1, info=info)
        assert rows.tolist() == [123] and info["index"] == "ann"


def test_compaction_renumbers_rows_and_rebuilds_the_index(built, probe_all):
    with open_store(built) as store:
        store.catalogue.remove_missing(ROOT, [r.path for r in store.catalogue.records() if not r.path.startswith("/photos/b0/")])
        assert store.compact(min_dead_share=0.2) == ROWS // 4
        assert store.index("ann").covered == store.rows == ROWS * 3 // 4
        for q in queries(store, 5, seed=6):
            assert index_search(store, q, 10)[0].tolist() == index_search(store, q, 10, exact=True)[0].tolist()


# ---------------------------------------------------------------------------- filters


def test_a_folder_filter_goes_into_faiss_and_a_small_one_is_scanned_exactly(built, probe_all, monkeypatch):
    monkeypatch.setattr(search, "EXACT_SELECTED_ROWS", 100)
    with open_index(built) as reader:
        for folder in ("b2", "b3"):
            mask = reader.catalogue.search_mask(ROOT / folder)
            for q in queries(reader, 5, seed=7):
                info: dict = {}
                rows, scores = index_search(reader, q, 10, mask=mask, info=info)
                assert info["index"] == "ann" and info["nprobe"] >= reader.searcher("ann").nprobe
                assert all(p.startswith(f"/photos/{folder}/") for r in rows.tolist() for p in reader.catalogue.paths_for_rows([r])[r])
                assert rows.tolist() == index_search(reader, q, 10, mask=mask, exact=True)[0].tolist()
        monkeypatch.setattr(search, "EXACT_SELECTED_ROWS", ROWS // 4 + 1)
        info = {}
        index_search(reader, queries(reader, 1, seed=8)[0], 10, mask=reader.catalogue.search_mask(ROOT / "b2"), info=info)
        assert info["index"] == "exact"


# ---------------------------------------------------------------------------- settings


def test_setting_off_drops_the_index_auto_waits_for_the_threshold_and_survives_rebuild(built, monkeypatch):
    with open_store(built) as store:
        store.set_setting("ann_mode", "auto")            # ROWS rows, below the automatic threshold
        assert store.index("ann").file == "" and not list(built.glob("*.faiss"))
        monkeypatch.setattr(ann_index, "AUTO_MIN_ROWS", ROWS - 1)
        store.set_setting("ann_mode", "auto")
        assert store.index("ann").covered == ROWS
        store.set_setting("ann_mode", "off")
        assert store.index("ann").file == "" and not list(built.glob("*.faiss"))
        with pytest.raises(IndexStoreError, match="one of auto, on, off"):
            store.set_setting("ann_mode", "sometimes")
    with open_store(built, "rebuild", image_fingerprint="img-B") as store:
        assert store.rows == 0 and store.meta["ann_mode"] == "off"


def test_without_faiss_the_setting_is_refused_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)      # import faiss raises ImportError
    with open_store(tmp_path / "idx") as store:
        add(store, clustered(300, seed=1), "a")
        with pytest.raises(AnnUnavailableError, match=r"approximate index needs the `ann` extra \(faiss is not installed\): pip install .*\[ann\]"):
            store.set_setting("ann_mode", "on")
        assert store.meta.get("ann_mode", "auto") == "auto" and index_search(store, clustered(1, 2)[0], 3)[0].size == 3


# ---------------------------------------------------------------------------- damage


def test_a_damaged_file_is_never_trusted_and_the_writer_rebuilds_it(built, probe_all):
    with open_index(built) as reader:
        ann = reader.index("ann")
        name, head, size = ann.file, int(reader.meta["ann_head"]), int(reader.meta["ann_bytes"])
    path = built / name
    good = path.read_bytes()
    rng = np.random.default_rng(9)
    for where in (rng.integers(0, head, 3), rng.integers(head, size, 3)):   # the head, then the lists' codes and ids
        damaged = bytearray(good)
        for at in where:
            damaged[at] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with open_index(built) as reader:
            for q in queries(reader, 5, seed=10):
                info: dict = {}
                rows, scores = index_search(reader, q, 10, info=info)
                assert info["index"] == ("exact" if where[0] < head else "ann")
                assert_true_scores(reader, q, rows, scores)
                assert np.all(rows < reader.rows)
        with open_store(built) as store:                        # the whole-file digest fails: built again
            assert store.index("ann").verify(store.vectors()) == ROWS and store.index("ann").file != name
        name = next(built.glob("*.faiss")).name
        path, good = built / name, (built / name).read_bytes()
        with open_index(built) as reader:
            head, size = int(reader.meta["ann_head"]), int(reader.meta["ann_bytes"])
    path.write_bytes(good[:-100])                               # truncated
    with open_index(built) as reader:
        info = {}
        index_search(reader, queries(reader, 1, seed=11)[0], 5, info=info)
        assert info["index"] == "exact"
    path.unlink()                                               # deleted: a rebuild, never a result
    with open_index(built) as reader:
        q = queries(reader, 1, seed=12)[0]
        assert index_search(reader, q, 5)[0].tolist() == top_k(reader.vectors(), q, 5)[0].tolist()
    with open_store(built) as store:
        assert store.index("ann").covered == ROWS and (built / store.index("ann").file).exists()


# ---------------------------------------------------------------------------- kill -9

WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import faiss
    from uclip_cli.index import ann_index
    from test_ann import ROWS, add, clustered, open_store
    faiss.omp_set_num_threads(1)

    index, what = Path(sys.argv[1]), sys.argv[2]
    ann_index.TAIL_ROWS = 100
    real_write = ann_index.AnnIndex._write
    def write_then_die(self, *args, **kwargs):
        changes = real_write(self, *args, **kwargs)     # the new file is complete and fsynced
        os.kill(os.getpid(), signal.SIGKILL)            # ... but the catalogue never names it
    ann_index.AnnIndex._write = write_then_die
    store = open_store(index)
    if what == "build":
        store.set_setting("ann_mode", "on")
    else:
        add(store, clustered(300, seed=30), "more")
    """
)


@pytest.mark.parametrize("what", ["build", "update"])
def test_kill_9_during_build_or_update_keeps_the_previous_state(tmp_path, what):
    index = tmp_path / "idx"
    with open_store(index) as store:
        add(store, clustered(ROWS, seed=0), "a")
        if what == "update":
            store.set_setting("ann_mode", "on")
        before = store.index("ann").file
        answers = [index_search(store, q, 10) for q in queries(store, 5, seed=13)]
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent)))
    done = subprocess.run([sys.executable, str(script), str(index), what], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    orphans = [p.name for p in index.glob("*.faiss") if p.name != before]
    assert len(orphans) == 1                                    # written, never committed
    with open_index(index) as reader:
        assert reader.index("ann").file == before and reader.rows == ROWS
        for q, (want_rows, want_scores) in zip(queries(reader, 5, seed=13), answers):
            info: dict = {}
            rows, scores = index_search(reader, q, 10, info=info)
            assert info["index"] == ("ann" if before else "exact")
            assert rows.tolist() == want_rows.tolist() and bits(scores) == bits(want_scores)
    with open_store(index) as store:          # the next writer drops the orphan (and builds what "on" asks for)
        live = store.index("ann").file
        assert sorted(p.name for p in index.glob("*.faiss")) == [live]
        assert live == before if what == "update" else store.index("ann").covered == ROWS


# ---------------------------------------------------------------------------- command line


def test_cli_index_setting_and_exact_query(tmp_path, tiny_bundle, monkeypatch, probe_all):
    from cli_helpers import invoke_uclip, uclip_env
    from uclip_cli.bundle import load_bundle

    bundle = load_bundle(tiny_bundle, verify=False)
    d = bundle.dims["clip"]
    index = tmp_path / "idx"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with open_index(index, IndexIdentity(image_fingerprint=bundle.image_fingerprint, heads_fingerprint=bundle.heads_fingerprint, d_clip=d, d_search=d), "create") as store:
        store.add_batch([Embedded(entry(f"{i}.jpg"), f"h{i}") for i in range(600)], vectors, vectors)
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=index)
    photos = tmp_path / "photos"
    photos.mkdir()
    assert "--ann" in invoke_uclip(["index", photos, "--ann", "sometimes"], env).stderr
    invoke_uclip(["index", photos, "--ann", "on", "--no-progress"], env).ok()
    with open_index(index) as reader:
        assert reader.meta["ann_mode"] == "on" and reader.index("ann").covered == 600
    approximate = invoke_uclip(["query", "a red bicycle", "-f", "json", "-n", "5"], env).ok().stdout
    exact_run = invoke_uclip(["query", "a red bicycle", "-f", "json", "-n", "5", "--exact"], env).ok().stdout
    assert approximate == exact_run
