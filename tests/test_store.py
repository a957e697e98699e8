"""IndexStore (catalogue + row files) and top_k: incremental updates, bundle checks, crash safety."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rounding import U32, assert_within, dot_bound
from uclip_cli.index import exact, exact_index, int8_copy
from uclip_cli.index.exact import top_k
from uclip_cli.index import access
from uclip_cli.index.errors import (
    IndexBusyError, IndexCorruptError, IndexMismatchError, IndexMissingError, IndexStoreError,
)
from uclip_cli.index.identity import IndexIdentity
from uclip_cli.index.records import Embedded, Failed, Reused, content_hash
from uclip_cli.index.store import IndexStore
from uclip_cli.sessions import SessionFactory
from uclip_cli.index.search import search as index_search
from uclip_cli.walk import FileEntry

D_CLIP, D_SEARCH = 8, 6
ROOT = Path("/photos")
FINGERPRINTS = dict(image_fingerprint="img-A", heads_fingerprint="heads-1", d_clip=D_CLIP, d_search=D_SEARCH)

CPU = SessionFactory(device="cpu")


def open_index(path: Path, identity: IndexIdentity | None = None, mode: str = "read") -> IndexStore:
    """access.open_index with a CPU session factory, so that searches take the int8 pass where it pays."""
    return access.open_index(path, identity, mode, sessions=CPU)


def entry(name: str, size: int = 100, mtime_ns: int = 1, root: Path = ROOT) -> FileEntry:
    return FileEntry(path=root / name, root=root, size=size, mtime_ns=mtime_ns)


def features_of(content: str) -> np.ndarray:
    seed = int.from_bytes(content.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng(seed).standard_normal(D_CLIP).astype(np.float32)


def project(features: np.ndarray) -> np.ndarray:
    return (features[:, :D_SEARCH] * 2 + 1).astype(np.float32)


def add(store: IndexStore, items: list[tuple[FileEntry, str]]) -> list[int]:
    feats = np.stack([features_of(c) for _, c in items])
    return store.add_batch([Embedded(e, c) for e, c in items], feats, project(feats))


def open_store(path: Path, mode: str = "create", **overrides) -> IndexStore:
    """An index whose rows are not unit vectors (`project` is affine): no norm checks."""
    return open_index(path, IndexIdentity(**{**FINGERPRINTS, "label": "bundle A", "unit_rows": False, **overrides}), mode)


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b, dtype=np.float32).view(np.uint32))


def row_files(index: Path) -> list[Path]:
    return sorted(index.glob("*.f32"))


def assert_row_invariants(store: IndexStore) -> None:
    """Each committed row is either used by an 'ok' record or dead; every record's row holds its content."""
    live = {r.row for r in store.catalogue.records() if r.status == "ok"}
    mask = store.catalogue.search_mask()
    dead = set() if mask is None else set(np.flatnonzero(~mask).tolist())
    assert live | dead == set(range(store.rows)) and not live & dead
    for record in store.catalogue.records():
        if record.status == "ok":
            assert bit_equal(store.features()[record.row], features_of(record.content_hash))
            assert bit_equal(store.vectors()[record.row], project(features_of(record.content_hash)[None])[0])


def int8_rows(store: IndexStore) -> int:
    """Rows the exact index's int8 copy covers, as committed."""
    return store.index("exact").quantized_rows


def quantized_sizes(index: Path) -> list[int]:
    """Bytes of the int8 copy's files: codes, then per-row statistics."""
    return [p.stat().st_size for p in sorted(index.glob("*.q8codes")) + sorted(index.glob("*.q8rows"))]


def assert_search_is_exact(store: IndexStore, queries: int = 3) -> dict:
    """search gives the float32 pass's result (rows and score bits); returns the path of the last search."""
    rng = np.random.default_rng(store.rows)
    vectors = store.vectors()
    info: dict = {}
    for _ in range(queries):
        query = rng.standard_normal(store.d_search).astype(np.float32)
        for mask in (rng.random(store.rows) < 0.6, store.catalogue.search_mask()):
            for min_score in (None, 0.5):
                info = {}
                rows, scores = index_search(store, query, 7, mask=mask, min_score=min_score, info=info)
                want_rows, want_scores = top_k(vectors, query, 7, mask=mask, min_score=min_score)
                assert rows.tolist() == want_rows.tolist() and bit_equal(scores, want_scores)
    return info


@pytest.fixture(autouse=True)
def int8_from_the_first_block(monkeypatch):
    """Small indexes use the int8 copy too (by default only large ones do)."""
    monkeypatch.setattr(exact, "QUANT_MIN_ROWS", 0)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(exact_index, "QUANT_BLOCK", 16)
    monkeypatch.setattr(int8_copy, "SPOT_CHECK_ROWS", 16)     # a reader spot-checks every (small) block


# ---------------------------------------------------------------------------- basic use


def test_add_lookup_and_read_back_bit_exact(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        rows = add(store, [(entry("a.jpg"), "ca"), (entry("b.jpg", size=7, mtime_ns=9), "cb")])
        assert rows == [0, 1]
        record = store.catalogue.lookup(ROOT / "b.jpg")
        assert (record.size, record.mtime_ns, record.content_hash, record.status, record.row) == (7, 9, "cb", "ok", 1)
        assert store.catalogue.lookup(ROOT / "nope.jpg") is None
        assert store.catalogue.is_current(entry("b.jpg", size=7, mtime_ns=9))
        assert not store.catalogue.is_current(entry("b.jpg", size=7, mtime_ns=10))
    with open_index(tmp_path / "idx", IndexIdentity(image_fingerprint="img-A"), "read") as reader:
        assert reader.vectors().shape == (2, D_SEARCH) and reader.features().shape == (2, D_CLIP)
        assert_row_invariants(reader)
        assert reader.catalogue.paths_for_rows([1, 0]) == {0: [str(ROOT / "a.jpg")], 1: [str(ROOT / "b.jpg")]}
        assert reader.catalogue.search_mask() is None
    assert [p.stat().st_size for p in row_files(tmp_path / "idx")] == [2 * D_CLIP * 4, 2 * D_SEARCH * 4]


def test_moved_file_reuses_its_row_without_a_new_vector(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry("old/a.jpg"), "ca"), (entry("b.jpg"), "cb")])
        row = store.catalogue.find_by_hash("ca")
        assert row == 0 and store.catalogue.find_by_hash("unknown") is None
        store.add_batch(reused=[Reused(entry("new/a.jpg"), "ca", row)])
        assert store.catalogue.remove_missing(ROOT, [ROOT / "new/a.jpg", ROOT / "b.jpg"]) == 1
        assert store.rows == 2 and store.catalogue.search_mask() is None
        assert store.catalogue.lookup(ROOT / "old/a.jpg") is None and store.catalogue.lookup(ROOT / "new/a.jpg").row == 0
        assert_row_invariants(store)


def test_copies_share_a_row_and_both_paths_are_reported(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry("a.jpg"), "ca")])
        store.add_batch(reused=[Reused(entry("copy.jpg"), "ca", 0)])
        assert store.catalogue.paths_for_rows([0]) == {0: [str(ROOT / "a.jpg"), str(ROOT / "copy.jpg")]}
        store.catalogue.remove_missing(ROOT, [ROOT / "copy.jpg"])
        assert store.catalogue.search_mask() is None  # the row is still used by the copy
        assert_row_invariants(store)


def test_deleted_file_leaves_the_index_and_search(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry("a.jpg"), "ca"), (entry("b.jpg"), "cb"), (entry("sub/c.jpg"), "cc")])
        assert store.catalogue.remove_missing(ROOT, [ROOT / "a.jpg", ROOT / "sub/c.jpg"]) == 1
        assert store.catalogue.lookup(ROOT / "b.jpg") is None
        assert store.catalogue.search_mask().tolist() == [True, False, True]
        assert_row_invariants(store)
        # a dead row is still found by content: a file moved to a folder indexed later needs no decode
        assert store.catalogue.find_by_hash("cb") == 1
        store.add_batch(reused=[Reused(entry("b.jpg", root=Path("/other")), "cb", 1)])
        assert store.catalogue.search_mask() is None
        assert_row_invariants(store)


def test_remove_missing_stays_inside_its_root_and_spares_unreadable_folders(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry("a.jpg"), "ca"), (entry("locked/b.jpg"), "cb"),
                    (entry("x.jpg", root=Path("/photos2")), "cx"), (entry("y.jpg", root=Path("/photos.old")), "cy")])
        assert store.catalogue.remove_missing(ROOT, [], keep_under=[ROOT / "locked"]) == 1
        remaining = sorted(r.path for r in store.catalogue.records())
        assert remaining == ["/photos.old/y.jpg", "/photos/locked/b.jpg", "/photos2/x.jpg"]


def test_changed_file_gets_a_new_row_and_the_old_one_dies(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry("a.jpg", mtime_ns=1), "v1")])
        changed = entry("a.jpg", size=200, mtime_ns=2)
        assert not store.catalogue.is_current(changed)
        add(store, [(changed, "v2")])
        assert store.catalogue.lookup(ROOT / "a.jpg").row == 1
        assert store.catalogue.search_mask().tolist() == [False, True]
        assert_row_invariants(store)


def test_errors_are_reported_and_retried_only_when_the_file_changes(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        bad = entry("bad.jpg", size=10, mtime_ns=5)
        store.add_batch(failed=[Failed(bad, "cannot identify image file")])
        assert store.catalogue.is_current(bad)
        assert store.catalogue.known_files(ROOT) == {str(bad.path): (10, 5)} and store.catalogue.known_files("/elsewhere") == {}
        assert not store.catalogue.is_current(entry("bad.jpg", size=10, mtime_ns=6))
        (record,) = store.catalogue.errors()
        assert (record.path, record.status, record.error, record.row) == (str(bad.path), "error", "cannot identify image file", None)
        assert store.stats().errors == 1 and store.rows == 0
        add(store, [(entry("bad.jpg", size=11, mtime_ns=6), "fixed")])
        assert store.catalogue.errors() == [] and store.stats().ok == 1


def test_batch_is_validated_before_anything_is_written(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        good = np.zeros((1, D_CLIP), np.float32)
        with pytest.raises(ValueError, match="shape"):
            store.add_batch([Embedded(entry("a.jpg"), "h")], good, np.zeros((1, D_SEARCH + 1), np.float32))
        with pytest.raises(ValueError, match="NaN"):
            store.add_batch([Embedded(entry("a.jpg"), "h")], good * np.nan, good[:, :D_SEARCH])
        with pytest.raises(ValueError, match="twice"):
            store.add_batch([Embedded(entry("a.jpg"), "h")], good, good[:, :D_SEARCH], failed=[Failed(entry("a.jpg"), "x")])
        with pytest.raises(ValueError, match="does not hold content"):
            store.add_batch(reused=[Reused(entry("b.jpg"), "h", 0)])
        assert store.rows == 0 and list(store.catalogue.records()) == []
        assert [p.stat().st_size for p in row_files(tmp_path / "idx")] == [0, 0]


def test_folder_restriction_mask(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry("2020/a.jpg"), "a"), (entry("2020x/b.jpg"), "b"), (entry("2020/sub/c.jpg"), "c")])
        assert store.catalogue.search_mask(under=ROOT / "2020").tolist() == [True, False, True]
        assert store.catalogue.search_mask(under=str(ROOT) + "/").tolist() == [True, True, True]


# ---------------------------------------------------------------------------- bundles


def test_index_of_another_image_encoder_is_refused_with_what_to_do(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry("a.jpg"), "ca")])
    with pytest.raises(IndexMismatchError) as refused:
        open_store(tmp_path / "idx", image_fingerprint="img-B", label="bundle B")
    message = str(refused.value)
    assert "bundle A" in message and "img-A" in message and "img-B" in message
    assert "--rebuild" in message and "--index" in message and "\n" not in message
    with pytest.raises(IndexMismatchError):
        open_index(tmp_path / "idx", IndexIdentity(image_fingerprint="img-B"), "read")
    with open_store(tmp_path / "idx", "rebuild", image_fingerprint="img-B") as rebuilt:
        assert rebuilt.rows == 0 and list(rebuilt.catalogue.records()) == [] and rebuilt.image_fingerprint == "img-B"
    assert [p.stat().st_size for p in row_files(tmp_path / "idx")] == [0, 0]


def test_new_heads_reproject_every_vector_without_images(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry(f"{i}.jpg"), f"c{i}") for i in range(10)])
    with open_store(tmp_path / "idx", heads_fingerprint="heads-2", d_search=3) as store:
        assert store.needs_reprojection
        with pytest.raises(IndexStoreError, match="reproject"):
            add(store, [(entry("new.jpg"), "n")])
        calls = []
        store.reproject(lambda f: calls.append(len(f)) or f[:, :3] * 10, heads_fingerprint="heads-2", d_search=3, chunk_rows=4)
        assert calls == [4, 4, 2] and not store.needs_reprojection
        expected = store.features()[:, :3] * 10
    with open_index(tmp_path / "idx", IndexIdentity(heads_fingerprint="heads-2"), "read") as reader:
        assert not reader.needs_reprojection and reader.d_search == 3
        assert bit_equal(reader.vectors(), expected)
    assert len(row_files(tmp_path / "idx")) == 2  # the old vectors file is gone
    with open_index(tmp_path / "idx", IndexIdentity(heads_fingerprint="heads-1"), "read") as stale_reader:
        assert stale_reader.needs_reprojection


def test_missing_index_and_busy_writer(tmp_path: Path):
    with pytest.raises(IndexMissingError, match="uclip index"):
        open_index(tmp_path / "none")
    with pytest.raises(IndexMissingError):
        open_index(tmp_path / "none", None, "write")
    with open_store(tmp_path / "idx") as writer:
        add(writer, [(entry("a.jpg"), "ca")])
        with pytest.raises(IndexBusyError, match=f"pid {os.getpid()}"):
            open_store(tmp_path / "idx")
        with open_index(tmp_path / "idx") as reader:  # readers never wait
            assert reader.rows == 1
    open_store(tmp_path / "idx").close()  # lock released on close


def test_corrupt_catalogue_is_refused_in_one_line(tmp_path: Path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "catalog.sqlite").write_bytes(b"this is not sqlite" * 100)
    for readonly in (True, False):
        with pytest.raises(IndexCorruptError, match="catalog.sqlite|catalogue"):
            open_store(tmp_path / "idx", "read" if readonly else "create")


def test_reader_sees_a_consistent_snapshot_while_the_writer_compacts(tmp_path: Path):
    with open_store(tmp_path / "idx") as writer:
        add(writer, [(entry(f"{i}.jpg"), f"c{i}") for i in range(8)])
        reader = open_index(tmp_path / "idx")
        writer.catalogue.remove_missing(ROOT, [ROOT / "6.jpg", ROOT / "7.jpg"])
        assert writer.compact(min_dead_share=0.9) == 0  # below the threshold: nothing done
        assert writer.compact(min_dead_share=0.5) == 6
        assert writer.rows == 2 and writer.catalogue.search_mask() is None
        assert_row_invariants(writer)
        assert writer.catalogue.paths_for_rows([0, 1]) == {0: [str(ROOT / "6.jpg")], 1: [str(ROOT / "7.jpg")]}
        # the reader still sees all 8 rows with matching paths and vectors (its files stay mapped)
        assert reader.rows == 8 and reader.catalogue.paths_for_rows([6]) == {6: [str(ROOT / "6.jpg")]}
        assert_row_invariants(reader)
        reader.close()
    assert len(row_files(tmp_path / "idx")) == 2


def test_a_long_lived_reader_moves_to_new_commits_on_refresh(tmp_path: Path):
    with open_store(tmp_path / "idx") as writer:
        add(writer, [(entry("a.jpg"), "ca")])
        with open_index(tmp_path / "idx") as reader:
            assert not reader.refresh() and reader.rows == 1
            add(writer, [(entry("b.jpg"), "cb")])
            assert reader.rows == 1 and reader.catalogue.lookup(ROOT / "b.jpg") is None     # its snapshot
            assert reader.refresh() and reader.rows == 2 and reader.catalogue.lookup(ROOT / "b.jpg").row == 1
            rows, _ = index_search(reader, project(features_of("cb")[None])[0], 1)
            assert rows.tolist() == [1]
            writer.catalogue.remove_missing(ROOT, [ROOT / "b.jpg"])                            # no new rows, one record less
            assert reader.refresh() and reader.catalogue.lookup(ROOT / "a.jpg") is None
            assert not reader.refresh()
            assert_row_invariants(reader)


def test_uncommitted_tail_is_truncated_on_open(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry("a.jpg"), "ca")])
    for f in row_files(tmp_path / "idx"):
        with open(f, "ab") as out:
            out.write(b"\x7f" * 100)
    with open_store(tmp_path / "idx") as store:
        assert [p.stat().st_size for p in row_files(tmp_path / "idx")] == [D_CLIP * 4, D_SEARCH * 4]
        assert_row_invariants(store)


def test_content_hash_identifies_content(tmp_path: Path):
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    (tmp_path / "c").write_bytes(b"other")
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b") != content_hash(tmp_path / "c")


# ---------------------------------------------------------------------------- kill -9

N_FILES, BATCH = 320, 16

WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from uclip_cli.index import access, exact_index, records, rowfiles
    from uclip_cli.index.identity import IndexIdentity
    exact_index.QUANT_BLOCK = {block}
    sys.path.insert(0, {tests!r})
    from test_store import entry, features_of, project

    index, hook, kill_at, log_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    appends = 0
    real_append = rowfiles.append_rows
    def append_then_maybe_die(path, first, rows):
        global appends
        real_append(path, first, rows)
        appends += str(path).endswith(".f32")     # the row files (their checksum files follow them)
        if hook == "mid_append" and appends == 2 * kill_at + 1:  # features of batch kill_at written, vectors not
            die()
    rowfiles.append_rows = append_then_maybe_die

    quantized = 0
    real_quantize = exact_index.ExactIndex._write
    def quantize_then_maybe_die(self, *args):
        global quantized
        changes = real_quantize(self, *args)
        quantized += 1
        if hook == "after_quantize" and quantized == kill_at + 1:
            die()  # new blocks of the int8 copy written and fsynced, their coverage not committed
        return changes
    exact_index.ExactIndex._write = quantize_then_maybe_die

    store = access.open_index(index, IndexIdentity(image_fingerprint="img-A", heads_fingerprint="heads-1", d_clip=8, d_search=6, unit_rows=False), "create")
    statements = {{"BEGIN IMMEDIATE": 0, "COMMIT": 0}}
    def trace(sql):
        if sql in statements:
            statements[sql] += 1
            if hook == "before_sql" and sql == "BEGIN IMMEDIATE" and statements[sql] == kill_at + 1:
                die()  # rows appended and fsynced, nothing in the catalogue yet
            if hook == "before_commit" and sql == "COMMIT" and statements[sql] == kill_at + 1:
                die()  # every record inserted, transaction not committed
    store.catalogue._conn.set_trace_callback(trace)

    log = open(log_path, "a")
    print("ready", flush=True)
    batch, done = [], 0
    def commit():
        global batch, done
        reused, new = [], []
        for e, c in ((e, c) for e, c in batch if c is not None):
            row = store.catalogue.find_by_hash(c)
            (reused if row is not None else new).append((e, c, row))
        feats = np.stack([features_of(c) for _, c, _ in new]) if new else None
        store.add_batch([records.Embedded(e, c) for e, c, _ in new], feats, project(feats) if new else None,
                        reused=[records.Reused(e, c, r) for e, c, r in reused],
                        failed=[records.Failed(e, "corrupt") for e, c in batch if c is None])
        if hook == "after_commit" and done == kill_at:
            die()  # committed, but the writer never got to log it
        log.write("".join(str(e.path) + "\\n" for e, _ in batch))
        log.flush()
        os.fsync(log.fileno())
        done += 1
        batch = []
    for i in range({n}):
        e = entry(f"{{i:04d}}.jpg", size=1000 + i, mtime_ns=i)
        if store.catalogue.is_current(e):
            continue
        content = None if i % 7 == 3 else f"c{{i if i % 10 else i // 2}}"  # failures and repeated content
        batch.append((e, content))
        if len(batch) == {batch}:
            commit()
    if batch:
        commit()
    store.close()
    print("done", flush=True)
    """
)


def run_writer(tmp_path: Path, hook: str = "none", kill_at: int = 0, kill_after_s: float | None = None,
               block: int = exact_index.QUANT_BLOCK) -> int:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent), n=N_FILES, batch=BATCH, block=block))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "idx"), hook, str(kill_at), str(tmp_path / "committed.log")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    if kill_after_s is not None:
        time.sleep(kill_after_s)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode


def check_after_crash(tmp_path: Path) -> int:
    index = tmp_path / "idx"
    logged = set((tmp_path / "committed.log").read_text().split()) if (tmp_path / "committed.log").exists() else set()
    with open_index(index) as reader:  # before any recovery: committed state only
        assert_row_invariants(reader)
        assert_search_is_exact(reader)
    with open_store(index) as store:                       # a writer's open drops the uncommitted tail
        sizes = [p.stat().st_size for p in row_files(index)]
        assert sizes == [store.rows * D_CLIP * 4, store.rows * D_SEARCH * 4]
        assert quantized_sizes(index) == [int8_rows(store) * D_SEARCH, int8_rows(store) * 16]
        assert_row_invariants(store)
        assert_search_is_exact(store)
        records = {r.path: r for r in store.catalogue.records()}
        assert logged <= set(records), "a committed batch was lost"
        assert store.catalogue.search_mask() is None, "a committed file was embedded twice"
        for path, record in records.items():
            i = int(Path(path).stem)
            assert (record.size, record.mtime_ns) == (1000 + i, i)
            assert (record.status == "error") == (i % 7 == 3)
        return len(records)


@pytest.mark.parametrize("hook", ["mid_append", "before_sql", "before_commit", "after_commit"])
def test_kill_9_at_each_step_of_a_batch_then_resume(tmp_path: Path, hook: str):
    assert run_writer(tmp_path, hook, kill_at=3) == -signal.SIGKILL
    indexed = check_after_crash(tmp_path)
    assert indexed == BATCH * (4 if hook == "after_commit" else 3)
    assert run_writer(tmp_path) == 0
    assert check_after_crash(tmp_path) == N_FILES


def test_kill_9_at_random_moments_then_resume(tmp_path: Path):
    rng = np.random.default_rng(1234)
    progress = []
    for _ in range(4):
        run_writer(tmp_path, kill_after_s=float(rng.uniform(0.0, 0.5)))
        progress.append(check_after_crash(tmp_path))
    assert progress == sorted(progress)  # nothing committed ever disappears
    assert run_writer(tmp_path) == 0
    assert check_after_crash(tmp_path) == N_FILES


def test_kill_9_between_the_int8_copy_and_the_commit_then_resume(tmp_path: Path):
    assert run_writer(tmp_path, "after_quantize", kill_at=3, block=16) == -signal.SIGKILL
    with open_index(tmp_path / "idx") as reader:
        assert quantized_sizes(tmp_path / "idx")[0] > int8_rows(reader) * D_SEARCH   # an uncommitted tail
        assert int8_rows(reader) == reader.rows // 16 * 16 > 0
    check_after_crash(tmp_path)
    assert run_writer(tmp_path, block=16) == 0
    assert check_after_crash(tmp_path) == N_FILES


def test_kill_9_at_random_moments_with_a_growing_int8_copy(tmp_path: Path):
    rng = np.random.default_rng(99)
    for _ in range(3):
        run_writer(tmp_path, kill_after_s=float(rng.uniform(0.0, 0.5)), block=16)
        check_after_crash(tmp_path)
    assert run_writer(tmp_path, block=16) == 0
    assert check_after_crash(tmp_path) == N_FILES
    with open_index(tmp_path / "idx") as reader:
        assert reader.searcher("exact").quantized().rows == int8_rows(reader) == reader.rows // 16 * 16 > 0


MAINTENANCE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity
    index, what = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if what == "reproject":
        store = open_index(index, IndexIdentity(image_fingerprint="img-A", heads_fingerprint="heads-2", d_clip=8, d_search=6), "create")
        chunks = []
        def project(f):
            chunks.append(1)
            if len(chunks) == 3:
                die()
            return f[:, :6] * 0
        store.reproject(project, heads_fingerprint="heads-2", d_search=6, chunk_rows=8)
    else:
        store = open_index(index, IndexIdentity(image_fingerprint="img-A", heads_fingerprint="heads-1", d_clip=8, d_search=6), "create")
        store.catalogue._conn.set_trace_callback(lambda sql: sql == "COMMIT" and die())
        store.compact(min_dead_share=0.1)
    """
)


@pytest.mark.parametrize("what", ["reproject", "compact"])
def test_kill_9_during_reprojection_or_compaction_keeps_the_old_index(tmp_path: Path, what: str):
    with open_store(tmp_path / "idx") as store:
        for b in range(5):
            add(store, [(entry(f"{b}-{i}.jpg"), f"c{b}-{i}") for i in range(8)])
        store.catalogue.remove_missing(ROOT, [ROOT / f"{b}-0.jpg" for b in range(5)])
        before = {r.path: r.row for r in store.catalogue.records()}
    script = tmp_path / "maintenance.py"
    script.write_text(MAINTENANCE)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "idx"), what], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    new_files = 1 if what == "reproject" else 2  # a new generation was written, never committed
    assert len(row_files(tmp_path / "idx")) == 2 + new_files
    with open_store(tmp_path / "idx") as store:
        assert not store.needs_reprojection and store.rows == 40
        assert {r.path: r.row for r in store.catalogue.records()} == before
        assert_row_invariants(store)
        assert len(row_files(tmp_path / "idx")) == 2  # orphans removed on open


# ---------------------------------------------------------------------------- top_k


def brute_force(vectors, query, k, mask=None, min_score=None):
    scores = vectors @ query
    candidates = [(-float(s), r) for r, s in enumerate(scores)
                  if (mask is None or mask[r]) and (min_score is None or s >= min_score)]
    best = sorted(candidates)[:k]
    return [r for _, r in best], [-s for s, _ in best]


@pytest.mark.parametrize("n,k,chunk", [(1000, 10, 64), (1000, 1, 1000), (50, 100, 16), (300, 0, 64)])
def test_top_k_matches_a_full_sort_with_ties(n: int, k: int, chunk: int):
    rng = np.random.default_rng(n + k)
    vectors = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)  # few distinct scores: many ties
    query = rng.integers(-2, 3, size=4).astype(np.float32)
    masks = [None, rng.random(n) < 0.5, rng.random(n) < 0.05]
    for mask in masks:
        for min_score in (None, 1.0):
            rows, scores = top_k(vectors, query, k, mask=mask, min_score=min_score, chunk_rows=chunk)
            want_rows, want_scores = brute_force(vectors, query, k, mask, min_score)
            assert rows.tolist() == want_rows
            assert scores.tolist() == want_scores
            assert rows.dtype == np.int64 and scores.dtype == np.float32


def test_top_k_over_a_memmap_of_the_store(tmp_path: Path):
    with open_store(tmp_path / "idx") as store:
        add(store, [(entry(f"{i}.jpg"), f"c{i}") for i in range(200)])
        vectors = store.vectors()
        assert isinstance(vectors, np.memmap)
        query = vectors[17]
        rows, scores = top_k(vectors, query, 5, chunk_rows=32)
        want_rows, _ = brute_force(np.asarray(vectors), np.asarray(query), 5)
        assert rows.tolist() == want_rows
        exact = np.asarray(vectors, np.float64)[rows] @ np.asarray(query, np.float64)
        assert_within(scores, exact, dot_bound(np.asarray(vectors)[rows], np.asarray(query)) + U32 * np.abs(exact))


def test_top_k_rejects_bad_input():
    with pytest.raises(ValueError, match="query"):
        top_k(np.zeros((3, 4), np.float32), np.zeros(5, np.float32), 1)
    with pytest.raises(ValueError, match="mask"):
        top_k(np.zeros((3, 4), np.float32), np.zeros(4, np.float32), 1, mask=np.ones(2, bool))


# ---------------------------------------------------------------------------- int8 copy


def test_int8_copy_follows_each_commit_and_search_stays_exact(tmp_path: Path, small_blocks):
    index = tmp_path / "idx"
    with open_store(index) as store:
        for b in range(9):
            add(store, [(entry(f"{b}-{i}.jpg"), f"c{b}-{i}") for i in range(7)])
            assert int8_rows(store) == store.rows // 16 * 16
            assert quantized_sizes(index) == [int8_rows(store) * D_SEARCH, int8_rows(store) * 16]
            info = assert_search_is_exact(store)
            assert info["path"] == ("int8" if store.rows >= 16 else "float32")
        store.catalogue.remove_missing(ROOT, [ROOT / f"{b}-{i}.jpg" for b in range(9) for i in range(4)])  # dead rows
        assert store.catalogue.search_mask() is not None
        assert assert_search_is_exact(store)["path"] == "int8"
    with open_index(index) as reader:
        assert reader.searcher("exact").quantized().rows == 48
        assert assert_search_is_exact(reader)["path"] == "int8"
        assert reader.searcher("exact").sessions is CPU      # the caller's factory makes the kernel's session


def test_a_copy_keeps_the_block_it_was_written_with(tmp_path: Path, monkeypatch):
    """An index whose int8 copy was written in wider blocks (8,192 rows before issue 22) is searched with them,
    exactly, and new rows extend it in the same blocks, after the default block changes."""
    index = tmp_path / "idx"
    monkeypatch.setattr(exact_index, "QUANT_BLOCK", 32)
    with open_store(index) as store:
        add(store, [(entry(f"a{i}.jpg"), f"a{i}") for i in range(70)])
        assert int8_rows(store) == 64
    monkeypatch.setattr(exact_index, "QUANT_BLOCK", 16)      # the default as a later release has it
    with open_store(index, mode="write") as store:
        assert store.meta["quantized_block"] == "32" and int8_rows(store) == 64
        add(store, [(entry(f"b{i}.jpg"), f"b{i}") for i in range(30)])
        assert store.meta["quantized_block"] == "32" and int8_rows(store) == 96
        assert quantized_sizes(index) == [96 * D_SEARCH, 96 * 16]
    with open_index(index) as reader:
        assert reader.searcher("exact").quantized().block == 32
        assert assert_search_is_exact(reader)["path"] == "int8"


def test_reader_keeps_its_snapshot_of_the_int8_copy(tmp_path: Path, small_blocks):
    index = tmp_path / "idx"
    with open_store(index) as store:
        add(store, [(entry(f"a{i}.jpg"), f"a{i}") for i in range(20)])
        with open_index(index) as reader:
            add(store, [(entry(f"b{i}.jpg"), f"b{i}") for i in range(30)])
            assert (int8_rows(store), int8_rows(reader), reader.rows) == (48, 16, 20)
            assert reader.searcher("exact").quantized().rows == 16
            assert_search_is_exact(reader)


def test_a_missing_short_or_damaged_copy_means_float32_until_the_writer_repairs_it(tmp_path: Path, small_blocks):
    index = tmp_path / "idx"
    with open_store(index) as store:
        for b in range(4):
            add(store, [(entry(f"{b}-{i}.jpg"), f"c{b}-{i}") for i in range(15)])
    codes, stats = index / "vectors.q8codes", index / "vectors.q8rows"
    good = codes.read_bytes(), stats.read_bytes()

    def reader_copy_rows() -> int:
        with open_index(index) as reader:
            assert_search_is_exact(reader)
            copy = reader.searcher("exact").quantized()
            return 0 if copy is None else copy.rows

    def repaired() -> bool:
        with open_store(index) as store:
            assert int8_rows(store) == 48
        return (codes.read_bytes(), stats.read_bytes()) == good

    assert reader_copy_rows() == 48
    damaged = bytearray(good[0])
    for j in range(D_SEARCH):                    # block 1: its last row's codes zeroed
        damaged[1 * D_SEARCH * 16 + j * 16 + 15] = 0
    codes.write_bytes(bytes(damaged))
    assert reader_copy_rows() == 16
    assert repaired()
    with open(stats, "r+b") as f:
        f.truncate(len(good[1]) - 4)
    assert reader_copy_rows() == 0
    assert repaired()
    codes.unlink()
    stats.unlink()
    assert reader_copy_rows() == 0
    assert repaired()


def test_an_index_written_before_the_copy_gets_one_at_the_writers_open(tmp_path: Path, small_blocks):
    import sqlite3

    index = tmp_path / "idx"
    with open_store(index) as store:
        add(store, [(entry(f"{i}.jpg"), f"c{i}") for i in range(40)])
    with sqlite3.connect(index / "catalog.sqlite") as c:
        c.execute("DELETE FROM meta WHERE key LIKE 'quantized_%'")
    for p in index.glob("*.q8*"):
        p.unlink()
    with open_index(index) as reader:
        assert int8_rows(reader) == 0 and reader.searcher("exact").quantized() is None
        assert assert_search_is_exact(reader)["path"] == "float32"
    with open_store(index) as store:
        assert int8_rows(store) == 32 and quantized_sizes(index) == [32 * D_SEARCH, 32 * 16]
    with open_index(index) as reader:
        assert assert_search_is_exact(reader)["path"] == "int8"


def test_reprojection_and_compaction_rebuild_the_copy(tmp_path: Path, small_blocks):
    index = tmp_path / "idx"
    with open_store(index) as store:
        for b in range(5):
            add(store, [(entry(f"{b}-{i}.jpg"), f"c{b}-{i}") for i in range(10)])
    with open_store(index, heads_fingerprint="heads-2") as store:
        store.reproject(lambda f: f[:, :4] * -3, heads_fingerprint="heads-2", d_search=4)
        assert int8_rows(store) == 48 and store.d_search == 4
        assert sorted(p.name for p in index.glob("*.q8*")) == ["vectors.1.q8codes", "vectors.1.q8rows", "vectors.1.q8sums"]
        assert quantized_sizes(index) == [48 * 4, 48 * 16]
        assert assert_search_is_exact(store)["path"] == "int8"
        store.catalogue.remove_missing(ROOT, [ROOT / f"{b}-{i}.jpg" for b in range(5) for i in range(4)])
        assert store.compact(min_dead_share=0.1) == 30
        assert store.rows == 20 and int8_rows(store) == 16
        assert sorted(p.name for p in index.glob("*.q8*")) == ["vectors.2.q8codes", "vectors.2.q8rows", "vectors.2.q8sums"]
        assert_search_is_exact(store)
    with open_index(index, IndexIdentity(heads_fingerprint="heads-2"), "read") as reader:
        assert assert_search_is_exact(reader)["path"] == "int8"


# ---------------------------------------------------------------------------- row checksums (issue 19, item 1)


def flip_sign(path: Path, row: int, d: int, column: int = 0) -> None:
    """Flip the sign bit of one float32: the row keeps its length, only its checksum tells."""
    with open(path, "r+b") as f:
        f.seek((row * d + column) * 4 + 3)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x80]))


def test_every_row_carries_a_checksum_written_with_it_and_kept_through_generations(tmp_path: Path):
    index = tmp_path / "idx"
    with open_store(index) as store:
        add(store, [(entry(f"{i}.jpg"), f"c{i}") for i in range(6)])
        for kind in ("features", "vectors"):
            assert store.row_files.crc_path(kind).stat().st_size == 6 * 4
            assert store.row_files.unsound(kind).size == 0
        flip_sign(store.row_files.path("vectors"), 2, D_SEARCH)
        flip_sign(store.row_files.path("features"), 4, D_CLIP, column=3)
        assert store.row_files.unsound("vectors").tolist() == [2] and store.row_files.unsound("features").tolist() == [4]
        store.catalogue.remove_missing(ROOT, [ROOT / f"{i}.jpg" for i in range(5)])         # row 5 dies
        assert store.compact(min_dead_share=0.1) == 0 and "not compacted" in store.notes[-1]   # never hides damage
    with open_store(index, heads_fingerprint="heads-2") as store:               # the new heads' projection
        store.reproject(project, heads_fingerprint="heads-2", d_search=D_SEARCH)
        assert "1 photos had damaged image features" in store.notes[-1] and store.catalogue.lookup(ROOT / "4.jpg") is None
        assert store.row_files.unsound("vectors").size == 0 and store.row_files.crc_path("vectors").name == "vectors.1.crc"
        assert not (index / "vectors.crc").exists()                            # the old generation's went with it
        assert store.compact(min_dead_share=0.1) == 2 and store.rows == 4          # rows 4 and 5 gone
        assert all(store.row_files.unsound(kind).size == 0 for kind in ("features", "vectors"))


def test_an_index_written_before_checksums_gets_them_from_its_next_writer(tmp_path: Path):
    index = tmp_path / "idx"
    with open_store(index) as store:
        add(store, [(entry(f"{i}.jpg"), f"c{i}") for i in range(3)])
    for crc in index.glob("*.crc"):
        crc.unlink()
    with open_index(index) as reader:                                        # readers never write: unchecked
        assert reader.row_files.crc_map("vectors") is None and reader.unsound(np.arange(3)).size == 0
    with open_store(index) as store:
        assert store.row_files.crc_path("vectors").stat().st_size == 3 * 4 and store.row_files.unsound("vectors").size == 0


def test_a_search_leaves_out_a_row_whose_checksum_fails_and_says_so(tmp_path: Path):
    index = tmp_path / "idx"
    with open_store(index) as store:
        add(store, [(entry(f"{i}.jpg"), f"c{i}") for i in range(8)])
        query = np.asarray(store.vectors()[3])
    flip_sign(index / "vectors.f32", 3, D_SEARCH, column=int(np.argmax(np.abs(query))))
    with open_index(index) as reader:
        info: dict = {}
        rows, _ = index_search(reader, query, 8, info=info)
        assert 3 not in rows.tolist() and info["damaged"] == [3] and len(rows) == 7
        reader.warm()                                                         # serve: every row checked once
        assert reader.proven_rows() == 8 and reader.unsound(np.arange(8)).tolist() == [3]
        rows, _ = index_search(reader, query, 8, info=(info := {}))
        assert 3 not in rows.tolist() and info["damaged"] == [3]
