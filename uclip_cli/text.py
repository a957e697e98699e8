"""Tokenising with the `tokenizers` library, as the bundle's TokenizerSettings say."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import BundleError, TokenizerSettings


class TextTokenizer:
    def __init__(self, path: Path, settings: TokenizerSettings):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise BundleError(f"{path} is not a readable tokenizers file ({str(e).splitlines()[0]}): re-run `uclip export`") from None
        self.settings = settings
        self._tok.no_padding()
        self._tok.enable_truncation(settings.max_length)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        s = self.settings
        if s.lowercase:
            texts = [t.lower() for t in texts]
        encodings = self._tok.encode_batch(list(texts))
        width = s.max_length if s.padding == "max_length" else max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), s.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}
