"""Training inputs: caption files, feature files, the checks before training, resumable encoding."""
import numpy as np
import pytest

from uclip_cli.train.config import TrainConfig
from uclip_cli.train.data import TrainInputError, TrainInputs, check_training_inputs, language_groups, read_captions
from uclip_cli.train.features import (encode_images_to_file, encode_texts_to_file, open_features,
                                      save_features)


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- captions

def test_captions_are_stripped_lines_without_blanks(tmp_path):
    p = tmp_path / "en.txt"
    p.write_bytes("\ufeffa cat on a sofa \r\n\n   \n\tdva psi\u2028v parku\nlast".encode("utf-8"))
    assert read_captions(p) == ["a cat on a sofa", "dva psi\u2028v parku", "last"]


def test_non_utf8_caption_file_is_refused_with_file_and_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("ok\nna\u010de\n".encode("utf-8") + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(TrainInputError, match=r"latin1\.txt.*not UTF-8 \(line 3"):
        read_captions(p)


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"])
def test_empty_caption_file_is_refused(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_bytes(content)
    with pytest.raises(TrainInputError, match="empty.txt: no captions"):
        read_captions(p)


def test_missing_caption_file_is_named(tmp_path):
    with pytest.raises(TrainInputError, match="nope.txt: caption file not found"):
        read_captions(tmp_path / "nope.txt")


# ---------------------------------------------------------------- feature files

def test_feature_file_round_trip_is_memory_mapped(tmp_path):
    a = unit(np.random.default_rng(0), 10, 4)
    save_features(tmp_path / "f.npy", a)
    got = open_features(tmp_path / "f.npy", dim=4)
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, a)


def bad_file_cases(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("not numpy")
    np.save(tmp_path / "float64.npy", unit(rng, 5, 4).astype(np.float64))
    np.save(tmp_path / "dim3.npy", unit(rng, 5, 3))
    np.save(tmp_path / "vector.npy", np.ones(4, np.float32))
    np.save(tmp_path / "norows.npy", np.zeros((0, 4), np.float32))
    nan = unit(rng, 5, 4)
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    inf = unit(rng, 5, 4)
    inf[2, 0] = -np.inf
    np.save(tmp_path / "inf.npy", inf)
    zero = unit(rng, 5, 4)
    zero[4] = 0
    np.save(tmp_path / "zero.npy", zero)
    return {
        "missing.npy": "feature file not found",
        "empty.npy": "empty file",
        "text.npy": "not a readable .npy",
        "float64.npy": "must be float32",
        "dim3.npy": "3-d but 4-d are expected",
        "vector.npy": "expected a 2-D",
        "norows.npy": "empty feature array",
        "nan.npy": "row 3 holds NaN or infinite",
        "inf.npy": "row 2 holds NaN or infinite",
        "zero.npy": "row 4 is all zeros",
    }


def test_bad_feature_files_are_refused_with_a_line_naming_the_file(tmp_path):
    for name, reason in bad_file_cases(tmp_path).items():
        with pytest.raises(TrainInputError) as info:
            open_features(tmp_path / name, dim=4)
        message = str(info.value)
        assert name in message and reason in message and "\n" not in message, message


def test_too_few_rows_for_a_batch_is_refused(tmp_path):
    save_features(tmp_path / "small.npy", unit(np.random.default_rng(2), 5, 4))
    with pytest.raises(TrainInputError, match="small.npy: 5 rows, fewer than the 8"):
        open_features(tmp_path / "small.npy", min_rows=8)


def arrays(rng, n=40, m1=30, m2=30, d_clip=6, d_multi=5):
    return unit(rng, n, d_clip), unit(rng, n, d_multi), unit(rng, m1, d_clip), unit(rng, m2, d_multi)


def test_training_inputs_must_agree():
    rng = np.random.default_rng(3)
    config = TrainConfig(batch_size=16, heldout_fraction=0.1)
    check_training_inputs(TrainInputs(*arrays(rng)), config)          # fine
    e_I, e_K, img, fgn = arrays(rng)

    def check(*parts, config=config, **named):
        return check_training_inputs(TrainInputs(*parts, **{k: v for k, v in named.items() if k != "dims"}), config,
                                     dims=named.get("dims"))

    with pytest.raises(TrainInputError, match="40 captions but .* has 39"):
        check(e_I, e_K[:39], img, fgn)
    with pytest.raises(TrainInputError, match="image_memory: features are 5-d but 6-d"):
        check(e_I, e_K, unit(rng, 30, 5), fgn)
    with pytest.raises(TrainInputError, match="english_multi: features are 5-d but 7-d"):
        check(e_I, e_K, img, fgn, dims={"multilingual": 7})
    with pytest.raises(TrainInputError, match="36 training captions .* fewer than one batch of 37"):
        check(e_I, e_K, img, fgn, config=TrainConfig(batch_size=37, heldout_fraction=0.1))
    check(e_I, e_K, img, fgn[:3])                                     # a memory smaller than a batch is fine
    with pytest.raises(TrainInputError, match="foreign.npy: 29 language labels for 30 rows"):
        check(e_I, e_K, img, fgn, foreign_language=np.zeros(29, np.int16), foreign_languages=("cs",),
              names={"foreign_memory": "foreign.npy"})


def test_language_groups_merge_parts_of_one_language():
    groups, labels = language_groups([("cs", 2), ("fi", 3), ("cs", 1)])
    assert labels == ("cs", "fi") and groups.tolist() == [0, 0, 1, 1, 1, 0] and groups.dtype == np.int16


# ---------------------------------------------------------------- encoding to files

class FakeTextEncoder:
    """Deterministic text -> unit vector; counts what it was asked to encode."""

    def __init__(self, dim=8, fail_after_batches=None):
        self.dim, self.fail_after, self.seen, self.calls = dim, fail_after_batches, [], 0

    def __call__(self, batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.seen.extend(batch)
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in batch]
        rows = np.array(rows, dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_text_encoding_writes_one_row_per_text_in_order(tmp_path):
    texts = [f"caption {i}" for i in range(23)]
    events = []
    report = encode_texts_to_file(texts, FakeTextEncoder(), tmp_path / "en.npy", batch=5, progress=events.append)
    got = open_features(tmp_path / "en.npy", dim=8)
    np.testing.assert_array_equal(got, FakeTextEncoder()(texts))
    assert (report.rows, report.items, report.cached) == (23, 23, False)
    assert [e.done for e in events] == [5, 10, 15, 20, 23]
    assert not (tmp_path / "en.npy.partial").exists() and not (tmp_path / "en.npy.progress.json").exists()


def test_text_encoding_is_cached(tmp_path):
    texts = [f"t{i}" for i in range(7)]
    encode_texts_to_file(texts, FakeTextEncoder(), tmp_path / "en.npy", batch=3, encoder_id="A")
    again = FakeTextEncoder()
    report = encode_texts_to_file(texts, again, tmp_path / "en.npy", batch=3, encoder_id="A")
    assert report.cached and again.calls == 0
    other_encoder = FakeTextEncoder()
    encode_texts_to_file(texts, other_encoder, tmp_path / "en.npy", batch=3, encoder_id="B")
    assert other_encoder.calls == 3      # another encoder id: encoded again
    other_texts = FakeTextEncoder()
    encode_texts_to_file(texts[:-1], other_texts, tmp_path / "en.npy", batch=3, encoder_id="B")
    assert other_texts.seen == texts[:-1]


def test_interrupted_text_encoding_resumes_where_it_stopped(tmp_path):
    texts = [f"caption {i}" for i in range(20)]
    out = tmp_path / "en.npy"
    with pytest.raises(KeyboardInterrupt):
        encode_texts_to_file(texts, FakeTextEncoder(fail_after_batches=2), out, batch=6)
    assert not out.exists() and (tmp_path / "en.npy.partial").exists()
    resumed = FakeTextEncoder()
    report = encode_texts_to_file(texts, resumed, out, batch=6)
    assert resumed.seen == texts[12:] and report.resumed_from == 12
    np.testing.assert_array_equal(open_features(out), FakeTextEncoder()(texts))


def test_encoder_returning_the_wrong_number_of_rows_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="returned shape"):
        encode_texts_to_file(["a", "b", "c"], lambda batch: np.ones((1, 4), np.float32), tmp_path / "x.npy", batch=3)


def test_image_encoding_drops_images_the_encoder_skips(tmp_path):
    paths = []
    for i in range(9):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(b"x" * (i + 1))
        paths.append(p)

    def encoder(batch):   # "cannot decode" every image whose size is a multiple of 3
        ok = [p for p in batch if p.stat().st_size % 3]
        return np.array([[p.stat().st_size, 1.0] for p in ok], dtype=np.float32)

    report = encode_images_to_file(paths, encoder, tmp_path / "mem.npy", batch=4)
    assert (report.rows, report.skipped) == (6, 3)
    assert open_features(tmp_path / "mem.npy")[:, 0].tolist() == [1, 2, 4, 5, 7, 8]
    assert encode_images_to_file(paths, encoder, tmp_path / "mem.npy", batch=4).cached
    paths[0].write_bytes(b"changed")
    assert not encode_images_to_file(paths, encoder, tmp_path / "mem.npy", batch=4).cached
