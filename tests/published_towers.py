"""Two published hub repos, in their exact layouts, with tiny random weights: what the default model assembler downloads.

- `immich-app/ViT-B-32__laion2b-s34b-b79k`: immich's OpenCLIP ONNX export. `visual/model.onnx` takes `image`
  float32 [1, 3, 224, 224] (batch fixed at 1) and `textual/model.onnx` takes `text` int32 [1, 77]; both give
  `embedding` float32 [1, 512], L2-normalised in the graph. `textual/tokenizer.json` is a CLIP BPE tokenizer as
  CLIPTokenizerFast saves it, with `<|startoftext|>` and `<|endoftext|>` the two largest ids (as 49406 / 49407 are).
- `sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2`: sentence-transformers layout with an ONNX export.
  `onnx/model.onnx` takes `input_ids`, `attention_mask`, `token_type_ids` int64 [batch, sequence] and gives
  `last_hidden_state` float32 [batch, sequence, 384] (token embeddings: the caller mean-pools them, masked, as
  `1_Pooling/config.json` says). `tokenizer.json` is an XLM-R Unigram tokenizer (<s>=0, <pad>=1, </s>=2, <unk>=3).

Both carry files the assembler must never download (`*.armnn`, `onnx/model_qint8_avx512.onnx`: junk bytes).
The graphs are written with the `onnx` helper API from numpy weights drawn from `seed`: the same seed gives the
same bytes. The tokenizers reuse the vocabularies stored in tests/data/tokenizers/ (ids stable across runs).
Nothing is downloaded. Serve them with tests/fake_hub.py: `hub.publish_files(repo, repo_files(folder))`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOKENIZER_VOCABS = Path(__file__).resolve().parent / "data" / "tokenizers"

IMMICH_REPO = "immich-app/ViT-B-32__laion2b-s34b-b79k"
SENTENCE_REPO = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
# The file kinds the real hub stores in LFS (and serves through a CDN redirect) in these two repos.
LFS_SUFFIXES = (".onnx", ".armnn")

IMAGE_SIZE = 224
CONTEXT_LENGTH = 77
EMBED_DIM = 512
SENTENCE_DIM = 384
SENTENCE_MAX_SEQ_LENGTH = 128
SENTENCE_POSITIONS = 512
OPSET = 17

IMMICH_CONFIG = ('{"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}, '
                 '"text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}')
IMMICH_PREPROCESS = ('{"size": [224, 224], "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073], '
                     '"std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", '
                     '"resize_mode": "shortest", "fill_color": 0}')
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")   # ids 0..3, as in XLM-R; <mask> takes the last id


def write_published_repos(root: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write both repos under `root` (root/owner/name/...); returns {repo id: its folder}."""
    root = Path(root)
    immich = root / IMMICH_REPO
    sentence = root / SENTENCE_REPO
    _write_immich(immich, seed)
    _write_sentence(sentence, seed)
    return {IMMICH_REPO: immich, SENTENCE_REPO: sentence}


def repo_files(folder: Path) -> dict[str, bytes]:
    """{path relative to `folder`, posix: bytes} of every file under `folder` (what FakeHub.publish_files takes)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- files

def _put(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def _json2(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _junk(seed: int, which: int, size: int = 384) -> bytes:
    return np.random.default_rng([seed, 99, which]).integers(0, 256, size, dtype=np.uint8).tobytes()


def _write_immich(folder: Path, seed: int) -> None:
    tokenizer = clip_tokenizer()
    vocab = dict(sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1]))
    _put(folder / "config.json", IMMICH_CONFIG)
    _put(folder / "README.md", "---\ntags:\n- immich\n- clip\n---\n\n# Model Description\n\nThis repo contains ONNX "
         "exports for the associated CLIP model by OpenCLIP (tiny random weights: a test stand-in).\n")
    _put(folder / "visual" / "preprocess_cfg.json", IMMICH_PREPROCESS)
    _put(folder / "visual" / "model.onnx", _visual_graph(seed))
    _put(folder / "visual" / "model.armnn", _junk(seed, 1))
    _put(folder / "textual" / "model.onnx", _textual_graph(seed, len(vocab)))
    _put(folder / "textual" / "model.armnn", _junk(seed, 2))
    _put(folder / "textual" / "tokenizer.json", tokenizer.to_str(pretty=True))
    _put(folder / "textual" / "tokenizer_config.json", _json2({
        "add_prefix_space": False, "bos_token": SOT, "clean_up_tokenization_spaces": False, "do_lower_case": True,
        "eos_token": EOT, "errors": "replace", "model_max_length": CONTEXT_LENGTH, "pad_token": EOT,
        "tokenizer_class": "CLIPTokenizer", "unk_token": EOT,
    }))
    added = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    _put(folder / "textual" / "special_tokens_map.json", _json2({
        "bos_token": {**added, "content": SOT}, "eos_token": {**added, "content": EOT, "normalized": False},
        "pad_token": EOT, "unk_token": {**added, "content": EOT, "normalized": False},
    }))
    _put(folder / "textual" / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    _put(folder / "textual" / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _write_sentence(folder: Path, seed: int) -> None:
    tokenizer = xlmr_tokenizer()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    _put(folder / "onnx" / "model.onnx", _sentence_graph(seed, size))
    _put(folder / "onnx" / "model_qint8_avx512.onnx", _junk(seed, 3))
    _put(folder / "tokenizer.json", tokenizer.to_str(pretty=True))
    mask = {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False, "single_word": False}
    _put(folder / "tokenizer_config.json", _json2({
        "bos_token": "<s>", "clean_up_tokenization_spaces": True, "cls_token": "<s>", "eos_token": "</s>",
        "mask_token": mask, "model_max_length": SENTENCE_MAX_SEQ_LENGTH, "pad_token": "<pad>", "sep_token": "</s>",
        "tokenizer_class": "XLMRobertaTokenizer", "unk_token": "<unk>",
    }))
    _put(folder / "special_tokens_map.json", _json2({
        "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": mask, "pad_token": "<pad>",
        "sep_token": "</s>", "unk_token": "<unk>",
    }))
    _put(folder / "sentence_bert_config.json",
         json.dumps({"max_seq_length": SENTENCE_MAX_SEQ_LENGTH, "do_lower_case": False}, indent=2))
    _put(folder / "1_Pooling" / "config.json", json.dumps({
        "word_embedding_dimension": SENTENCE_DIM, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    _put(folder / "modules.json", json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ], indent=2))
    _put(folder / "config.json", json.dumps({
        "_name_or_path": "old_models/paraphrase-multilingual-MiniLM-L12-v2/0_Transformer",
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": SENTENCE_DIM, "initializer_range": 0.02,
        "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": SENTENCE_POSITIONS,
        "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
        "position_embedding_type": "absolute", "transformers_version": "4.7.0", "type_vocab_size": 2,
        "use_cache": True, "vocab_size": size,
    }, indent=2) + "\n")
    _put(folder / "README.md", "---\npipeline_tag: sentence-similarity\nlicense: apache-2.0\nlibrary_name: "
         "sentence-transformers\n---\n\n# sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2\n\n"
         "Maps sentences to a 384 dimensional dense vector space (tiny random weights: a test stand-in).\n")


# ------------------------------------------------------------------------------------------- tokenizers

def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer():
    """CLIP's tokenizer pipeline (as transformers' CLIPConverter builds it) on the stored tiny BPE merges.

    The vocabulary is ordered as CLIP's: the 256 byte characters, the same with `</w>`, one token per merge,
    then `<|startoftext|>` and `<|endoftext|>` (the two largest ids).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    stored = json.loads((TOKENIZER_VOCABS / "clip.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in stored["merges"]]
    tokens = _bytes_to_unicode()
    tokens += [t + "</w>" for t in tokens]
    tokens += [a + b for a, b in merges]
    tokens += [SOT, EOT]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOT))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOT, vocab[EOT]), (SOT, vocab[SOT]), trim_offsets=False, add_prefix_space=False)
    tokenizer.add_special_tokens([AddedToken(SOT, normalized=True, special=True),
                                  AddedToken(EOT, normalized=False, special=True)])
    return tokenizer


def xlmr_tokenizer():
    """XLM-R's tokenizer pipeline on the stored tiny Unigram vocabulary (trained on multilingual captions)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    stored = json.loads((TOKENIZER_VOCABS / "xlm-roberta.json").read_text(encoding="utf-8"))
    pieces = [(p, s) for p, s in stored["vocab"] if p not in (*XLMR_SPECIALS, "<mask>")]
    vocab = [(p, 0.0) for p in XLMR_SPECIALS] + pieces + [("<mask>", 0.0)]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=XLMR_SPECIALS.index("<unk>"), byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in XLMR_SPECIALS]
                                 + [AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
    return tokenizer


# ------------------------------------------------------------------------------------------- graphs

class _Graph:
    """A tiny builder over onnx.helper: named initializers from a seeded generator, nodes in order."""

    def __init__(self, seed: int, which: int):
        self.rng = np.random.default_rng([seed, which])
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def weight(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        from onnx import helper

        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"/{op_type}_{self.count}", **attrs))
        return out

    def dense(self, x: str, name: str, n_in: int, n_out: int) -> str:
        w = self.weight(f"{name}.weight", (n_in, n_out), 1.0 / np.sqrt(n_in))
        b = self.weight(f"{name}.bias", (n_out,), 0.02)
        return self.op("Add", self.op("MatMul", x, w), b)

    def l2_normalise(self, x: str, out: str) -> None:
        from onnx import helper

        norm = self.op("ReduceL2", x, axes=[-1], keepdims=1)
        self.nodes.append(helper.make_node("Div", [x, norm], [out], name="/Div_normalise"))

    def model(self, name: str, inputs: list, outputs: list) -> bytes:
        import onnx
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="uclip-tests", producer_version="1")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model.SerializeToString()


def _visual_graph(seed: int) -> bytes:
    """image [1,3,224,224] -> per 32x32 patch: the channel means and a random patch embedding (Conv, 8 channels,
    as ViT-B/32 patchifies; it tells apart textures whose means agree) -> 539 -> 128 (tanh) -> 512 -> L2 norm."""
    from onnx import TensorProto, helper

    g = _Graph(seed, 1)
    patch, channels = 32, 8
    grid = IMAGE_SIZE // patch
    means = g.op("AveragePool", "image", kernel_shape=[patch, patch], strides=[patch, patch])           # [1,3,7,7]
    conv = g.weight("visual.conv1.weight", (channels, 3, patch, patch), 1.0 / np.sqrt(3 * patch * patch))
    patches = g.op("Conv", "image", conv, kernel_shape=[patch, patch], strides=[patch, patch])        # [1,8,7,7]
    features = g.op("Concat", means, patches, axis=1)                                                  # [1,11,7,7]
    width = (3 + channels) * grid * grid
    flat = g.op("Reshape", features, g.const("flat_shape", np.array([1, width], dtype=np.int64)))
    hidden = g.op("Tanh", g.dense(flat, "visual.fc1", width, 128))
    g.l2_normalise(g.dense(hidden, "visual.proj", 128, EMBED_DIM), "embedding")
    return g.model("visual", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, IMAGE_SIZE, IMAGE_SIZE])],
                   [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, EMBED_DIM])])


def _textual_graph(seed: int, vocab_size: int) -> bytes:
    """text int32 [1,77] -> token + position embeddings -> mean over positions up to the first argmax (the end
    token, CLIP's largest id; padding after it is ignored) -> 64 -> 128 (tanh) -> 512 -> L2 norm."""
    from onnx import TensorProto, helper

    g = _Graph(seed, 2)
    width = 64
    tokens = g.op("Gather", g.weight("token_embedding.weight", (vocab_size, width), 1.0), "text", axis=0)
    hidden = g.op("Add", tokens, g.weight("positional_embedding", (CONTEXT_LENGTH, width), 0.1))   # [1,77,64]
    end = g.op("ArgMax", g.op("Cast", "text", to=TensorProto.FLOAT), axis=1, keepdims=1, select_last_index=0)
    positions = g.const("positions", np.arange(CONTEXT_LENGTH, dtype=np.int64)[None, :])
    mask = g.op("Cast", g.op("LessOrEqual", positions, end), to=TensorProto.FLOAT)       # [1,77]
    mask3 = g.op("Unsqueeze", mask, g.const("axis_2", np.array([2], dtype=np.int64)))    # [1,77,1]
    axis1 = g.const("axis_1", np.array([1], dtype=np.int64))
    total = g.op("ReduceSum", g.op("Mul", hidden, mask3), axis1, keepdims=0)             # [1,64]
    pooled = g.op("Div", total, g.op("ReduceSum", mask, axis1, keepdims=1))
    hidden = g.op("Tanh", g.dense(pooled, "text.fc1", width, 128))
    g.l2_normalise(g.dense(hidden, "text.proj", 128, EMBED_DIM), "embedding")
    return g.model("textual", [helper.make_tensor_value_info("text", TensorProto.INT32, [1, CONTEXT_LENGTH])],
                   [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, EMBED_DIM])])


def _sentence_graph(seed: int, vocab_size: int) -> bytes:
    """input_ids/attention_mask/token_type_ids int64 [batch, sequence] -> word + type + position embeddings (32)
    mixed with the masked mean of the sentence (one attention-free layer) -> 384 per token, not pooled."""
    from onnx import TensorProto, helper

    g = _Graph(seed, 3)
    width = 32
    words = g.op("Gather", g.weight("embeddings.word_embeddings.weight", (vocab_size, width), 1.0), "input_ids", axis=0)
    types = g.op("Gather", g.weight("embeddings.token_type_embeddings.weight", (2, width), 0.5), "token_type_ids", axis=0)
    length = g.op("Gather", g.op("Shape", "input_ids"), g.const("one", np.array(1, dtype=np.int64)), axis=0)
    steps = g.op("Range", g.const("zero", np.array(0, dtype=np.int64)), length, "one")
    positions = g.op("Gather", g.weight("embeddings.position_embeddings.weight", (SENTENCE_POSITIONS, width), 0.1),
                     steps, axis=0)                                                        # [sequence, 32]
    hidden = g.op("Add", g.op("Add", words, types), positions)                            # [batch, sequence, 32]
    mask = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.FLOAT),
                g.const("axis_2", np.array([2], dtype=np.int64)))                          # [batch, sequence, 1]
    axis1 = g.const("axis_1", np.array([1], dtype=np.int64))
    total = g.op("ReduceSum", g.op("Mul", hidden, mask), axis1, keepdims=1)                # [batch, 1, 32]
    count = g.op("Max", g.op("ReduceSum", mask, axis1, keepdims=1), g.const("min_count", np.array(1.0, np.float32)))
    context = g.op("Div", total, count)
    mixed = g.op("Tanh", g.op("Add", g.dense(hidden, "encoder.token", width, width),
                              g.op("MatMul", context, g.weight("encoder.context.weight", (width, width), 0.5))))
    out = g.op("Add", g.dense(mixed, "encoder.output", width, SENTENCE_DIM),
               g.op("MatMul", hidden, g.weight("encoder.residual.weight", (width, SENTENCE_DIM), 0.1)))
    g.nodes.append(helper.make_node("Identity", [out], ["last_hidden_state"], name="/Identity_output"))
    dims = ["batch_size", "sequence_length"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims)
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    return g.model("sentence", inputs,
                   [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, SENTENCE_DIM])])
