"""The bundle's ONNX towers and heads behind two questions: "what vector does this text get" and
"what vector does this image get".  Each graph is loaded only when first needed, so a text query never
pays for the image encoder.

Search space:
- "shared": the bundle has trained heads; text -> multilingual tower -> Head_A, image -> image tower -> Head_B.
- "clip":   no heads yet; English text -> CLIP text tower, image -> image tower (raw CLIP space).
"""
from __future__ import annotations

import threading
import time
from functools import cached_property

import numpy as np

from . import bundle as B
from .errors import UclipError
from .sessions import OrtModel, SessionFactory
from .text import TextTokenizer
from .text_precision import Choice, text_tower_choice


class EncoderError(UclipError):
    """A query the bundle cannot serve."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Encoders:
    """The bundle's graphs, each loaded on first use by the SessionFactory the caller gives.

    The factory is the caller's (a command's --device and --threads, a query's one-shot sessions, a
    test's recording factory), never one made here: a default built inside would quietly ignore them.

    text_precision: which file a text tower's session loads when the bundle carries its int8 twin
    (bundle.INT8_TWINS): "fp32" (the tower itself: indexing, training, evaluation, whose features the
    heads are fitted on), "int8", or "auto" (queries: the faster of the two on this CPU, measured once
    with this factory's sessions and remembered, text_precision.py).
    """

    def __init__(self, bundle: B.Bundle, sessions: SessionFactory, *, batch_size: int = 32, text_precision: str = "fp32"):
        if sessions is None:
            raise TypeError("Encoders needs the SessionFactory that creates its sessions, not None")
        if text_precision not in ("fp32", "int8", "auto"):
            raise ValueError(f"text_precision must be fp32, int8 or auto, not {text_precision!r}")
        self.bundle = bundle
        self.sessions = sessions
        self.batch_size = batch_size
        self.text_precision = text_precision
        self.text_choices: dict[str, Choice] = {}    # text tower -> the precision its session was made in
        self._models: dict[str, OrtModel] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._preloads: list[threading.Thread] = []
        self.load_seconds: dict[str, float] = {"sessions": 0.0, "tokenizer": 0.0}   # what loading cost so far

    @property
    def space(self) -> str:
        return "shared" if self.bundle.has_heads else "clip"

    @property
    def search_dim(self) -> int:
        return self.bundle.dims["shared"] if self.bundle.has_heads else self.bundle.dims["clip"]

    def model(self, name: str) -> OrtModel:
        with self._guard:
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:                      # a preload in progress finishes first; a failed one is retried here
            if name not in self._models:
                start = time.perf_counter()
                self._models[name] = self.sessions.create(self.bundle.file(self._graph_file(name)),
                                                          expect=self.bundle.signature(name))
                self.load_seconds["sessions"] += time.perf_counter() - start
        return self._models[name]

    def _graph_file(self, name: str) -> str:
        """The bundle file graph `name`'s session loads: a text tower's int8 twin where this Encoders' precision
        says so (the twin has the tower's inputs and outputs, so `name` still describes it)."""
        if name not in B.INT8_TWINS or self.text_precision == "fp32" or self.bundle.int8_twin(name) is None:
            return name
        if self.text_precision == "int8":
            choice = Choice("int8", self.bundle.int8_twin(name), "asked for by the caller")
        else:
            choice = text_tower_choice(self.bundle, name, self.sessions)
        self.text_choices[name] = choice
        return choice.file

    def query_text_tower(self) -> str | None:
        """The text tower a text query runs (multilingual once the bundle has heads, else CLIP's), or None."""
        if self.bundle.has_heads:
            return B.TEXT_MULTILINGUAL
        return B.TEXT_CLIP if self.bundle.has_clip_text else None

    def preload(self, *names: str) -> None:
        """Create these sessions in a background thread (e.g. while the first images decode). The command that
        preloads calls finish_preloads() before it returns, so no session is still being created behind it
        (the next command in the same process, or the interpreter's exit, must not meet a half-built one)."""
        def load() -> None:
            for name in names:
                try:
                    self.model(name)
                except Exception:  # noqa: BLE001 - model() raises it again where the session is needed
                    return

        thread = threading.Thread(target=load, name="uclip-session-preload", daemon=True)
        self._preloads.append(thread)
        thread.start()

    def finish_preloads(self) -> None:
        """Wait for every preload this object started (at most one graph load each: seconds)."""
        while self._preloads:
            self._preloads.pop().join()

    def loaded_providers(self) -> dict[str, list[str]]:
        return {name: m.providers for name, m in self._models.items()}

    @cached_property
    def _multilingual_tokenizer(self) -> TextTokenizer:
        return self._tokenizer("multilingual")

    @cached_property
    def _clip_tokenizer(self) -> TextTokenizer:
        return self._tokenizer("clip")

    def _tokenizer(self, key: str) -> TextTokenizer:
        start = time.perf_counter()
        settings = self.bundle.tokenizers[key]
        tokenizer = TextTokenizer(self.bundle.file(settings.file), settings,
                                  thorough_cache=self.bundle.verify == "full")
        self.load_seconds["tokenizer"] += time.perf_counter() - start
        return tokenizer

    def warm_text_queries(self) -> None:
        """Everything a text query can need, loaded and run once now: the sessions of the query path and the
        whole tokenizer file (the first queries would otherwise use a small vocabulary, then load the whole
        file inside a later query: 0.4 s for XLM-R's 250,002 pieces). For a server, before it is ready."""
        if not (self.bundle.has_heads or self.bundle.has_clip_text):
            return
        (self._multilingual_tokenizer if self.bundle.has_heads else self._clip_tokenizer).load_whole()
        self.encode_text_query(["warm up"])

    # -- frozen towers -------------------------------------------------------------------------
    def multilingual_features(self, texts: list[str]) -> np.ndarray:
        return self._run_text(B.TEXT_MULTILINGUAL, self._multilingual_tokenizer, texts)

    def clip_text_features(self, texts: list[str]) -> np.ndarray:
        if not self.bundle.has_clip_text:
            raise EncoderError(f"{self.bundle.path} has no CLIP text tower: re-export it with `uclip export`")
        return self._run_text(B.TEXT_CLIP, self._clip_tokenizer, texts)

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """Frozen, L2-normalised CLIP image features of preprocessed pixels [B,3,H,W]."""
        io = self.bundle.graph_io(B.IMAGE_ENCODER)
        return _normalise(self._run(B.IMAGE_ENCODER, io, {io.inputs["pixels"]: np.ascontiguousarray(pixels, dtype=np.float32)}))

    def _run_text(self, graph: str, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
        io = self.bundle.graph_io(graph)   # input names by role, id type, fixed batch, pooling
        ids = np.int32 if io.ids == "int32" else np.int64
        out = []
        for start in range(0, len(texts), self.batch_size):
            feeds = tokenizer(texts[start:start + self.batch_size])
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])   # one segment, as sentence encoders are run
            got = self._run(graph, io, {io.inputs[role]: v.astype(ids) for role, v in feeds.items() if role in io.inputs})
            if io.pooling == "mean":   # token embeddings: the mean over real tokens (sentence-transformers' pooling)
                mask = feeds["attention_mask"][:, :, None].astype(np.float32)
                got = (got * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
            out.append(got)
        return _normalise(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)

    def _run(self, graph: str, io, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's output for every row of `feeds`; a graph exported for a fixed batch gets its rows in turn."""
        model = self.model(graph)
        rows = len(next(iter(feeds.values())))
        if io.batch is None or rows == io.batch:
            return model.run(feeds)
        return np.concatenate([model.run({k: v[i:i + io.batch] for k, v in feeds.items()})
                               for i in range(0, rows, io.batch)])

    # -- heads ---------------------------------------------------------------------------------
    def project_multilingual(self, features: np.ndarray) -> np.ndarray:
        return self._run_head(B.HEAD_A, features)

    def project_image(self, features: np.ndarray) -> np.ndarray:
        """Frozen image features -> search vectors (Head_B, or identity while untrained)."""
        if not self.bundle.has_heads:
            return _normalise(features)
        return self._run_head(B.HEAD_B, features)

    def _run_head(self, graph: str, features: np.ndarray) -> np.ndarray:
        io = self.bundle.graph_io(graph)
        return _normalise(self._run(graph, io, {io.inputs["features"]: np.ascontiguousarray(features, dtype=np.float32)}))

    # -- queries -------------------------------------------------------------------------------
    def encode_text_query(self, texts: list[str]) -> np.ndarray:
        """Search vectors for texts in any language (English only while the bundle has no heads)."""
        if self.bundle.has_heads:
            return self.project_multilingual(self.multilingual_features(texts))
        if self.bundle.has_clip_text:
            return self.clip_text_features(texts)
        raise EncoderError(f"{self.bundle.path} has neither trained heads nor a CLIP text tower: run `uclip train`")

    def encode_image_query(self, pixels: np.ndarray) -> np.ndarray:
        return self.project_image(self.image_features(pixels))
