"""Query terms: one query string -> weighted text, image and id terms (rclip-style arithmetic).

One parser for `uclip query` and for `uclip serve`'s API, so that a query means the same thing in
both. The grammar, with examples:

    mačka na kauču                  one text term (any language)
    "beach" - "people"              beach, minus people
    beach - people                  the same: a lone + or - between spaces is an operator
    2:"sunset" + ./photo.jpg        sunset counted twice, plus an example photo
    ./racing.jpg - 2:sports + snow  an image, minus twice "sports", plus "snow"
    id:4f0c...e1 + night            an indexed photo by its id (as results carry it), plus "night"
    "Prague - old town"             quotes make one term: the dash is text here

- A term is one or more words or "quoted strings"; the words of a term are joined by single spaces.
  Inside quotes, \\" is a quote and \\\\ a backslash. `+` and `-` standing alone are operators; a
  hyphen inside a word ("rock-n-roll") is text.
- `W:` glued to the start of a term weighs it (W a positive number: 2, 0.5, .5). A term that
  should start with digits and a colon ("10:30 meeting") is quoted: "10:30 meeting".
- A one-word term is an image *path* when it starts with /, ./, ../ or ~/, or ends in an image file
  extension (photo.jpg): a path that is not an image is an error (say --text to search the words), never
  silently searched as text. Over HTTP paths are refused: photos are named by id there.
- `id:HEX` names an indexed photo by its content id (the 32 hex digits results carry).
- Filters are words too, anywhere in the query, unquoted: `after:2019-06 before:2019-09 camera:pixel
  camera:"pixel 7" near:45.81,15.98 within:20km has:gps is:portrait is:landscape tag:kočka` (filters.py reads their
  values); `split_filters` takes them out before the terms are read. Quoted, "after:2019" is text.

The query's vector is the weighted sum of the terms' unit vectors, normalised again (`combine`); a
single term with weight 1 is its own vector, so its scores are the usual cosines. Combined queries
rank by cosine to the combined direction (the ranking equals that of the un-normalised sum, which is
what rclip ranks by).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from .errors import UclipError
from .walk import is_image_name

TEXT, IMAGE, ID = "text", "image", "id"
MAX_QUERY_CHARS = 2000        # a query longer than this is refused (the text towers read ~77-512 tokens anyway)
MAX_TERMS = 16
MAX_WEIGHT = 1000.0
ID_PREFIX = "id:"
_ID_RE = re.compile(r"[0-9a-f]{32}")
_WEIGHT_RE = re.compile(r"(?P<weight>\d+(?:\.\d*)?|\.\d+):(?=.)", re.S)
_PATH_PREFIXES = ("/", "./", "../", "~/", "file://")


class QueryTermsError(UclipError):
    """A query string that cannot be read as terms; the message says where and what to do."""


@dataclass(frozen=True)
class Term:
    weight: float   # signed: negative for a subtracted term
    kind: str       # TEXT | IMAGE (a path, CLI only) | ID (an indexed photo's content id)
    value: str      # the text, the path as typed, or the 32 hex digits of the id

    def to_dict(self) -> dict:
        return {"weight": self.weight, "kind": self.kind, "value": self.value}

    def __str__(self) -> str:
        body = ID_PREFIX + self.value if self.kind == ID else _quoted(self.value)
        weight = abs(self.weight)
        return body if weight == 1 else f"{weight:g}:{body}"


@dataclass(frozen=True)
class QueryTerms:
    terms: tuple[Term, ...]

    @property
    def kind(self) -> str:
        """"text" or "image" for one term of weight 1 (an id counts as an image), else "combined"."""
        if len(self.terms) == 1 and self.terms[0].weight == 1:
            return TEXT if self.terms[0].kind == TEXT else IMAGE
        return "combined"

    @property
    def texts(self) -> list[Term]:
        return [t for t in self.terms if t.kind == TEXT]

    def has(self, kind: str) -> bool:
        return any(t.kind == kind for t in self.terms)

    def to_list(self) -> list[dict]:
        return [t.to_dict() for t in self.terms]

    def __str__(self) -> str:
        parts = []
        for i, term in enumerate(self.terms):
            sign = "-" if term.weight < 0 else "+"
            parts.append(str(term) if i == 0 and sign == "+" else f"{sign} {term}")
        return " ".join(parts)


def parse_terms(query: str, *, force_text: bool = False, allow_paths: bool = True) -> QueryTerms:
    """Read a query string as terms (grammar in the module docstring); QueryTermsError if it cannot be.

    `force_text`: the whole string is one text term, no operators, quotes or paths (`uclip query --text`).
    `allow_paths`: False over HTTP, where image paths are refused and photos are named by id.
    """
    if len(query) > MAX_QUERY_CHARS:
        raise QueryTermsError(f"the query is {len(query)} characters long: keep it under {MAX_QUERY_CHARS}")
    if "\x00" in query:
        raise QueryTermsError("the query contains a NUL character: remove it")
    if not query.strip():
        raise QueryTermsError("the query is empty: give text in any language, or the path of an image")
    if force_text:
        return QueryTerms((Term(1.0, TEXT, " ".join(query.split())),))
    terms = _terms(query, allow_paths)
    if len(terms) > MAX_TERMS:
        raise QueryTermsError(f"the query has {len(terms)} terms: use at most {MAX_TERMS}")
    if all(t.weight < 0 for t in terms):
        raise QueryTermsError("the query only subtracts: add a term to search for, e.g. \"beach\" - \"people\"")
    return QueryTerms(tuple(terms))


def split_filters(query: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The query without its filter words, and those words as filters.read_filters takes them
    ((key, value, the word as written)); a word is a filter when it starts unquoted with a filter key."""
    from .filters import TEXT_FLAGS, TEXT_KEYS

    if len(query) > MAX_QUERY_CHARS or ":" not in query:
        return query, []          # too long: parse_terms refuses it with the reason; no colon: no filter word
    found: list[tuple[str, str, str]] = []
    rest = query
    for word in reversed(_words(query)):
        key, colon, value = word.text.partition(":")
        start = word.at - 1
        if query[start] == '"' or not colon:
            continue
        flag = TEXT_FLAGS.get(word.text.lower())
        if flag is not None:
            found.append((*flag, word.text))
        elif key.lower() in TEXT_KEYS:
            found.append((TEXT_KEYS[key.lower()], value, word.text))
        else:
            continue
        rest = rest[:start] + " " * (word.end - start) + rest[word.end:]
    return rest, found[::-1]


# ------------------------------------------------------------------------------------------ lexing

@dataclass(frozen=True)
class _Word:
    """A run of characters without unquoted space; quoted segments lose their quotes ("a b"c -> a bc)."""

    text: str
    weight_text: str | None   # "2" of a leading unquoted `2:` with something after it
    rest: str                 # the text after that weight prefix (= text without one)
    operator: bool            # exactly an unquoted + or -
    at: int                   # column, 1-based, for messages
    end: int = 0              # index just past the word in the query


def _words(query: str) -> list[_Word]:
    words: list[_Word] = []
    i, n = 0, len(query)
    while i < n:
        if query[i].isspace():
            i += 1
            continue
        start = i
        parts: list[str] = []
        quoted = False
        while i < n and not query[i].isspace():
            if query[i] == '"':
                segment, i = _quoted_segment(query, i)
                parts.append(segment)
                quoted = True
            else:
                j = i
                while j < n and not query[j].isspace() and query[j] != '"':
                    j += 1
                parts.append(query[i:j])
                i = j
        text = "".join(parts)
        weight_text, rest = None, text
        if query[start] != '"':        # a weight prefix is unquoted: "2:x" is text
            match = _WEIGHT_RE.match(parts[0] + ("\x00" if len(parts) > 1 else ""))
            if match:
                weight_text, rest = match.group("weight"), text[match.end():]
        words.append(_Word(text, weight_text, rest, not quoted and text in ("+", "-"), start + 1, i))
    return words


def _quoted_segment(query: str, start: int) -> tuple[str, int]:
    out, i = [], start + 1
    while i < len(query):
        c = query[i]
        if c == "\\" and i + 1 < len(query) and query[i + 1] in '"\\':
            out.append(query[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise QueryTermsError(f"the quote at column {start + 1} is never closed: close it with \", "
                          "or write \\\" for a quote inside quotes")


# ------------------------------------------------------------------------------------------ parsing

def _terms(query: str, allow_paths: bool) -> list[Term]:
    groups: list[tuple[float, list[_Word]]] = []
    sign, pending = 1.0, None          # pending: the operator word waiting for its term
    group: list[_Word] = []
    for word in _words(query):
        if word.operator:
            if pending is not None and not group:
                raise QueryTermsError(f"'{pending.text}' at column {pending.at} is followed by '{word.text}' "
                                      f"at column {word.at}: put a term between them")
            if group:
                groups.append((sign, group))
            group, pending, sign = [], word, (1.0 if word.text == "+" else -1.0)
            continue
        group.append(word)
    if pending is not None and not group:
        raise QueryTermsError(f"the query ends with '{pending.text}': add a term after it")
    if group:
        groups.append((sign, group))
    weighted = len(groups) > 1     # one term alone needs no weight: "10:30 meeting" stays text
    return [_term(words, sign, allow_paths, weighted) for sign, words in groups]


def _term(words: list[_Word], sign: float, allow_paths: bool, weighted: bool) -> Term:
    first = words[0]
    weight = 1.0
    texts = [w.text for w in words]
    if weighted and first.weight_text is not None:
        weight = float(first.weight_text)
        if not (0 < weight <= MAX_WEIGHT and math.isfinite(weight)):
            raise QueryTermsError(f"the weight {first.weight_text}: at column {first.at}: give a number above 0 "
                                  f"and at most {MAX_WEIGHT:g}")
        texts[0] = first.rest
    if len(words) == 1:
        text = texts[0]
        if text.startswith(ID_PREFIX):
            content_id = text[len(ID_PREFIX):].lower()
            if not _ID_RE.fullmatch(content_id):
                raise QueryTermsError(f"{text!r} at column {first.at} is not a photo id: ids are 32 hex digits "
                                      "(as results carry them)")
            return Term(sign * weight, ID, content_id)
        if looks_like_path(text):
            if not allow_paths:
                raise QueryTermsError(f"{text!r} at column {first.at} looks like a file path: here photos are named "
                                      "by id (id:... as results carry it), never by path")
            return Term(sign * weight, IMAGE, text)
    text = " ".join(" ".join(texts).split())
    if not text:
        raise QueryTermsError(f"the term at column {first.at} is empty: remove the empty quotes")
    return Term(sign * weight, TEXT, text)


def looks_like_path(word: str) -> bool:
    """A one-word term that names a file: /, ./, ../, ~/ or file:// first, or an image extension last.

    "AC/DC", "St.", "rock-n-roll" and "10:30" stay text; "beach.jpg" and "./beach" are paths.
    """
    if word.startswith(_PATH_PREFIXES) or word in (".", "..", "~"):
        return True
    return is_image_name(PurePosixPath(word).name)


# ------------------------------------------------------------------------------------------ vectors

def combine(vectors: np.ndarray, weights: list[float] | np.ndarray) -> np.ndarray:
    """The query vector of terms: the weighted sum of their unit vectors [n, d], normalised (float32 [d]).

    One term of weight 1 returns its own vector unchanged. Terms that cancel out (a - a) are an error.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float64)
    if len(vectors) == 1 and weights[0] == 1.0:
        return vectors[0]
    total = (weights[:, None] * vectors.astype(np.float64)).sum(axis=0)
    norm = float(np.linalg.norm(total))
    if not math.isfinite(norm) or norm < 1e-6 * float(np.abs(weights).sum()):
        raise QueryTermsError("the query's terms cancel each other out: change a weight or drop a term")
    return (total / norm).astype(np.float32)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
