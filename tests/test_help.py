"""Every command's `--help` as a user reads it: golden files, and the rules that keep it readable.

tests/golden/help/<command>.txt holds `uclip --help`, `uclip index --help`, `uclip eval retrieval --help`
(eval-retrieval.txt), ... exactly as printed on an 80-column-wide help page without colour (COLUMNS=100,
TERM=dumb, NO_COLOR=1: click caps help at 78 columns). A new command without a golden file fails, and so
does a golden file whose command is gone. After a deliberate change to the help, regenerate them with
    UCLIP_UPDATE_GOLDEN=1 python -m pytest tests/test_help.py
which rewrites the files that differ and fails for each one it rewrote (review `git diff tests/golden/help`,
then run again without the variable: it passes).

Beyond the golden text, the rules that the golden files alone would not keep: no Python type in the help
(`<list[str]>`, `<int range>`, a required argument as `{query}`), and each command's one-line description
in its group's listing is a whole sentence (click cuts a long docstring at "(e.g." or with "...").
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import typer

from cli_helpers import invoke_uclip, uclip_env
from uclip_cli.cli import app

GOLDEN = Path(__file__).resolve().parent / "golden" / "help"
UPDATE_GOLDEN = os.environ.get("UCLIP_UPDATE_GOLDEN") == "1"
PLAIN_TERMINAL = {"COLUMNS": "100", "LINES": "50", "TERM": "dumb", "NO_COLOR": "1"}
TYPE_NAME = re.compile(r"<(?:list\[|int|float|str|path|bool|file|directory|choice)[^<>]*>|\{[a-z_]+\}")


def _commands() -> dict[tuple[str, ...], Any]:
    """Every command and group of `uclip`, by its words after `uclip` (() is `uclip` itself)."""
    found: dict[tuple[str, ...], Any] = {}

    def walk(words: tuple[str, ...], command: Any) -> None:
        found[words] = command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk((*words, name), sub)

    walk((), typer.main.get_command(app))
    return found


COMMANDS = _commands()


def _golden_name(words: tuple[str, ...]) -> str:
    return ("-".join(words) or "uclip") + ".txt"


def _help(words: tuple[str, ...], tmp_path: Path) -> str:
    return invoke_uclip([*words, "--help"], {**uclip_env(tmp_path), **PLAIN_TERMINAL}).ok().stdout


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=lambda w: " ".join(("uclip", *w)))
def test_help_matches_its_golden_file(words, tmp_path):
    shown, golden = _help(words, tmp_path), GOLDEN / _golden_name(words)
    if UPDATE_GOLDEN and (not golden.is_file() or golden.read_text(encoding="utf-8") != shown):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(shown, encoding="utf-8")
        pytest.fail(f"rewrote {golden}: review `git diff {GOLDEN}`, then run again without UCLIP_UPDATE_GOLDEN")
    assert golden.is_file(), f"{golden} is missing: run UCLIP_UPDATE_GOLDEN=1 python -m pytest tests/test_help.py"
    assert shown == golden.read_text(encoding="utf-8"), (
        f"`uclip {' '.join(words)} --help` changed; if on purpose: UCLIP_UPDATE_GOLDEN=1 python -m pytest tests/test_help.py")


def test_every_golden_file_has_its_command():
    expected = {_golden_name(words) for words in COMMANDS}
    assert sorted(p.name for p in GOLDEN.glob("*.txt") if p.name not in expected) == []


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=lambda w: " ".join(("uclip", *w)))
def test_help_names_no_python_types(words, tmp_path):
    shown = _help(words, tmp_path)
    assert [line for line in shown.splitlines() if TYPE_NAME.search(line)] == []
    assert shown.startswith(f"Usage: {' '.join(('uclip', *words))} ")


@pytest.mark.parametrize("words", sorted(w for w in COMMANDS if w), ids=lambda w: " ".join(("uclip", *w)))
def test_every_command_is_listed_with_a_whole_sentence(words, tmp_path):
    command = COMMANDS[words]
    summary = command.get_short_help_str(limit=45)      # the narrowest listing click makes
    assert summary and command.help, f"uclip {' '.join(words)} has no description"
    assert summary.endswith((".", ")")) and not summary.endswith("..."), summary
    assert not summary.endswith(("e.g.", "i.e.", "etc.")) and summary.count("(") == summary.count(")"), summary
    listing = " ".join(_help(words[:-1], tmp_path).split())
    assert f"{words[-1]} {summary}" in listing


def test_train_help_puts_what_a_photo_user_needs_first_and_the_papers_switches_last(tmp_path):
    sections = [line[:-1] for line in _help(("train",), tmp_path).splitlines() if line and not line[0].isspace()
                and line.endswith(":") and not line.startswith("Usage")]
    assert sections[0] == "Languages and texts" and sections[1] == "Where" and sections[2] == "How long"
    assert sections[-2].startswith("Method (the paper's ablation switches") and sections[-1] == "Options"
    method = _help(("train",), tmp_path).split(sections[-2] + ":")[1]
    for switch in ("--no-text-loss", "--no-noise", "--paper", "--init"):
        assert switch in method
