"""Tokenising with the `tokenizers` library, as the bundle's TokenizerSettings say.

A multilingual Unigram tokenizer (XLM-R's, 250,002 pieces) costs about 0.6 s of CPU to load, more
than all the rest of a cold query. A few texts need only the pieces found inside their own words, so
the first calls (QUERY_VOCAB_TEXTS texts in all) run a tokenizer built from those pieces alone: they
are looked up in a sorted array of every piece (`PieceVocabulary`, kept in the user's cache dir), and
its ids are mapped back to the full vocabulary's. Unigram chooses among the pieces that match inside
a word, and penalises unknown characters relative to the lowest score of the vocabulary; both are
kept, and normaliser, pre-tokeniser, added tokens, post-processor and truncation are the file's own,
so the ids are the full tokenizer's (tests compare them in many languages). Later calls, and any other
kind of tokenizer, load the whole file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bundle import BundleError, TokenizerSettings
from .filecache import DerivedFolder

QUERY_VOCAB_TEXTS = 64
VOCAB_CACHE = "tokenizer-vocab"
VOCAB_FORMAT = "1"


class TextTokenizer:
    def __init__(self, path: Path, settings: TokenizerSettings, *, thorough_cache: bool = False):
        """thorough_cache: check the cached vocabulary arrays' sha256, not only their sizes (filecache.py)."""
        self.path = Path(path)
        self.settings = settings
        self._full = None
        self._texts_seen = 0
        self._query_vocab = PieceVocabulary.open(self.path, thorough=thorough_cache)
        if self._query_vocab is None:
            self._full = self._load_full()

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        s = self.settings
        if s.lowercase:
            texts = [t.lower() for t in texts]
        rows = self._ids(list(texts))
        width = s.max_length if s.padding == "max_length" else max(len(r) for r in rows)
        ids = np.full((len(rows), width), s.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def load_whole(self) -> None:
        """Load the whole tokenizer file now (a server, before it says it is ready: no request then waits for it)."""
        if self._full is None:
            self._full = self._load_full()

    def _ids(self, texts: list[str]) -> list[list[int]]:
        self._texts_seen += len(texts)
        if self._full is None and self._texts_seen <= QUERY_VOCAB_TEXTS:
            return self._query_vocab.encode(texts, self.settings.max_length)
        if self._full is None:
            self._full = self._load_full()
        return [e.ids for e in self._full.encode_batch(texts)]

    def _load_full(self):
        tokenizer = _tokenizer_from(lambda t: t.from_file(str(self.path)), self.path)
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.settings.max_length)
        return tokenizer


def _tokenizer_from(make, path: Path):
    from tokenizers import Tokenizer

    try:
        return make(Tokenizer)
    except Exception as e:
        raise BundleError(f"{path} is not a readable tokenizers file ({str(e).splitlines()[0]}): re-run `uclip export`") from None


class PieceVocabulary:
    """A Unigram tokenizer file split into its pieces as sorted arrays and the rest ("skeleton")."""

    PIECES = "pieces.npy"    # every piece, sorted (numpy unicode)
    IDS = "ids.npy"          # the id of each sorted piece
    RANKS = "ranks.npy"      # the sorted position of each id
    SCORES = "scores.npy"    # the score of each id
    SKELETON = "skeleton.json"

    def __init__(self, path: Path, folder: DerivedFolder):
        self.path = path
        meta = json.loads(folder.file(self.SKELETON).read_text(encoding="utf-8"))
        self.spec, self.unk_id, self.fixed_ids = meta["spec"], meta["unk_id"], meta["fixed_ids"]
        self.pieces, self.ids, self.ranks, self.scores = (
            np.load(folder.file(name), mmap_mode="r") for name in (self.PIECES, self.IDS, self.RANKS, self.SCORES))
        self.longest = self.pieces.dtype.itemsize // 4
        self._words = self._tokenizer(sorted(set(self.fixed_ids)), truncate=None, post_process=False)

    @classmethod
    def open(cls, path: Path, *, thorough: bool = False) -> "PieceVocabulary | None":
        """The file's vocabulary arrays (built into the cache on first use); None for other kinds of tokenizer."""
        import tokenizers

        try:
            folder = DerivedFolder.of(VOCAB_CACHE, path, f"{VOCAB_FORMAT}|{tokenizers.__version__}")
        except OSError:
            return None
        if not folder.ready(thorough):
            folder.discard()   # absent, or damaged since it was written: build it afresh
            if not folder.build(lambda tmp: _split_vocabulary(path, tmp)):
                return None
        if not folder.file(cls.PIECES).is_file():   # built, but this tokenizer is not a plain Unigram one
            return None
        try:
            return cls(path, folder)
        except Exception:  # noqa: BLE001 - a damaged cache entry: drop it, the whole file still works
            folder.discard()
            return None

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        words = [w for text in texts for w in self._words_of(text)]
        needed = sorted(set(self.fixed_ids) | set(self._lookup(words)))
        tokenizer = self._tokenizer(needed, truncate=max_length, post_process=True)
        to_full = np.asarray(needed, dtype=np.int64)
        # Tokens the post-processor adds carry the file's own ids; all others are positions in `needed`.
        return [[i if special else int(to_full[i]) for i, special in zip(e.ids, e.special_tokens_mask)]
                for e in tokenizer.encode_batch(texts)]

    def _words_of(self, text: str) -> list[str]:
        """The text's words after normalising and pre-tokenising: every piece Unigram can use lies inside one."""
        encoding = self._words.encode(text, add_special_tokens=False)
        words: dict[int, str] = {}
        for k, (token, word) in enumerate(zip(encoding.tokens, encoding.word_ids)):
            key = word if word is not None else -1 - k
            words[key] = words.get(key, "") + token
        return list(words.values())

    def _lookup(self, words: list[str]) -> list[int]:
        """Ids of every piece that occurs inside one of `words`."""
        candidates = sorted({w[i:j] for w in words for i in range(len(w))
                             for j in range(i + 1, min(len(w), i + self.longest) + 1)})
        if not candidates:
            return []
        wanted = np.asarray(candidates, dtype=self.pieces.dtype)
        at = np.minimum(np.searchsorted(self.pieces, wanted), len(self.pieces) - 1)
        return self.ids[at[self.pieces[at] == wanted]].tolist()

    def _tokenizer(self, ids: list[int], *, truncate: int | None, post_process: bool):
        spec = dict(self.spec)
        spec["model"] = dict(spec["model"], unk_id=ids.index(self.unk_id),
                             vocab=[[str(self.pieces[self.ranks[i]]), float(self.scores[i])] for i in ids])
        if not post_process:
            spec["post_processor"] = None
        tokenizer = _tokenizer_from(lambda t: t.from_str(json.dumps(spec)), self.path)
        tokenizer.no_padding()
        if truncate is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(truncate)
        return tokenizer


def _split_vocabulary(path: Path, out: Path) -> None:
    """Write PieceVocabulary's files for the tokenizer file at `path`, or only a skeleton saying it does not apply."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))   # unreadable: no cache; loading the file says why
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    pieces = [p for p, _ in vocab] if isinstance(vocab, list) else []
    ids_of = {p: i for i, p in enumerate(pieces)}
    added = {t.get("content"): t.get("id") for t in spec.get("added_tokens") or []}
    usable = (model.get("type") == "Unigram" and not model.get("byte_fallback") and model.get("unk_id") is not None
              and len(ids_of) == len(pieces) > 0 and not any("\0" in p for p in pieces)
              and all(ids_of.get(content) == i for content, i in added.items()))
    if not usable:
        (out / PieceVocabulary.SKELETON).write_text(json.dumps({"usable": False}), encoding="utf-8")
        return
    scores = np.asarray([s for _, s in vocab], dtype=np.float64)
    strings = np.asarray(pieces)
    order = np.argsort(strings, kind="stable")
    ranks = np.empty_like(order)
    ranks[order] = np.arange(len(order))
    np.save(out / PieceVocabulary.PIECES, strings[order])
    np.save(out / PieceVocabulary.IDS, order.astype(np.int64))
    np.save(out / PieceVocabulary.RANKS, ranks.astype(np.int64))
    np.save(out / PieceVocabulary.SCORES, scores)
    # Kept in every reduced vocabulary: the unknown piece, added tokens, and the lowest score (Unigram's
    # penalty for unknown characters is relative to it).
    fixed = sorted({int(model["unk_id"]), int(np.argmin(scores)), *added.values()})
    skeleton = dict(spec, model={k: v for k, v in model.items() if k != "vocab"})
    (out / PieceVocabulary.SKELETON).write_text(
        json.dumps({"usable": True, "spec": skeleton, "unk_id": int(model["unk_id"]), "fixed_ids": fixed}),
        encoding="utf-8")
