"""The `uclip` command line: parses arguments, calls the library, prints.  No logic lives here."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UclipError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search your own photos in any language (uCLIP on ONNX Runtime).")
eval_app = typer.Typer(no_args_is_help=True, help="Recall@K retrieval and zero-shot classification benchmarks.")
app.add_typer(eval_app, name="eval")

BundleOpt = typer.Option(None, "--bundle", "-b", help="Model bundle directory [default: $UCLIP_BUNDLE or ~/.local/share/uclip/bundle].")
IndexOpt = typer.Option(None, "--index", "-i", help="Index directory [default: $UCLIP_INDEX or ~/.local/share/uclip/index].")
DeviceOpt = typer.Option("auto", "--device", help="auto (TensorRT > CUDA > CPU, whichever really loads) | cpu | cuda | tensorrt.")
ThreadsOpt = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads [default: all cores, or $UCLIP_THREADS].")


def _bundle_path(bundle: Optional[Path]) -> Path:
    from .config import default_bundle

    return bundle if bundle is not None else default_bundle()


def _index_path(index: Optional[Path]) -> Path:
    from .config import default_index

    return index if index is not None else default_index()


def _sessions(device: str, threads: Optional[int]):
    from .sessions import SessionFactory

    return SessionFactory(device=device, threads=threads, log=lambda m: typer.echo(m, err=True))


@app.command()
def index(
    folders: List[Path] = typer.Argument(..., help="Folders to index (one index can hold several)."),
    index: Optional[Path] = IndexOpt,
    bundle: Optional[Path] = BundleOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    exclude: List[str] = typer.Option([], "--exclude", "-x", help="Glob of paths to skip (repeatable), e.g. '*/raw/*'."),
    hidden: bool = typer.Option(False, "--hidden", help="Also index hidden files and folders."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder batch."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Decoding threads [default: cores]."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write skipped files and reasons as JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Embed the images under FOLDERS (incremental: new, changed, moved and deleted files)."""
    from .bundle import load_bundle
    from .indexer import IndexOptions, run_index

    b = load_bundle(_bundle_path(bundle), only=None)
    summary = run_index(
        [Path(f) for f in folders], _index_path(index), b, _sessions(device, threads),
        IndexOptions(exclude=list(exclude), include_hidden=hidden, batch_size=batch_size, workers=workers,
                     progress=progress, report_path=report),
        log=lambda m: typer.echo(m, err=True),
    )
    typer.echo(summary.format())
    if summary.report_path:
        typer.echo(f"skipped files listed in {summary.report_path}")


@app.command()
def query(
    query: str = typer.Argument(..., help="Text in any language, or the path of an image ('more like this')."),
    top: int = typer.Option(10, "--top", "-n", min=1, help="How many results."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop results scoring below this cosine."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | paths | json"),
    folder: Optional[Path] = typer.Option(None, "--in", help="Only results under this indexed folder."),
    text: bool = typer.Option(False, "--text", help="Treat QUERY as text even if a file of that name exists."),
    index: Optional[Path] = IndexOpt,
    bundle: Optional[Path] = BundleOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Search the index by text (any language) or by example image."""
    from .query import format_results, run_query

    if fmt not in ("table", "paths", "json"):
        raise typer.BadParameter(f"--format {fmt!r}: use table, paths or json", param_hint="--format")
    result = run_query(query, index_path=_index_path(index), bundle_path=_bundle_path(bundle),
                       sessions=_sessions(device, threads), top=top, min_score=min_score, folder=folder, force_text=text)
    for note in result.notes:
        typer.echo(note, err=True)
    typer.echo(format_results(result, fmt))


@app.command()
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
    raise typer.Exit(0 if report.ok and not report.warnings else 1)


def main() -> None:
    import click

    try:
        code = app(standalone_mode=False)
    except UclipError as e:
        typer.echo(f"uclip: error: {e}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        typer.echo("uclip: interrupted (everything committed so far is kept; run the command again to resume)", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
