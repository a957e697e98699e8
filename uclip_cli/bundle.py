"""Model bundle: one directory holding everything inference needs.

Layout (file names are fixed; the manifest lists which ones are present):

    manifest.json                 format, sources, dims, preprocessing, tokenizers, sha256 of every file
    image_encoder.onnx            pixel_values f32[B,3,H,W]            -> embeddings f32[B,d_clip]  (L2-normalised)
    text_multilingual.onnx        input_ids i64[B,T], attention_mask i64[B,T] -> embeddings f32[B,d_multi] (masked mean, L2)
    text_clip.onnx                input_ids i64[B,T], attention_mask i64[B,T] -> embeddings f32[B,d_clip]  (L2)
    head_a.onnx                   features f32[B,d_multi] -> embeddings f32[B,d_shared] (L2)   (optional until trained)
    head_b.onnx                   features f32[B,d_clip]  -> embeddings f32[B,d_shared] (L2)   (optional until trained)
    tokenizer_multilingual.json   a `tokenizers` Tokenizer
    tokenizer_clip.json           a `tokenizers` Tokenizer
    heads.safetensors             trained head weights (optional; written by `uclip train`)
    text_multilingual.int8.onnx   the text towers again with int8 weights, same inputs and outputs (optional:
    text_clip.int8.onnx           `uclip export --quantize int8-beside`); a query runs whichever of the two is
                                  faster on its CPU, measured once (text_precision.py)

The manifest is the single description of the format; `export` writes it with `write_manifest`,
the runtime reads it with `load_bundle`.

A bundle may come from anywhere (`uclip pull`), so nothing in it is trusted:
- the manifest is checked against a schema before any value is used: every number is bounded by what
  a real model has (an image side of 100,000 px would make every batch 120 GB), every enumeration
  is one of its known values, unknown keys are refused, and each failure is one line naming the key;
- file names are plain names inside the bundle folder (no path separators, no `..`, no links out of
  it), and the runtime reaches a file only through `Bundle.file`, which refuses a name the manifest
  does not list and checks the file's sha256 the first time it is used;
- how thoroughly that check is done is the caller's choice, by what the file will be used for
  (`verify=`): "full" hashes the file (commands that write vectors: index, train, eval), "cached"
  trusts a hash remembered for the same (path, size, mtime, inode) (read-only queries, where hashing
  a 470 MB text tower would cost a second per query), "none" only for `uclip doctor`, which hashes
  everything itself. A file changed in place with its size and mtime put back is caught by every
  command that writes vectors;
- graph inputs and outputs are checked against the manifest when a session is created
  (`Bundle.signature`), so two swapped graphs are refused, not run.
"""
from __future__ import annotations

from .errors import UclipError
from .filecache import sha256_file  # noqa: F401  (B.sha256_file: the bundle's checksum)

import hashlib
import json
import math
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .families import DEFAULT_GRAPH_IO, ID_TYPES, INPUT_ROLES, PADDINGS, POOLINGS, RESAMPLES, RESIZE_MODES, GraphIO

FORMAT_NAME = "uclip-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

IMAGE_ENCODER = "image_encoder.onnx"
TEXT_MULTILINGUAL = "text_multilingual.onnx"
TEXT_CLIP = "text_clip.onnx"
HEAD_A = "head_a.onnx"
HEAD_B = "head_b.onnx"
TOKENIZER_MULTILINGUAL = "tokenizer_multilingual.json"
TOKENIZER_CLIP = "tokenizer_clip.json"
HEADS_WEIGHTS = "heads.safetensors"
TEXT_MULTILINGUAL_INT8 = "text_multilingual.int8.onnx"
TEXT_CLIP_INT8 = "text_clip.int8.onnx"
INT8_TWINS = {TEXT_MULTILINGUAL: TEXT_MULTILINGUAL_INT8, TEXT_CLIP: TEXT_CLIP_INT8}   # a text tower -> its int8 twin

REQUIRED_FILES = (IMAGE_ENCODER, TEXT_MULTILINGUAL, TOKENIZER_MULTILINGUAL)
HEAD_FILES = (HEAD_A, HEAD_B)
GRAPH_FILES = (IMAGE_ENCODER, TEXT_MULTILINGUAL, TEXT_CLIP, HEAD_A, HEAD_B)
KNOWN_FILES = (IMAGE_ENCODER, TEXT_MULTILINGUAL, TEXT_CLIP, HEAD_A, HEAD_B,
               TOKENIZER_MULTILINGUAL, TOKENIZER_CLIP, HEADS_WEIGHTS, TEXT_MULTILINGUAL_INT8, TEXT_CLIP_INT8)
VERIFY_MODES = ("full", "cached", "none")

# Bounds on manifest numbers: generous around every real model, far below what exhausts memory.
# Real image sides are 224-518 px (ViT-B/32 224, SigLIP2 256-512, EVA 448); text windows 64-512 tokens;
# embedding widths 256-4096.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
MAX_DIM = 8192
MAX_TEXT_LENGTH = 8192
MAX_TOKEN_ID = 2 ** 31 - 1
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

NO_BUNDLE_HINT = ("`uclip index DIR` assembles the default model on first use (one download), or install one with "
                  "`uclip pull SOURCE` (a Hugging Face repo id, an https URL or a bundle archive), or pass --bundle")

BUNDLE_ENV = "UCLIP_BUNDLE"


class BundleError(UclipError):
    """A bundle that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class ImageSettings:
    """How pixels reach the image encoder (CLIPImageProcessor / SiglipImageProcessor semantics)."""

    size: int = 224                      # final square side fed to the encoder
    resize_mode: str = "shortest_edge"   # "shortest_edge" (CLIP: resize short side, then crop) | "exact" (SigLIP: resize to size x size)
    crop: bool = True                    # centre-crop to size x size after resizing
    resample: str = "bicubic"            # "bicubic" | "bilinear"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageSettings":
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "resize_mode": self.resize_mode,
            "crop": self.crop,
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class TokenizerSettings:
    """How text becomes ids for one text tower."""

    file: str
    max_length: int
    padding: str = "longest"   # "longest" (dynamic) | "max_length" (SigLIP is trained with fixed padding)
    pad_id: int = 0
    lowercase: bool = False    # SigLIP2 lower-cases text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenizerSettings":
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "max_length": self.max_length,
            "padding": self.padding,
            "pad_id": self.pad_id,
            "lowercase": self.lowercase,
        }


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    image: ImageSettings
    tokenizers: dict[str, TokenizerSettings]   # keys: "multilingual", "clip"
    dims: dict[str, int]                        # keys: "clip", "multilingual", "shared"
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    verify: str = "full"                        # how `file` checks a file before its first use (VERIFY_MODES)
    _verified: set = field(default_factory=set, compare=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def has_heads(self) -> bool:
        return all(f in self.files for f in HEAD_FILES)

    @property
    def has_clip_text(self) -> bool:
        return TEXT_CLIP in self.files and "clip" in self.tokenizers

    def check_now(self, names: tuple[str, ...]) -> None:
        """Check these listed files now (as `verify` says), so that a damaged one stops a command before any work."""
        for name in names:
            if name in self.files:
                self.file(name)

    def int8_twin(self, name: str) -> str | None:
        """The listed int8 twin of a text tower (same inputs and outputs, int8 weights), or None."""
        twin = INT8_TWINS.get(name)
        return twin if twin in self.files else None

    def file(self, name: str) -> Path:
        """The path of a listed file, its checksum checked (once per process) as `verify` says; else BundleError."""
        if name not in self.files:
            raise BundleError(f"{self.path / MANIFEST} does not list {name}: the bundle is incomplete; "
                              "pull or export it again")
        path = self.path / name
        if self.verify != "none":
            with self._lock:
                if name not in self._verified:
                    check_file(path, self.files[name], thorough=self.verify == "full")
                    self._verified.add(name)
        return path

    def graph_io(self, name: str) -> GraphIO:
        """Input names (by role) and output name of a graph, as the manifest records them (else the defaults)."""
        recorded = (self.manifest.get("graphs") or {}).get(name)
        return GraphIO.from_dict(recorded) if recorded else DEFAULT_GRAPH_IO[name]

    def signature(self, name: str) -> dict[str, dict[str, tuple[str, tuple[int | None, ...]]]]:
        """What the graph must take and give: {"inputs"|"outputs": {name: (element type, shape)}}; None = any size.

        Checked against the session when it is created (sessions.check_signature), so a graph swapped
        for another, or for one of other dimensions, is refused before it computes anything.
        """
        io = self.graph_io(name)
        batch = io.batch
        inputs: dict[str, tuple[str, tuple[int | None, ...]]] = {}
        if name == IMAGE_ENCODER:
            inputs[io.inputs["pixels"]] = ("float", (batch, 3, self.image.size, self.image.size))
            out = self.dims["clip"]
        elif name in (TEXT_CLIP, TEXT_MULTILINGUAL):
            for role in ("input_ids", "attention_mask", "token_type_ids"):
                if role in io.inputs:
                    inputs[io.inputs[role]] = (io.ids, (batch, None))
            out = self.dims["clip" if name == TEXT_CLIP else "multilingual"]
        else:
            inputs[io.inputs["features"]] = ("float", (batch, self.dims["multilingual" if name == HEAD_A else "clip"]))
            out = self.dims["shared"]
        shape = (batch, None, out) if io.pooling == "mean" else (batch, out)
        return {"inputs": inputs, "outputs": {io.output: ("float", shape)}}

    @property
    def fingerprint(self) -> str:
        """Identity of everything that shapes a stored vector (encoders, preprocessing, heads)."""
        return _digest({"image": self.image_fingerprint, "heads": self.heads_fingerprint})

    @property
    def image_fingerprint(self) -> str:
        """Identity of the frozen image features: image encoder + preprocessing."""
        return _digest({"encoder": self.files[IMAGE_ENCODER], "image": self.image.to_dict()})

    @property
    def heads_fingerprint(self) -> str:
        """Identity of the projection applied to frozen features ("none" while untrained)."""
        if not self.has_heads:
            return "none"
        return _digest({HEAD_A: self.files[HEAD_A], HEAD_B: self.files[HEAD_B]})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


TRAINED_FILES = (HEAD_A, HEAD_B, HEADS_WEIGHTS)   # what `uclip train` writes; every other file comes from export


def restore_advice(name: str) -> str:
    """The command that really restores a damaged or missing bundle file.

    The heads come from `uclip train`: running the same command again rewrites them (a finished run
    writes its kept heads back without training again), and it checks only the frozen encoders it
    reads. Never `uclip export` for them: an export builds a bundle without trained heads.
    """
    if name in TRAINED_FILES:
        return "run your `uclip train` command again (it rewrites the heads), or pull the bundle again"
    return ("pull the bundle again, or export it again and then run `uclip train` (an export holds no trained "
            "heads)")


def check_file(path: Path, expected: str, *, thorough: bool) -> None:
    """BundleError unless the file's sha256 is `expected`; `thorough` hashes it even when the cache knows it."""
    try:
        digest = _cached_sha256(path, trust_cache=not thorough)
    except OSError as e:
        raise BundleError(f"{path} cannot be read ({e.strerror or e}): {restore_advice(path.name)}") from None
    if digest != expected:
        raise BundleError(f"{path} does not match its checksum in manifest.json (damaged, tampered or truncated): "
                          f"{restore_advice(path.name)}")


def _cached_sha256(path: Path, *, trust_cache: bool = True) -> str:
    """sha256 of a file, remembered per (path, size, mtime_ns, inode) in the user's cache directory.

    Re-hashing a 470 MB text tower on every cold query would cost a second; a file whose size,
    mtime or inode changed is hashed again. The key cannot see a change that keeps size and mtime
    (bit rot, or a tool that restores the mtime), so `trust_cache=False` (every command that writes
    vectors) hashes the file anyway and refreshes the entry; `uclip doctor` always hashes everything.
    """
    from .config import cache_dir

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_file = cache_dir() / "verified-files.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if trust_cache and isinstance(cache.get(key), str):
        return cache[key]
    digest = sha256_file(path)
    if cache.get(key) == digest:
        return digest
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return digest


def write_manifest(
    directory: Path,
    *,
    sources: dict[str, str],
    dims: dict[str, int],
    image: ImageSettings,
    tokenizers: dict[str, TokenizerSettings],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write manifest.json listing every bundle file present with its sha256 (atomically)."""
    directory = Path(directory)
    files = {name: sha256_file(directory / name) for name in KNOWN_FILES if (directory / name).is_file()}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sources": dict(sources),
        "dims": dict(dims),
        "image": image.to_dict(),
        "tokenizers": {k: v.to_dict() for k, v in tokenizers.items()},
        "files": files,
    }
    if extra:
        manifest.update(extra)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def update_manifest(directory: Path, **changes: Any) -> dict[str, Any]:
    """Re-checksum the files of an existing bundle and merge `changes` into its manifest."""
    directory = Path(directory)
    current = read_manifest(directory)
    extra = {k: v for k, v in current.items()
             if k not in ("format", "format_version", "sources", "dims", "image", "tokenizers", "files")}
    extra.update(changes.pop("extra", {}) or {})
    return write_manifest(
        directory,
        sources=changes.get("sources", current["sources"]),
        dims=changes.get("dims", current["dims"]),
        image=ImageSettings.from_dict(changes.get("image", current["image"])),
        tokenizers={k: TokenizerSettings.from_dict(v) for k, v in changes.get("tokenizers", current["tokenizers"]).items()},
        extra=extra,
    )


def assembled_without_heads(manifest: dict[str, Any]) -> bool:
    """A default bundle whose towers are installed but whose heads are not fitted yet (assemble.py)."""
    export = manifest.get("export")
    return isinstance(export, dict) and bool(export.get("assembled")) and not all(
        f in (manifest.get("files") or {}) for f in HEAD_FILES)


def needs_assembly(directory: Path) -> bool:
    """True when `directory` holds no bundle yet (nothing there, or an empty folder), or an assembled one whose
    heads are not fitted yet: where the default model assembles itself. Cheap: index, query and serve ask it
    before they load the bundle."""
    directory = Path(directory).expanduser()
    if (directory / MANIFEST).is_file():
        try:
            return assembled_without_heads(json.loads((directory / MANIFEST).read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            return False     # load_bundle says what is wrong with it
    if not directory.exists():
        return left_aside(directory) is None   # an interrupted replace left a whole bundle: load_bundle says so
    return directory.is_dir() and not any(directory.iterdir())


def install_files(directory: Path, files: dict[str, Path], **manifest_changes: Any) -> dict[str, Any]:
    """Move finished files (bundle name -> path on the same filesystem) into the bundle, then re-checksum the
    manifest with `manifest_changes` (update_manifest): how heads are written, by `uclip train` and by the
    default model's assembly. The bundle's fingerprint changes with the manifest (indexes re-project)."""
    directory = Path(directory)
    for name, path in files.items():
        if name not in KNOWN_FILES:
            raise ValueError(f"{name} is not a bundle file")
        os.replace(path, directory / name)
    return update_manifest(directory, **manifest_changes)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest as JSON, format and version checked (not yet its contents: see validate_manifest)."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        aside = left_aside(Path(directory))
        if aside is not None:
            raise BundleError(f"no model bundle at {directory}, but an interrupted install left the previous one "
                              f"at {aside}: rename it back to {directory}")
        raise BundleError(f"no model bundle at {directory}: {NO_BUNDLE_HINT}")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {directory} is not a uclip bundle ({NO_BUNDLE_HINT})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{path} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                          "pull or export the bundle again") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} holds a JSON {type(manifest).__name__}, not an object: pull or export the bundle again")
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path} is not a uclip bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {manifest.get('format_version')!r}, this uclip reads {FORMAT_VERSION}: "
            "pull or export the bundle again"
        )
    return manifest


class _Invalid(Exception):
    """A manifest value that breaks the schema: (key path, what is wrong)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise _Invalid(key, what)


def _object(value: Any, key: str) -> dict[str, Any]:
    _require(isinstance(value, dict), key, f"must be a JSON object, not {type(value).__name__}")
    return value


def _int_in(value: Any, key: str, low: int, high: int) -> None:
    _require(_is_int(value) and low <= value <= high, key, f"must be a whole number from {low} to {high}, not {value!r}")


def _number_in(value: Any, key: str, low: float, high: float, *, open_low: bool = False) -> None:
    ok = _is_number(value) and (value > low if open_low else value >= low) and value <= high
    _require(ok, key, f"must be a number {'above' if open_low else 'from'} {low} {'and up to' if open_low else 'to'} "
                      f"{high}, not {value!r}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _require(isinstance(value, str) and value in allowed, key, f"must be one of {', '.join(allowed)}, not {value!r}")


def _known_keys(d: dict[str, Any], key: str, allowed: set[str], required: set[str]) -> None:
    for k in sorted(set(d) - allowed):
        raise _Invalid(f"{key}.{k}", f"is not a known key (known: {', '.join(sorted(allowed))})")
    for k in sorted(required - set(d)):
        raise _Invalid(f"{key}.{k}", "is missing")


def _plain_name(value: Any, key: str) -> None:
    _require(isinstance(value, str) and PLAIN_NAME.fullmatch(value) is not None and value != MANIFEST, key,
             f"must be a plain file name inside the bundle (letters, digits, '.', '_', '-'), not {value!r}")


def _validate(m: dict[str, Any]) -> None:
    files = _object(m.get("files"), "files")
    for name, digest in files.items():
        _plain_name(name, f"files[{name!r}]")
        _require(isinstance(digest, str) and SHA256_HEX.fullmatch(digest) is not None, f"files.{name}",
                 f"must be a sha256 in lower-case hex, not {digest!r}")
    if "sources" in m:
        sources = _object(m["sources"], "sources")
        for k, v in sources.items():
            _require(isinstance(v, str), f"sources.{k}", "must be a string")

    dims = _object(m.get("dims"), "dims")
    _known_keys(dims, "dims", {"clip", "multilingual", "shared"}, {"clip", "multilingual", "shared"})
    for k, v in dims.items():
        _int_in(v, f"dims.{k}", 1, MAX_DIM)

    image = _object(m.get("image"), "image")
    fields = {"size", "resize_mode", "crop", "resample", "rescale_factor", "mean", "std"}
    _known_keys(image, "image", fields, fields)
    _int_in(image["size"], "image.size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    _one_of(image["resize_mode"], "image.resize_mode", RESIZE_MODES)
    _require(isinstance(image["crop"], bool), "image.crop", f"must be true or false, not {image['crop']!r}")
    _one_of(image["resample"], "image.resample", RESAMPLES)
    _number_in(image["rescale_factor"], "image.rescale_factor", 0.0, 1.0, open_low=True)
    for k, low, high in (("mean", 0.0, 1.0), ("std", 0.01, 1.0)):   # per channel, in rescaled [0, 1] pixel units
        values = image[k]
        _require(isinstance(values, list) and len(values) == 3, f"image.{k}",
                 f"must be a list of 3 numbers (one per RGB channel), not {values!r}")
        for i, v in enumerate(values):
            _number_in(v, f"image.{k}[{i}]", low, high)

    tokenizers = _object(m.get("tokenizers"), "tokenizers")
    _known_keys(tokenizers, "tokenizers", {"multilingual", "clip"}, {"multilingual"})
    for which, t in tokenizers.items():
        key = f"tokenizers.{which}"
        t = _object(t, key)
        _known_keys(t, key, {"file", "max_length", "padding", "pad_id", "lowercase"}, {"file", "max_length"})
        _plain_name(t["file"], f"{key}.file")
        _require(t["file"] in files, f"{key}.file", f"names {t['file']!r}, which the manifest's files do not list "
                                                    "(every file the runtime loads must be listed and checked)")
        _int_in(t["max_length"], f"{key}.max_length", 1, MAX_TEXT_LENGTH)
        if "padding" in t:
            _one_of(t["padding"], f"{key}.padding", PADDINGS)
        if "pad_id" in t:
            _int_in(t["pad_id"], f"{key}.pad_id", 0, MAX_TOKEN_ID)
        if "lowercase" in t:
            _require(isinstance(t["lowercase"], bool), f"{key}.lowercase", "must be true or false")

    if "graphs" in m:
        for name, io in _object(m["graphs"], "graphs").items():
            key = f"graphs.{name}"
            _one_of(name, "graphs", GRAPH_FILES)
            io = _object(io, key)
            _known_keys(io, key, {"inputs", "output", "ids", "batch", "pooling"}, {"inputs"})
            if "ids" in io:
                _one_of(io["ids"], f"{key}.ids", ID_TYPES)
            if "batch" in io:
                _int_in(io["batch"], f"{key}.batch", 1, 1)
            if "pooling" in io:
                _one_of(io["pooling"], f"{key}.pooling", POOLINGS)
                _require(name in (TEXT_CLIP, TEXT_MULTILINGUAL), f"{key}.pooling", "applies to text towers only")
            for role, input_name in _object(io["inputs"], f"{key}.inputs").items():
                _one_of(role, f"{key}.inputs", INPUT_ROLES)
                _require(isinstance(input_name, str) and 0 < len(input_name) <= 128, f"{key}.inputs.{role}",
                         "must be a graph input name")
            _require(isinstance(io.get("output", "embeddings"), str), f"{key}.output", "must be a graph output name")
    for key in ("export", "training", "origin"):
        if key in m:
            _object(m[key], key)


def validate_manifest(manifest: dict[str, Any], path: Path) -> None:
    """BundleError (one line naming the key) unless the manifest follows the schema described at the top."""
    try:
        _validate(manifest)
    except _Invalid as e:
        key, what = e.args
        raise BundleError(f"{path}: {key} {what}: the bundle is damaged or not made by uclip; "
                          "pull or export it again") from None


def load_bundle(directory: str | os.PathLike, *, verify: bool | str = True,
                only: tuple[str, ...] | None = None, replacing: tuple[str, ...] = ()) -> Bundle:
    """Read, validate and (unless verify is False / "none") check a bundle.

    verify:    "full" (True) hashes each file before its first use; "cached" trusts a remembered hash of
               the same (path, size, mtime, inode) (read-only queries); "none" (False) checks nothing (doctor).
    only:      the files to check now (so that errors come before any work); None = every listed file.
    replacing: files the caller is about to write anew (`uclip train`: TRAINED_FILES), so neither their
               absence nor their damage stops it: that is how a damaged head is restored.
    Files not checked now are checked by `Bundle.file` when first used. Other missing files are refused.
    """
    mode = {True: "full", False: "none"}.get(verify, verify) if isinstance(verify, bool) else verify
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}")
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    validate_manifest(manifest, directory / MANIFEST)
    files: dict[str, str] = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{directory / MANIFEST} does not list {name}: the bundle is incomplete; pull or export it again")
    root = directory.resolve()
    for name in files:
        path = directory / name
        if not path.is_file():
            if name in replacing:
                continue
            raise BundleError(f"{path} is missing: the bundle is incomplete; {restore_advice(name)}")
        if path.resolve().parent != root:
            raise BundleError(f"{path} is a link to a file outside the bundle folder: a bundle holds its own files; "
                              "pull or export it again")
    bundle = Bundle(
        path=directory,
        manifest=manifest,
        image=ImageSettings.from_dict(manifest["image"]),
        tokenizers={k: TokenizerSettings.from_dict(v) for k, v in manifest["tokenizers"].items()},
        dims={k: int(v) for k, v in manifest["dims"].items()},
        files=dict(files),
        verify=mode,
    )
    if mode != "none":
        for name in (only if only is not None else tuple(files)):
            if name in files and name not in replacing:
                bundle.file(name)
    return bundle


def replace_directory(staging: Path, target: Path) -> bool:
    """Put the finished folder `staging` at `target`, replacing what is there; True when something was replaced.

    On Linux the two folders are exchanged in one atomic rename (renameat2 RENAME_EXCHANGE): every reader
    sees the whole old bundle or the whole new one. Elsewhere the old folder is renamed aside first; a
    crash between the two renames leaves it whole as `.NAME.old-PID` beside the target, and loading the
    missing bundle names that folder.
    """
    if target.exists() and _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)   # now holds the old bundle
        return True
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return old is not None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def left_aside(directory: Path) -> Path | None:
    """A whole bundle an interrupted replace_directory left beside `directory`, if any."""
    for old in sorted(directory.parent.glob(f".{directory.name}.old-*")):
        if (old / MANIFEST).is_file():
            return old
    return None


def verify_bundle(bundle: Bundle) -> dict[str, str]:
    """Checksum state of every file: name -> "ok" | "missing" | "mismatch"."""
    state = {}
    for name, digest in bundle.files.items():
        p = bundle.path / name
        if not p.is_file():
            state[name] = "missing"
        else:
            state[name] = "ok" if sha256_file(p) == digest else "mismatch"
    return state
