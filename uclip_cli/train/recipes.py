"""Named training recipes, kept as data (recipes.toml beside this file): text sources, languages, row caps.

A recipe names where the English anchor captions and the foreign-language memory come from; it adds
to whatever --captions / --foreign the command gives, and never names an image memory (that stays the
user's own index, or --images / --image-features). Each recipe says how it was checked: against its
dataset cards only ("card"), end to end on a connected machine ("connected"), or that it reads only the
captions shipped with uclip ("shipped": no network, nothing to check).

Besides recipes.toml, one recipe per language of the shipped XM3600 captions (uclip_cli/captions.py) is
built here, named by its code (`--recipe cs`, `--recipe ja`, ...), and `xm3600` with all 35 of them: the
shipped English captions as anchors, the shipped captions of the language(s) as the foreign memory.
They run offline. The larger public corpora are the recipes.toml ones (`cs-opus`, `cs-fi-hr-hu-ro`, ...).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .data import TrainInputError
from .sources import TextSource, parse_text_source

RECIPES_FILE = Path(__file__).with_name("recipes.toml")
CHECKED = ("card", "connected", "shipped")
SHIPPED_ANCHORS = "en"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    checked: str
    captions: tuple[TextSource, ...]
    foreign: tuple[TextSource, ...]

    @property
    def languages(self) -> list[str]:
        return list(dict.fromkeys(s.label for s in self.foreign))


def _sources(name: str, key: str, entries: object) -> tuple[TextSource, ...]:
    if not isinstance(entries, list) or not entries:
        raise TrainInputError(f"{RECIPES_FILE}: recipe {name!r} needs a non-empty list `{key}`")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise TrainInputError(f"{RECIPES_FILE}: recipe {name!r}: each `{key}` entry needs a `source` string")
        max_rows = entry.get("max_rows")
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise TrainInputError(f"{RECIPES_FILE}: recipe {name!r}: max_rows must be a whole number >= 1")
        source = parse_text_source(entry["source"])
        language = entry.get("language", source.language)
        out.append(TextSource(source.spec, language, source.path, source.hub, max_rows, source.shipped))
    return tuple(out)


def shipped_recipes() -> dict[str, Recipe]:
    """`xm3600` and one recipe per language of the captions that ship with uclip (offline)."""
    from uclip_cli.captions import shipped_languages

    from .sources import SHIPPED_PREFIX

    anchors = (parse_text_source(SHIPPED_PREFIX + SHIPPED_ANCHORS),)
    languages = [code for code in shipped_languages() if code != SHIPPED_ANCHORS]
    recipes = {"xm3600": Recipe("xm3600", f"the XM3600 captions shipped with uclip: English anchors + {len(languages)} "
                                "languages (offline)", "shipped", anchors,
                                tuple(parse_text_source(SHIPPED_PREFIX + code) for code in languages))}
    for code in languages:
        recipes[code] = Recipe(code, f"{code}: the XM3600 captions shipped with uclip (1,800 English, 1,800 {code}; offline)",
                               "shipped", anchors, (parse_text_source(SHIPPED_PREFIX + code),))
    return recipes


def load_recipes(path: Path = RECIPES_FILE) -> dict[str, Recipe]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TrainInputError(f"{path}: cannot read the recipes ({e})") from None
    recipes = shipped_recipes()
    for name, body in data.get("recipes", {}).items():
        if name in recipes:
            raise TrainInputError(f"{path}: recipe {name!r} is the name of a shipped-captions recipe")
        if body.get("checked") not in CHECKED:
            raise TrainInputError(f"{path}: recipe {name!r}: `checked` must be one of {', '.join(CHECKED)}")
        recipes[name] = Recipe(name, str(body.get("description", "")), body["checked"],
                               _sources(name, "captions", body.get("captions")),
                               _sources(name, "foreign", body.get("foreign")))
    return recipes


def get_recipe(name: str, path: Path = RECIPES_FILE) -> Recipe:
    recipes = load_recipes(path)
    if name not in recipes:
        raise TrainInputError(f"--recipe {name!r}: no such recipe (known: {', '.join(sorted(recipes))}; "
                              "`uclip train --list-recipes` describes them)")
    return recipes[name]


def format_recipes(recipes: dict[str, Recipe]) -> str:
    lines = []
    for r in recipes.values():
        checked = {"card": "checked against dataset cards only", "connected": "run on a connected machine",
                   "shipped": "offline: text shipped with uclip"}[r.checked]
        lines.append(f"{r.name:<18} {r.description} [{', '.join(r.languages)}; {checked}]")
    return "\n".join(lines)
