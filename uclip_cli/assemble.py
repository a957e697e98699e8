"""The default model, assembled on first use: published ONNX towers, heads fitted here in closed form.

A new user runs `uclip index ~/Pictures`; with no bundle installed and none named (`--bundle`), the
default bundle assembles itself at the default bundle location. Nothing here needs torch,
transformers or an export:

1. Download (hub_files.py): the frozen towers are files other projects publish on the Hugging Face
   hub as ONNX, each pinned by commit and, where it is known, by sha256 and size (`default_model.json`,
   a recipe: data, like the model families). Into a staging folder beside the bundle location, resumably:
   an interrupted run continues where it stopped, and nothing appears at the bundle location before
   the download is whole and verified.
2. Describe (tower_layouts.py): each repo's own config files say how its graphs are fed — image size,
   resize and normalisation (immich's `preprocess_cfg.json`), text window and padding, the token
   pooling of a sentence encoder (`1_Pooling/config.json`) — and the graphs themselves say their input
   and output names, element types and fixed batch, read from the graph, never assumed. That becomes
   the bundle's manifest (`graphs`: families.GraphIO), checked against each graph whenever a session
   is made, as for an exported bundle. The multilingual tower is then fused where that provably changes
   nothing (tower_fusion.py: ONNX Runtime's transformer optimizer, checked against the published graph's
   own float64 result within float32 rounding; queries about 4-5 % faster), and the staged folder is
   installed in one rename.
3. Fit (in place): the heads are fitted in closed form (closed_form.py, subspaces.py, numpy) on
   caption text that ships with uclip (captions.py) — English anchors through both text towers,
   captions in 35 other languages for the language subspace — and written as ONNX graphs without
   torch (head_graphs.py), each checked against its exact float64 function within float32 rounding
   before it is installed. Until the heads are in, the bundle's manifest records `export.assembled`
   without heads, and the next command fits them (a Ctrl-C during the fit loses only the fit).

The function fitted is `uclip train`'s closed-form default (language subspace removed, Head_A the
multilingual space itself, a kernel Head_B regressed on it) without the modality projection, which
needs the user's photos and ties or loses on held-out text (issue 20). `uclip train` can refit the
heads later on more text or the user's own photos. One process assembles at a time (a lock beside the
bundle); another waits.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from . import bundle as B
from .errors import UclipError
from .hub_files import HubFileMissing, HubUnreachable, PinnedFile, endpoint, fetch, metadata
from .tower_layouts import LAYOUTS, TowerParts

RECIPE_FILE = "default_model.json"
ROLES = ("clip", "multilingual")
Log = Callable[[str], Any]


class AssemblyError(UclipError):
    """The default model cannot be assembled; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ recipe

@dataclass(frozen=True)
class TowerSource:
    role: str
    repo: str
    revision: str
    layout: str
    licence: str
    files: tuple[PinnedFile, ...]

    @property
    def download_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass(frozen=True)
class HeadsPlan:
    anchor_language: str = "en"
    foreign_per_language: int = 200
    head_b: str = "kernel"
    landmarks_per_dim: int = 2
    d_shared: int = 512
    modality_projection: bool = False
    captions: str = "xm3600-fit"


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    about: str
    towers: tuple[TowerSource, ...]
    heads: HeadsPlan = field(default_factory=HeadsPlan)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelRecipe":
        towers = []
        for t in d["towers"]:
            files = tuple(PinnedFile(t["repo"], t["revision"], path, pin.get("sha256"), pin.get("size"),
                                     bool(pin.get("optional", False))) for path, pin in t["files"].items())
            if t["role"] not in ROLES or t["layout"] not in LAYOUTS:
                raise AssemblyError(f"recipe {d.get('name')!r}: unknown role or layout in {t['repo']}")
            towers.append(TowerSource(t["role"], t["repo"], t["revision"], t["layout"], t.get("licence", ""), files))
        if sorted(t.role for t in towers) != sorted(ROLES):
            raise AssemblyError(f"recipe {d.get('name')!r} needs one clip and one multilingual tower")
        return cls(str(d["name"]), str(d.get("about", "")), tuple(towers), HeadsPlan(**d.get("heads", {})))

    @classmethod
    def default(cls) -> "ModelRecipe":
        return cls.from_dict(json.loads(resources.files(__package__).joinpath(RECIPE_FILE).read_text(encoding="utf-8")))

    def tower(self, role: str) -> TowerSource:
        return next(t for t in self.towers if t.role == role)

    @property
    def download_bytes(self) -> int:
        return sum(t.download_bytes for t in self.towers)


# ------------------------------------------------------------------------------------------------ assembly

def _staging(destination: Path) -> Path:
    return destination.parent / f".{destination.name}.assembling"


class _Lock:
    """One assembling process per bundle location; another waits, and says so."""

    def __init__(self, destination: Path, log: Log):
        self.path = destination.parent / f".{destination.name}.assembling.lock"
        self.log = log
        self.file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log("waiting for another uclip process that is assembling the default model ...")
            fcntl.flock(self.file, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def offline_message(destination: Path, reason: str) -> str:
    from .hub_files import offline

    retry = f"unset {offline()} and run the same command again" if offline() else "connect and run the same command again"
    return (f"no model bundle at {destination}, and the default model cannot be downloaded: {reason}. "
            f"{retry[0].upper() + retry[1:]} (a started download resumes), or install a bundle made elsewhere with "
            f"`uclip pull ARCHIVE` (`uclip bundle pack` writes one), or pass --bundle FOLDER")


def ensure_default_bundle(destination: Path, sessions, *, recipe: ModelRecipe | None = None, progress: bool = True,
                          log: Log = lambda m: None) -> bool:
    """Assemble the default model at `destination` when it holds none (see the module docstring); True when
    anything was done. Raises AssemblyError (one line) when it cannot be."""
    destination = Path(destination).expanduser()
    if not B.needs_assembly(destination):
        return False
    recipe = recipe or ModelRecipe.default()
    lock = _Lock(destination, log)
    try:
        lock.acquire()
    except OSError as e:
        raise AssemblyError(f"cannot write beside {destination} to assemble the default model ({e.strerror or e}): "
                            "pass --bundle FOLDER, or set UCLIP_BUNDLE to a folder you can write") from None
    try:
        if not (destination / B.MANIFEST).is_file():
            if destination.exists() and any(destination.iterdir()):
                return False   # someone put something else there meanwhile: load_bundle explains
            _download_and_install(destination, recipe, sessions, progress=progress, log=log)
        manifest = B.read_manifest(destination)
        if B.assembled_without_heads(manifest):
            from .default_heads import fit_and_install_heads

            fit_and_install_heads(destination, recipe, sessions, progress=progress, log=log)
    finally:
        lock.release()
    return True


def _download_and_install(destination: Path, recipe: ModelRecipe, sessions, *, progress: bool, log: Log) -> None:
    staging = _staging(destination)
    bundle_dir, sources_dir = staging / "bundle", staging / "sources"
    started = time.monotonic()
    first = min((f for t in recipe.towers for f in t.files), key=lambda f: f.size or 0)
    try:
        metadata(first)   # reachable? (one short request: an offline machine hears so at once, in one line)
    except HubUnreachable as e:
        raise AssemblyError(offline_message(destination, str(e))) from None
    log(f"uclip: no model yet: assembling the default model into {destination} (once). It downloads "
        f"{recipe.download_bytes / 1e6:,.0f} MB from {endpoint()} — "
        + "; ".join(f"{t.repo} ({t.licence.split(' (')[0]})" for t in recipe.towers)
        + " — then fits the two heads on this machine (a few minutes on a CPU)")
    paths: dict[str, dict[str, Path]] = {}
    pins: dict[str, dict[str, Any]] = {}
    try:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        for tower in sorted(recipe.towers, key=lambda t: t.download_bytes):   # small configs first: faults show early
            layout = LAYOUTS[tower.layout]
            missing = sorted(set(layout.FILES) - {f.path for f in tower.files})
            if missing:
                raise AssemblyError(f"recipe {recipe.name!r}: {tower.repo} lacks {', '.join(missing)}, which its layout needs")
            paths[tower.role] = {}
            for f in sorted(tower.files, key=lambda f: f.size or 0):
                target = bundle_dir / layout.FILES[f.path] if layout.FILES.get(f.path) else sources_dir / tower.role / f.path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    digest = _staged(target, f) or fetch(f, target, label=f"download {tower.repo.split('/')[-1]}/{f.path}",
                                                          progress=progress, log=log)
                except HubFileMissing:
                    if not f.optional:
                        raise
                    log(f"note: {f.where} is not published; its layout's defaults stand in for it")
                    continue
                paths[tower.role][f.path] = target
                pins[f"{tower.repo}/{f.path}"] = {"repo": tower.repo, "revision": tower.revision, "path": f.path,
                                                  "sha256": digest, "pinned_sha256": bool(f.sha256), "bytes": target.stat().st_size,
                                                  "bundle_file": layout.FILES.get(f.path)}
    except HubUnreachable as e:
        raise AssemblyError(offline_message(destination, str(e))) from None
    except OSError as e:
        raise AssemblyError(f"cannot write {staging} ({e.strerror or e}): free some space (about "
                            f"{recipe.download_bytes / 1e9:.1f} GB are needed) or set UCLIP_BUNDLE to a folder elsewhere; "
                            "run the same command again to resume") from None
    parts = {t.role: LAYOUTS[t.layout].parts(t.repo, paths[t.role], sessions.inspect) for t in recipe.towers}
    fusion = _fused_multilingual(parts["multilingual"], paths["multilingual"], sessions, log)
    _write_manifest(bundle_dir, recipe, parts, pins, time.monotonic() - started, fusion)
    B.load_bundle(bundle_dir, verify="full")        # the schema, every checksum, every file present
    B.replace_directory(bundle_dir, destination)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"downloaded and installed the towers in {time.monotonic() - started:.0f} s")


def _fused_multilingual(parts: TowerParts, paths: dict[str, Path], sessions, log: Log) -> dict[str, Any]:
    """Step 2b: the published multilingual tower fused where that provably changes nothing (tower_fusion.py)."""
    from .tower_fusion import fuse_published_tower

    config = paths.get("config.json")
    shape: dict[str, int] = {}
    if config is not None:
        try:
            values = json.loads(config.read_text(encoding="utf-8"))
            shape = {k: int(values[k]) for k in ("num_attention_heads", "hidden_size") if k in values}
        except (OSError, ValueError, TypeError, AttributeError):
            shape = {}     # the optimizer reads them off the graph
    settings = parts.tokenizers["multilingual"]
    log("fusing the multilingual tower's layers (checked against its exact result; about half a minute) ...")
    return fuse_published_tower(parts.files[B.TEXT_MULTILINGUAL], parts.files[settings.file], settings,
                                parts.graphs[B.TEXT_MULTILINGUAL], sessions, log, shape=shape)


def _staged(target: Path, f: PinnedFile) -> str | None:
    """The sha256 of a file an earlier, interrupted run finished downloading, when it is still the pinned one."""
    if not target.is_file():
        return None
    from .filecache import sha256_file

    digest = sha256_file(target)
    if (f.sha256 and digest != f.sha256) or (f.size is not None and target.stat().st_size != f.size):
        target.unlink()
        return None
    return digest


def _write_manifest(bundle_dir: Path, recipe: ModelRecipe, parts: dict[str, TowerParts], pins: dict[str, Any],
                    seconds: float, fusion: dict[str, Any]) -> None:
    from importlib import metadata

    from .extras import DISTRIBUTION

    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "source folder"
    clip, multi = parts["clip"], parts["multilingual"]
    for role, p in parts.items():
        for name, source in p.files.items():
            if source.parent != bundle_dir:
                raise AssemblyError(f"internal: {name} was staged outside the bundle folder")
    dims = {"clip": clip.dims["clip"], "multilingual": multi.dims["multilingual"], "shared": recipe.heads.d_shared}
    towers = {t.role: {"repo": t.repo, "revision": t.revision, "layout": t.layout, "licence": t.licence} for t in recipe.towers}
    B.write_manifest(
        bundle_dir,
        sources={t.role: f"{t.repo}@{t.revision}" for t in recipe.towers},
        dims=dims, image=clip.image, tokenizers={**clip.tokenizers, **multi.tokenizers},
        extra={"graphs": {name: io.to_dict() for p in parts.values() for name, io in p.graphs.items()},
               "export": {"families": {t.role: t.layout for t in recipe.towers},
                          "assembled": {"recipe": recipe.name, "about": recipe.about, "towers": towers, "files": pins,
                                        "fusion": {B.TEXT_MULTILINGUAL: fusion},
                                        "assembled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "seconds": round(seconds, 1), "uclip": version}}})

