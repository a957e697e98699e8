"""Where uclip keeps things: bundle, index and cache locations (XDG, overridable)."""
from __future__ import annotations

import os
from pathlib import Path

BUNDLE_ENV = "UCLIP_BUNDLE"
INDEX_ENV = "UCLIP_INDEX"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "uclip"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "uclip"


def default_bundle() -> Path:
    """--bundle, else $UCLIP_BUNDLE, else ~/.local/share/uclip/bundle."""
    value = os.environ.get(BUNDLE_ENV)
    return Path(value).expanduser() if value else data_dir() / "bundle"


def default_index() -> Path:
    """--index, else $UCLIP_INDEX, else ~/.local/share/uclip/index."""
    value = os.environ.get(INDEX_ENV)
    return Path(value).expanduser() if value else data_dir() / "index"
