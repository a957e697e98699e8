"""The `uclip` command line: parses arguments, calls the library, prints.  No logic lives here."""
from __future__ import annotations

import time

_STARTED = time.perf_counter()   # UCLIP_TIMINGS=1 (hidden, for bench/bench_query.py) counts from here

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cli_help import HelpCommand
from .errors import UclipError

# Help is plain text: no Rich markup, so that "[/CONFIG]" or "[default]" in a help string is shown as
# typed instead of being eaten or crashing `--help`; -h is --help everywhere.
PLAIN = dict(rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search your own photos in any language (uCLIP on ONNX Runtime).", **PLAIN)
eval_app = typer.Typer(no_args_is_help=True, help="Recall@K retrieval and zero-shot classification benchmarks.",
                       short_help="Measure retrieval and zero-shot classification per language.", **PLAIN)
app.add_typer(eval_app, name="eval")
bundle_app = typer.Typer(no_args_is_help=True, help="Pack a model bundle into one archive, or show what a bundle is.",
                         short_help="Pack a model bundle into one archive, or show what it is.", **PLAIN)
app.add_typer(bundle_app, name="bundle")


def _show_version(value: bool) -> None:
    if value:
        from importlib import metadata

        from .extras import DISTRIBUTION

        try:
            version = metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            version = "(run from a source folder, not installed)"
        typer.echo(f"uclip {version}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", "-V", callback=_show_version, is_eager=True,
                                          help="Show uclip's version and exit.")) -> None:
    pass

BundleOpt = typer.Option(None, "--bundle", "-b", help="Model bundle directory (default: $UCLIP_BUNDLE, else bundle= in ~/.config/uclip/config.toml, else ~/.local/share/uclip/bundle).")
IndexOpt = typer.Option(None, "--index", "-i", help="Index directory (default: $UCLIP_INDEX, else index= in ~/.config/uclip/config.toml, else ~/.local/share/uclip/index).")
DeviceOpt = typer.Option("auto", "--device", help="auto (TensorRT > CUDA > CPU, whichever really loads) | cpu | cuda | tensorrt.")
TIMINGS_ENV = "UCLIP_TIMINGS"
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Show progress (a live line on a terminal).")
ReportFormatOpt = typer.Option("table", "--format", "-f", metavar="FORMAT", help="table | json")
ThreadsOpt = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: all cores, or $UCLIP_THREADS; never more than the CPUs available).")


def _log(message: str) -> None:
    """A note or warning for the user, on stderr, on a line of its own (never glued to a live progress line)."""
    from .progress import finish_live_lines

    finish_live_lines()
    typer.echo(message, err=True)


def _bundle_path(bundle: Optional[Path]) -> Path:
    from .config import default_bundle

    return bundle if bundle is not None else default_bundle()


def _usable_bundle(bundle: Optional[Path], device: str, threads: Optional[int], *, progress: bool = True) -> Path:
    """The bundle to use; when none was named and none is installed yet, the default model assembles itself."""
    path = _bundle_path(bundle)
    if bundle is None:
        from .bundle import needs_assembly

        if needs_assembly(path):
            from .assemble import ensure_default_bundle

            ensure_default_bundle(path, _sessions(device, threads), progress=progress, log=_log)
    return path


def _index_path(index: Optional[Path]) -> Path:
    from .config import default_index

    return index if index is not None else default_index()


def _sessions(device: str, threads: Optional[int], *, one_shot: bool = False, requests: bool = False):
    from .sessions import SessionFactory
    from .threads import THREADS_ENV, resolve_threads

    if threads is not None or os.environ.get(THREADS_ENV):   # checked and bounded before any work starts
        threads, note = resolve_threads(threads)
        if note:
            _log(note)

    return SessionFactory(device=device, threads=threads, log=_log, one_shot=one_shot, requests=requests)


@app.command(cls=HelpCommand, short_help="Index the photos under FOLDERS; a rerun adds only what changed.")
def index(
    folders: Optional[List[str]] = typer.Argument(None, help="Folders to index (one index can hold several) (default: the folders the index holds)."),
    index: Optional[Path] = IndexOpt,
    bundle: Optional[Path] = BundleOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    exclude: List[str] = typer.Option([], "--exclude", "-x", metavar="GLOB", help=(
        "Skip paths matching GLOB (repeatable), read as .gitignore reads them: without a slash it matches a name at "
        "any depth ('*.gif', 'raw'); with one, the path from the indexed folder ('raw/*'; '*/raw/*' also takes raw/ "
        "right under it); a trailing / matches folders only; * also crosses folders; an absolute path "
        "('/home/me/photos/raw') matches that path.")),
    hidden: bool = typer.Option(False, "--hidden", help="Also index hidden files and folders."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder batch."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding threads (default: cores; never more than the CPUs available)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write skipped files and reasons as JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Empty the index first (e.g. after switching to another image encoder)."),
    follow_links: bool = typer.Option(False, "--follow-links", help="Also follow symlinked folders that point outside the indexed folders."),
    import_shards: List[str] = typer.Option([], "--import", metavar="SHARDS", help="Merge shards written by `uclip embed` (files or their folder; repeatable) instead of walking folders: no image is decoded."),
    ann: Optional[str] = typer.Option(None, "--ann", metavar="MODE", help="Approximate index (FAISS, the `ann` extra), kept as a setting of the index: auto (from 1,000,000 photos), on, off (default: keep the index's setting, auto when new)."),
) -> None:
    """Embed the images under FOLDERS (incremental: new, changed, moved and deleted files); no FOLDERS: update every folder indexed."""
    from .bundle import HEAD_B, IMAGE_ENCODER, load_bundle
    from .indexer import IndexOptions, run_import, run_index

    if ann is not None and ann not in ("auto", "on", "off"):
        raise typer.BadParameter(f"--ann {ann!r}: use auto, on or off", param_hint="--ann")
    if workers is not None:
        from .threads import resolve_threads

        workers, note = resolve_threads(workers, option="--workers")
        if note:
            _log(note)
    sessions = _sessions(device, threads)
    b = load_bundle(_usable_bundle(bundle, device, threads, progress=progress), verify="full",
                    only=(IMAGE_ENCODER, HEAD_B))   # every file that shapes vectors
    options = IndexOptions(exclude=list(exclude), include_hidden=hidden, batch_size=batch_size, workers=workers,
                           progress=progress, report_path=report, rebuild=rebuild, follow_links=follow_links, ann=ann)
    if import_shards:
        if folders:
            raise typer.BadParameter("give folders to walk or --import shards, not both", param_hint="--import")
        summary = run_import(list(import_shards), _index_path(index), b, sessions, options,
                             log=_log)
    else:
        summary = run_index(list(folders or []), _index_path(index), b, sessions, options,
                            log=_log)
    typer.echo(summary.format())
    for line in summary.warning_lines():
        _log(line)
    if summary.report_path:
        typer.echo(f"skipped files listed in {summary.report_path}")


@app.command(cls=HelpCommand, short_help="Embed photos on Ray into Parquet shards for `uclip index --import`.")
def embed(
    inputs: Optional[List[str]] = typer.Argument(None, help="Folders of images (local or shared), or folder URIs of a pyarrow/fsspec filesystem (s3://bucket/photos)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the Parquet shards (on a filesystem every worker sees); a rerun resumes."),
    files: List[Path] = typer.Option([], "--files", help="Text file listing image paths, one per line (repeatable)."),
    bundle: Optional[Path] = BundleOpt,
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="An existing Ray cluster (e.g. ray://head:10001 or auto) (default: start Ray on this machine)."),
    shard_size: int = typer.Option(512, "--shard-size", min=1, help="Files per partition and per shard."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder batch."),
    actors: Optional[int] = typer.Option(None, "--actors", min=1, help="Encoder actors (default: one per GPU, else one per 4 CPUs)."),
    device: str = DeviceOpt,
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="ONNX Runtime threads per encoder actor on CPUs."),
    exclude: List[str] = typer.Option([], "--exclude", "-x", metavar="GLOB", help="Glob of paths to skip (repeatable)."),
    hidden: bool = typer.Option(False, "--hidden", help="Also embed hidden files and folders."),
    follow_links: bool = typer.Option(False, "--follow-links", help="Also follow symlinked folders that point outside the input folders."),
    progress: bool = ProgressOpt,
) -> None:
    """Embed images on Ray (this machine or a cluster) into Parquet shards; `uclip index --import OUT` merges them into an index."""
    from .embed import EmbedOptions, run_embed

    summary = run_embed(list(inputs or []), out, _bundle_path(bundle), EmbedOptions(
        shard_size=shard_size, batch_size=batch_size, device=device, threads=threads, actors=actors,
        ray_address=ray_address, files=list(files), exclude=list(exclude), include_hidden=hidden,
        follow_links=follow_links, progress=progress), log=_log)
    typer.echo(summary.format())
    if summary.report_path:
        typer.echo(f"skipped files listed in {summary.report_path}")
    typer.echo(f"merge into an index with: uclip index --import {out}")


@app.command(cls=HelpCommand, short_help="Drop the photos under FOLDERS from the index.")
def forget(
    folders: List[Path] = typer.Argument(..., help="Indexed folders to drop from the index (they may no longer exist)."),
    index: Optional[Path] = IndexOpt,
) -> None:
    """Drop every file under FOLDERS from the index (e.g. an unmounted drive you no longer want searched)."""
    from .indexer import forget_folders

    for folder, removed in forget_folders([Path(f) for f in folders], _index_path(index)).items():
        typer.echo(f"forgot {removed} files under {folder}")


@app.command(cls=HelpCommand, short_help="Search the index by text (any language) or by example image.")
def query(
    query: str = typer.Argument(..., help="Text in any language, or the path of an image ('more like this')."),
    top: int = typer.Option(10, "--top", "-n", min=1, help="How many results."),
    min_score: Optional[float] = typer.Option(None, "--min-score", min=-1.0, max=1.0, help="Drop results scoring below this cosine (-1 to 1)."),
    fmt: str = typer.Option("table", "--format", "-f", metavar="FORMAT", help="table | paths | json"),
    folder: Optional[Path] = typer.Option(None, "--in", help="Only results under this indexed folder."),
    text: bool = typer.Option(False, "--text", help="Treat QUERY as text even if a file of that name exists."),
    null: bool = typer.Option(False, "--null", "-0", help="Bare paths, each ended by a NUL byte, exactly as on disk (for xargs -0); implies --format paths."),
    exact: bool = typer.Option(False, "--exact", help="Exact search even where the index has an approximate one (slower past a million photos)."),
    after: Optional[str] = typer.Option(None, "--after", metavar="DATE", help="Only photos taken in DATE (2019, 2019-06, 2019-06-14) or later; in the query: after:DATE."),
    before: Optional[str] = typer.Option(None, "--before", metavar="DATE", help="Only photos taken before DATE; in the query: before:DATE."),
    camera: Optional[str] = typer.Option(None, "--camera", help="Only photos whose camera make or model contains this (any case); in the query: camera:TEXT."),
    near: Optional[str] = typer.Option(None, "--near", metavar="LAT,LON", help="Only photos taken near this place (degrees, south and west negative); in the query: near:LAT,LON."),
    within: Optional[str] = typer.Option(None, "--within", metavar="DISTANCE", help="How near for --near: 20km, 500m, 3mi (default 10km); in the query: within:DISTANCE."),
    has_gps: bool = typer.Option(False, "--has-gps", help="Only photos with a GPS position; in the query: has:gps."),
    portrait: bool = typer.Option(False, "--portrait", help="Only photos taller than wide; in the query: is:portrait."),
    landscape: bool = typer.Option(False, "--landscape", help="Only photos wider than tall; in the query: is:landscape."),
    tag: List[str] = typer.Option([], "--tag", metavar="LABEL", help="Only photos `uclip tag` gave this label (repeatable: all of them); in the query: tag:LABEL."),
    sort: str = typer.Option("score", "--sort", metavar="ORDER", help="score (best first) | date (the best matches, oldest first) | newest."),
    index: Optional[Path] = IndexOpt,
    bundle: Optional[Path] = BundleOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Search the index by text (any language) or by example image, among the photos that pass the filters.

    Filters apply before the top -n (-n 20: 20 photos that pass) and may also be written in QUERY itself:
    `uclip query "pláž after:2019-06 camera:pixel"`. Filters alone list the photos that pass, newest first.
    """
    entered = time.perf_counter()
    # Before numpy loads: one matrix-vector product does not pay for OpenBLAS's spinning thread pool
    # (measured: 0.12 s of a 0.5 s cold query on 2 cores).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .filters import cli_filters
    from .query import format_results, run_query

    imported = time.perf_counter()
    if fmt not in ("table", "paths", "json"):
        raise typer.BadParameter(f"--format {fmt!r}: use table, paths or json", param_hint="--format")
    if null and fmt == "json":
        raise typer.BadParameter("-0 prints NUL-separated paths: leave out --format json", param_hint="--null")
    fmt = "paths" if null else fmt
    index_path = _index_path(index)
    # no index yet: "run `uclip index`" comes first, before the default model is downloaded for nothing
    bundle_path = _usable_bundle(bundle, device, threads) if index_path.exists() else _bundle_path(bundle)
    result = run_query(query, index_path=index_path, bundle_path=bundle_path,
                       sessions=_sessions(device, threads, one_shot=True, requests=True), top=top, min_score=min_score, folder=folder, force_text=text,
                       exact=exact, sort=sort, filters=cli_filters(
                           after=after, before=before, camera=camera, near=near, within=within, has_gps=has_gps,
                           portrait=portrait, landscape=landscape, tags=tag))
    shown = time.perf_counter()
    for note in result.notes:
        _log(note)
    output = format_results(result, fmt, null=null)
    if null:
        sys.stdout.write(output)
        sys.stdout.flush()
    elif output:   # no hits as bare paths: print nothing, not an empty line for xargs to run on
        typer.echo(output)
    if os.environ.get(TIMINGS_ENV):
        stages = {"cli": entered - _STARTED, "imports": imported - entered, **result.timings,
                  "output": time.perf_counter() - shown, "in_process": time.perf_counter() - _STARTED}
        typer.echo("uclip timings " + json.dumps({k: round(v, 4) for k, v in stages.items()}), err=True)


@app.command(cls=HelpCommand, short_help="Group near-duplicate photos (bursts, re-saves, resized copies).")
def dupes(
    threshold: float = typer.Option(0.95, "--threshold", "-t", help="Cosine of the image features from which two photos are near-duplicates (0.5 to 1; higher: closer copies only)."),
    fmt: str = typer.Option("table", "--format", "-f", metavar="FORMAT", help="table | json | paths (a blank line between groups)"),
    folder: Optional[Path] = typer.Option(None, "--in", help="Only photos under this indexed folder."),
    exact: Optional[bool] = typer.Option(None, "--exact/--approximate", show_default=False, help="Compare every pair of photos (exact; ~45 s of CPU at 100,000 photos), or only photos in nearby clusters (~6x less; may miss a rare pair). Default: every pair up to 20,000 photos."),
    index: Optional[Path] = IndexOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Group indexed photos whose image features are within --threshold (bursts, edits, re-saves, resized
    copies), largest group first, each photo with its size, pixel size and capture time, so that you can pick
    which to keep. Identical files at several paths are shown as exact copies. Nothing is ever deleted.
    """
    from .dupes import check_threshold, find_dupes, format_dupes, nothing_found
    from .index.access import open_index
    from .progress import StageProgress

    if fmt not in ("table", "paths", "json"):
        raise typer.BadParameter(f"--format {fmt!r}: use table, paths or json", param_hint="--format")
    check_threshold(threshold)
    bar = StageProgress(enabled=progress)
    with open_index(_index_path(index), mode="read") as store:
        try:
            result = find_dupes(store, threshold, folder.expanduser().resolve() if folder else None, exact=exact,
                                progress=bar.step)
        finally:
            bar.close()
        for note in store.notes:
            _log(note)
    if not result.groups and fmt == "table":
        _log(nothing_found(result))
        return
    output = format_dupes(result, fmt)
    if output:
        typer.echo(output)


@app.command(cls=HelpCommand, short_help="Tag the photos with labels in any language (zero-shot, calibrated).")
def tag(
    labels: Optional[str] = typer.Argument(None, help="Labels separated by commas, any language (\"pláž, hory, kočka\"); none: apply the stored labels to photos indexed since."),
    file: Optional[Path] = typer.Option(None, "--file", help="A UTF-8 text file of labels, one per line."),
    remove: List[str] = typer.Option([], "--remove", metavar="LABEL", help="Drop this label and its tags (repeatable); photos stay."),
    clear: bool = typer.Option(False, "--clear", help="Drop every label and tag; photos stay."),
    fmt: str = ReportFormatOpt,
    index: Optional[Path] = IndexOpt,
    bundle: Optional[Path] = BundleOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Give each indexed photo the labels it matches, each label with a threshold calibrated on your library;
    then search with tag:LABEL (or --tag). New labels are scored alone; photos indexed since are scored on the
    next `uclip tag`. Tags are kept in the index, for the model that scored them."""
    from .tags import format_summary, read_labels, run_tag

    if fmt not in ("table", "json"):
        raise typer.BadParameter(f"--format {fmt!r}: use table or json", param_hint="--format")
    wanted = read_labels(labels, file)
    summary = run_tag(_index_path(index), _bundle_path(bundle), _sessions(device, threads), wanted, remove=remove,
                      clear=clear)
    for note in summary.notes:
        _log(note)
    typer.echo(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) if fmt == "json" else format_summary(summary))


@app.command(cls=HelpCommand, short_help="List the tags with how many photos hold each.")
def tags(fmt: str = ReportFormatOpt, index: Optional[Path] = IndexOpt, bundle: Optional[Path] = BundleOpt) -> None:
    """List the labels `uclip tag` gave, with how many photos hold each (search them with tag:LABEL)."""
    from .tags import format_listing, list_tags

    if fmt not in ("table", "json"):
        raise typer.BadParameter(f"--format {fmt!r}: use table or json", param_hint="--format")
    listing = list_tags(_index_path(index), _bundle_path(bundle))
    typer.echo(json.dumps(listing, indent=2, ensure_ascii=False) if fmt == "json" else format_listing(listing))


@app.command(cls=HelpCommand, short_help="A local web page and JSON API to search your photos.")
def serve(
    index: Optional[Path] = IndexOpt,
    bundle: Optional[Path] = BundleOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --allow-remote."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port (0: any free one)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a --host other machines can reach; every request then needs the token."),
    token: Optional[str] = typer.Option(None, "--token", envvar="UCLIP_SERVE_TOKEN", help="Token requests must carry (default beyond loopback: a random one, printed in the link)."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """A local page and a JSON API to search and look at your photos (needs the `serve` extra)."""
    from .serve import run_server

    run_server(index_path=_index_path(index), bundle_path=_usable_bundle(bundle, device, threads), host=host, port=port,
               allow_remote=allow_remote, token=token, sessions=_sessions(device, threads, requests=True),
               ready=lambda url: (typer.echo(f"uclip serve: {url}   (Ctrl-C stops it)"), sys.stdout.flush()),
               log=lambda m: typer.echo(m, err=True))
    typer.echo("uclip serve: stopped", err=True)


@app.command(cls=HelpCommand, short_help="Read every byte of the index and report (or --repair) damage.")
def check(
    index: Optional[Path] = IndexOpt,
    bundle: Optional[Path] = BundleOpt,
    repair: bool = typer.Option(False, "--repair", help="Mend what can be mended: damaged search vectors are computed again from the stored image features (needs the bundle), the int8 copy and the approximate index are rebuilt, photos whose features are damaged are dropped so that `uclip index` embeds them again."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Read every byte of the index and report damage (exit 1 while any remains)."""
    from .index.check import run_check

    def project():
        from .bundle import load_bundle
        from .encoders import Encoders

        b = load_bundle(_bundle_path(bundle), verify="full", only=())   # each graph hashed before its first use
        return b.heads_fingerprint, Encoders(b, _sessions(device, threads)).project_image

    report = run_check(_index_path(index), repair=repair, project=project, log=lambda m: typer.echo(m, err=True))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        for name, ok, detail in report.checks:
            typer.echo(f"{'ok ' if ok else 'BAD'}  {name:<16} {detail}")
    raise typer.Exit(0 if report.ok else 1)


@app.command(cls=HelpCommand, short_help="Show the ONNX Runtime providers that load and the bundle's state.")
def doctor(
    bundle: Optional[Path] = BundleOpt,
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show the onnxruntime install, the providers that really load, and the bundle's state."""
    from .doctor import run_doctor

    report = run_doctor(_bundle_path(bundle), device)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        for c in report.checks:
            typer.echo(f"{'ok ' if c.ok else 'BAD'}  {c.name:<34} {c.detail}")
        for w in report.warnings:
            typer.echo(f"WARNING  {w}")
    raise typer.Exit(0 if report.ok else 1)   # warnings are not failures


@app.command(cls=HelpCommand, short_help="Build a model bundle from Hugging Face checkpoints (needs torch).")
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to write (replaced atomically if it exists)."),
    clip: str = typer.Option("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", "--clip",
                             help="CLIP or SigLIP2 checkpoint: Hugging Face id or local directory."),
    multilingual: str = typer.Option("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2", "--multilingual",
                                     help="Multilingual sentence encoder (BERT / XLM-R / MPNet, mean pooling): id or directory."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: per-channel int8 text towers (faster cold start); int8-all: the image encoder too (faster indexing); int8-beside: int8 text towers beside the float32 ones, queries running the faster on each CPU."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
) -> None:
    """Build an ONNX model bundle from Hugging Face checkpoints (needs the `train` extra: torch + transformers)."""
    from .extras import require_extra

    require_extra("train", purpose="`uclip export`")
    from .export import export_bundle

    export_bundle(clip, multilingual, out, quantize=quantize, opset=opset, log=_log)


TRAIN_HELP = (
    "Teach the model your languages: train its two heads and write them into the bundle (needs the `train` "
    "extra). The quickest start is a recipe, e.g. `uclip train --recipe hr` (see --list-recipes).\n\n"
    "The image memory is the image features your index already stores (your own photos, nothing decoded "
    "again); --images or --image-features give another. Texts come from files (one per line; a LANG= prefix "
    "names the language: cs=sentences.txt) or Hugging Face datasets, hf://datasets/NAME/CONFIG:SPLIT:COLUMN "
    "(CONFIG optional; NAME@REVISION pins a commit), streamed once and cached.\n\n"
    "By default the heads are fitted in closed form, in seconds to minutes. With --refine they are trained by "
    "optimiser steps (at least 1,000) until the held-out loss stops improving, and it says why it stopped; "
    "--epochs N is the paper's schedule. The batch adapts to small inputs and says so; a batch size given with "
    "--batch-size that does not fit is refused before anything is encoded. The same command again resumes its run; other "
    "settings start a new run. Afterwards the index is re-projected with the new heads."
)
# `uclip train --help` in the order a photo user needs it; the paper's switches last
LANGUAGES, PLACES, SCHEDULE, HARDWARE = "Languages and texts", "Where", "How long", "Hardware"
FEATURES, METHOD = "Features computed elsewhere", "Method (the paper's ablation switches, for experiments)"


@app.command(cls=HelpCommand, help=TRAIN_HELP,
             short_help="Teach the model your languages: train its heads (needs torch).")
def train(
    recipe: Optional[str] = typer.Option(None, "--recipe", metavar="NAME", rich_help_panel=LANGUAGES, help="A named recipe of caption and foreign-text datasets (see --list-recipes); adds to --captions/--foreign."),
    list_recipes: bool = typer.Option(False, "--list-recipes", rich_help_panel=LANGUAGES, help="List the recipes and exit."),
    captions: List[str] = typer.Option([], "--captions", metavar="SOURCE", rich_help_panel=LANGUAGES, help="English anchor captions: a text file (one per line) or hf://datasets/... (repeatable)."),
    foreign: List[str] = typer.Option([], "--foreign", metavar="SOURCE", rich_help_panel=LANGUAGES, help="Sentences in the target languages: FILE or hf://datasets/..., optionally prefixed LANG= (repeatable)."),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", min=1, rich_help_panel=LANGUAGES, help="At most this many texts from each text source."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", rich_help_panel=PLACES, help=BundleOpt.help),
    index: Optional[Path] = typer.Option(None, "--index", "-i", rich_help_panel=PLACES, help=IndexOpt.help),
    images: List[Path] = typer.Option([], "--images", rich_help_panel=PLACES, help="Folder of uncaptioned images for the image memory instead of the index (repeatable)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", rich_help_panel=PLACES, help="Feature cache, runs and checkpoints (default: ~/.cache/uclip/train/...)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, rich_help_panel=SCHEDULE, help="Exactly N epochs, the paper's schedule (5), no early stopping (default: by steps)."),
    min_steps: int = typer.Option(1000, "--min-steps", min=1, rich_help_panel=SCHEDULE, help="Step schedule: at least this many optimiser steps."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, rich_help_panel=SCHEDULE, help="Step schedule: at most this many optimiser steps."),
    patience: int = typer.Option(5, "--patience", min=1, rich_help_panel=SCHEDULE, help="Step schedule: stop after this many held-out evaluations without improvement."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, rich_help_panel=SCHEDULE, help="Captions per step (default: 512, lowered to fit small inputs)."),
    torch_device: str = typer.Option("auto", "--torch-device", rich_help_panel=HARDWARE, help="Training device: auto (CUDA when torch sees one) | cpu | cuda."),
    device: str = typer.Option("auto", "--device", rich_help_panel=HARDWARE, help=DeviceOpt.help),
    threads: Optional[int] = typer.Option(None, "--threads", rich_help_panel=HARDWARE, help="Threads for torch and ONNX Runtime (default: physical cores, or $UCLIP_THREADS; never more than the CPUs available)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", rich_help_panel=HARDWARE, help=ProgressOpt.help),
    extract_only: bool = typer.Option(False, "--extract-only", rich_help_panel=FEATURES, help="Only encode the inputs into .npy feature files, to train later."),
    english_clip_features: Optional[Path] = typer.Option(None, "--english-clip-features", rich_help_panel=FEATURES, help="Precomputed e_I (.npy) of the captions."),
    english_multi_features: Optional[Path] = typer.Option(None, "--english-multi-features", rich_help_panel=FEATURES, help="Precomputed e_K (.npy), same captions."),
    image_features: List[Path] = typer.Option([], "--image-features", rich_help_panel=FEATURES, help="Precomputed CLIP image features (.npy, repeatable) instead of the index."),
    foreign_features: List[Path] = typer.Option([], "--foreign-features", rich_help_panel=FEATURES, help="Precomputed multilingual features (.npy, repeatable)."),
    paper: bool = typer.Option(False, "--paper", rich_help_panel=METHOD, help="The paper's heads, start and learning rate (random MLP heads, no subspace removed, lr 1e-3); the options below still apply after it. With --epochs 5: the paper's exact run."),
    init: Optional[str] = typer.Option(None, "--init", rich_help_panel=METHOD, help="How the heads start: ridge-to-multilingual (default) | ridge | procrustes (a closed-form alignment of the captions) | random (the paper)."),
    head_b: Optional[str] = typer.Option(None, "--head-b", rich_help_panel=METHOD, help="What Head_B is: mlp (the paper's) | kernel (a linear map plus Gaussian-kernel features around anchor captions)."),
    adapt_head_b: Optional[str] = typer.Option(None, "--adapt-head-b", rich_help_panel=METHOD, help="Adapt Head_B's closed-form start to the image memory, unpaired: mean | coral | coral-input | self-learning (measured: none gains out of domain; off by default)."),
    refine: Optional[bool] = typer.Option(None, "--refine/--closed-form-only", rich_help_panel=METHOD, help="After the closed-form start (--init), train the heads with the paper's contrastive losses, or keep the closed form as it is (default: kept, unless --epochs, --max-steps or --lr is given; random heads are always trained)."),
    freeze_head_a: Optional[bool] = typer.Option(None, "--freeze-head-a/--train-head-a", rich_help_panel=METHOD, help="Head_A keeps its closed-form start (--init); only Head_B trains (default: frozen with --init ridge-to-multilingual, the default)."),
    lr: Optional[float] = typer.Option(None, "--lr", rich_help_panel=METHOD, help="AdamW learning rate (default 1e-4; the paper's 1e-3 with its random start)."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=METHOD, help="Seed of the random start, the held-out split and the batches."),
    retrieval_topk: Optional[int] = typer.Option(None, "--retrieval-topk", rich_help_panel=METHOD, help="Top-k soft retrieval instead of the exact softmax."),
    language_projection: Optional[bool] = typer.Option(None, "--language-projection/--no-language-projection", rich_help_panel=METHOD, help="Head_A removes the span of the language means of its inputs (inside head_a.onnx: queries need no language code; default on)."),
    modality_projection: Optional[bool] = typer.Option(None, "--modality-projection/--no-modality-projection", rich_help_panel=METHOD, help="Head_B removes the span of the CLIP text and image means of its inputs (the modality gap; inside head_b.onnx; default on)."),
    retrieval_per_language: Optional[bool] = typer.Option(None, "--retrieval-per-language/--mixed-retrieval", rich_help_panel=METHOD, help="Each caption retrieves its pseudo foreign text from one language's memory, languages balanced."),
    no_text: bool = typer.Option(False, "--no-text-loss", rich_help_panel=METHOD, help="Ablation: drop L_text."),
    no_pseudo: bool = typer.Option(False, "--no-pseudo-loss", rich_help_panel=METHOD, help="Ablation: drop L_pseudo."),
    no_intra: bool = typer.Option(False, "--no-intra-loss", rich_help_panel=METHOD, help="Ablation: drop L_intra."),
    no_noise: bool = typer.Option(False, "--no-noise", rich_help_panel=METHOD, help="Ablation: no Gaussian perturbation."),
) -> None:
    from .extras import require_extra

    require_extra("train", purpose="`uclip train`")
    from .progress import StageProgress
    from .threads import resolve_threads
    from .train.config import TrainConfig
    from .train.pipeline import TrainSources, extract_features, run_training
    from .train.recipes import format_recipes, get_recipe, load_recipes

    if list_recipes:
        typer.echo(format_recipes(load_recipes()))
        return
    n_threads, note = resolve_threads(threads)
    if note:
        _log(note)
    config = TrainConfig.from_options(
        paper=paper, epochs=epochs, min_steps=min_steps, max_steps=max_steps, patience=patience, batch_size=batch_size,
        seed=seed, retrieval_topk=retrieval_topk, use_text=not no_text, use_pseudo=not no_pseudo,
        use_intra=not no_intra, use_noise=not no_noise, device=torch_device, language_projection=language_projection,
        modality_projection=modality_projection, retrieval_per_language=retrieval_per_language, init=init,
        freeze_head_a=freeze_head_a, head_b=head_b, refine=refine, lr=lr, adapt_head_b=adapt_head_b)
    chosen = get_recipe(recipe) if recipe else None
    sources = TrainSources(captions=[*(chosen.captions if chosen else ()), *captions],
                           foreign=[*(chosen.foreign if chosen else ()), *foreign], images=list(images),
                           english_clip_features=english_clip_features, english_multi_features=english_multi_features,
                           image_features=list(image_features), foreign_features=list(foreign_features),
                           index=_index_path(index), max_rows=max_rows)
    sessions, bar, bundle_path = _sessions(device, n_threads), StageProgress(enabled=progress), _bundle_path(bundle)
    try:
        made = extract_features(bundle_path, sources, work_dir=work_dir, sessions=sessions, progress=bar, log=_log) \
            if extract_only else run_training(bundle_path, sources, config, work_dir=work_dir, sessions=sessions,
                                              progress=bar, log=_log, adapt_batch=batch_size is None, threads=n_threads)
    finally:
        bar.close()
    if extract_only:
        _print_features(made)
    else:
        typer.echo("\n".join(made.summary(bundle_path)))


def _print_features(files: dict) -> None:
    for name, path in files.items():
        typer.echo(f"{name}: {path}")
    typer.echo("train on them with --english-clip-features, --english-multi-features, --image-features, --foreign-features")


def _print_report(report: dict, fmt: str) -> None:
    from .evaluate import format_report_table

    if fmt == "json":
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        typer.echo(format_report_table(report))


@eval_app.command("retrieval", cls=HelpCommand, short_help="Recall@1/5/10 per language, text->image and image->text.")
def eval_retrieval(
    captions: Path = typer.Option(..., "--captions", help="captions.jsonl: {\"image\": name, \"captions\": {lang: text}} per line."),
    languages: str = typer.Option("cs,fi,hr,hu,ro", "--languages", "-l", help="Comma-separated language codes."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder holding the captions file's images."),
    features: Optional[Path] = typer.Option(None, "--features", help="Image features saved by --save-features (no decoding)."),
    save_features: Optional[Path] = typer.Option(None, "--save-features", help="Save the extracted image features (.npz)."),
    fmt: str = ReportFormatOpt,
    bundle: Optional[Path] = BundleOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Recall@1/5/10, text->image and image->text, one caption per image, per language and averaged."""
    from .eval_run import run_retrieval_eval

    report = run_retrieval_eval(bundle_path=_bundle_path(bundle), captions_file=captions,
                                languages=[x.strip() for x in languages.split(",") if x.strip()], images=images,
                                features_file=features, save_features=save_features, sessions=_sessions(device, threads),
                                progress=progress, log=_log)
    _print_report(report, fmt)


@eval_app.command("classify", cls=HelpCommand, short_help="Zero-shot classification: accuracy and macro-F1 per language.")
def eval_classify(
    images: Path = typer.Option(..., "--images", help="Folder with one subfolder of images per class."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompt file: lang<TAB>class<TAB>prompt per line."),
    languages: Optional[str] = typer.Option(None, "--languages", "-l", help="Comma-separated codes (default: all in the file)."),
    fmt: str = ReportFormatOpt,
    bundle: Optional[Path] = BundleOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Zero-shot classification: accuracy and macro-F1 per language."""
    from .eval_run import run_classification_eval

    langs = [x.strip() for x in languages.split(",") if x.strip()] if languages else None
    report = run_classification_eval(bundle_path=_bundle_path(bundle), images=images, prompts_file=prompts,
                                     languages=langs, sessions=_sessions(device, threads), progress=progress)
    _print_report(report, fmt)


@app.command(cls=HelpCommand, short_help="Install a model bundle from the Hugging Face Hub, a URL or a file.")
def pull(
    source: str = typer.Argument(..., help="Hugging Face model repo id (owner/name or hf://owner/name), https URL of a bundle archive, or a local archive or bundle folder."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub repos: branch, tag or commit to pin (default: main)."),
    bundle: Optional[Path] = BundleOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Install a model bundle: every checksum verified first, the previous bundle replaced atomically (kept if anything fails)."""
    from .transfer import pull_bundle

    result = pull_bundle(source, _bundle_path(bundle), revision=revision, progress=progress,
                         log=_log)
    pinned = f" at {result.revision}" if result.revision else ""
    typer.echo(f"{'replaced' if result.replaced else 'installed'} the bundle at {result.bundle} from {source}{pinned}: "
               f"{result.files} files, {result.bytes / 1e6:.1f} MB, every checksum verified")


@bundle_app.command("pack", cls=HelpCommand, short_help="Write the bundle into one archive for `uclip pull`.")
def bundle_pack(
    out: Path = typer.Argument(..., help="Archive to write: NAME.tar, or NAME.tar.gz for a gzip-compressed one."),
    bundle: Optional[Path] = BundleOpt,
) -> None:
    """Write the bundle (manifest with every checksum + every file) into one archive for `uclip pull`."""
    from .transfer import pack_bundle

    packed = pack_bundle(_bundle_path(bundle), out)
    typer.echo(f"packed {packed['files']} files into {packed['archive']} ({packed['bytes'] / 1e6:.1f} MB)")


@bundle_app.command("info", cls=HelpCommand, short_help="Show what a bundle is: sources, sizes, heads, origin.")
def bundle_info(
    bundle: Optional[Path] = BundleOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """What a bundle is: sources, dims, preprocessing, quantisation, heads (trained when, on what), size, origin."""
    from .transfer import bundle_info as read_info, format_info

    info = read_info(_bundle_path(bundle))
    typer.echo(json.dumps(info, indent=2, ensure_ascii=False) if as_json else format_info(info))


INTERRUPTED = 130


def main() -> None:
    # Standalone mode: typer itself prints usage errors (exit 2) and turns Ctrl-C into exit 130.
    try:
        app(args=_with_query_shortcut(sys.argv[1:]), prog_name="uclip")   # also as `python -m uclip_cli.cli`
    except UclipError as e:
        _log(f"uclip: error: {e}")
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, KeyboardInterrupt) or e.code == INTERRUPTED:
            _log("uclip: interrupted (everything committed so far is kept; run the command again to resume)")
            sys.exit(INTERRUPTED)
        raise


def _with_query_shortcut(args: list[str]) -> list[str]:
    """rclip's habit: `uclip "cat"` (a first word that is no command) searches, as `uclip query "cat"`.

    A word close to a command name ("indx") stays a mistyped command, which typer reports with the
    commands it knows: a typo must not become a search."""
    if not args or args[0].startswith("-"):
        return args
    import difflib

    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    names += [g.name for g in app.registered_groups]
    if args[0] in names or difflib.get_close_matches(args[0], names, n=1, cutoff=0.75):
        return args
    return ["query", *args]


def entry() -> None:
    """The console script: `main`, then exit without tearing the interpreter down.

    Everything a command writes is committed and closed before `main` returns; unloading numpy,
    onnxruntime and typer's modules at exit only costs a cold query about 0.13 s.
    """
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:    # `uclip query ... | head`
        pass
    os._exit(code)


if __name__ == "__main__":
    main()
