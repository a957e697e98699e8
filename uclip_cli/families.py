"""Model families as data: one JSON file per family in `uclip_cli/model_families/`.

A family says, for the checkpoints of one architecture (transformers `model_type`), everything that
differs between architectures: which transformers class `uclip export` loads, how images are
preprocessed (resize mode, crop, default normalisation), how text is tokenised (padding, lower-casing,
where the length limit comes from, whether the tower sees an attention mask) and the names of the
exported graphs' inputs and output. Export reads it to build a bundle and writes the graph names into
the manifest (`graphs`), so the runtime needs no family at all: it reads the manifest. A new
architecture is a new JSON file (and, when it needs one, a torch wrapper in export/towers.py), not
edits across modules; `open_clip`'s `model_configs/*.json` + `factory.py` follow the same idea.

Graph inputs are named by role: "pixels" (float32 [batch, 3, size, size]), "input_ids",
"attention_mask" and "token_type_ids" (int64 [batch, sequence]; int32 where the graph says so),
"features" (float32 [batch, d], the heads). Graphs published by others (an assembled default bundle,
assemble.py) may differ from uclip's own exports in three ways a GraphIO records: token ids as int32
(`ids`), a batch fixed at export time (`batch`: rows are then fed one at a time) and token embeddings
instead of a sentence embedding (`pooling` "mean": the runtime takes the masked mean, as
sentence-transformers' pooling module does).

This module is torch-free: the runtime imports it to know the default graph names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UclipError

ROLES = ("clip", "multilingual")          # image + English text dual encoder | multilingual sentence encoder
INPUT_ROLES = ("pixels", "input_ids", "attention_mask", "token_type_ids", "features")
ID_TYPES = ("int64", "int32")              # element type of a text graph's token inputs
POOLINGS = ("mean",)                       # what the runtime does to a graph's token embeddings
RESIZE_MODES = ("shortest_edge", "exact")  # CLIP: short side then centre crop | SigLIP: straight to size x size
RESAMPLES = ("bicubic", "bilinear")
PADDINGS = ("longest", "max_length")


class FamilyError(UclipError):
    """A family file that cannot be used (a packaging mistake, named with the file)."""


@dataclass(frozen=True)
class GraphIO:
    """The names of one graph's inputs (by role) and of its output, and how the runtime feeds it."""

    inputs: dict[str, str]
    output: str = "embeddings"
    ids: str = "int64"            # element type of the token inputs (ID_TYPES)
    batch: int | None = None      # None: any batch; 1: a graph exported for one row at a time
    pooling: str | None = None    # None: the output is the embedding; "mean": token embeddings, masked mean

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphIO":
        return cls(inputs=dict(d["inputs"]), output=str(d.get("output", "embeddings")), ids=str(d.get("ids", "int64")),
                   batch=d.get("batch"), pooling=d.get("pooling"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"inputs": dict(self.inputs), "output": self.output}
        for key, default in (("ids", "int64"), ("batch", None), ("pooling", None)):   # written only when they differ
            if getattr(self, key) != default:
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class ImageRecipe:
    resize_mode: str
    crop: bool
    resample: str                       # used when the checkpoint's preprocessor_config.json names none
    mean: tuple[float, float, float]    # likewise
    std: tuple[float, float, float]


@dataclass(frozen=True)
class TextRecipe:
    attention_mask: bool    # False: the tower was trained on padded text without a mask (SigLIP)
    padding: str            # "longest" | "max_length"
    lowercase: bool
    max_length: str         # "text_config.max_position_embeddings" | "sentence_bert_config.max_seq_length"
    position_offset: int    # positions the position table reserves before the first token (RoBERTa-like: 2)


@dataclass(frozen=True)
class Family:
    name: str
    role: str
    model_types: tuple[str, ...]
    about: str
    model_class: str                    # transformers class name export loads the checkpoint with
    text: TextRecipe
    graphs: dict[str, GraphIO]
    image: ImageRecipe | None = None    # role "clip" only
    pooling: str | None = None          # role "multilingual" only: "mean"
    extra: dict[str, Any] = field(default_factory=dict)


def _parse(name: str, raw: Any, where: str | None = None) -> Family:
    where = where or f"uclip_cli/model_families/{name}"
    try:
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        role = raw["role"]
        if role not in ROLES:
            raise ValueError(f"role {role!r}")
        text = TextRecipe(**raw["text"])
        if text.padding not in PADDINGS:
            raise ValueError(f"text.padding {text.padding!r}")
        image = None
        if role == "clip":
            d = raw["image"]
            image = ImageRecipe(resize_mode=d["resize_mode"], crop=bool(d["crop"]), resample=d["resample"],
                                mean=tuple(float(x) for x in d["mean"]), std=tuple(float(x) for x in d["std"]))
            if image.resize_mode not in RESIZE_MODES or image.resample not in RESAMPLES:
                raise ValueError(f"image {d}")
        graphs = {file: GraphIO.from_dict(g) for file, g in raw["graphs"].items()}
        for graph in graphs.values():
            if not set(graph.inputs) <= set(INPUT_ROLES):
                raise ValueError(f"input roles {sorted(graph.inputs)}")
        known = {"name", "role", "model_types", "about", "model_class", "text", "graphs", "image", "pooling"}
        return Family(name=str(raw["name"]), role=role, model_types=tuple(raw["model_types"]), about=str(raw["about"]),
                      model_class=str(raw["model_class"]), text=text, graphs=graphs, image=image,
                      pooling=raw.get("pooling"), extra={k: v for k, v in raw.items() if k not in known})
    except (KeyError, TypeError, ValueError) as e:
        raise FamilyError(f"{where} is not a usable family description ({type(e).__name__}: {e})") from None


@cache
def families() -> dict[str, Family]:
    """Every family shipped with uclip, by name."""
    found: dict[str, Family] = {}
    for entry in sorted(resources.files(__package__).joinpath("model_families").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            family = _parse(entry.name, json.loads(entry.read_text(encoding="utf-8")))
            found[family.name] = family
    return found


_added: dict[str, Family] = {}


def add_family(path: str | Path) -> Family:
    """Make the family described by a JSON file outside uclip known to this process (tests' real-weights stand-in,
    tests/families/): parsed and checked like a shipped one, found by `for_model_type` after the shipped ones."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FamilyError(f"{path} cannot be read as a family description ({e})") from None
    family = _parse(path.name, raw, where=str(path))
    _added[family.name] = family
    return family


def _known() -> list[Family]:
    return [*families().values(), *_added.values()]


def for_model_type(model_type: str, role: str) -> Family | None:
    """The family of `role` that covers this transformers model_type, or None."""
    for family in _known():
        if family.role == role and model_type in family.model_types:
            return family
    return None


def model_types(role: str) -> tuple[str, ...]:
    """Every model_type some family of `role` covers (for messages)."""
    return tuple(t for f in _known() if f.role == role for t in f.model_types)


# The graph names every bundle had before manifests recorded them, and the heads' (written by `uclip train`).
DEFAULT_GRAPH_IO: dict[str, GraphIO] = {
    "image_encoder.onnx": GraphIO({"pixels": "pixel_values"}),
    "text_clip.onnx": GraphIO({"input_ids": "input_ids", "attention_mask": "attention_mask"}),
    "text_multilingual.onnx": GraphIO({"input_ids": "input_ids", "attention_mask": "attention_mask"}),
    "head_a.onnx": GraphIO({"features": "features"}),
    "head_b.onnx": GraphIO({"features": "features"}),
}
