"""What makes a cold `uclip query` fast must not change a single id or score.

- text.PieceVocabulary: a tokenizer built from the pieces inside the query's words gives the ids
  of the whole 250k-piece Unigram tokenizer (many languages, added tokens, unknown characters,
  truncation, competitive scores, a normalizer), and any damage to its cache falls back to the file.
- sessions.optimized_copy: sessions loaded from the optimised, memory-mapped copy in the cache dir
  compute what the bundle's own graph computes (within float32 rounding of its exact, float64 value:
  the optimiser fuses ops, which changes the rounding); a damaged, stale or unwritable cache costs
  only speed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from exact_towers import exact_tower
from rounding import assert_float32_run_of, exact_inputs
from uclip_cli import bundle as B
from uclip_cli.bundle import TokenizerSettings
from uclip_cli.filecache import DerivedFolder
from uclip_cli.sessions import OPTIMIZED_CACHE, SessionFactory
from uclip_cli.text import VOCAB_CACHE, PieceVocabulary, TextTokenizer

EDGE_CASES = [
    "", " ", "a", "a <mask> b<s>c </s>", "<unk><pad>", "☃ ☃☃ unknown ☃x☃", "😀🐈 emoji cat",
    "ﬁne ＦＵＬＬ　ｗｉｄｔｈ and  double   spaces\t\ttabs\nnewline", "x" * 700,
    "Dvě kočky spí na červené pohovce. " * 30,   # longer than max_length tokens: truncated
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def unigram_file(tmp_path_factory) -> Path:
    """An XLM-R style Unigram tokenizer (trained on the spot), with competitive scores and an NFKC normalizer."""
    from tiny_models import _xlmr_tokenizer

    spec = json.loads(_xlmr_tokenizer(128).backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    path = tmp_path_factory.mktemp("unigram") / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


SETTINGS = TokenizerSettings(file="tokenizer.json", max_length=32, pad_id=1)


def sentences(per_language: int = 25) -> list[str]:
    from tiny_models import training_sentences

    return training_sentences(per_language=per_language) + EDGE_CASES


def full_ids(path: Path, texts: list[str], max_length: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return [e.ids for e in tokenizer.encode_batch(texts)]


def test_query_vocabulary_gives_the_whole_tokenizers_ids(unigram_file):
    vocab = PieceVocabulary.open(unigram_file)
    assert vocab is not None
    texts = sentences()
    expected = full_ids(unigram_file, texts, SETTINGS.max_length)
    for start in range(0, len(texts), 7):   # small batches, as queries come
        assert vocab.encode(texts[start:start + 7], SETTINGS.max_length) == expected[start:start + 7]
    unknown = full_ids(unigram_file, ["☃"], SETTINGS.max_length)[0]
    unk_id = json.loads(unigram_file.read_text(encoding="utf-8"))["model"]["unk_id"]
    assert vocab.encode(["☃"], SETTINGS.max_length)[0] == unknown and unk_id in unknown


def test_query_vocabulary_keeps_the_unknown_penalty_and_the_special_ids(tmp_path):
    """A vocabulary built by hand where each would show: for "▁bcd" the whole tokenizer prefers
    ▁ bc d (-81) to ▁ <unk> cd (-12 + the lowest score of the vocabulary, -100), which a vocabulary
    of the query's pieces alone (lowest score -60) would turn around; and the special tokens sit at
    the end, far from their positions in a reduced vocabulary."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = [("<unk>", 0.0), ("▁", -1.0), ("bc", -60.0), ("d", -20.0), ("cd", -1.0)]
    vocab += [(f"q{i}", -5.0) for i in range(5)] + [("zzz", -100.0), ("<s>", 0.0), ("</s>", 0.0)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 11), ("</s>", 12)])
    path = tmp_path / "hand.json"
    tokenizer.save(str(path))
    texts = ["bcd", "q3 bcd</s>", "", "<s>"]
    expected = full_ids(path, texts, 16)
    assert expected[0] == [11, 1, 2, 3, 12]
    assert PieceVocabulary.open(path).encode(texts, 16) == expected


def test_text_tokenizer_is_the_same_before_and_after_loading_the_whole_file(unigram_file, monkeypatch):
    import uclip_cli.text as text

    texts = sentences(per_language=3)
    quick = TextTokenizer(unigram_file, SETTINGS)
    monkeypatch.setattr(text, "QUERY_VOCAB_TEXTS", 0)
    whole = TextTokenizer(unigram_file, SETTINGS)
    for start in range(0, len(texts), 5):
        a, b = quick(texts[start:start + 5]), whole(texts[start:start + 5])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert quick._full is not None   # past QUERY_VOCAB_TEXTS texts it loaded the whole file


def test_other_tokenizers_load_the_whole_file(tiny_bundle):
    bert = tiny_bundle / B.TOKENIZER_MULTILINGUAL   # WordPiece
    assert PieceVocabulary.open(bert) is None
    settings = B.load_bundle(tiny_bundle, verify=False).tokenizers["multilingual"]
    ids = TextTokenizer(bert, settings)(["Ein Hund läuft am Strand."])["input_ids"][0]
    assert ids.tolist() == full_ids(bert, ["Ein Hund läuft am Strand."], settings.max_length)[0]


def vocab_folder(path: Path) -> DerivedFolder:
    import tokenizers

    from uclip_cli.text import VOCAB_FORMAT

    return DerivedFolder.of(VOCAB_CACHE, path, f"{VOCAB_FORMAT}|{tokenizers.__version__}")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_a_damaged_vocabulary_cache_never_changes_ids(unigram_file, damage):
    texts = sentences(per_language=2)
    expected = full_ids(unigram_file, texts, SETTINGS.max_length)
    assert PieceVocabulary.open(unigram_file) is not None
    pieces = vocab_folder(unigram_file).file(PieceVocabulary.PIECES)
    if damage == "truncate":
        pieces.write_bytes(pieces.read_bytes()[:100])
    elif damage == "garbage":
        pieces.write_bytes(os.urandom(pieces.stat().st_size))
    else:
        pieces.unlink()
    tokenizer = TextTokenizer(unigram_file, SETTINGS)
    assert [r[m.astype(bool)].tolist() for r, m in zip(*tokenizer(texts).values())] == expected


def test_a_changed_tokenizer_file_gets_a_new_cache_and_the_old_one_goes(unigram_file, tmp_path):
    copy = tmp_path / "tokenizer.json"
    shutil.copy(unigram_file, copy)
    PieceVocabulary.open(copy)
    old = vocab_folder(copy).path
    spec = json.loads(copy.read_text(encoding="utf-8"))
    spec["model"]["vocab"][10][1] += 5.0   # one piece scores much higher now
    copy.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    texts = sentences(per_language=2)
    assert PieceVocabulary.open(copy).encode(texts, 32) == full_ids(copy, texts, 32)
    assert not old.exists() and vocab_folder(copy).path.exists()


# ---------------------------------------------------------------------------------------------- sessions

def feeds_for(model) -> dict[str, np.ndarray]:
    ids = np.array([[0, 5, 9, 11, 2, 1], [0, 7, 2, 1, 1, 1]], dtype=np.int64)
    return {k: v for k, v in {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}.items()
            if k in model.input_names}


def assert_computes(got: np.ndarray, checkpoints, graph: str, feeds: dict[str, np.ndarray]) -> None:
    """`got` is a float32 run of the tiny bundle's `graph` on `feeds`: within rounding of its exact value."""
    assert_float32_run_of(got, exact_tower(checkpoints, graph), exact_inputs(*feeds.values()), what=graph)


def copy_folder(path: Path) -> DerivedFolder:
    import onnxruntime as ort

    return DerivedFolder.of(OPTIMIZED_CACHE, path, ort.__version__)


@pytest.mark.parametrize("one_shot", [False, True])
def test_sessions_from_the_optimised_copy_compute_what_the_bundle_graph_computes(tiny_bundle, tiny_checkpoints,
                                                                                  one_shot):
    graph = tiny_bundle / B.TEXT_MULTILINGUAL
    first = SessionFactory(device="cpu", one_shot=one_shot).create(graph)   # writes the copy
    folder = copy_folder(graph)
    assert folder.ready()
    second = SessionFactory(device="cpu", one_shot=one_shot).create(graph)  # loads it
    assert Path(second.session._model_path) == folder.file("model.onnx")
    feeds = feeds_for(second)
    for model in (first, second):
        assert_computes(model.run(feeds), tiny_checkpoints, B.TEXT_MULTILINGUAL, feeds)


@pytest.mark.parametrize("damage", ["truncate weights", "garbage graph"])
def test_a_damaged_copy_falls_back_to_the_bundle_graph(tiny_bundle, tiny_checkpoints, damage):
    graph = tiny_bundle / B.IMAGE_ENCODER
    SessionFactory(device="cpu").create(graph)
    folder = copy_folder(graph)
    if damage == "truncate weights":
        weights = folder.file("model.onnx.data")
        weights.write_bytes(weights.read_bytes()[:64])
    else:
        model = folder.file("model.onnx")
        model.write_bytes(b"\0" * model.stat().st_size)   # same size: the record cannot tell
    session = SessionFactory(device="cpu").create(graph)
    size = B.load_bundle(tiny_bundle, verify=False).image.size
    pixels = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)}
    assert_computes(session.run(pixels), tiny_checkpoints, B.IMAGE_ENCODER, pixels)


def test_a_changed_graph_gets_a_new_copy_and_the_old_one_goes(tiny_bundle, tiny_checkpoints, tmp_path):
    graph = tmp_path / "head.onnx"
    shutil.copy(tiny_bundle / B.TEXT_MULTILINGUAL, graph)
    SessionFactory(device="cpu").create(graph)
    old = copy_folder(graph).path
    shutil.copy(tiny_bundle / B.TEXT_CLIP, graph)   # another graph at the same path
    model = SessionFactory(device="cpu").create(graph)
    feeds = feeds_for(model)
    assert_computes(model.run(feeds), tiny_checkpoints, B.TEXT_CLIP, feeds)   # not the old graph's copy
    assert not old.exists() and copy_folder(graph).ready()


def test_an_unwritable_cache_dir_only_costs_speed(tiny_bundle, tiny_checkpoints, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be", encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    graph = tiny_bundle / B.TEXT_MULTILINGUAL
    model = SessionFactory(device="cpu", one_shot=True).create(graph)
    feeds = feeds_for(model)
    assert_computes(model.run(feeds), tiny_checkpoints, B.TEXT_MULTILINGUAL, feeds)
    tokenizer = TextTokenizer(tiny_bundle / B.TOKENIZER_MULTILINGUAL,
                              B.load_bundle(tiny_bundle, verify=False).tokenizers["multilingual"])
    assert tokenizer(["a dog"])["input_ids"].shape[0] == 1
