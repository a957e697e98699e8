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

The manifest is the single description of the format; `export` writes it with `write_manifest`,
the runtime reads it with `load_bundle`.
"""
from __future__ import annotations

from .errors import UclipError

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

REQUIRED_FILES = (IMAGE_ENCODER, TEXT_MULTILINGUAL, TOKENIZER_MULTILINGUAL)
HEAD_FILES = (HEAD_A, HEAD_B)

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

    @property
    def has_heads(self) -> bool:
        return all(f in self.files for f in HEAD_FILES)

    @property
    def has_clip_text(self) -> bool:
        return TEXT_CLIP in self.files and "clip" in self.tokenizers

    def file(self, name: str) -> Path:
        return self.path / name

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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime_ns, inode) in the user's cache directory.

    Re-hashing a 470 MB text tower on every cold query would cost a second; a file whose size,
    mtime or inode changed is hashed again, and `uclip doctor` always hashes everything.
    """
    from .config import cache_dir

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_file = cache_dir() / "verified-files.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
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
    known = (IMAGE_ENCODER, TEXT_MULTILINGUAL, TEXT_CLIP, HEAD_A, HEAD_B,
             TOKENIZER_MULTILINGUAL, TOKENIZER_CLIP, HEADS_WEIGHTS)
    files = {name: sha256_file(directory / name) for name in known if (directory / name).is_file()}
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


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise BundleError(f"bundle directory {directory} does not exist: build one with `uclip export` or pass --bundle")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {directory} is not a uclip bundle (build one with `uclip export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}): re-run `uclip export`") from None
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path} is not a uclip bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {manifest.get('format_version')}, this uclip reads {FORMAT_VERSION}: re-export the bundle"
        )
    return manifest


def load_bundle(directory: str | os.PathLike, *, verify: bool = True, only: tuple[str, ...] | None = None) -> Bundle:
    """Read and (by default) verify a bundle.

    `only` restricts the checksum verification to the files a command will actually load, so
    that a text query does not hash a 350 MB image encoder.  Missing required files are always refused.
    """
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    files: dict[str, str] = manifest.get("files", {})
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{directory / MANIFEST} does not list {name}: the bundle is incomplete, re-run `uclip export`")
    for name in files:
        if not (directory / name).is_file():
            raise BundleError(f"{directory / name} is missing: the bundle is incomplete, re-run `uclip export`")
    if verify:
        for name in (only if only is not None else tuple(files)):
            if name not in files:
                continue
            if _cached_sha256(directory / name) != files[name]:
                raise BundleError(
                    f"{directory / name} does not match its checksum in manifest.json (tampered or truncated): re-run `uclip export`"
                )
    return Bundle(
        path=directory,
        manifest=manifest,
        image=ImageSettings.from_dict(manifest["image"]),
        tokenizers={k: TokenizerSettings.from_dict(v) for k, v in manifest["tokenizers"].items()},
        dims={k: int(v) for k, v in manifest["dims"].items()},
        files=dict(files),
    )


def verify_bundle(bundle: Bundle) -> dict[str, str]:
    """Checksum state of every file: name -> "ok" | "missing" | "mismatch"."""
    state = {}
    for name, digest in bundle.files.items():
        p = bundle.file(name)
        if not p.is_file():
            state[name] = "missing"
        else:
            state[name] = "ok" if sha256_file(p) == digest else "mismatch"
    return state
