"""Running the `uclip` command line in tests, and reading what it left behind.

- `run_uclip`: the real thing, `python -m uclip_cli.cli ...` in a subprocess (exit codes, tracebacks,
  stdout encoding, sys.modules are those a user gets).
- `invoke_uclip`: the same `main()` in this process with argv, environment and streams swapped;
  about ten times faster, for the many steps of incremental-indexing scenarios.
Both take the environment from `uclip_env`, which points every user directory into the test's tmp folder.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

ERROR_PREFIX = "uclip: error: "


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    def ok(self) -> "CliResult":
        assert self.code == 0, f"exit {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        return self

    def one_line_error(self) -> str:
        """The message of a user error: exit code 2, exactly one stderr line 'uclip: error: ...', no traceback."""
        lines = self.stderr.strip().splitlines()
        assert self.code == 2, f"exit {self.code}, stderr:\n{self.stderr}"
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), f"not a one-line error:\n{self.stderr}"
        assert "Traceback" not in self.stderr + self.stdout
        return lines[0][len(ERROR_PREFIX):]


NO_HUB = "http://127.0.0.1:9"   # a closed port: no test ever reaches the real hub (a stand-in hub sets its own)


def uclip_env(home: Path, *, bundle: Path | None = None, index: Path | None = None) -> dict[str, str]:
    """This process's environment with the user's data and cache folders under `home` (never the real ones)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCLIP_", "XDG_"))}
    env.update(XDG_CACHE_HOME=str(home / "cache"), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
               UCLIP_THREADS="1", HF_ENDPOINT=NO_HUB)
    env.pop("HF_HUB_OFFLINE", None)
    if bundle is not None:
        env["UCLIP_BUNDLE"] = str(bundle)
    if index is not None:
        env["UCLIP_INDEX"] = str(index)
    return env


def run_uclip(args: Sequence[str | os.PathLike], env: dict[str, str], *, cwd: Path | None = None,
              timeout: float = 60, entry_point: bool = False) -> CliResult:
    """`uclip ARGS` in a new interpreter: `python -m uclip_cli.cli`, or the installed `uclip` script."""
    command = [entry_point_script()] if entry_point else [sys.executable, "-m", "uclip_cli.cli"]
    done = subprocess.run([*command, *map(str, args)], env=env, cwd=cwd, capture_output=True, timeout=timeout)
    return CliResult(done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8"))


def entry_point_script() -> str:
    """The `uclip` console script installed next to this interpreter."""
    script = shutil.which("uclip", path=str(Path(sys.executable).parent))
    assert script, f"no `uclip` script next to {sys.executable}: is the project installed (pip install -e .)?"
    return script


def invoke_uclip(args: Sequence[str | os.PathLike], env: dict[str, str]) -> CliResult:
    """`uclip ARGS` through `uclip_cli.cli.main` in this process (give absolute paths: the cwd is not changed)."""
    from uclip_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with environment(env), _argv(["uclip", *map(str, args)]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Run in-process code with `env` as the environment (the user's cache folders under the test's tmp)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------- `uclip index` output

_SUMMARY_FIELDS = {
    "seen": r"indexed (\d+) files",
    "embedded": r"(\d+) embedded",
    "moved": r"(\d+) moved or renamed",
    "reused": r"(\d+) reused",
    "unchanged": r"(\d+) unchanged",
    "skipped": r"(\d+) skipped,",
    "removed": r"(\d+) removed",
    "searchable": r"(\d+) images searchable",
    "skipped_in_all": r"(\d+) files skipped in all",
}


_NOTHING_TO_DO = r"^nothing new to index: (\d+) files up to date$"


def parse_summary(stdout: str) -> dict[str, int]:
    """The counts of `uclip index`'s end summary (a run with nothing to do says only how many files are up to date)."""
    counts = {}
    up_to_date = re.findall(_NOTHING_TO_DO, stdout, flags=re.MULTILINE)
    if up_to_date:
        counts = dict.fromkeys(("embedded", "moved", "reused", "skipped", "removed"), 0)
        counts["seen"] = counts["unchanged"] = int(up_to_date[0])
    for name, pattern in _SUMMARY_FIELDS.items():
        if name in counts:
            continue
        found = re.findall(pattern, stdout)
        assert len(found) == 1, f"summary field {name!r} ({pattern}) not found once in:\n{stdout}"
        counts[name] = int(found[0])
    return counts


def read_report(index_or_file: Path) -> dict[str, str]:
    """A skipped-files report (an index's report.json, or a --report file) as {path: reason}; {} when absent."""
    import json

    path = index_or_file / "report.json" if index_or_file.is_dir() else index_or_file
    if not path.exists():
        return {}
    return {item["path"]: item["reason"] for item in json.loads(path.read_text(encoding="utf-8"))["skipped"]}


# ------------------------------------------------------------------------- the index on disk

def index_records(index: Path) -> dict[str, "object"]:
    """path -> FileRecord of every file the index knows (read-only; no bundle check)."""
    from uclip_cli.index.access import open_index

    with open_index(index) as store:
        return {r.path: r for r in store.catalogue.records()}


def index_vectors(index: Path, kind: str = "vectors") -> dict[str, np.ndarray]:
    """path -> a copy of its stored search vector (or frozen `features`) for every searchable file."""
    from uclip_cli.index.access import open_index

    with open_index(index) as store:
        rows = store.vectors() if kind == "vectors" else store.features()
        return {r.path: np.array(rows[r.row]) for r in store.catalogue.records() if r.status == "ok"}


def relative_to(root: Path, paths: Sequence[str]) -> list[str]:
    """Absolute paths printed by uclip -> paths relative to `root` (posix separators)."""
    root = Path(root).resolve()
    return [Path(p).relative_to(root).as_posix() for p in paths]


def copy_tree(source: Path, destination: Path) -> Path:
    """A private copy of a generated folder (symlinks kept as symlinks, so a loop stays a loop)."""
    shutil.copytree(source, destination, symlinks=True)
    return destination


# ------------------------------------------------------------------------- bundles

def copy_bundle(bundle: Path, destination: Path) -> Path:
    shutil.copytree(bundle, destination)
    return destination


def flip_one_byte(path: Path) -> None:
    """Tamper with a file the way a bad disk or download does: one bit in its middle, size unchanged."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def bundle_with_other_image_encoder(bundle: Path, destination: Path, seed: int = 1) -> Path:
    """A copy of `bundle` whose image encoder has other random weights: to an index, another model.

    (Exporting a second tiny CLIP with another seed gives the same kind of bundle but costs ~20 s;
    re-drawing the exported weights takes well under a second.)
    """
    import onnx
    from onnx import numpy_helper

    from uclip_cli import bundle as B

    copy_bundle(bundle, destination)
    graph_path = destination / B.IMAGE_ENCODER
    model = onnx.load(str(graph_path))
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype == np.float32 and weights.size > 1:
            noisy = weights + 0.05 * rng.standard_normal(weights.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    onnx.save(model, str(graph_path))
    B.update_manifest(destination)
    return destination
