"""How the towers other projects publish reach a bundle: one class per repository layout.

A layout names the files it needs from its repository (`FILES`: repo path -> bundle file, or None for a
file only read here) and turns them into the bundle's parts (`parts`): which staged file becomes which
bundle file, how each graph is fed (families.GraphIO: input names by role, id type, fixed batch, pooling),
the tokenizer settings and the image preprocessing. Everything comes from the repository's own config
files and from the graphs themselves (`signature`, read by the session factory), never from assumptions;
a repository that does not hold what its layout needs is refused in one line naming the file.

    immich-openclip             immich-app's OpenCLIP exports (immich's machine-learning/export):
                                visual/ and textual/ ONNX graphs, open_clip's config.json and
                                preprocess_cfg.json, a Hugging Face CLIP tokenizer
    sentence-transformers-onnx  a sentence-transformers repo with its optimum ONNX export (onnx/model.onnx:
                                token embeddings), its pooling and sequence-length settings

A new published layout is a new class here and a name in LAYOUTS (assemble.py's recipes name them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import bundle as B
from .errors import UclipError
from .families import GraphIO


class LayoutError(UclipError):
    """A published repository that does not hold what its layout needs; the message names the file."""


Signature = Callable[[Path], dict[str, list[tuple[str, str, list]]]]


@dataclass
class TowerParts:
    """What one published repo gives the bundle: files (bundle name -> staged path) and how to feed them."""

    files: dict[str, Path]
    graphs: dict[str, GraphIO]
    tokenizers: dict[str, B.TokenizerSettings]
    dims: dict[str, int]
    image: B.ImageSettings | None = None


def _json(path: Path, where: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LayoutError(f"{where} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise LayoutError(f"{where} is not a JSON object")
    return value


def _token_id(tokenizer_file: Path, token: Any, where: str) -> int:
    from tokenizers import Tokenizer

    content = token.get("content") if isinstance(token, dict) else token
    try:
        found = Tokenizer.from_file(str(tokenizer_file)).token_to_id(str(content))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own types for a bad file
        raise LayoutError(f"{where}: its tokenizer.json cannot be read ({str(e).splitlines()[0]})") from None
    if found is None:
        raise LayoutError(f"{where}: the padding token {content!r} is not in its tokenizer.json")
    return int(found)


_IDS = {"tensor(int64)": "int64", "tensor(int32)": "int32"}


def _batch_of(dims: list) -> int | None:
    first = dims[0] if dims else None
    return 1 if first == 1 else None


def _one(args: list, what: str, where: str) -> tuple[str, str, list]:
    if len(args) != 1:
        raise LayoutError(f"{where} has {len(args)} {what}s ({', '.join(a[0] for a in args)}), one was expected")
    return args[0]


class ImmichOpenClip:
    """immich-app's OpenCLIP exports (immich's machine-learning/export): visual/ and textual/ ONNX graphs,
    open_clip's model config, preprocessing config and a Hugging Face CLIP tokenizer."""

    FILES = {"visual/model.onnx": B.IMAGE_ENCODER, "textual/model.onnx": B.TEXT_CLIP,
             "textual/tokenizer.json": B.TOKENIZER_CLIP, "config.json": None, "visual/preprocess_cfg.json": None,
             "textual/tokenizer_config.json": None}
    RESIZE = {"shortest": ("shortest_edge", True), "squash": ("exact", False)}

    @classmethod
    def parts(cls, repo: str, paths: dict[str, Path], signature: Signature) -> TowerParts:
        config = _json(paths["config.json"], f"{repo}/config.json")
        pre = _json(paths["visual/preprocess_cfg.json"], f"{repo}/visual/preprocess_cfg.json")
        # optional: older exports lack it; open_clip pads with 0, immich with the end token: the same result, as the
        # tower pools at the first end token (the largest id)
        tokenizer_config = (_json(paths["textual/tokenizer_config.json"], f"{repo}/textual/tokenizer_config.json")
                            if "textual/tokenizer_config.json" in paths else {})
        try:
            size = pre["size"][0] if isinstance(pre["size"], list) else pre["size"]
            resize_mode, crop = cls.RESIZE[pre.get("resize_mode", "shortest")]
            image = B.ImageSettings(size=int(size), resize_mode=resize_mode, crop=crop, resample=pre.get("interpolation", "bicubic"),
                                    mean=tuple(float(x) for x in pre["mean"]), std=tuple(float(x) for x in pre["std"]))
            context = int(config["text_cfg"]["context_length"])
            embed_dim = int(config["embed_dim"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise LayoutError(f"{repo}: config.json or visual/preprocess_cfg.json lacks what a CLIP export has ({e!r})") from None
        if image.resample not in ("bicubic", "bilinear"):
            raise LayoutError(f"{repo}/visual/preprocess_cfg.json: interpolation {image.resample!r} is not supported")
        visual, textual = signature(paths["visual/model.onnx"]), signature(paths["textual/model.onnx"])
        pixels = _one(visual["inputs"], "input", f"{repo}/visual/model.onnx")
        image_out = _one(visual["outputs"], "output", f"{repo}/visual/model.onnx")
        text_in = _one(textual["inputs"], "input", f"{repo}/textual/model.onnx")
        text_out = _one(textual["outputs"], "output", f"{repo}/textual/model.onnx")
        if pixels[1] != "tensor(float)" or pixels[2][1:] != [3, image.size, image.size]:
            raise LayoutError(f"{repo}/visual/model.onnx takes {pixels[1]} {pixels[2]}, not float [batch, 3, {image.size}, "
                                f"{image.size}] as its preprocess_cfg.json says")
        if text_in[1] not in _IDS or (isinstance(text_in[2][-1], int) and text_in[2][-1] != context):
            raise LayoutError(f"{repo}/textual/model.onnx takes {text_in[1]} {text_in[2]}, not token ids of {context}")
        for out, where in ((image_out, "visual"), (text_out, "textual")):
            if out[2][-1] != embed_dim:
                raise LayoutError(f"{repo}/{where}/model.onnx gives {out[2]}, not {embed_dim}-d embeddings")
        pad = _token_id(paths["textual/tokenizer.json"], tokenizer_config.get("pad_token", "<|endoftext|>"), repo)
        return TowerParts(
            files={cls.FILES[p]: paths[p] for p in cls.FILES if cls.FILES[p]},
            graphs={B.IMAGE_ENCODER: GraphIO({"pixels": pixels[0]}, image_out[0], batch=_batch_of(pixels[2])),
                    B.TEXT_CLIP: GraphIO({"input_ids": text_in[0]}, text_out[0], ids=_IDS[text_in[1]],
                                         batch=_batch_of(text_in[2]))},
            # open_clip pads every text to the full window (its tower pools at the end token, which has the largest id)
            tokenizers={"clip": B.TokenizerSettings(B.TOKENIZER_CLIP, context, padding="max_length", pad_id=pad)},
            dims={"clip": embed_dim}, image=image)


class SentenceTransformersOnnx:
    """A sentence-transformers repo with its ONNX export (`onnx/model.onnx`: token embeddings, no pooling
    inside) and its pooling and sequence-length settings."""

    FILES = {"onnx/model.onnx": B.TEXT_MULTILINGUAL, "tokenizer.json": B.TOKENIZER_MULTILINGUAL,
             "sentence_bert_config.json": None, "1_Pooling/config.json": None, "tokenizer_config.json": None}
    ROLES = ("input_ids", "attention_mask", "token_type_ids")

    @classmethod
    def parts(cls, repo: str, paths: dict[str, Path], signature: Signature) -> TowerParts:
        sbert = _json(paths["sentence_bert_config.json"], f"{repo}/sentence_bert_config.json")
        pooling = _json(paths["1_Pooling/config.json"], f"{repo}/1_Pooling/config.json")
        tokenizer_config = _json(paths["tokenizer_config.json"], f"{repo}/tokenizer_config.json")
        if not pooling.get("pooling_mode_mean_tokens") or any(
                pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
            raise LayoutError(f"{repo}/1_Pooling/config.json: only mean pooling is supported")
        graph = signature(paths["onnx/model.onnx"])
        where = f"{repo}/onnx/model.onnx"
        names = {name: kind for name, kind, _ in graph["inputs"]}
        if not {"input_ids", "attention_mask"} <= set(names) or not set(names) <= set(cls.ROLES):
            raise LayoutError(f"{where} takes {sorted(names)}, not input_ids, attention_mask (and token_type_ids)")
        if len({*names.values()}) != 1 or names["input_ids"] not in _IDS:
            raise LayoutError(f"{where}: its token inputs are {sorted(set(names.values()))}, not one integer type")
        out_name, out_type, out_dims = graph["outputs"][0]
        if out_type != "tensor(float)" or len(out_dims) not in (2, 3) or not isinstance(out_dims[-1], int):
            raise LayoutError(f"{where} gives {out_type} {out_dims}, not token or sentence embeddings")
        try:
            max_length = int(sbert["max_seq_length"])
        except (KeyError, TypeError, ValueError):
            raise LayoutError(f"{repo}/sentence_bert_config.json has no max_seq_length") from None
        pad = _token_id(paths["tokenizer.json"], tokenizer_config.get("pad_token", "<pad>"), repo)
        return TowerParts(
            files={cls.FILES[p]: paths[p] for p in cls.FILES if cls.FILES[p]},
            graphs={B.TEXT_MULTILINGUAL: GraphIO({n: n for n in names}, out_name, ids=_IDS[names["input_ids"]],
                                                 batch=_batch_of(graph["inputs"][0][2]),
                                                 pooling="mean" if len(out_dims) == 3 else None)},
            tokenizers={"multilingual": B.TokenizerSettings(B.TOKENIZER_MULTILINGUAL, max_length, pad_id=pad,
                                                            lowercase=bool(sbert.get("do_lower_case", False)))},
            dims={"multilingual": int(out_dims[-1])})


LAYOUTS = {"immich-openclip": ImmichOpenClip, "sentence-transformers-onnx": SentenceTransformersOnnx}
