"""Session-wide fixtures: tiny random-weight checkpoints and a bundle exported from them, built once per run."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@contextmanager
def single_torch_thread():
    """Tiny models run fastest on one thread, and several threads crawl on a busy shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` in modules that run tiny torch models."""
    with single_torch_thread():
        yield


def unit_rows(x):
    """Rows scaled to unit L2 norm, as float32."""
    import numpy as np

    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class TinyCheckpoints:
    clip: Path           # CLIPModel directory (64 px images, 24-d projection)
    multilingual: Path   # sentence-transformers BERT directory (32-d, mean pooling)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> TinyCheckpoints:
    from tiny_models import make_tiny_clip, make_tiny_sentence_encoder

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    with single_torch_thread():
        return TinyCheckpoints(clip=make_tiny_clip(root / "clip"),
                               multilingual=make_tiny_sentence_encoder(root / "multilingual", "bert"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoints, tmp_path_factory) -> Path:
    """A verified fp32 bundle of the tiny checkpoints, without heads. Treat it as read-only: copy it to change it."""
    from uclip_cli.export import export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    with single_torch_thread():
        return export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), out, log=lambda _: None)
