"""How `uclip ... --help` reads: plain text, in sections, in the words a user types.

typer writes help in two ways. With Rich it draws boxed panels (an option's `rich_help_panel`) but reads
"[/CONFIG]" or "[default]" in a help string as markup; uclip's help is plain text (`rich_markup_mode=None`),
and there typer ignores the panels and names each value by its Python type (`<list[str]>`, `<int range>`,
a required argument as `{query}`). `HelpCommand` keeps plain text and typer's own grouping:

- each option's `rich_help_panel` is a section of its own, in the order the command declares them (an
  option without one is under "Options"), so a long command shows what a photo user needs first;
- a value is named by what is typed (PATH, N, NUMBER, TEXT, or the choices), an argument by its name in
  capitals, as in the usage line; a range is said in words ("at least 1", "from -1.0 to 1.0").

Every command is made with `cls=HelpCommand`; tests/test_help.py keeps each command's help as a golden file
and checks these rules on all of them.
"""
from __future__ import annotations

import re

import typer

# what a value is called in help, by typer's type label
VALUE_NAMES = {"int": "N", "int range": "N", "float": "NUMBER", "float range": "NUMBER", "path": "PATH",
               "file": "PATH", "directory": "PATH", "str": "TEXT"}
TYPE_LABEL = re.compile(r"<([^<>]*)>")


def value_name(label: str) -> str:
    """The metavar for typer's type label ('list[str]' -> 'TEXT', 'int range' -> 'N', 'a|b' -> 'a|b')."""
    inner = label[5:-1] if label.startswith("list[") and label.endswith("]") else label
    return VALUE_NAMES.get(inner, inner.upper() if "|" not in inner else inner)


def range_as_typed(low, high) -> str | None:
    """How click and typer write a closed range in help ('x>=1', '0<=x<=65535')."""
    if low is None and high is None:
        return None
    return f"x<={high}" if low is None else f"x>={low}" if high is None else f"{low}<=x<={high}"


def range_in_words(low, high) -> str:
    if high is None:
        return f"at least {low}"
    if low is None:
        return f"at most {high}"
    return f"from {low} to {high}"


class HelpCommand(typer.core.TyperCommand):
    """A typer command whose plain-text help has sections (rich_help_panel) and no Python type names."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = self._argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                section, name = "Arguments", self._argument_name(param)
            else:
                section = getattr(param, "rich_help_panel", None) or "Options"
                name = TYPE_LABEL.sub(lambda m: value_name(m.group(1)), record[0])
            sections.setdefault(section, []).append((name, self._plain_extras(param, record[1])))
        for section, rows in sections.items():
            with formatter.section(section):
                formatter.write_dl(rows)

    @staticmethod
    def _argument_name(param) -> str:
        name = (param.metavar or param.name or "").upper()
        return f"{name}..." if param.nargs != 1 else name

    @staticmethod
    def _plain_extras(param, text: str) -> str:
        low, high = getattr(param, "min", None), getattr(param, "max", None)
        if low is None and high is None:     # typer before 0.20 keeps the range on click's type
            kind = getattr(param, "type", None)
            low, high = getattr(kind, "min", None), getattr(kind, "max", None)
        typed = range_as_typed(low, high)
        return text.replace(typed, range_in_words(low, high)) if typed else text
