"""Damaged indexes (issue 10, items 7, 8, 9, 13, 14): each damage answers correctly, is repaired, or is
refused in one line naming the file and what to do, never a traceback, a hang or a wrong answer."""
from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import invoke_uclip, run_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from uclip_cli.index import exact, exact_index
from uclip_cli.index.exact import top_k
from uclip_cli.index import access
from uclip_cli.index.errors import IndexDiskFullError
from uclip_cli.index.identity import IndexIdentity
from uclip_cli.index.records import Embedded
from uclip_cli.index.search import search as index_search
from uclip_cli.index.store import IndexStore
from uclip_cli.sessions import SessionFactory
from uclip_cli.walk import FileEntry

PHOTOS = 24
QUERY = "a red bicycle"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damage") / "photos"
    for i in range(PHOTOS):
        path = root / f"set{i % 3}" / f"img_{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(photo_like(64, 48, seed=500 + i), quality=85))
    return root.resolve()


@pytest.fixture(scope="module")
def indexed(photos, tiny_bundle, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("damage-home")
    index = home / "index"
    invoke_uclip(["index", photos, "--index", index, "--no-progress"], uclip_env(home, bundle=tiny_bundle)).ok()
    return index


@pytest.fixture
def index(indexed, tmp_path) -> Path:
    """A fresh copy of the indexed fixture folder's index."""
    return Path(shutil.copytree(indexed, tmp_path / "index", ignore=shutil.ignore_patterns("writer.lock")))


@pytest.fixture
def env(tmp_path, tiny_bundle, index) -> dict:
    return uclip_env(tmp_path, bundle=tiny_bundle, index=index)


CPU = SessionFactory(device="cpu")


def open_index(path: Path, identity: IndexIdentity | None = None, mode: str = "read") -> IndexStore:
    """access.open_index with a CPU session factory, so that searches take the int8 pass where it pays."""
    return access.open_index(path, identity, mode, sessions=CPU)


def answer(env: dict, *extra) -> list[tuple[str, float]]:
    out = json.loads(invoke_uclip(["query", QUERY, "-f", "json", "-n", "8", *extra], env).ok().stdout)
    return [(r["path"], r["score"]) for r in out["results"]]


def rows_of(index: Path) -> dict[str, int]:
    with open_index(index) as store:
        return {r.path: r.row for r in store.catalogue.records() if r.row is not None}


def vectors_file(index: Path) -> Path:
    with open_index(index) as store:
        return index / store.meta["vectors_file"]


def poke(path: Path, row: int, d: int, value: float, column: int = 0) -> None:
    """Set one float32 of row `row` (d per row) of a row file."""
    with open(path, "r+b") as f:
        f.seek((row * d + column) * 4)
        f.write(np.float32(value).tobytes())


def flip_bit(path: Path, row: int, d: int, bit: int) -> None:
    """Flip one bit (31: the sign, 23-30: the exponent) of the largest float32 of row `row`: the sign bit keeps
    the row's length, so only its checksum can tell."""
    values = np.fromfile(path, dtype="<f4", count=d, offset=row * d * 4)
    column = int(np.argmax(np.abs(values)))
    word = values[column:column + 1].view("<u4") ^ np.uint32(1 << bit)
    with open(path, "r+b") as f:
        f.seek((row * d + column) * 4)
        f.write(word.tobytes())


# ---------------------------------------------------------------------------- item 9: the row count


@pytest.mark.parametrize("count", ["3", "1000", "abc"])
def test_a_wrong_row_count_is_repaired_from_the_records_never_truncated(index, env, count):
    before, rows_before = answer(env), rows_of(index)
    sizes = {p.name: p.stat().st_size for p in index.glob("*.f32")}
    with sqlite3.connect(index / "catalog.sqlite") as c:
        c.execute("UPDATE meta SET value = ? WHERE key = 'rows'", (count,))
    reader = invoke_uclip(["query", QUERY, "-f", "json", "-n", "8"], env).ok()
    assert f"counted '{count}' rows but its records use {PHOTOS}" in reader.stderr          # said, and searched in full
    assert [(r["path"], r["score"]) for r in json.loads(reader.stdout)["results"]] == before
    writer = invoke_uclip(["index", "--no-progress"], env).ok()
    assert "repaired" in writer.stderr and f"{PHOTOS} images searchable" in writer.stdout
    assert {p.name: p.stat().st_size for p in index.glob("*.f32")} == sizes                # nothing destroyed
    assert rows_of(index) == rows_before and answer(env) == before
    with open_index(index) as store:
        assert store.meta["rows"] == str(PHOTOS) and not store.notes


def test_a_short_features_file_keeps_search_and_drops_only_the_photos_it_lost(index, env):
    """Issue 19, item 3: `truncate -s` of features.f32 made query, index and check --repair all refuse."""
    before = answer(env)
    with open_index(index) as store:
        features = index / store.meta["features_file"]
        d_clip = store.d_clip
    os.truncate(features, 5 * d_clip * 4)          # the frozen features of 19 photos lost
    reader = invoke_uclip(["query", QUERY, "-f", "json", "-n", "8"], env).ok()
    assert [(r["path"], r["score"]) for r in json.loads(reader.stdout)["results"]] == before
    assert str(features) in reader.stderr and "uclip check --repair" in reader.stderr
    check = invoke_uclip(["check"], env)
    assert check.code == 1 and str(features) in check.stdout + check.stderr
    repaired = invoke_uclip(["check", "--repair"], env)
    assert repaired.code == 0, repaired.stdout + repaired.stderr
    assert f"lost the image features of {PHOTOS - 5} photos" in repaired.stderr
    assert len(rows_of(index)) == 5
    assert f"{PHOTOS - 5} embedded" in invoke_uclip(["index", "--no-progress"], env).ok().stdout
    assert answer(env) == before and len(rows_of(index)) == PHOTOS


# ---------------------------------------------------------------------------- item 14: catalogue damage, --report


@pytest.mark.parametrize("table", ["files", "dead", "meta"])
def test_a_dropped_table_is_one_line(index, env, table):
    with sqlite3.connect(index / "catalog.sqlite") as c:
        c.execute(f"DROP TABLE {table}")
    for command in (["query", QUERY], ["index", "--no-progress"]):
        message = invoke_uclip(command, env).one_line_error()
        assert "catalog.sqlite" in message or "no index" in message


def test_a_missing_vectors_file_still_answers_says_how_to_recover_and_index_rebuilds_it(index, env):
    before = answer(env)
    vectors_file(index).unlink()
    meanwhile = invoke_uclip(["query", QUERY, "-f", "json", "-n", "8"], env).ok()     # from the features, in memory
    assert "is missing" in meanwhile.stderr and "projected in memory" in meanwhile.stderr and "uclip index" in meanwhile.stderr
    assert [r["path"] for r in json.loads(meanwhile.stdout)["results"]] == [path for path, _ in before]
    writer = invoke_uclip(["index", "--no-progress"], env).ok()       # computed again from the features
    assert "computed again from the stored image features" in writer.stderr
    assert answer(env) == before


def test_report_pointing_at_a_folder_or_an_unwritable_place_is_refused_before_any_work(index, env, photos, tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for report in (folder, blocker / "report.json"):
        message = invoke_uclip(["index", photos, "--report", report, "--no-progress"], env).one_line_error()
        assert "--report" in message and str(report) in message
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.tmp"))


def test_a_report_that_fails_at_the_end_keeps_what_was_indexed_and_leaves_no_tmp(index, env, photos, tmp_path, monkeypatch):

    (photos.parent / "bad").mkdir(exist_ok=True)
    bad = photos.parent / "bad" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    report = tmp_path / "out" / "report.json"
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, "{", encoding="utf-8")
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    try:
        message = invoke_uclip(["index", photos.parent / "bad", "--report", report, "--no-progress"], env).one_line_error()
    finally:
        bad.unlink()
    assert "cannot write the report" in message and "kept" in message
    assert not list(report.parent.glob("*.tmp"))
    with open_index(index) as store:     # the batch was committed before the report failed
        assert store.catalogue.lookup(bad).status == "error"


# ---------------------------------------------------------------------------- item 7: damaged rows


@pytest.mark.parametrize("value", [1e30, np.nan, 0.0, "sign", "exponent"])
def test_a_damaged_row_is_left_out_said_and_repaired_from_the_features(index, env, value):
    before = answer(env)
    target = before[-1][0]                              # a photo inside the answer
    row = rows_of(index)[target]
    path = vectors_file(index)
    d = path.stat().st_size // 4 // PHOTOS
    if value in ("sign", "exponent"):
        flip_bit(path, row, d, 31 if value == "sign" else 29)
    elif value == 0.0:
        with open(path, "r+b") as f:                    # a zeroed row
            f.seek(row * d * 4)
            f.write(bytes(d * 4))
    else:
        poke(path, row, d, value)
    damaged = invoke_uclip(["query", QUERY, "-f", "json", "-n", "8"], env).ok()
    got = [(r["path"], r["score"]) for r in json.loads(damaged.stdout)["results"]]
    assert target not in [p for p, _ in got] and all(s < 1.0001 for _, s in got)
    assert [p for p, _ in got][:len(before) - 1] == [p for p, _ in before if p != target][:len(before) - 1]
    assert "damaged vectors" in damaged.stderr and "uclip check --repair" in damaged.stderr
    check = invoke_uclip(["check"], env)
    assert check.code == 1 and "BAD  vectors rows" in check.stdout
    repaired = invoke_uclip(["check", "--repair"], env)
    assert repaired.code == 0, repaired.stdout + repaired.stderr
    assert "computed again from the stored image features" in repaired.stderr
    assert answer(env) == before


@pytest.mark.parametrize("damage", ["inf", "sign"])
def test_damaged_features_drop_the_photo_and_the_next_index_embeds_it_again(index, env, photos, damage):
    before = answer(env)
    with open_index(index) as store:
        features, d_clip = index / store.meta["features_file"], store.d_clip
    target = before[0][0]
    if damage == "sign":
        flip_bit(features, rows_of(index)[target], d_clip, 31)
    else:
        poke(features, rows_of(index)[target], d_clip, np.inf)
    assert answer(env) == before                        # answers read the vectors, which are whole
    check = invoke_uclip(["check"], env)
    assert check.code == 1 and "BAD  features rows" in check.stdout
    repaired = invoke_uclip(["check", "--repair"], env)
    assert repaired.code == 0 and "embeds them again" in repaired.stderr
    assert target not in rows_of(index)
    assert "1 embedded" in invoke_uclip(["index", "--no-progress"], env).ok().stdout
    assert answer(env) == before


def test_check_on_a_small_index_says_there_is_no_int8_or_approximate_copy_and_why(index, env):
    """Issue 21: below one int8 block and below the ANN threshold nothing is built; `check` says so in words."""
    shown = invoke_uclip(["check"], env).ok().stdout
    lines = {line[5:21].strip(): line[21:].strip() for line in shown.splitlines()}
    assert lines["exact index"] == (f"no int8 copy yet: it is made in blocks of {exact_index.QUANT_BLOCK:,} rows and the index "
                                    f"has {PHOTOS} (searches scan the float32 rows, as fast at this size)")
    assert lines["ann index"].startswith("no approximate index: ") and lines["ann index"].endswith("; searches are exact")
    assert "0 rows covered" not in shown and shown.startswith("ok ")
    as_json = json.loads(invoke_uclip(["check", "--json"], env).ok().stdout)
    assert [c["detail"] for c in as_json["checks"] if c["name"] == "exact index"] == [lines["exact index"]]


@pytest.fixture
def int8_everywhere(monkeypatch):
    monkeypatch.setattr(exact, "QUANT_MIN_ROWS", 0)
    monkeypatch.setattr(exact_index, "QUANT_BLOCK", 64)


def unit_store(path: Path, n: int = 640, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    with open_index(path, IndexIdentity(image_fingerprint="i", heads_fingerprint="h", d_clip=d, d_search=d), "create") as store:
        entries = [Embedded(FileEntry(path=Path(f"/p/{i}.jpg"), root=Path("/p"), size=1, mtime_ns=1), f"c{i}") for i in range(n)]
        store.add_batch(entries, v, v)
    return v


def test_a_float32_row_that_disagrees_with_its_int8_copy_is_left_out_on_the_int8_path(tmp_path, int8_everywhere):
    v = unit_store(tmp_path / "idx")
    q = v[100] + 0.01 * v[7]
    q /= np.linalg.norm(q)
    want_rows, _ = top_k(v, q, 5)
    assert want_rows[0] == 100
    poke(tmp_path / "idx" / "vectors.f32", 100, v.shape[1], -0.5, column=3)   # the best row, made worse
    with open_index(tmp_path / "idx") as reader:
        info: dict = {}
        rows, scores = index_search(reader, q, 5, info=info)
        assert info["path"] == "int8" and info["damaged"] == [100]
        assert rows.tolist() == top_k(v, q, 6)[0].tolist()[1:]                   # the rest, in order


# ---------------------------------------------------------------------------- item 8: damaged int8 copy


@pytest.mark.parametrize("part", ["codes", "stats", "sums"])
def test_a_damaged_int8_copy_never_drops_the_best_match(tmp_path, int8_everywhere, part):
    v = unit_store(tmp_path / "idx")
    best = 64 * 3 + 30                                  # inside block 3, neither its first nor its last row
    q = v[best]
    d = v.shape[1]
    name = {"codes": "vectors.q8codes", "stats": "vectors.q8rows", "sums": "vectors.q8sums"}[part]
    path = tmp_path / "idx" / name
    data = bytearray(path.read_bytes())
    if part == "codes":                                 # the best row's codes zeroed: block 3 is [d, 64]
        for j in range(d):
            data[3 * d * 64 + j * 64 + 30] = 0
    elif part == "stats":                               # its scale shrunk: its score would look tiny
        stats = np.frombuffer(bytes(data), np.float32).reshape(-1, 4, 64).copy()
        stats[3, 0, 30] *= 1e-3
        data = bytearray(stats.tobytes())
    else:
        data[3 * (4 * d + 8) + 5] ^= 0x40               # block 3's check record
    path.write_bytes(bytes(data))
    with open_index(tmp_path / "idx") as reader:
        info: dict = {}
        rows, _ = index_search(reader, q, 3, info=info)
        assert rows[0] == best and rows.tolist() == top_k(v, q, 3)[0].tolist()
    with open_index(tmp_path / "idx", IndexIdentity(image_fingerprint="i", heads_fingerprint="h", d_clip=d, d_search=d), "create") as store:
        assert store.index("exact").verify(store.vectors()) == 640              # the writer rewrote the block
        info = {}
        assert index_search(store, q, 3, info=info)[0].tolist() == top_k(v, q, 3)[0].tolist() and "int8_damaged_blocks" not in info


# ---------------------------------------------------------------------------- item 13: disk full, read-only


def test_an_injected_full_disk_is_one_line_and_loses_nothing_committed(tmp_path, monkeypatch):
    from uclip_cli.index import rowfiles

    v = unit_store(tmp_path / "idx", n=100)
    real = rowfiles.append_rows

    def full(path, first, rows):
        real(path, first, rows[: len(rows) // 2])        # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rowfiles, "append_rows", full)
    with open_index(tmp_path / "idx", IndexIdentity(image_fingerprint="i", heads_fingerprint="h", d_clip=24, d_search=24), "create") as store:
        entries = [Embedded(FileEntry(path=Path(f"/p/new{i}.jpg"), root=Path("/p"), size=1, mtime_ns=1), f"n{i}") for i in range(10)]
        with pytest.raises(IndexDiskFullError, match=r"disk full at .*nothing committed was lost"):
            store.add_batch(entries, v[:10], v[:10])
        assert store.rows == 100
    monkeypatch.setattr(rowfiles, "append_rows", real)
    with open_index(tmp_path / "idx", IndexIdentity(image_fingerprint="i", heads_fingerprint="h", d_clip=24, d_search=24), "create") as store:
        assert store.rows == 100 and (tmp_path / "idx" / "vectors.f32").stat().st_size == 100 * 24 * 4
        assert index_search(store, v[42], 1)[0].tolist() == [42]


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode:
        pytest.skip(f"a small tmpfs cannot be mounted here ({done.stderr.decode().strip()}): "
                    "test_an_injected_full_disk_is_one_line_and_loses_nothing_committed covers the store")


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of `folder` until `leave` bytes are free (approximately)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            free = shutil.disk_usage(folder).free
            if free <= leave:
                break
            os.write(fd, bytes(min(1 << 16, max(4096, free - leave))))
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_at_several_levels_then_queries_on_the_full_and_on_a_read_only_disk(photos, tiny_bundle, tmp_path):
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "4m")
    try:
        env = uclip_env(tmp_path / "home", bundle=tiny_bundle, index=mount / "index")
        clean_env = uclip_env(tmp_path / "home", bundle=tiny_bundle, index=tmp_path / "clean")
        invoke_uclip(["index", photos, "--no-progress"], clean_env).ok()
        want = answer(clean_env)
        outcomes = []
        for leave in (0, 4096, 40_000, 120_000, 400_000):
            filler = _fill(mount, leave)
            done = run_uclip(["index", photos, "--no-progress", "--batch-size", "4"], env)
            outcomes.append(done.code)
            if done.code:
                message = done.one_line_error()
                assert "disk full at" in message and "nothing committed was lost" in message, message
                if (mount / "index" / "catalog.sqlite").exists():
                    query = run_uclip(["query", QUERY, "-f", "json"], env)      # on the full disk
                    assert query.code in (0, 2) and "Traceback" not in query.stderr, query.stderr
            filler.unlink()
        assert 2 in outcomes                                                     # the disk really filled
        invoke_uclip(["index", photos, "--no-progress"], env).ok()
        assert answer(env) == want
        filler = _fill(mount, 0)
        assert answer(env) == want                                               # a complete index, a full disk
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        assert answer(env) == want                                               # read-only
        message = run_uclip(["index", photos, "--no-progress"], env).one_line_error()
        assert "read-only" in message or "cannot write" in message
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ---------------------------------------------------------------------------- random damage, every file

TRIALS = int(os.environ.get("UCLIP_DAMAGE_TRIALS", "24"))   # more for a deeper search: the outcome is the same property


@pytest.fixture(scope="module")
def full_index(tiny_bundle, tmp_path_factory) -> Path:
    """An index in the tiny bundle's space with every file in use: 640 rows, the int8 copy in blocks of 64,
    an approximate index (ann_mode on)."""
    from uclip_cli.index import ann_index
    from uclip_cli.bundle import load_bundle

    b = load_bundle(tiny_bundle, verify=False)
    d = b.dims["clip"]
    index = tmp_path_factory.mktemp("full") / "index"
    rng = np.random.default_rng(5)
    v = rng.standard_normal((640, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    saved = exact_index.QUANT_BLOCK
    exact_index.QUANT_BLOCK = 64
    try:
        with open_index(index, IndexIdentity(image_fingerprint=b.image_fingerprint, heads_fingerprint=b.heads_fingerprint, d_clip=d, d_search=d), "create") as store:
            entries = [Embedded(FileEntry(path=Path(f"/photos/{i % 4}/{i:03d}.jpg"), root=Path("/photos"), size=1,
                                          mtime_ns=1), f"{i:032x}") for i in range(640)]
            store.add_batch(entries, v, v)
            if ann_index.faiss_available():
                store.set_setting("ann_mode", "on")
    finally:
        exact_index.QUANT_BLOCK = saved
    return index


def damage(path: Path, rng: np.random.Generator) -> str:
    data = bytearray(path.read_bytes())
    kinds = ["flip", "truncate", "append"] + (["sign", "exponent"] if path.suffix == ".f32" else [])
    kind = rng.choice(kinds) if len(data) >= 4 else "append"
    if kind in ("sign", "exponent"):                    # one bit of one float32: the sign keeps the row's length
        at = int(rng.integers(0, len(data) // 4)) * 4 + 3
        data[at] ^= 0x80 if kind == "sign" else 1 << int(rng.integers(0, 7))
    elif kind == "flip":
        for at in rng.integers(0, len(data), int(rng.integers(1, 9))):
            data[at] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
        data = data[: int(rng.integers(0, len(data)))]
    else:
        data += rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return f"{kind} {path.name}"


def results(done) -> list[tuple[str, float]]:
    return [(r["path"], r["score"]) for r in json.loads(done.stdout)["results"]]


def assert_correct_or_one_line(done, truth: dict[str, float], want: list[tuple[str, float]], approximate: bool, what: str):
    """A query's outcome: a one-line refusal, or an answer whose scores are the true ones, best first, and
    which is the undamaged answer (less the rows it says are damaged; any true top rows for a damaged
    approximate index, whose misses are recall, not wrong scores)."""
    assert "Traceback" not in done.stderr + done.stdout, what
    if done.code == 2:
        done.one_line_error()
        return
    assert done.code == 0, f"{what}: exit {done.code}\n{done.stderr}"
    got = results(done)
    assert all(abs(score - truth[path]) <= 2e-6 for path, score in got), f"{what}: a score is not the true cosine"
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True), what
    if "damaged vectors" in done.stderr:
        assert [p for p, _ in got] == [p for p, _ in want if p in dict(got)][: len(got)], what
    elif not approximate:
        assert got == want, f"{what}: {got} != {want}"


def test_random_damage_to_every_index_file_never_gives_a_traceback_or_a_wrong_answer(full_index, tiny_bundle, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(exact, "QUANT_MIN_ROWS", 0)          # the int8 copy answers, as past 8,192 rows
    env = uclip_env(tmp_path / "home", bundle=tiny_bundle)
    empty = tmp_path / "empty"
    empty.mkdir()
    pristine = tmp_path / "pristine"
    shutil.copytree(full_index, pristine)
    want = results(invoke_uclip(["query", QUERY, "-f", "json", "--index", pristine, "--exact"], env).ok())
    with open_index(pristine) as store:       # the true cosine of every photo for this query
        vectors = np.asarray(store.vectors(), dtype=np.float64)
        paths = {r.row: r.path for r in store.catalogue.records()}
    from uclip_cli.bundle import load_bundle
    from uclip_cli.encoders import Encoders
    from uclip_cli.sessions import SessionFactory

    q = Encoders(load_bundle(tiny_bundle, verify=False), SessionFactory(device="cpu", threads=1)).encode_text_query([QUERY])[0].astype(np.float64)
    truth = {paths[r]: float(np.float32(s)) for r, s in enumerate(vectors @ q)}
    files = sorted(p.name for p in pristine.iterdir() if p.is_file() and p.name != "writer.lock")
    assert any(name.endswith(".faiss") for name in files) and any(name.endswith(".q8sums") for name in files)
    rng = np.random.default_rng(2024)
    outcomes = []
    for trial in range(TRIALS):
        index = tmp_path / f"trial{trial}"
        shutil.copytree(pristine, index)
        what = damage(index / files[trial % len(files)], rng)
        ann = what.endswith(".faiss")
        for command in (["query", QUERY, "-f", "json", "--index", index],
                        ["query", QUERY, "-f", "json", "--index", index, "--exact"]):
            done = invoke_uclip(command, env)
            assert_correct_or_one_line(done, truth, want, ann and "--exact" not in command, f"{what}: {command[-1]}")
        check = invoke_uclip(["check", "--index", index], env)
        assert check.code in (0, 1, 2) and "Traceback" not in check.stderr, what
        writer = invoke_uclip(["index", empty, "--index", index, "--no-progress"], env)   # the writer's open repairs
        assert writer.code in (0, 2) and "Traceback" not in writer.stderr, f"{what}: {writer.stderr}"
        if writer.code == 2:
            writer.one_line_error()
        done = invoke_uclip(["query", QUERY, "-f", "json", "--index", index, "--exact"], env)
        assert_correct_or_one_line(done, truth, want, False, f"{what}, after the writer")
        outcomes.append((what, check.code, writer.code, done.code))
        shutil.rmtree(index)
    if os.environ.get("UCLIP_DAMAGE_TRIALS"):
        print(*outcomes, sep="\n")
