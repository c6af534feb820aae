"""A sound pre-check for the injection detector's regexes: the literal strings a match cannot do without.

Why: the detector's patterns (tasks.injection) try long word alternations at every position of a
text, about 700 us per LoCoMo turn on the 2-core dev machine (of which 320 us re-scan the text's
rot13 reading). Every memory passes through it on ingest and index, so at the GPU host's 50k turns/s
it would need ~35 cores. Almost every text is clean, and a clean text usually contains none of the
literal strings some alternative of a pattern requires.

`alternatives(pattern)` walks the compiled pattern's parse tree: for each top-level alternative, the
sets of strings a match of it needs one of each (case-folded as the regex engine folds; neighbouring
literal pieces joined, "(hi|hey) (ai|bot)" needs one of "hi ai", "hey bot", ...), or None when some
alternative needs no literal at all. `Finder` finds every needed string in a text in one
Aho-Corasick pass, and `Gate.may_match(found)` is then a necessary condition: False proves the
pattern cannot match, so the exact search is skipped. It never changes a result;
tests/tasks/test_injection_gate.py checks that on LoCoMo, the attack suite and generated texts.
The parse tree comes from `re._parser`, the standard library's own parser (private, stable since
Python 3.11); if it ever fails, the gate answers "may match" for everything.
"""

from __future__ import annotations

import _sre
import re
from dataclasses import dataclass
from functools import cache

import ahocorasick

try:  # Python >= 3.11
    from re import _parser as P
except ImportError:  # pragma: no cover - older interpreters run without the gate
    P = None

_NEUTRAL = {"AT", "ASSERT", "ASSERT_NOT"}  # zero-width: add nothing, require nothing


@cache
def _fold_table() -> dict[int, int]:
    """Each character to one representative of the characters IGNORECASE matches it with: the regex
    engine's own lower-casing (not str.lower: "İ" lowers to two characters there, to "i" here) joined
    with its extra cases (re._casefix: "ı" with "i", "ſ" with "s", ...). Built once, on first use."""
    try:
        from re._casefix import _EXTRA_CASES as extra
    except ImportError:  # pragma: no cover
        extra = {}
    low = _sre.unicode_tolower
    rep: dict[int, int] = {}  # lower-case character -> its class's smallest member
    changed = True
    while changed:  # extra cases chain (three Greek iotas): merge to a fixed point
        changed = False
        for c, others in extra.items():
            group = {low(x) for x in (c, *others)}
            r = min(rep.get(g, g) for g in group)
            for g in group:
                if rep.get(g, g) != r:
                    rep[g], changed = r, True
    table = {}
    for c in range(0x20000):
        r = rep.get(low(c), low(c))
        if r != c:
            table[c] = r
    return table


def fold(text: str) -> str:
    """`text` with every character replaced by its IGNORECASE class's representative."""
    return text.translate(_fold_table())


_MAX_EXACT = 48  # the most strings an exact piece may expand to (more: slower checks, not more selective)
Need = frozenset[str]  # every match contains one of these strings
Alternative = tuple[Need, ...]  # ... and each of these


def _exact(items) -> frozenset[str] | None:
    """All the strings this sequence can match, when it is a small finite set of literals; else None."""
    out = frozenset([""])
    for op, av in items:
        name = str(op)
        if name == "LITERAL":
            part = frozenset([fold(chr(av))])
        elif name in _NEUTRAL:
            continue
        elif name == "SUBPATTERN":
            part = _exact(av[-1])
        elif name == "BRANCH":
            parts = [_exact(b) for b in av[1]]
            part = None if any(x is None for x in parts) else frozenset().union(*parts)
        elif name == "MAX_REPEAT" and av[0] == 0 and av[1] == 1:
            inner = _exact(av[2])
            part = None if inner is None else inner | {""}
        else:
            part = None
        if part is None or len(out) * len(part) > _MAX_EXACT:
            return None
        out = frozenset(a + b for a in out for b in part)
    return out


def _needs(items) -> list[Need]:
    """Sets of strings each of which every match of this sequence needs one of (a conjunction).
    Neighbouring exact pieces are joined ("(hi|hey) (ai|bot)" needs one of "hi ai", "hey bot", ...)."""
    needs: list[Need] = []
    run: frozenset[str] | None = None  # strings the match holds contiguously up to here
    for item in items:
        name = str(item[0])
        if name in _NEUTRAL:
            continue
        piece = _exact([item])
        if piece is not None and run is not None and len(run) * len(piece) > _MAX_EXACT:
            if "" not in run:
                needs.append(run)
            run = None
        if piece is not None:
            run = piece if run is None else frozenset(a + b for a in run for b in piece)
            continue
        if run is not None and "" not in run:
            needs.append(run)
        run = None
        inner = _inner_needs(item)
        if inner:
            needs.append(inner)
    if run is not None and "" not in run:
        needs.append(run)
    return needs


def _inner_needs(item) -> Need | None:
    """One set of strings that every match of a non-exact item needs one of."""
    op, av = item
    name = str(op)
    if name == "SUBPATTERN":
        return _best(_needs(av[-1]))
    if name == "BRANCH":
        branches = [_best(_needs(b)) for b in av[1]]
        return None if any(b is None for b in branches) else frozenset().union(*branches)
    if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") and av[0] >= 1:
        return _best(_needs(av[2]))
    return None  # IN, ANY, NOT_LITERAL, CATEGORY, GROUPREF ...: no literal to rely on


def _best(needs: list[Need]) -> Need | None:
    """Of several required sets, the most selective (longest shortest string, then fewest strings)."""
    return max(needs, key=lambda s: (min(map(len, s)), -len(s)), default=None)


def alternatives(pattern: re.Pattern[str]) -> tuple[Alternative, ...] | None:
    """The pattern's top-level alternatives, each as the sets of strings a match of it needs (folded);
    None when some alternative needs no literal at all (then every text may match)."""
    if P is None:
        return None
    try:
        tree = P.parse(pattern.pattern, pattern.flags)
        items = [i for i in tree if str(i[0]) not in _NEUTRAL]  # the parser hoists a shared leading \\b
        tops = items[0][1][1] if len(items) == 1 and str(items[0][0]) == "BRANCH" else [tree]
        alts = tuple(tuple(sorted((n for n in _needs(t) if "" not in n), key=len)) for t in tops)
    except Exception:  # noqa: BLE001 - a parser change must not break detection, only its speed
        return None
    return None if any(not a for a in alts) else alts


@dataclass(frozen=True)
class Gate:
    """A necessary condition for one pattern to match: some alternative has every one of its needs
    met by the strings found in the text. `alts` None: every text may match. `keys` joins one need
    of each alternative: a text with none of them is rejected by one set operation."""

    alts: tuple[Alternative, ...] | None
    keys: frozenset[str]

    @classmethod
    def of(cls, pattern: re.Pattern[str]) -> Gate:
        alts = alternatives(pattern)
        return cls(alts, frozenset().union(*(_best(list(alt)) for alt in alts or ())))

    def may_match(self, found: frozenset[str]) -> bool:
        if self.alts is None:
            return True
        if self.keys.isdisjoint(found):
            return False
        return any(all(not need.isdisjoint(found) for need in alt) for alt in self.alts)


class Finder:
    """Every needed string present in a text, found in one pass (an Aho-Corasick automaton,
    pyahocorasick) over the text's `fold`: C speed for ~1,000 strings where a Python loop of
    substring tests cost ~300 us a text."""

    def __init__(self, gates: list[Gate]) -> None:
        self._automaton = ahocorasick.Automaton()
        for gate in gates:
            for alt in gate.alts or ():
                for need in alt:
                    for s in need:
                        self._automaton.add_word(s, s)
        self._empty = len(self._automaton) == 0
        if not self._empty:
            self._automaton.make_automaton()

    def found(self, text: str) -> frozenset[str]:
        if self._empty:
            return frozenset()
        return frozenset(s for _, s in self._automaton.iter(fold(text)))
