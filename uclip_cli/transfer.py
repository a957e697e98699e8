"""Bundles that travel: `uclip bundle pack`, `uclip pull`, `uclip bundle info`.

pack:  one tar archive (gzip-compressed when OUT ends in .tar.gz / .tgz) holding manifest.json first, then
       every file the manifest lists, flat, with fixed owner and time (the same bundle packs to the same
       bytes). The checksums travel inside, in the manifest, and each file's size in the manifest member's
       PAX header (`UCLIP.sizes`, JSON name -> bytes: the bundle's manifest itself stays as it is). The
       bundle is hashed in full before it is packed, so a damaged bundle is never shipped.
pull:  SOURCE is a Hugging Face model repo id (`owner/name` or `hf://owner/name`, through huggingface_hub:
       its progress bars, resumable downloads, cache and offline mode, `--revision` pinning), an https URL of
       an archive (resumed with a Range request after a cut), or a local archive or bundle folder.
       Nothing is trusted: the manifest is validated (bundle.validate_manifest), every file is hashed
       while it is copied into a staging folder beside the destination and compared with the manifest,
       files the manifest does not list are refused, and only then is the staging folder swapped with
       the destination in one atomic rename (bundle.replace_directory). A failed, refused or interrupted
       pull leaves the previous bundle exactly as it was (and at most a `.NAME.pull-PID` staging folder,
       removed by the next pull).
       All files of a hub bundle come from one commit: the manifest is fetched first, and the commit its
       download resolved to pins every other file (a repo pushed to meanwhile cannot mix two bundles).
       An archive is read in one pass, manifest first (an archive whose first member is not the manifest is
       refused), so that every later member is judged before a byte of it is written: a member the
       manifest does not list is refused at its header; a member is bounded by its listed size (or, in an
       archive packed without sizes, by MAX_FILE_BYTES, the 2 GiB protobuf limit of one ONNX graph: a
       bundle holds no external weight files) at its header and again while it is written (the write
       stops at the first byte over); sparse members are refused (a few kB of tar can expand to any size).
       A full disk while writing says "disk full", naming where, not that the source cannot be read.
info:  what a bundle is, from its manifest: sources, families, dims, preprocessing, quantisation, heads
       (trained when, on what, which languages), size, where it was pulled from.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import ipaddress
import json
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import bundle as B
from .errors import UclipError

CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20          # a real manifest is a few kB
MAX_FILE_BYTES = 1 << 31              # one ONNX graph serialises to under 2 GiB (protobuf's limit)
SIZES_KEY = "UCLIP.sizes"             # PAX header of the manifest member: {file name: bytes}
URL_TIMEOUT_S = 30
HUB_REPO_ID = re.compile(r"(?:hf://)?([A-Za-z0-9][A-Za-z0-9._-]{0,95})/([A-Za-z0-9][A-Za-z0-9._-]{0,95})")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class TransferError(UclipError):
    """A pack or pull that cannot be done; the message names the source or file and what to do."""


Log = Callable[[str], Any]


# ----------------------------------------------------------------------------------------------- pack

def pack_bundle(bundle_dir: Path, out: Path, *, log: Log = lambda m: None) -> dict[str, Any]:
    """Write the bundle at `bundle_dir` into one archive at `out` (atomically); returns what was packed."""
    bundle = B.load_bundle(bundle_dir, verify="full")   # every file hashed now: never ship a damaged bundle
    out = Path(out).expanduser()
    if out.is_dir():
        raise TransferError(f"{out} is a folder: give the archive's file name, e.g. {out / 'bundle.tar'}")
    if not out.name.endswith(ARCHIVE_SUFFIXES):
        raise TransferError(f"{out}: name the archive .tar or .tar.gz (the format follows the name)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    names = [B.MANIFEST, *sorted(bundle.files)]
    sizes = {name: (bundle.path / name).stat().st_size for name in names[1:]}
    try:
        with open(tmp, "wb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if out.name.endswith((".gz", ".tgz")) else raw
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in names:
                    path = bundle.path / name
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                    if name == B.MANIFEST:
                        info.pax_headers = {SIZES_KEY: json.dumps(sizes, sort_keys=True, separators=(",", ":"))}
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
            if stream is not raw:
                stream.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TransferError(f"cannot write {out} ({e.strerror or e})") from None
    size = out.stat().st_size
    log(f"packed {len(names) - 1} files of {bundle.path} into {out} ({size / 1e6:.1f} MB)")
    return {"archive": str(out), "files": len(names) - 1, "bytes": size}


# ----------------------------------------------------------------------------------------------- pull

@dataclass(frozen=True)
class PullResult:
    bundle: Path
    source: str
    kind: str            # "hub" | "url" | "archive" | "directory"
    revision: str | None
    files: int
    bytes: int
    replaced: bool


class _Staging:
    """Files written into a staging folder, each hashed as it is written."""

    def __init__(self, path: Path):
        self.path = path
        self.digests: dict[str, str] = {}
        self.bytes = 0

    def write(self, name: str, chunks: Iterator[bytes], *, limit: int | None = None, where: str = "") -> None:
        """Write and hash one file; `limit`: refuse it at the first chunk that would take it past this many bytes."""
        if name in self.digests:
            raise TransferError(f"{name} appears twice in the source: not a bundle uclip made")
        digest = hashlib.sha256()
        written = 0
        try:
            with open(self.path / name, "xb") as f:
                for chunk in chunks:
                    if limit is not None and written + len(chunk) > limit:
                        raise TransferError(f"{where or 'the source'}: {name} holds more than the {limit} bytes its "
                                            "manifest lists: refused, nothing was installed")
                    digest.update(chunk)
                    f.write(chunk)
                    written += len(chunk)
                    self.bytes += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TransferError(f"disk full while writing {name} into {self.path.parent} ({self.bytes} bytes "
                                    "written so far): free some space and pull again; the previous bundle is "
                                    "unchanged") from None
            raise TransferError(f"cannot write {name} into {self.path.parent} ({e.strerror or e}): the previous "
                                "bundle is unchanged") from None
        self.digests[name] = digest.hexdigest()

    def copy(self, name: str, source: Path) -> None:
        with open(source, "rb") as f:
            self.write(name, iter(lambda: f.read(CHUNK), b""))


def pull_bundle(source: str, destination: Path, *, revision: str | None = None, progress: bool = True,
                log: Log = lambda m: None) -> PullResult:
    """Install the bundle at `source` at `destination` (verified, atomically); see the module docstring."""
    destination = Path(destination).expanduser()
    if destination.exists() and not destination.is_dir():
        raise TransferError(f"{destination} is a file: pass a folder for the bundle with --bundle")
    if destination.is_dir() and any(destination.iterdir()) and not (destination / B.MANIFEST).is_file():
        raise TransferError(f"{destination} is not empty and not a uclip bundle: pass another folder with --bundle")
    kind, where = classify_source(source)
    if revision is not None and kind != "hub":
        raise TransferError(f"--revision applies to Hugging Face repos only, not to {source}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    for stale in destination.parent.glob(f".{destination.name}.pull-*"):   # left by a killed pull
        shutil.rmtree(stale, ignore_errors=True)
    staging = _Staging(destination.with_name(f".{destination.name}.pull-{os.getpid()}"))
    staging.path.mkdir()
    try:
        if kind == "directory":
            manifest, pinned = _from_directory(Path(where), staging), None
        elif kind == "archive":
            manifest, pinned = _from_archive(Path(where), staging), None
        elif kind == "url":
            manifest, pinned = _from_url(where, staging, progress=progress, log=log), None
        else:
            manifest, pinned = _from_hub(where, revision, staging, progress=progress, log=log)
        manifest["origin"] = {"source": source, "kind": kind, "revision": pinned,
                              "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (staging.path / B.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        B.load_bundle(staging.path, verify="none")   # the whole bundle as the runtime will read it
        from .filecache import fsync_path

        fsync_path(staging.path)
        replaced = B.replace_directory(staging.path, destination)
    except OSError as e:
        why = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or e
        raise TransferError(f"cannot install the bundle at {destination} ({why}); "
                            "the previous bundle, if any, is unchanged") from None
    finally:
        shutil.rmtree(staging.path, ignore_errors=True)
    return PullResult(destination, source, kind, pinned, len(staging.digests), staging.bytes, replaced)


def classify_source(source: str) -> tuple[str, str]:
    """("url" | "archive" | "directory" | "hub", what to open)."""
    if not source.strip():
        raise TransferError("the source is empty: give a Hugging Face repo id (owner/name), an https URL or a path")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source) and not source.startswith("hf://"):
        url = urllib.parse.urlsplit(source)
        if url.scheme == "https" or (url.scheme == "http" and _is_loopback(url.hostname)):
            return "url", source
        raise TransferError(f"{source}: only https URLs are accepted (a plain http download can be altered on the "
                            "way, and the checksums travel inside the archive)")
    path = Path(source).expanduser()
    if path.is_dir():
        return "directory", str(path)
    if path.is_file():
        return "archive", str(path)
    match = HUB_REPO_ID.fullmatch(source)
    if match and not source.startswith((".", "/", "~")):
        return "hub", f"{match.group(1)}/{match.group(2)}"
    raise TransferError(f"{source} is neither a folder, a file, an https URL nor a Hugging Face repo id (owner/name)")


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _check_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest's JSON, validated; TransferError naming `where` otherwise."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise TransferError(f"{where}: manifest.json is {len(raw)} bytes, far more than any bundle's: not a uclip bundle")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TransferError(f"{where}: manifest.json is not valid JSON: not a uclip bundle, or damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != B.FORMAT_NAME:
        raise TransferError(f"{where} holds no uclip bundle manifest")
    if manifest.get("format_version") != B.FORMAT_VERSION:
        raise TransferError(f"{where} has bundle format version {manifest.get('format_version')!r}; this uclip "
                            f"reads {B.FORMAT_VERSION}: upgrade uclip, or pull a bundle made for this version")
    try:
        B.validate_manifest(manifest, Path(where) / B.MANIFEST)
    except B.BundleError as e:
        raise TransferError(str(e).replace("pull or export it again", "nothing was installed")) from None
    return manifest


def _check_files(manifest: dict[str, Any], staging: _Staging, where: str) -> None:
    """Every listed file arrived, with its checksum; nothing else did."""
    listed: dict[str, str] = manifest["files"]
    extra = sorted(set(staging.digests) - set(listed))
    if extra:
        raise TransferError(f"{where} holds {extra[0]}, which its manifest does not list: refused, nothing was installed")
    for name, digest in sorted(listed.items()):
        if name not in staging.digests:
            raise TransferError(f"{where} lacks {name}, which its manifest lists: the bundle is incomplete, "
                                "nothing was installed")
        if staging.digests[name] != digest:
            raise TransferError(f"{name} from {where} does not match its checksum in the manifest (damaged or "
                                "tampered with on the way): nothing was installed")


def _from_directory(folder: Path, staging: _Staging) -> dict[str, Any]:
    try:
        manifest = _check_manifest((folder / B.MANIFEST).read_bytes(), str(folder))
    except FileNotFoundError:
        raise TransferError(f"{folder} has no manifest.json: not a uclip bundle") from None
    root = folder.resolve()
    for name in manifest["files"]:
        path = folder / name
        if not path.is_file() or path.resolve().parent != root:
            raise TransferError(f"{path} is missing, or not a plain file inside {folder}: nothing was installed")
        staging.copy(name, path)
    _check_files(manifest, staging, str(folder))
    return manifest


def _member_name(member: tarfile.TarInfo, where: str) -> str | None:
    """The member's plain file name; None for the archive's own folder entry; TransferError for anything else."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    if member.isdir() and name in ("", "."):
        return None
    if member.issparse():
        raise TransferError(f"{where}: member {member.name!r} is a sparse file (its header claims {member.size} "
                            "bytes from a few); a uclip bundle archive holds plain files only: refused, nothing "
                            "was installed")
    if not member.isreg() or not (name == B.MANIFEST or B.PLAIN_NAME.fullmatch(name)):
        what = "a link" if member.issym() or member.islnk() else "a folder" if member.isdir() else \
            "a file outside the archive's top level" if "/" in name else "not a plain file name"
        raise TransferError(f"{where}: member {member.name!r} is {what}; a uclip bundle archive holds plain files "
                            "only: refused, nothing was installed")
    return name


def _extract(fileobj, where: str, staging: _Staging) -> dict[str, Any]:
    """Stream a tar archive into the staging folder, manifest first, hashing each file and bounding it by its
    listed size; returns the validated manifest (see the module docstring)."""
    manifest: dict[str, Any] | None = None
    sizes: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                name = _member_name(member, where)
                if name is None:
                    continue
                if manifest is None:
                    if name != B.MANIFEST:
                        raise TransferError(f"{where}: its first file is {name}, not {B.MANIFEST} (`uclip bundle pack` "
                                            "puts it first, so that every file is checked against it before it is "
                                            "written): refused, nothing was installed; pack the bundle with "
                                            "`uclip bundle pack`")
                    if member.size > MAX_MANIFEST_BYTES:
                        raise TransferError(f"{where}: manifest.json is {member.size} bytes, far more than any "
                                            "bundle's: not a uclip bundle")
                    manifest = _check_manifest(tar.extractfile(member).read(MAX_MANIFEST_BYTES + 1), where)
                    sizes = _listed_sizes(member, manifest, where)
                    continue
                if name == B.MANIFEST:
                    raise TransferError(f"{where} holds two manifest.json: refused, nothing was installed")
                if name not in manifest["files"]:
                    raise TransferError(f"{where} holds {name}, which its manifest does not list: refused before "
                                        "writing it, nothing was installed")
                limit = sizes.get(name, MAX_FILE_BYTES)
                if member.size > limit:
                    raise TransferError(f"{where}: {name} claims {member.size} bytes, but its manifest lists "
                                        f"{limit}" + ("" if name in sizes else " at most (the size of any graph)")
                                        + ": refused before writing it, nothing was installed")
                data = tar.extractfile(member)
                staging.write(name, iter(lambda: data.read(CHUNK), b""), limit=limit, where=where)
    except (tarfile.TarError, EOFError, zlib_error(), gzip.BadGzipFile) as e:
        raise TransferError(f"{where} is not a readable bundle archive ({_first_line(e)}): damaged or cut short; "
                            "nothing was installed") from None
    if manifest is None:
        raise TransferError(f"{where} holds no manifest.json: not a uclip bundle archive")
    _check_files(manifest, staging, where)
    return manifest


def _listed_sizes(member: tarfile.TarInfo, manifest: dict[str, Any], where: str) -> dict[str, int]:
    """The size of each listed file, from the manifest member's PAX header; {} for an archive packed without
    them (each file is then bounded by MAX_FILE_BYTES)."""
    raw = member.pax_headers.get(SIZES_KEY)
    if raw is None:
        return {}
    try:
        sizes = json.loads(raw)
        ok = isinstance(sizes, dict) and set(sizes) == set(manifest["files"]) and all(
            type(v) is int and 0 <= v <= MAX_FILE_BYTES for v in sizes.values())
    except ValueError:
        ok = False
    if not ok:
        raise TransferError(f"{where}: the sizes listed with manifest.json are not those of its files: damaged or "
                            "not packed by uclip; nothing was installed")
    return sizes


def zlib_error():
    import zlib

    return zlib.error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _from_archive(archive: Path, staging: _Staging) -> dict[str, Any]:
    try:
        with open(archive, "rb") as f:
            return _extract(f, str(archive), staging)
    except OSError as e:
        raise TransferError(f"{archive} cannot be read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------- https

def _download_path(url: str) -> Path:
    from .config import cache_dir

    return cache_dir() / "downloads" / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".part")


def _from_url(url: str, staging: _Staging, *, progress: bool, log: Log) -> dict[str, Any]:
    """Download the archive (resuming a cut download with a Range request), then extract it."""
    part = _download_path(url)
    part.parent.mkdir(parents=True, exist_ok=True)
    _download(url, part, progress=progress, log=log)
    try:
        with open(part, "rb") as f:
            manifest = _extract(f, url, staging)
    except TransferError:
        part.unlink(missing_ok=True)   # a complete download that is not a good bundle: do not resume into it
        raise
    part.unlink(missing_ok=True)
    return manifest


def _download(url: str, part: Path, *, progress: bool, log: Log) -> None:
    from .downloads import DownloadFailed, HTTPStatusError, download

    label = f"download {urllib.parse.urlsplit(url).path.rsplit('/', 1)[-1] or url}"
    try:
        download(url, part, label=label, progress=progress, log=log, timeout=URL_TIMEOUT_S)
    except HTTPStatusError as e:
        raise TransferError(f"{url}: the server answered {e.code} {e.reason}") from None
    except DownloadFailed as e:
        raise TransferError(f"{url}: download failed ({e.reason}); run the same command again to resume; "
                            "the previous bundle is unchanged") from None


# ----------------------------------------------------------------------------------------------- hub

def _hub():
    try:
        import huggingface_hub
    except ImportError:
        from .extras import install_command

        raise TransferError(f"pulling from the Hugging Face hub needs huggingface_hub: {install_command('hub')}") from None
    return huggingface_hub


def _from_hub(repo_id: str, revision: str | None, staging: _Staging, *, progress: bool,
              log: Log) -> tuple[dict[str, Any], str]:
    hub = _hub()
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    endpoint = os.environ.get("HF_ENDPOINT") or None   # read now: huggingface_hub reads it once, at its import
    offline = hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    where = f"{repo_id}" + (f"@{revision}" if revision else "")

    def fetch(name: str, rev: str | None) -> Path:
        try:
            return Path(hub.hf_hub_download(repo_id, name, revision=rev, endpoint=endpoint, local_files_only=offline))
        except Exception as e:  # noqa: BLE001 - huggingface_hub and httpx raise many types; each becomes one line
            raise TransferError(_hub_error(e, repo_id, name, rev, offline)) from None

    if not progress:
        disable_progress_bars()
    try:
        manifest_path = fetch(B.MANIFEST, revision)
        commit = manifest_path.parent.name   # .../snapshots/<commit>/manifest.json: pins every other file
        manifest = _check_manifest(manifest_path.read_bytes(), where)
        if progress:
            log(f"pulling {len(manifest['files'])} files of {repo_id} at commit {commit}")
        for name in sorted(manifest["files"]):
            staging.copy(name, fetch(name, commit))
    finally:
        if not progress:
            enable_progress_bars()
    _check_files(manifest, staging, where)
    return manifest, commit


def _hub_error(e: Exception, repo_id: str, name: str, revision: str | None, offline: bool) -> str:
    kind = type(e).__name__
    rev = f" at revision {revision}" if revision else ""
    if kind == "RepositoryNotFoundError":
        return (f"{repo_id} is not a model repo on the Hugging Face hub (or it is private: log in with `hf auth login`); "
                "nothing was installed")
    if kind == "RevisionNotFoundError":
        return f"{repo_id} has no revision {revision!r}: give a branch, tag or commit that exists; nothing was installed"
    if kind == "EntryNotFoundError" or kind == "RemoteEntryNotFoundError":
        return (f"{repo_id}{rev} lacks {name}" + (", which its manifest lists: the bundle is incomplete" if name != B.MANIFEST
                                                   else ": it is not a uclip bundle repo") + "; nothing was installed")
    if kind == "LocalEntryNotFoundError" or offline:
        return (f"{repo_id}{rev}: {name} is not in the Hugging Face cache and the hub cannot be reached"
                + (" (HF_HUB_OFFLINE is set)" if offline else "") + ": connect and run the same command again; "
                "the previous bundle is unchanged")
    if kind == "GatedRepoError":
        return f"{repo_id} is gated: accept its terms on the hub and log in with `hf auth login`; nothing was installed"
    return (f"downloading {name} from {repo_id}{rev} failed ({kind}: {_first_line(e)}); run the same command again "
            "to resume; the previous bundle is unchanged")


# ----------------------------------------------------------------------------------------------- info

def bundle_info(bundle_dir: Path) -> dict[str, Any]:
    """What the bundle at `bundle_dir` is, from its manifest (no file is hashed: `uclip doctor` does that)."""
    bundle = B.load_bundle(bundle_dir, verify="none")
    m = bundle.manifest
    export = m.get("export") if isinstance(m.get("export"), dict) else {}
    training = m.get("training") if isinstance(m.get("training"), dict) else None
    quantization = export.get("quantization") if isinstance(export.get("quantization"), dict) else None
    sizes = {name: (bundle.path / name).stat().st_size for name in bundle.files}
    info: dict[str, Any] = {
        "path": str(bundle.path),
        "fingerprint": bundle.fingerprint,
        "format_version": m["format_version"],
        "sources": dict(m.get("sources") or {}),
        "families": export.get("families") or export.get("model_types") or {},
        "dims": dict(bundle.dims),
        "image": bundle.image.to_dict(),
        "text_length": {k: t.max_length for k, t in bundle.tokenizers.items()},
        "quantization": {"mode": quantization.get("mode"), "graphs": sorted(quantization.get("files") or {})}
        if quantization else None,
        "exported_with": export.get("versions"),
        "heads": None,
        "files": sizes,
        "bytes": sum(sizes.values()),
        "origin": m.get("origin"),
        "assembled": export.get("assembled") if isinstance(export.get("assembled"), dict) else None,
    }
    if bundle.has_heads:
        t = training or {}
        info["heads"] = {
            "trained_at": t.get("trained_at"),
            "inputs": t.get("inputs") or t.get("feature_sources"),
            "sizes": t.get("sizes"),
            "foreign_languages": t.get("foreign_languages"),
            "epochs": len(t["epochs"]) if isinstance(t.get("epochs"), list) else None,
            "device": t.get("device"),
        }
    return info


def format_info(info: dict[str, Any]) -> str:
    """`uclip bundle info` as aligned lines."""
    def show(value: Any) -> str:
        if value is None or value == {} or value == []:
            return "not recorded"
        if isinstance(value, dict):
            return ", ".join(f"{k}={show(v) if isinstance(v, (dict, list)) else v}" for k, v in value.items())
        if isinstance(value, list):
            return ", ".join(map(str, value))
        return str(value)

    image = info["image"]
    rows = [
        ("bundle", f"{info['path']} (fingerprint {info['fingerprint']}, format {info['format_version']})"),
        ("sources", show(info["sources"])),
        ("families", show(info["families"])),
        ("dims", show(info["dims"])),
        ("image", f"{image['size']} px, {image['resize_mode']}{' + centre crop' if image['crop'] else ''}, "
                  f"{image['resample']}, mean {image['mean']}, std {image['std']}"),
        ("text length", show(info["text_length"])),
        ("quantization", "none (float32)" if info["quantization"] is None else
         f"{info['quantization']['mode']}: {', '.join(info['quantization']['graphs'])}"),
    ]
    heads = info["heads"]
    if heads is None:
        rows.append(("heads", "not trained: English text and image queries only (run `uclip train`)"))
    else:
        rows += [("heads", f"trained {show(heads['trained_at'])}"
                           + (f", {heads['epochs']} epochs" if heads["epochs"] else "")
                           + (f" on {heads['device']}" if heads["device"] else "")),
                 ("  trained on", show(heads["inputs"])),
                 ("  sizes", show(heads["sizes"])),
                 ("  foreign languages", show(heads["foreign_languages"]))]
    rows.append(("size", f"{info['bytes'] / 1e6:.1f} MB in {len(info['files'])} files"))
    assembled = info.get("assembled")
    if assembled:
        towers = assembled.get("towers") or {}
        rows.append(("assembled", f"{assembled.get('assembled_at')} from published files: " + "; ".join(
            f"{role} {t.get('repo')}@{str(t.get('revision'))[:12]} ({t.get('licence')})" for role, t in towers.items())))
    origin = info["origin"]
    rows.append(("pulled from", ("not pulled (assembled here)" if assembled else "not pulled (built here)") if not origin else
                 f"{origin.get('source')}" + (f" at {origin['revision']}" if origin.get("revision") else "")
                 + f" on {origin.get('pulled_at')}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
