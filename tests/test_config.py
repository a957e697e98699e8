"""Where the bundle and the index are found: option > environment > config.toml > default."""
from __future__ import annotations

from pathlib import Path

import pytest

from uclip_cli import config


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    for var in ("UCLIP_BUNDLE", "UCLIP_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path


def test_defaults_live_in_the_data_dir(home):
    assert config.default_bundle() == home / "data" / "uclip" / "bundle"
    assert config.default_index() == home / "data" / "uclip" / "index"


def test_config_file_then_environment_take_precedence(home, monkeypatch):
    config.config_file().parent.mkdir(parents=True)
    config.config_file().write_text('bundle = "~/models/uclip"\nindex = "/srv/photos-index"\n', encoding="utf-8")
    assert config.default_bundle() == Path.home() / "models" / "uclip"
    assert config.default_index() == Path("/srv/photos-index")
    monkeypatch.setenv("UCLIP_BUNDLE", str(home / "env-bundle"))
    assert config.default_bundle() == home / "env-bundle"


@pytest.mark.parametrize("text", ['bundle = "unclosed', 'bundel = "/x"', "index = 3"])
def test_bad_config_file_is_a_one_line_error_naming_it(home, text):
    config.config_file().parent.mkdir(parents=True)
    config.config_file().write_text(text, encoding="utf-8")
    with pytest.raises(config.ConfigError) as raised:
        config.default_index()
    assert str(config.config_file()) in str(raised.value) and "\n" not in str(raised.value)
