"""The speakers a question names, found by looking its words up in a table made once per namespace.

A namespace of many people holds thousands of names (its speakers' own, and the names the turns call
them by: `tasks.names`). Testing each name against each question cost 130 us a question for 2,400
names, three times a question (`bench/device_parts.py`'s host steps). Here a name made of word
characters and single spaces is found by looking up the question's runs of up to `words` consecutive
words (a run is the question's own text between its first and last word, so "mel  smith" with two
spaces is no "mel smith", as the regex `\\bmel smith\\b` would not find it either). The few names with
other characters keep the substring-and-regex test. `tests/tasks/test_name_lookup.py` checks both
give what the regex over every name gives.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"\w+")
_WORDS = re.compile(r"\w+(?: \w+)*")


@dataclass(frozen=True)
class NameTable:
    """Lower-cased names -> speaker codes (a speaker's own name over an alias), split by how found."""

    codes: dict[str, int]  # every name
    by_words: dict[str, int]  # names of word characters and single spaces
    words: int  # most words in one of those
    others: tuple[tuple[str, int], ...]  # the rest: substring, then regex
    names_of: dict[int, tuple[str, ...]]  # speaker code -> its names


def table(ns: Any, with_aliases: bool) -> NameTable:
    """The namespace's table, made on first use and kept on `ns` while its names are the same."""
    aliases = getattr(ns, "aliases", {}) if with_aliases else {}
    key = (id(aliases), len(aliases), id(ns.speakers), len(ns.speakers), with_aliases)
    cached = getattr(ns, "_name_table", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    codes = {**aliases, **ns.speakers}
    by_words = {name: code for name, code in codes.items() if _WORDS.fullmatch(name)}
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, code in codes.items():
        names_of[code].append(name)
    made = NameTable(
        codes=codes,
        by_words=by_words,
        words=max((name.count(" ") + 1 for name in by_words), default=0),
        others=tuple((name, code) for name, code in codes.items() if name not in by_words),
        names_of={code: tuple(names) for code, names in names_of.items()},
    )
    with contextlib.suppress(AttributeError):  # an object that takes no attributes: made again next time
        ns._name_table = (key, made)
    return made


def named(names: NameTable, lowered: str) -> set[int]:
    """Codes of the speakers whose name occurs in `lowered` (a lower-cased question) as a whole word
    or words: what `re.search(rf"\\b{re.escape(name)}\\b", lowered)` finds over every name."""
    found: set[int] = set()
    spans = [m.span() for m in _TOKEN.finditer(lowered)] if names.by_words else []
    for i, (start, _) in enumerate(spans):
        for _, end in spans[i : i + names.words]:
            code = names.by_words.get(lowered[start:end])
            if code is not None:
                found.add(code)
    for name, code in names.others:
        if name in lowered and re.search(rf"\b{re.escape(name)}\b", lowered):
            found.add(code)
    return found
