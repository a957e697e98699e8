"""ONNX export of the frozen encoders into a uclip bundle (needs torch + transformers: the `train` extra).

Importing this package stays light (no torch); `export_bundle` loads the heavy modules on first use.
"""
from __future__ import annotations

from uclip_cli.errors import UclipError


class ExportError(UclipError):
    """An export that cannot proceed; the one-line message says which checkpoint or file and why."""


def __getattr__(name: str):
    if name == "export_bundle":
        from .build import export_bundle

        return export_bundle
    raise AttributeError(name)


__all__ = ["ExportError", "export_bundle"]
