"""Build a uclip model bundle from Hugging Face checkpoints: ONNX towers, tokenizers, preprocessing, manifest.

    export_bundle("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
                  "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2", Path("bundle"))

Each source is a Hugging Face id or a local checkpoint directory. The bundle is assembled in a
temporary directory beside `out_dir` and renamed into place only after every graph passed its
parity check, so a failed export never leaves a half-written bundle.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from uclip_cli import bundle as B
from uclip_cli import families as F
from uclip_cli.sessions import SessionFactory

from . import ExportError
from .parity import PARITY_RULE, VERIFY_TEXTS, verify_tower
from .fuse import UNFUSED, fuse_verified
from .quantize import quantize_towers
from .towers import ClipTextTower, ImageTower, MultilingualTower

QUANTIZE_MODES = ("int8", "int8-all", "int8-beside")
# int8: the two text towers (cold-start size and speed); int8-all: the image encoder too (indexing
# speed; its features are stored in the index, so their cosine to fp32 is recorded in the manifest);
# int8-beside: int8 text towers beside the fp32 ones (bundle.INT8_TWINS), each CPU running the faster
# of the two, measured once (text_precision.py): int8 wins where VNNI/AMX run its kernels, not on AVX2.
QUANTIZED_GRAPHS = {"int8": (B.TEXT_MULTILINGUAL, B.TEXT_CLIP), "int8-all": (B.TEXT_MULTILINGUAL, B.TEXT_CLIP, B.IMAGE_ENCODER),
                    "int8-beside": (B.TEXT_MULTILINGUAL, B.TEXT_CLIP)}
FUSED_GRAPHS = (B.TEXT_MULTILINGUAL,)   # BERT / XLM-R shaped: ONNX Runtime's transformer optimizer knows them
SHARED_DIM = 512
DEFAULT_SENTENCE_LENGTH = 128
EXPORT_BATCH = 2   # verification uses other batch sizes, so a batch size baked into a graph is caught
RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}



# ----------------------------------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face checkpoint by local directory or hub id, with its config already read."""

    source: str
    role: str              # "clip" | "multilingual": named in error messages
    local_only: bool       # never touch the hub (local directory, or hub unreachable but cached)
    config: Any

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def family(self) -> F.Family:
        """The family of this checkpoint's architecture (open_checkpoint has checked there is one)."""
        family = F.for_model_type(self.model_type, self.role)
        assert family is not None, self.model_type
        return family

    def load_kwargs(self) -> dict[str, Any]:
        return {"local_files_only": self.local_only}

    def file(self, name: str) -> Path | None:
        """A file of the checkpoint (local path or hub cache), or None when it has none."""
        local = Path(self.source).expanduser()
        if local.is_dir():
            return local / name if (local / name).is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.source, name, local_files_only=self.local_only))
        except Exception:
            return None

    def json(self, name: str) -> dict[str, Any] | list[Any] | None:
        path = self.file(name)
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"{path} is not valid JSON ({e}): the {self.role} checkpoint is damaged") from None


ROLE_NAMES = {"clip": "image + English text tower", "multilingual": "multilingual text tower"}


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


def open_checkpoint(source: str, role: str) -> Checkpoint:
    """Find a checkpoint locally, then on the hub, then in the hub cache; check its architecture.

    Raises ExportError (one line) for a missing directory, an id neither cached nor downloadable,
    or a model type the role does not support.
    """
    path = Path(source).expanduser()
    if path.exists() or _looks_like_path(source):
        ckpt = _open_directory(path, role)
    else:
        ckpt = _open_hub_id(source, role)
    _require_model_type(ckpt.source, ckpt.model_type, role)
    return ckpt


def _open_directory(path: Path, role: str) -> Checkpoint:
    from transformers import AutoConfig

    if not path.is_dir():
        raise ExportError(f"{role} checkpoint directory {path} does not exist: "
                          "pass a directory holding a Hugging Face checkpoint, or a hub id")
    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path} has no config.json: it is not a Hugging Face checkpoint directory "
                          f"({role} tower)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{config_file} is not valid JSON ({e}): the {role} checkpoint is damaged") from None
    _require_model_type(str(path), str(raw.get("model_type")), role)   # before transformers tries to parse it
    family = F.for_model_type(str(raw.get("model_type")), role)
    if ":" in family.model_class:   # a model class outside transformers: importing it registers its config type
        _model_class(family)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{config_file} cannot be read as a transformers config ({_first_line(e)})") from None
    return Checkpoint(str(path), role, True, config)


HUB_PROBE_TIMEOUT = 5.0   # seconds for one request to the hub before it counts as unreachable
ROLE_FLAGS = {"clip": "--clip", "multilingual": "--multilingual"}
_unreachable: list[str] = []   # the endpoint that did not answer, once it has not


def hub_reachable() -> bool:
    """One quick request to the hub's endpoint, no retries: any HTTP answer means it can be reached.

    Without it, an offline export spends half a minute in huggingface_hub's retries for every file
    before it can say anything. When the hub does not answer, huggingface_hub is put in offline mode
    for the rest of this process (uclip runs one command per process), so that nothing else, not even
    its user-agent lookup, tries again. HF_HUB_OFFLINE=1 skips the request.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception:   # connection refused, DNS, timeout, TLS, proxy: all mean "not reachable from here"
        _unreachable.append(constants.ENDPOINT)
        constants.HF_HUB_OFFLINE = True
        return False
    return True


def _open_hub_id(source: str, role: str) -> Checkpoint:
    from transformers import AutoConfig

    for local_only in ((False, True) if hub_reachable() else (True,)):
        try:
            return Checkpoint(source, role, local_only, AutoConfig.from_pretrained(source, local_files_only=local_only))
        except (OSError, ValueError) as e:
            if not local_only and "not a valid model identifier" in str(e):
                raise ExportError(f"{source} is not a checkpoint on the Hugging Face hub (nor a local directory): "
                                  "check the id, or run `hf auth login` for a private one") from None
    why = f"{_unreachable[0]} cannot be reached" if _unreachable else "HF_HUB_OFFLINE is set"
    folder = source.rstrip("/").rsplit("/", 1)[-1]
    raise ExportError(f"checkpoint {source} is not in the local Hugging Face cache and {why}: on a connected machine "
                      f"run `hf download {source} --local-dir {folder}`, copy {folder} here and pass "
                      f"{ROLE_FLAGS[role]} {folder}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _require_model_type(source: str, model_type: str, role: str) -> None:
    supported, what = F.model_types(role), ROLE_NAMES[role]
    if F.for_model_type(model_type, role) is not None:
        return
    hint = ""
    if model_type == "siglip2":
        hint = " (NaFlex SigLIP2 is not supported: use a fixed-resolution one such as google/siglip2-base-patch32-256)"
    raise ExportError(f"{source} has model_type {model_type!r}, not supported as the {what}{hint}: "
                      f"supported model types are {', '.join(supported)}")


@contextmanager
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_model(ckpt: Checkpoint, model_cls, **kwargs):
    try:
        with _no_progress_bars():
            model = model_cls.from_pretrained(ckpt.source, dtype=torch.float32, attn_implementation="eager",
                                              **ckpt.load_kwargs(), **kwargs)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the weights of {ckpt.source} ({_first_line(e)})") from None
    return model.eval()


def _load_tokenizer(ckpt: Checkpoint, **kwargs):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt.source, **ckpt.load_kwargs(), **kwargs)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the tokenizer of {ckpt.source} ({_first_line(e)})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(f"the tokenizer of {ckpt.source} ({type(tokenizer).__name__}) has no `tokenizers` "
                          "backend (tokenizer.json), which the runtime needs: use a checkpoint with a fast tokenizer")
    return tokenizer


# ----------------------------------------------------------------------------------------------- settings

def image_settings(ckpt: Checkpoint, image_size: int) -> B.ImageSettings:
    """ImageSettings from the checkpoint's preprocessor_config.json, read as its family says (CLIP: resize the
    short side + centre crop; SigLIP: straight to size x size); the family's defaults fill what the file omits."""
    config = ckpt.json("preprocessor_config.json")
    if config is None:   # transformers 5 save_pretrained nests it in processor_config.json
        config = (ckpt.json("processor_config.json") or {}).get("image_processor")
    if not isinstance(config, dict):
        raise ExportError(f"{ckpt.source} has no preprocessor_config.json: cannot know how its images are preprocessed")
    recipe = ckpt.family.image
    resample = config.get("resample", recipe.resample)
    if resample not in RESAMPLE_NAMES:
        raise ExportError(f"{ckpt.source}/preprocessor_config.json uses resample {resample!r}: "
                          f"supported are {sorted(set(RESAMPLE_NAMES.values()))}")
    resize_mode = recipe.resize_mode
    if resize_mode == "exact":
        size, crop = _square(config.get("size", image_size), ckpt), False
    else:
        crop = bool(config.get("do_center_crop", recipe.crop))
        size = _square(config.get("crop_size", image_size), ckpt) if crop else _shortest_edge(config.get("size"), ckpt)
    if size != image_size:
        raise ExportError(f"{ckpt.source}/preprocessor_config.json makes {size}px images but the vision tower "
                          f"expects {image_size}px")
    return B.ImageSettings(
        size=size, resize_mode=resize_mode, crop=crop, resample=RESAMPLE_NAMES[resample],
        rescale_factor=float(config.get("rescale_factor", B.ImageSettings().rescale_factor)),
        mean=tuple(float(x) for x in config.get("image_mean", recipe.mean)),
        std=tuple(float(x) for x in config.get("image_std", recipe.std)),
    )


def _square(value, ckpt: Checkpoint) -> int:
    if isinstance(value, int):
        return value
    height, width = value.get("height"), value.get("width")
    if height is None or height != width:
        raise ExportError(f"{ckpt.source}/preprocessor_config.json asks for {value}: only square inputs are supported")
    return int(height)


def _shortest_edge(value, ckpt: Checkpoint) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise ExportError(f"{ckpt.source}/preprocessor_config.json has size {value!r}: expected a shortest_edge")


def multilingual_max_length(ckpt: Checkpoint) -> int:
    """sentence-transformers' max_seq_length, else 128; never beyond the position table."""
    st_config = ckpt.json("sentence_bert_config.json")
    length = int(st_config.get("max_seq_length") or DEFAULT_SENTENCE_LENGTH) if isinstance(st_config, dict) \
        else DEFAULT_SENTENCE_LENGTH
    positions = int(ckpt.config.max_position_embeddings) - ckpt.family.text.position_offset
    return min(length, positions)


def check_mean_pooling(ckpt: Checkpoint) -> None:
    """The method needs masked mean pooling straight after the transformer (a Normalize module is harmless)."""
    modules = ckpt.json("modules.json")
    if not isinstance(modules, list):
        return   # a plain transformers encoder: mean pooling is what uclip applies
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(("Transformer", "Normalize")):
            continue
        if kind.endswith("Pooling"):
            pooling = ckpt.json(f"{module.get('path', '1_Pooling')}/config.json") or {}
            if not pooling.get("pooling_mode_mean_tokens", True) or any(
                    pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                             "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_lasttoken")):
                raise ExportError(f"{ckpt.source} pools with {pooling}: uclip supports sentence encoders with mean pooling only")
            continue
        raise ExportError(f"{ckpt.source}/modules.json has a {kind} module: uclip supports "
                          "Transformer + mean Pooling (+ Normalize) sentence encoders only")


def bundle_tokenizer(hf_tokenizer, *, file: str, max_length: int, padding: str, lowercase: bool = False):
    """A standalone `tokenizers` Tokenizer with the checkpoint's pipeline, and its TokenizerSettings."""
    from tokenizers import Tokenizer, normalizers

    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    pad_id = hf_tokenizer.pad_token_id
    if pad_id is None:
        pad_id = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else 0
    if lowercase and "Lowercase" not in tokenizer.to_str():
        current = tokenizer.normalizer
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([current] if current else []))
    tokenizer.enable_truncation(max_length)
    # Right padding, as the runtime pads (uclip_cli/text.py) and as CLIP/SigLIP/BERT were trained.
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=hf_tokenizer.convert_ids_to_tokens(pad_id),
                             length=max_length if padding == "max_length" else None)
    settings = B.TokenizerSettings(file=file, max_length=max_length, padding=padding, pad_id=int(pad_id),
                                   lowercase=lowercase)
    return tokenizer, settings


# ----------------------------------------------------------------------------------------------- towers

@dataclass
class Tower:
    """One graph to export: the torch module, its bundle file name, and how to feed it."""

    name: str
    module: torch.nn.Module
    kind: str                                  # "image" | "text"
    io: F.GraphIO                              # the graph's input names (by role) and output name
    tokenizer_key: str | None = None           # for text towers: key in the manifest's tokenizers
    image_size: int = 0

    def feeds(self, arrays: dict[str, Any]) -> dict[str, Any]:
        """Arrays by input role (pixels, input_ids, attention_mask) -> by this graph's input names."""
        return {self.io.inputs[role]: value for role, value in arrays.items() if role in self.io.inputs}


def _config_value(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _model_class(family: F.Family):
    """The class a family loads its checkpoints with: a transformers class name, or `module:Class` for a model
    written outside transformers (tests' real-weights stand-in); importing its module registers its config."""
    module, _, name = family.model_class.rpartition(":")
    if module:
        import importlib

        return getattr(importlib.import_module(module), name)
    import transformers

    return getattr(transformers, family.model_class)


def clip_towers(ckpt: Checkpoint) -> tuple[list[Tower], B.ImageSettings, Any, dict[str, Any]]:
    """Image tower + CLIP text tower, the image settings, the HF tokenizer and its settings arguments."""
    family = ckpt.family
    model = _load_model(ckpt, _model_class(family))
    image_size = int(model.config.vision_config.image_size)
    image = image_settings(ckpt, image_size)
    text = family.text
    towers = [
        Tower(B.IMAGE_ENCODER, ImageTower(model), "image", family.graphs[B.IMAGE_ENCODER], image_size=image_size),
        Tower(B.TEXT_CLIP, ClipTextTower(model, use_attention_mask=text.attention_mask), "text",
              family.graphs[B.TEXT_CLIP], tokenizer_key="clip"),
    ]
    text_length = int(_config_value(model.config, text.max_length))
    tokenizer_args = dict(max_length=text_length, padding=text.padding, lowercase=text.lowercase)
    return towers, image, _load_tokenizer(ckpt), tokenizer_args


def multilingual_tower(ckpt: Checkpoint) -> tuple[Tower, Any, dict[str, Any]]:
    check_mean_pooling(ckpt)
    family = ckpt.family
    module_path = _transformer_subfolder(ckpt)
    extra = {"subfolder": module_path} if module_path else {}
    model = _load_model(ckpt, _model_class(family), **extra)
    tower = Tower(B.TEXT_MULTILINGUAL, MultilingualTower(model), "text", family.graphs[B.TEXT_MULTILINGUAL],
                  tokenizer_key="multilingual")
    tokenizer_args = dict(max_length=multilingual_max_length(ckpt), padding=family.text.padding,
                          lowercase=family.text.lowercase)
    return tower, _load_tokenizer(ckpt, **extra), tokenizer_args


def _transformer_subfolder(ckpt: Checkpoint) -> str:
    modules = ckpt.json("modules.json")
    if isinstance(modules, list):
        for module in modules:
            if str(module.get("type", "")).endswith("Transformer"):
                return str(module.get("path", ""))
    return ""


# ----------------------------------------------------------------------------------------------- ONNX

def export_onnx(tower: Tower, path: Path, example: dict[str, torch.Tensor], opset: int) -> None:
    names = list(example)   # in the order of the module's forward arguments
    dynamic_axes = {tower.io.output: {0: "batch"}}
    for name in names:
        dynamic_axes[name] = {0: "batch"} if tower.kind == "image" else {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tracer warnings about Python control flow on fixed sizes
        torch.onnx.export(tower.module, tuple(example[n] for n in names), str(path), dynamo=False,
                          opset_version=opset, input_names=names, output_names=[tower.io.output],
                          dynamic_axes=dynamic_axes, do_constant_folding=True)


def image_batches(size: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Fresh normalised-looking random pixels (by input role), batch sizes that differ from the export batch."""
    rng = np.random.default_rng(seed)
    return [{"pixels": rng.standard_normal((n, 3, size, size)).astype(np.float32)} for n in (1, 3)]


def text_batches(tokenize: Callable[[list[str]], dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The verification sentences in one padded batch, then a single one (different batch size and length)."""
    return [tokenize(VERIFY_TEXTS), tokenize(VERIFY_TEXTS[1:2])]


def torch_outputs(tower: Tower, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return tower.module(*(torch.from_numpy(v) for v in feeds.values())).numpy()


def torch_outputs_and_bounds(tower: Tower, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's float32 outputs, and per row how far any float32 run may lie from the exact result."""
    from .rounding import float32_error_bound

    bounded = float32_error_bound(tower.module, [torch.from_numpy(v) for v in feeds.values()])
    return bounded.result.numpy(), bounded.bound.numpy()


def verify_tokenizer(name: str, hf_tokenizer, tokenize, settings: B.TokenizerSettings) -> None:
    """The bundle's tokenizer, as the runtime runs it, must give the ids the checkpoint's own tokenizer gives."""
    texts = [t.lower() for t in VERIFY_TEXTS] if settings.lowercase else VERIFY_TEXTS
    hf_tokenizer.padding_side = "right"
    expected = hf_tokenizer(texts, padding="max_length" if settings.padding == "max_length" else "longest",
                            truncation=True, max_length=settings.max_length, return_tensors="np")
    ours = tokenize(VERIFY_TEXTS)
    if not (np.array_equal(expected["input_ids"], ours["input_ids"])
            and np.array_equal(expected["attention_mask"], ours["attention_mask"])):
        raise ExportError(f"{name} tokenizes differently from the checkpoint's own tokenizer: export failed")


def runtime_tokenizer(path: Path, settings: B.TokenizerSettings):
    from uclip_cli.text import TextTokenizer

    return TextTokenizer(path, settings)


# ----------------------------------------------------------------------------------------------- bundle

def _prepare_destination(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file: pass a new or empty directory, or an existing bundle to replace")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / B.MANIFEST).is_file():
        raise ExportError(f"{out_dir} is not empty and not a uclip bundle: pass a new or empty directory")


def _publish(staging: Path, out_dir: Path, log: Callable[[str], Any]) -> None:
    """Move the finished bundle into place; an existing bundle there is replaced only at the very end."""
    if B.replace_directory(staging, out_dir):
        log(f"replaced the bundle at {out_dir} (its trained heads, if any, are gone: re-run `uclip train`)")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_bundle(
    clip_source: str,
    multilingual_source: str,
    out_dir: str | os.PathLike,
    *,
    quantize: str | None = None,
    opset: int = 17,
    verify: bool = True,
    log: Callable[[str], Any] = print,
    sessions: SessionFactory | None = None,
) -> Path:
    """Export the image tower, CLIP text tower and multilingual tower (+ tokenizers, settings) into `out_dir`.

    clip_source:          CLIPModel or fixed-resolution SigLIP/SigLIP2 checkpoint (hub id or directory).
    multilingual_source:  sentence-transformers encoder with mean pooling (BERT / XLM-R / MPNet).
    quantize:             None, "int8": dynamic int8 weights (per channel) for the two text towers, or
                          "int8-all": the image encoder too (about 2.5x faster indexing on AVX-512 VNNI CPUs),
                          with their cosine against fp32 recorded in the manifest; "int8-beside": int8 text
                          towers beside the fp32 ones, a query running whichever is faster on its CPU.
    verify:               compare every graph with PyTorch (fails beyond float32 rounding) and every tokenizer
                          with the checkpoint's own.
    sessions:             the SessionFactory that opens the written graphs for those checks (always on the
                          CPU, the file as written: SessionFactory.create_as_written); None: a CPU factory.
    Returns out_dir. Raises ExportError with a one-line message.
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ExportError(f"--quantize {quantize!r} is not supported: use one of {', '.join(QUANTIZE_MODES)}")
    out_dir = Path(out_dir).expanduser()
    sessions = sessions if sessions is not None else SessionFactory(device="cpu")
    _prepare_destination(out_dir)
    clip_ckpt = open_checkpoint(clip_source, "clip")
    multi_ckpt = open_checkpoint(multilingual_source, "multilingual")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest_args = _build(clip_ckpt, multi_ckpt, staging, quantize=quantize, opset=opset, verify=verify, log=log,
                               sessions=sessions)
        B.write_manifest(staging, **manifest_args)
        _publish(staging, out_dir, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"bundle written to {out_dir}")
    return out_dir


def _build(clip_ckpt: Checkpoint, multi_ckpt: Checkpoint, staging: Path, *, quantize: str | None, opset: int,
           verify: bool, log: Callable[[str], Any], sessions: SessionFactory) -> dict[str, Any]:
    """Write towers and tokenizers into `staging`; returns write_manifest's arguments."""
    log(f"loading {clip_ckpt.source} ({clip_ckpt.model_type}) and {multi_ckpt.source} ({multi_ckpt.model_type})")
    towers, image, clip_tok, clip_tok_args = clip_towers(clip_ckpt)
    multi, multi_tok, multi_tok_args = multilingual_tower(multi_ckpt)
    towers.append(multi)
    tokenizers, tokenize = _write_tokenizers(
        staging, {"clip": (B.TOKENIZER_CLIP, clip_tok, clip_tok_args),
                  "multilingual": (B.TOKENIZER_MULTILINGUAL, multi_tok, multi_tok_args)}, verify=verify)
    feeds = {t.name: [t.feeds(batch) for batch in (image_batches(t.image_size, seed=1234) if t.kind == "image"
                                                   else text_batches(tokenize[t.tokenizer_key]))] for t in towers}
    out_dims, parity, fusion = _export_towers(towers, staging, feeds, tokenize, opset=opset, verify=verify, log=log,
                                              sessions=sessions)
    if out_dims[B.TEXT_CLIP] != out_dims[B.IMAGE_ENCODER]:
        raise ExportError(f"{clip_ckpt.source} gives {out_dims[B.IMAGE_ENCODER]}-d image embeddings but "
                          f"{out_dims[B.TEXT_CLIP]}-d text embeddings: not a dual encoder uclip can use")
    quantization = None
    if quantize is not None:
        quantization = quantize_towers(staging, {n: feeds[n] for n in QUANTIZED_GRAPHS[quantize]}, sessions, log=log,
                                       beside=quantize == "int8-beside")
        quantization["mode"] = quantize
    for original in staging.glob(f"*{UNFUSED}"):   # read by the quantizer only; never part of the bundle
        original.unlink()
    export_info = {
        "versions": _versions(), "opset": opset,
        "model_types": {"clip": clip_ckpt.model_type, "multilingual": multi_ckpt.model_type},
        "families": {"clip": clip_ckpt.family.name, "multilingual": multi_ckpt.family.name},
        "verified": verify, "parity_rule": PARITY_RULE, "parity": parity, "fusion": fusion,
        "quantization": quantization,
    }
    dims = {"clip": out_dims[B.IMAGE_ENCODER], "multilingual": out_dims[B.TEXT_MULTILINGUAL], "shared": SHARED_DIM}
    return dict(sources={"clip": clip_ckpt.source, "multilingual": multi_ckpt.source}, dims=dims, image=image,
                tokenizers=tokenizers, extra={"export": export_info, "graphs": {t.name: t.io.to_dict() for t in towers}})


def _write_tokenizers(staging: Path, specs: dict[str, tuple[str, Any, dict[str, Any]]], *, verify: bool):
    """Each tokenizer file, its settings, and a runtime tokenizer reading that very file."""
    settings: dict[str, B.TokenizerSettings] = {}
    tokenize: dict[str, Callable] = {}
    for key, (file, hf_tokenizer, args) in specs.items():
        tokenizer, settings[key] = bundle_tokenizer(hf_tokenizer, file=file, **args)
        tokenizer.save(str(staging / file))
        tokenize[key] = runtime_tokenizer(staging / file, settings[key])
        if verify:
            verify_tokenizer(file, hf_tokenizer, tokenize[key], settings[key])
    return settings, tokenize


def _export_towers(towers: list[Tower], staging: Path, feeds: dict[str, list[dict[str, np.ndarray]]],
                   tokenize: dict[str, Callable], *, opset: int, verify: bool, log: Callable[[str], Any],
                   sessions: SessionFactory):
    """Export every tower (and check its parity, then fuse the multilingual tower's kernels where the fused graph
    passes the same check: fuse.py); returns each graph's output size, the parity figures and the fusion records."""
    out_dims: dict[str, int] = {}
    parity: dict[str, dict[str, float]] = {}
    fusion: dict[str, dict[str, Any]] = {}
    for tower in towers:
        log(f"exporting {tower.name}")
        export_onnx(tower, staging / tower.name, _example_input(tower, tokenize), opset)
        batches = feeds[tower.name] if verify else feeds[tower.name][:1]
        if verify:
            references, bounds = zip(*(torch_outputs_and_bounds(tower, f) for f in batches))
            out_dims[tower.name] = int(references[0].shape[1])
            parity[tower.name] = figures = verify_tower(tower.name, staging / tower.name, batches, list(references),
                                                        list(bounds), sessions)
            log(f"  {tower.name}: max |onnx - torch| {figures['max_abs_diff']:.2e} "
                f"({figures['error_to_bound']:.3f} of the float32 rounding bound), min cosine {figures['min_cosine']:.6f}")
            if tower.name in FUSED_GRAPHS:   # fewer, bigger kernels, kept only by the same parity check (fuse.py)
                fusion[tower.name] = fuse_verified(tower.name, staging / tower.name, tower.module.model.config, batches,
                                                   list(references), list(bounds), sessions, log)
        else:
            out_dims[tower.name] = int(torch_outputs(tower, batches[0]).shape[1])
    return out_dims, parity, fusion


def _example_input(tower: Tower, tokenize: dict[str, Callable]) -> dict[str, torch.Tensor]:
    if tower.kind == "image":
        return tower.feeds({"pixels": torch.randn(EXPORT_BATCH, 3, tower.image_size, tower.image_size)})
    feeds = tokenize[tower.tokenizer_key](["a photo of a cat", "two dogs"][:EXPORT_BATCH])
    return tower.feeds({k: torch.from_numpy(v) for k, v in feeds.items()})
