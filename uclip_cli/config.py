"""Where uclip keeps things: bundle, index and cache locations (XDG, overridable).

Precedence for the bundle and the index: the command-line option, then $UCLIP_BUNDLE / $UCLIP_INDEX,
then `bundle = "..."` / `index = "..."` in ~/.config/uclip/config.toml, then ~/.local/share/uclip/.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UclipError

BUNDLE_ENV = "UCLIP_BUNDLE"
INDEX_ENV = "UCLIP_INDEX"
CONFIG_KEYS = ("bundle", "index")


class ConfigError(UclipError):
    """An unreadable config file; the message names it."""


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "uclip"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "uclip"


def config_file() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "uclip" / "config.toml"


def read_config() -> dict[str, str]:
    """The settings of config.toml ({} when there is none)."""
    path = config_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}): fix or remove it") from None
    import tomllib

    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML ({e}): fix or remove it") from None
    unknown = sorted(set(values) - set(CONFIG_KEYS))
    if unknown or not all(isinstance(values[k], str) for k in values):
        raise ConfigError(f"{path}: only string settings {', '.join(CONFIG_KEYS)} are known (found {', '.join(sorted(values))})")
    return values


def _default(key: str, env: str) -> Path:
    value = os.environ.get(env) or read_config().get(key)
    return Path(value).expanduser() if value else data_dir() / key


def default_bundle() -> Path:
    """--bundle, else $UCLIP_BUNDLE, else config.toml's `bundle`, else ~/.local/share/uclip/bundle."""
    return _default("bundle", BUNDLE_ENV)


def default_index() -> Path:
    """--index, else $UCLIP_INDEX, else config.toml's `index`, else ~/.local/share/uclip/index."""
    return _default("index", INDEX_ENV)
