"""Optional extras: import what a command needs, or say in one line which pip command installs it.

    torch = require("torch", extra="train", purpose="`uclip export`")

raises MissingExtra ("`uclip export` needs the `train` extra (torch is not installed): pip install
'uclip-cli[train]'") instead of a 40-line ModuleNotFoundError traceback. The command is the exact
one for this installation: from PyPI `pip install 'uclip-cli[EXTRA]'`; from a clone (there is no
release yet) pip records the folder it installed from (PEP 610 direct_url.json), and the command
names that folder, with -e for an editable install. Every command that needs an extra (export,
train, heif, and later serve, ann, ray) goes through `require`, so the advice lives in one place.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
from importlib import metadata
from types import ModuleType
from urllib.parse import unquote, urlparse

from .errors import UclipError

DISTRIBUTION = "uclip-cli"   # the name on PyPI; the command stays `uclip`, the package `uclip_cli`

# What a CPU-only machine should install before the `train` extra: an unpinned torch from PyPI is a
# multi-GB CUDA build on Linux.
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"

# The modules each extra installs that uclip imports (pyproject.toml lists the distributions).
EXTRA_MODULES = {
    "cpu": ("onnxruntime",),
    "train": ("torch", "transformers", "safetensors", "onnx"),
    "heif": ("pillow_heif",),
    "hub": ("huggingface_hub",),
    "ray": ("ray", "pyarrow"),
    "serve": ("starlette", "uvicorn"),
    "ann": ("faiss",),
}

NOTES = {
    "train": f"for a CPU-only torch, first: {CPU_TORCH}",
    "cpu": "or [gpu] on an NVIDIA machine, never both",
    "gpu": "or [cpu] without an NVIDIA GPU, never both",
    "ann": "faiss-cpu; faiss-gpu-cu12 instead where CUDA is",
}


class MissingExtra(UclipError):
    """A command needs an optional extra that is not installed; the message holds the pip command."""


def _install_origin() -> tuple[str, bool] | None:
    """(folder, editable) when this distribution was installed from a local folder, else None (an index)."""
    for dist in metadata.distributions(name=DISTRIBUTION):
        try:
            raw = dist.read_text("direct_url.json")
        except OSError:
            raw = None
        if not raw:
            continue   # an egg-info in the working directory shadows the installed metadata: look further
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        url = urlparse(record.get("url", ""))
        if url.scheme != "file" or "dir_info" not in record:
            return None
        return unquote(url.path), bool(record["dir_info"].get("editable"))
    return None


def install_command(extra: str) -> str:
    """The pip command that adds `extra` to this installation of uclip."""
    origin = _install_origin()
    if origin is not None:
        folder, editable = origin
        return f"pip install {'-e ' if editable else ''}{shlex.quote(f'{folder}[{extra}]')}"
    return f"pip install {shlex.quote(f'{DISTRIBUTION}[{extra}]')}"


def missing_extra_message(extra: str, purpose: str, module: str) -> str:
    note = NOTES.get(extra)
    return (f"{purpose} needs the `{extra}` extra ({module} is not installed): {install_command(extra)}"
            + (f" ({note})" if note else ""))


def require_extra(extra: str, *, purpose: str) -> None:
    """Check (without importing) that every module of `extra` is installed; else MissingExtra."""
    for module in EXTRA_MODULES[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(missing_extra_message(extra, purpose, module))


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingExtra naming the extra and the exact pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or module).split(".")[0]
        if missing != module.split(".")[0] and e.name is not None:
            raise   # the module is there but one of its own imports is broken: not a missing extra
        raise MissingExtra(missing_extra_message(extra, purpose, missing)) from None
