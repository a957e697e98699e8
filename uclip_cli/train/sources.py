"""Where training text comes from: local text files, or Hugging Face datasets streamed once and cached.

A text source is a path (one text per line), `uclip:xm3600:LANG` (the XM3600 captions in LANG that ship
with uclip: uclip_cli/captions.py; no network) or `hf://datasets/NAME[@REVISION][/CONFIG]:SPLIT:COLUMN`,
optionally prefixed with a language code, `cs=...`, which labels the rows it gives (training records
the language of each foreign row; a file named like a code, `cs.txt`, is labelled by its name).

    hf://datasets/yerevann/coco-karpathy:train:sentences
    hf://datasets/Helsinki-NLP/opus-100/cs-en:train:translation.cs
    fi=hf://datasets/Helsinki-NLP/opus-100/en-fi:train:translation.fi

COLUMN may name a field inside a column (`translation.cs`); a column holding a list of texts (five
captions per image) gives each of them. A dataset is streamed through the `datasets` library (only
that column is read from parquet files), at most `max_rows` texts, and written once to a local text
cache keyed by the spec and the requested revision (`cache_dir()/datasets/`), with the commit it
came from. A later run that needs no more texts than the cache holds reads the cache and touches no
network; the hub is asked again only for more rows than were cached, or for another revision.
Failures are one line naming the source: an unknown dataset, config, split or column (with the ones
that exist), a gated dataset, or no network and no cached copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import ProgressEvent, ProgressFn
from .data import TrainInputError, read_captions

HUB_PREFIX = "hf://datasets/"
SHIPPED_PREFIX = "uclip:xm3600:"   # + a language code: captions that ship with uclip
SPEC_FORMAT = "hf://datasets/NAME[@REVISION][/CONFIG]:SPLIT:COLUMN"
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(?:[-_][A-Za-z]{2,8})?")
PROGRESS_EVERY = 1000        # rows between progress events while streaming


@dataclass(frozen=True)
class HubDatasetSpec:
    repo: str                  # owner/name (or a legacy name without owner)
    config: str | None
    split: str
    column: str                # top-level column, then fields inside it: "translation.cs"
    revision: str | None       # as asked (None: the default branch)

    @property
    def text(self) -> str:
        name = self.repo + (f"@{self.revision}" if self.revision else "") + (f"/{self.config}" if self.config else "")
        return f"{HUB_PREFIX}{name}:{self.split}:{self.column}"

    @property
    def column_path(self) -> list[str]:
        return self.column.split(".")

    def cache_key(self) -> str:
        fields = [self.repo, self.config or "", self.split, self.column, self.revision or "main"]
        return hashlib.sha256("\0".join(fields).encode()).hexdigest()[:20]


def parse_hub_spec(spec: str) -> HubDatasetSpec:
    body = spec[len(HUB_PREFIX):]
    parts = body.split(":")
    if len(parts) != 3 or not all(parts):
        raise TrainInputError(f"{spec}: a dataset is named {SPEC_FORMAT}, e.g. "
                              "hf://datasets/yerevann/coco-karpathy:train:sentences")
    name, split, column = parts
    segments = name.split("/")
    if len(segments) > 3 or not all(segments):
        raise TrainInputError(f"{spec}: {name!r} is not NAME or OWNER/NAME[/CONFIG] ({SPEC_FORMAT})")
    repo_parts = segments[:2] if len(segments) >= 2 else segments
    config = segments[2] if len(segments) == 3 else None
    revision = None
    if "@" in repo_parts[-1]:
        repo_parts[-1], revision = repo_parts[-1].split("@", 1)
        if not revision or not repo_parts[-1]:
            raise TrainInputError(f"{spec}: an empty name or revision around '@' ({SPEC_FORMAT})")
    return HubDatasetSpec("/".join(repo_parts), config, split, column, revision)


@dataclass(frozen=True)
class TextSource:
    """One --captions / --foreign value: a local text file or a hub dataset, and the language it holds."""

    spec: str                          # as given, without a language prefix
    language: str | None
    path: Path | None = None
    hub: HubDatasetSpec | None = None
    max_rows: int | None = None        # at most this many texts from it (a recipe's cap)
    shipped: str | None = None         # the language of shipped captions (uclip:xm3600:LANG)

    @property
    def label(self) -> str:
        """What training records as this source's language group: its language, else its name."""
        return self.language or (self.path.name if self.path else self.spec)


def parse_text_source(value: str | os.PathLike) -> TextSource:
    """`[LANG=]PATH` or `[LANG=]hf://datasets/...`; a file whose stem is a language code (cs.txt) is that language."""
    text = os.fspath(value)
    language = None
    code, sep, rest = text.partition("=")
    if sep and rest and LANGUAGE_CODE.fullmatch(code) and not Path(text).exists():
        language, text = code, rest
    if text.startswith(HUB_PREFIX):
        return TextSource(text, language, hub=parse_hub_spec(text))
    if text.startswith(SHIPPED_PREFIX):
        from uclip_cli.captions import shipped_languages

        code = text[len(SHIPPED_PREFIX):]
        if code not in shipped_languages():
            raise TrainInputError(f"{text}: uclip ships XM3600 captions in {', '.join(shipped_languages())}, not {code!r}")
        return TextSource(text, language or code, shipped=code)
    if text.startswith("hf://"):
        raise TrainInputError(f"{text}: only datasets can be read from the hub here ({SPEC_FORMAT})")
    path = Path(text).expanduser()
    if language is None and LANGUAGE_CODE.fullmatch(path.stem):
        language = path.stem
    return TextSource(text, language, path=path)


# ---------------------------------------------------------------- reading

def read_text_source(source: TextSource, *, max_rows: int | None = None, cache_root: Path | None = None,
                     progress: ProgressFn | None = None, log: Callable[[str], None] = lambda m: None) -> list[str]:
    """The texts of one source (at most max_rows, and at most the source's own cap): a file's lines,
    or a dataset's column (cached)."""
    caps = [c for c in (max_rows, source.max_rows) if c is not None]
    max_rows = min(caps) if caps else None
    if source.path is not None or source.shipped is not None:
        if source.shipped is not None:
            from uclip_cli.captions import shipped_captions

            texts = shipped_captions(source.shipped)
        else:
            texts = read_captions(source.path)
        return texts[:max_rows] if max_rows else texts
    assert source.hub is not None
    from uclip_cli.config import cache_dir

    return HubTextCache(cache_root or cache_dir() / "datasets").texts(source.hub, max_rows, progress, log)


def _clean(text: str) -> str:
    return " ".join(text.split())           # one line: no newline inside a caption


def _texts_in(value: Any, path: list[str], where: str) -> Iterator[str]:
    """Every text in a cell, following field names into dicts and across lists."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _texts_in(item, path, where)
        return
    if path:
        if not isinstance(value, dict):
            raise TrainInputError(f"{where}: {type(value).__name__} values have no field {path[0]!r}")
        if path[0] not in value:
            raise TrainInputError(f"{where}: no field {path[0]!r} (fields: {', '.join(map(str, value))})")
        yield from _texts_in(value[path[0]], path[1:], where)
        return
    if isinstance(value, dict):
        raise TrainInputError(f"{where}: the column holds records (fields: {', '.join(map(str, value))}): "
                              "name one as COLUMN.FIELD")
    if not isinstance(value, str):
        raise TrainInputError(f"{where}: the column holds {type(value).__name__} values, not text")
    text = _clean(value)
    if text:
        yield text


class HubTextCache:
    """Texts of hub datasets, streamed once, kept as text files with the commit they came from."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, spec: HubDatasetSpec) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{spec.repo}_{spec.config or ''}_{spec.split}_{spec.column}")[:80]
        return self.root / f"{slug}-{spec.cache_key()}"

    def cached(self, spec: HubDatasetSpec) -> tuple[dict, Path] | None:
        folder = self.folder(spec)
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        texts = folder / "texts.txt"
        return (meta, texts) if texts.is_file() else None

    def texts(self, spec: HubDatasetSpec, max_rows: int | None, progress: ProgressFn | None,
              log: Callable[[str], None]) -> list[str]:
        found = self.cached(spec)
        if found:
            meta, path = found
            if meta.get("complete") or (max_rows is not None and meta.get("rows", 0) >= max_rows):
                texts = path.read_text(encoding="utf-8").split("\n")[:meta["rows"]]
                texts = texts[:max_rows] if max_rows else texts
                log(f"{spec.text}: {len(texts)} texts from the local cache (commit {meta['commit'][:12]}, "
                    f"fetched {meta['fetched']}), no network used")
                return texts
        texts, commit, complete = stream_hub_texts(spec, max_rows, progress, log,
                                                   cached_rows=found[0].get("rows") if found else None)
        self._write(spec, texts, commit, complete)
        return texts

    def _write(self, spec: HubDatasetSpec, texts: list[str], commit: str, complete: bool) -> None:
        folder = self.folder(spec)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".texts.{os.getpid()}.tmp"
        tmp.write_text("\n".join(texts), encoding="utf-8")
        os.replace(tmp, folder / "texts.txt")
        meta = {"spec": spec.text, "commit": commit, "rows": len(texts), "complete": complete,
                "fetched": time.strftime("%Y-%m-%d %H:%M", time.localtime())}
        tmp = folder / f".meta.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, folder / "meta.json")


def _first_lines(message: str, n: int = 2) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines()[:n] if line.strip())


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _unreachable(spec: HubDatasetSpec, reason: str, cached_rows: int | None) -> TrainInputError:
    cache = (f"the local cache holds only {cached_rows} rows of it: pass --max-rows {cached_rows} to use them"
             if cached_rows else "and there is no cached copy: connect once to fetch it, or train from text at hand: "
             "a local file of sentences, one per line (--captions en.txt: English; --foreign cs.txt: one language), or the "
             "captions that ship with uclip (--recipe xm3600, or --recipe LANG for one of its 35 languages)")
    return TrainInputError(f"{spec.text}: cannot reach the Hugging Face hub at {_hub_endpoint()} ({reason}); {cache}")


def _hub_error(spec: HubDatasetSpec, error: BaseException, cached_rows: int | None) -> TrainInputError:
    """One line for whatever the hub or the datasets library raised."""
    from huggingface_hub import errors as hub_errors

    name = type(error).__name__
    if isinstance(error, hub_errors.GatedRepoError):
        return TrainInputError(f"{spec.text}: {spec.repo} is gated: accept its terms on the hub, then log in with "
                               "`hf auth login`")
    if isinstance(error, hub_errors.RepositoryNotFoundError) or name == "DatasetNotFoundError":
        return TrainInputError(f"{spec.text}: no dataset {spec.repo!r} on the Hugging Face hub at {_hub_endpoint()} "
                               "(or it is private: log in with `hf auth login`)")
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return TrainInputError(f"{spec.text}: {spec.repo} has no revision {spec.revision!r}")
    if isinstance(error, hub_errors.OfflineModeIsEnabled) or (isinstance(error, ConnectionError) and "Offline" in str(error)):
        return _unreachable(spec, "HF_HUB_OFFLINE is set", cached_rows)
    if isinstance(error, hub_errors.HfHubHTTPError):
        return TrainInputError(f"{spec.text}: the hub answered {_first_lines(error, 1)}")
    if isinstance(error, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
        return _unreachable(spec, _first_lines(error, 1) or name, cached_rows)
    if isinstance(error, ValueError):       # datasets: bad split / config, with the ones that exist
        return TrainInputError(f"{spec.text}: {_first_lines(error)} ({SPEC_FORMAT})")
    return TrainInputError(f"{spec.text}: the datasets library could not read it ({name}: {_first_lines(error, 1)})")


def stream_hub_texts(spec: HubDatasetSpec, max_rows: int | None, progress: ProgressFn | None,
                     log: Callable[[str], None], *, cached_rows: int | None = None) -> tuple[list[str], str, bool]:
    """(texts, commit, complete) streamed from the hub through `datasets`."""
    try:
        import datasets
        from huggingface_hub import HfApi
    except ImportError:
        from uclip_cli.extras import install_command

        raise TrainInputError(f"{spec.text}: reading hub datasets needs the `datasets` library: "
                              f"{install_command('train')} (or pip install datasets)") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        commit = HfApi().dataset_info(spec.repo, revision=spec.revision).sha
        log(f"{spec.text}: streaming from {_hub_endpoint()} (commit {commit[:12]})"
            + (f", at most {max_rows} texts" if max_rows else ""))
        top = spec.column_path[0]
        dataset = datasets.load_dataset(spec.repo, spec.config, split=spec.split, streaming=True, revision=commit)
        columns = list(dataset.features) if dataset.features else None
        if columns is not None:
            if top not in columns:
                raise TrainInputError(f"{spec.text}: no column {top!r} (columns: {', '.join(columns)})")
            try:       # parquet: read only that column
                dataset = datasets.load_dataset(spec.repo, spec.config, split=spec.split, streaming=True,
                                                revision=commit, columns=[top])
            except ValueError:
                pass
        texts: list[str] = []
        complete, started = True, time.perf_counter()
        for i, row in enumerate(dataset):
            if top not in row:
                raise TrainInputError(f"{spec.text}: no column {top!r} (columns: {', '.join(row)})")
            texts.extend(_texts_in(row[top], spec.column_path[1:], spec.text))
            if progress and (i + 1) % PROGRESS_EVERY == 0:
                rate = len(texts) / max(time.perf_counter() - started, 1e-9)
                progress(ProgressEvent("download", len(texts), max_rows or 0, rate, "texts"))
            if max_rows is not None and len(texts) >= max_rows:
                texts, complete = texts[:max_rows], False
                break
    except TrainInputError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub and datasets raise many types; each becomes one line
        raise _hub_error(spec, e, cached_rows) from None
    if not texts:
        raise TrainInputError(f"{spec.text}: the column holds no text")
    return texts, commit, complete
