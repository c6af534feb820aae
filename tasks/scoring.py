"""Scoring of level-0 memories for one question, over any set of rows closed under sessions.

1. hybrid relevance: cosine to the question's embedding and BM25 (stemmed; the names of the
   speakers the question names are left to the speaker cue, `scored_words`), each z-normalised over the whole level with statistics that are exact without scanning it (the
   dense mean and sd from the embeddings' mean and covariance fixed at index time, the BM25 ones
   from the question words' posting lists), mixed with a fixed weight; both over the text a memory
   is found by (`tasks.index.index_text`: a turn's full original words, while what is packed is the
   memory's text, which the compress stage may have shortened);
2. conversation structure: a turn inherits part of its better neighbour's score (a short reply
   "yes, last week!" lives next to the question it answers; a turn without one, at a session's
   edge, reads NO_NEIGHBOUR; a long turn split into passages counts by its best passage, and its
   other passages are lowered), and every turn of a session gets part of its session's score (mean of
   its SESSION_TOP best turns), so the budget goes to the right sessions;
3. question cues: a boost for turns by the participant the question names (only a speaker of the
   namespace: a name that is no speaker's fires nothing; a first-person question names the speaker
   called FIRST_PERSON, the user of a user/assistant history, when there is one), a large one for
   every turn of the sessions the named participants (one or more) took part in, and one for turns whose event time falls in
   a period the question names ("in October 2023", "on 3 June, 2023"), or, when the question's
   date is known (`as_of`), a period relative to it ("last month", "two weeks ago").
A row's score depends only on its session's rows, so scoring the candidates' whole sessions gives
every candidate the score an exhaustive scan of the namespace gives it (`score_rows(..., all rows)`).
The weights were set on the LoCoMo dev split, in a flat region (neighbouring values change
recall@1000 by < 0.01); choosing them leave-one-conversation-out gave 0.847 recall@1000 on the
held-out conversations against 0.851 in-sample. Fitted instead (`tasks.fusion_fit`, a listwise linear
ranker over these signals, `tasks.fusion`), leave-one-conversation-out, they reach 0.864 on dev, the
same as these constants re-chosen per fold from a grid (0.864), against 0.869 for the constants as
they are, and lower recall@1000 on the `speakers` and `assistant` variants: not kept
(`bench/fusion_cv.py`, `bench/fusion_hand_grid.py`, results in bench/results/fusion_*_cpu.json).
Fitted on dev and every variant pooled, each file one weight (`bench/fusion_weighted.py`), LOCO
recall@1000 minus these constants: dev -0.004, speakers -0.011 (the user/assistant files weighed 3x:
-0.007, -0.010; `speakers` weighed 3x: -0.004, -0.010): not kept either
(bench/results/fusion_weighted_cpu.md, fusion_weighted_speakers_cpu.md).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np

from memstage.gpu.lexical_index import analyse
from memstage.tasks import name_lookup

W_DENSE = 0.7  # share of the dense z-score in the hybrid score (BM25 gets the rest)
NEIGHBOUR = 0.4  # share of the better adjacent turn's score a turn inherits (same session only)
NO_NEIGHBOUR = -3.0  # what a missing neighbour reads (z units; was the namespace's lowest score)
SESSION = 0.5  # weight of the session's score (mean of its SESSION_TOP best turns) on its turns
SESSION_TOP = 3
# A long turn's passages (`tasks.passages`) are one turn: a neighbour inherits the turn's best
# passage's score, not only the adjacent passage's (TURN_NEIGHBOUR), and a turn's passages other than
# its best are lowered by PASSAGE_REST, so the budget goes to one passage per turn before a second
# (robustness suite's `long` variant, recall@1000 loose / strict: 0.745 / 0.713 before; 0.761 with
# TURN_NEIGHBOUR alone; 0.776 / 0.719 with PASSAGE_REST -1; 0.779 / 0.711 with -100, i.e. last)
TURN_NEIGHBOUR = True
PASSAGE_REST = -1.0
SPEAKER = 0.4  # boost for turns by the one participant the question names
# boost for every turn of a session a participant the question names (one or more) took part in: in
# a namespace of many people's conversations it keeps the question on theirs, almost a filter (a turn
# of another session must score 6 z above to come first); within one conversation, where both
# speakers take part in every session, it shifts every turn alike. Planted LoCoMo conversation among
# 100k synthetic memories (bench/scale.py), recall@1000 at 0.5 / 1.5 / 3 / 6: 0.799 / 0.836 /
# 0.852 / 0.876, the conversation alone 0.867 (10k: 0.846 / - / 0.869 / 0.882).
SPEAKER_SESSION = 6.0
# The speaker a first-person question ("what did I ...", "my") asks about, when the namespace has a
# speaker of this name and the question names none: the user of a user/assistant history.
FIRST_PERSON = "user"
# Names the turns call a speaker by (`tasks.names`: "Caroline" for `user`) count as that speaker's, for
# the cue and for the words searched (`tasks.retrieve.search_text`). Recall@1000 on the robustness
# suite's `speakers` variant 0.820 without, 0.836 with the cue alone, 0.869 with the search too.
SPEAKER_NAMES = True
# The words of the speakers a question names are left out of its lexical (BM25) query; the speaker
# cue stands for them. A name's BM25 weight is set by the namespace's population, not the question:
# IDF 0.2 where the name labels half of one conversation's turns, 5.7 where it labels 338 of 100k
# memories, and there it buried the question's other words (bench/scale.py, issue 16).
NAMES_SEARCHED = False
_FIRST_PERSON = re.compile(r"\b(?:i|me|my|mine|myself|i'm|i've|i'd|i'll)\b")
PERIOD = 1.0  # boost for turns whose event time falls in a period the question names
PERIOD_SLACK = (timedelta(days=14), timedelta(days=40))  # an event is talked about soon after it
NO_DAY = np.iinfo(np.int32).min  # event day of a memory without an event time

# ---- periods named in a question -------------------------------------------------------------------

_MONTHS = [m.lower() for m in calendar.month_name[1:]]
_MONTH_RE = "|".join(_MONTHS)
_DATE = re.compile(
    rf"\b(?:(\d{{1,2}})(?:st|nd|rd|th)?\s+)?({_MONTH_RE})(?:\s+(\d{{1,2}})(?:st|nd|rd|th)?)?(?:,?\s+((?:19|20)\d\d))?\b",
    re.I,
)
_YEAR = re.compile(r"\b(?:in|of|during)\s+((?:19|20)\d\d)\b", re.I)


def question_periods(question: str) -> list[tuple[int | None, int | None, int | None]]:
    """(year, month, day) periods a question names; None where it leaves a part open."""
    out: list[tuple[int | None, int | None, int | None]] = []
    for m in _DATE.finditer(question):
        day, month, year = m.group(1) or m.group(3), m.group(2).lower(), m.group(4)
        if month == "may" and not (day or year):
            continue  # most likely the verb
        out.append((int(year) if year else None, _MONTHS.index(month) + 1, int(day) if day else None))
    if not out:
        out = [(int(m.group(1)), None, None) for m in _YEAR.finditer(question)]
    return out


def period_bounds(period: tuple[int | None, int | None, int | None], year: int) -> tuple[date, date] | None:
    y, month, day = period
    y = y or year
    try:
        if month is None:
            return date(y, 1, 1), date(y, 12, 31)
        if day is not None:
            return date(y, month, day), date(y, month, day)
        return date(y, month, 1), date(y, month, calendar.monthrange(y, month)[1])
    except ValueError:
        return None


def in_periods(days: np.ndarray, periods: list[tuple[int | None, int | None, int | None]]) -> np.ndarray:
    """Which event days (datetime64[D], NaT for none) fall in (or shortly after) any of the periods."""
    valid = ~np.isnat(days)
    ints = np.where(valid, days.astype("datetime64[D]").astype(np.int64), NO_DAY)
    return days_in(ints, day_ranges(periods, [], years_of(ints)))


def years_of(days: np.ndarray) -> list[int]:
    """The years of the event days (days since 1970, NO_DAY for none) that occur."""
    found = np.unique(np.asarray(days)[np.asarray(days) != NO_DAY])
    return sorted(
        set((found.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970).tolist())
    )


def day_ranges(
    periods: list[tuple[int | None, int | None, int | None]],
    relative: list[tuple[date, date]],
    years: list[int],
) -> list[tuple[int, int]]:
    """Inclusive event-day bounds (days since 1970, PERIOD_SLACK included) of named periods (a month
    without a year: in each of `years`, the years of the rows scored) and of relative ones."""
    bounds = [
        b
        for p in periods
        for year in ([p[0]] if p[0] else years)
        if (b := period_bounds(p, year)) is not None
    ]
    before, after = PERIOD_SLACK
    epoch = date(1970, 1, 1)
    return [((lo - before - epoch).days, (hi + after - epoch).days) for lo, hi in bounds + relative]


def days_in(days: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Which event days (days since 1970; NO_DAY, below every range, for none) fall in any range."""
    hit = np.zeros(len(days), dtype=bool)
    for lo, hi in ranges:
        hit |= (days >= lo) & (days <= hi)
    return hit


_COUNT = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7}
_COUNT |= {"eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a couple of": 2, "a few": 3}
_RELATIVE = re.compile(
    r"\b(today|yesterday|(?:this|last|past) (?:week|weekend|month|year)"
    rf"|(\d{{1,3}}|{'|'.join(sorted(_COUNT, key=len, reverse=True))}) (day|week|month|year)s? ago)\b",
    re.I,
)


def _month_range(year: int, month: int) -> tuple[date, date]:
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return date(year, month, 1), date(year, month, calendar.monthrange(year, month)[1])


def relative_periods(question: str, today: date | None) -> list[tuple[date, date]]:
    """(first, last) days of the periods a question names relative to the day it is asked."""
    out: list[tuple[date, date]] = []
    if today is None:
        return out
    week = today - timedelta(days=today.weekday())  # Monday of this week
    fixed = {
        "today": (today, today),
        "yesterday": (today - timedelta(days=1),) * 2,
        "this week": (week, today),
        "last week": (week - timedelta(days=7), week - timedelta(days=1)),
        "past week": (today - timedelta(days=7), today),
        "this weekend": (week - timedelta(days=2), today),
        "last weekend": (week - timedelta(days=2), week - timedelta(days=1)),
        "past weekend": (week - timedelta(days=2), week - timedelta(days=1)),
        "this month": (today.replace(day=1), today),
        "last month": _month_range(today.year, today.month - 1),
        "past month": (today - timedelta(days=31), today),
        "this year": (date(today.year, 1, 1), today),
        "last year": (date(today.year - 1, 1, 1), date(today.year - 1, 12, 31)),
        "past year": (today - timedelta(days=366), today),
    }
    for m in _RELATIVE.finditer(question):
        phrase = " ".join(m.group(1).lower().split())
        if phrase in fixed:
            out.append(fixed[phrase])
            continue
        n = int(m.group(2)) if m.group(2).isdigit() else _COUNT[" ".join(m.group(2).lower().split())]
        unit = m.group(3).lower()
        if unit in ("day", "week"):
            back = today - timedelta(days=n * (7 if unit == "week" else 1))
            half = timedelta(days=3 if unit == "week" else 1)
            out.append((back - half, back + half))
        elif unit == "month":
            out.append(_month_range(today.year, today.month - n))
        elif today.year - n >= 1:
            out.append((date(today.year - n, 1, 1), date(today.year - n, 12, 31)))
    return out


# ---- relevance ---------------------------------------------------------------------------------


@dataclass
class LevelQuery:
    """One question against one level: what z-scores any of its rows without scanning the level."""

    qvec: np.ndarray
    dense_mean: float
    dense_sd: float
    lex_rows: np.ndarray  # sorted rows with a BM25 score > 0
    lex_vals: np.ndarray
    lex_mean: float
    lex_sd: float
    has_words: bool  # whether any question word is in the level's vocabulary


def level_query(level: Any, qvec: np.ndarray, qwords: list[str]) -> LevelQuery:
    mean = float(qvec @ level.mean)
    var = float(qvec @ level.cov @ qvec)
    rows, vals, lmean, lsd = level.lexical.sparse_scores(qwords)
    has_words = any(w in level.lexical.vocab for w in qwords)
    return LevelQuery(qvec, mean, float(np.sqrt(max(var, 0.0))), rows, vals, lmean, lsd, has_words)


def _z(x: np.ndarray, mean: float, sd: float) -> np.ndarray:
    return (x - mean) / sd if sd > 1e-6 else np.zeros_like(x)


def hybrid(level: Any, q: LevelQuery, rows: np.ndarray) -> np.ndarray:
    """Hybrid relevance of `rows` (positions in the level), z-normalised over the whole level."""
    # row by row (np.vecdot), not `@`: a matrix-vector product over a few thousand rows is split over
    # OpenBLAS's threads, whose idle spinning then held the core the next question's encoder needed
    # (10k memories: 3k rows 6.6 ms CPU against 0.13; a retrieval's CPU p50 25 -> 12 ms, issue 16)
    cos = np.vecdot(level.vectors(rows), q.qvec)
    dense = _z(cos.astype(np.float64), q.dense_mean, q.dense_sd)
    if not q.has_words:
        return dense
    at = np.searchsorted(q.lex_rows, rows)
    at = np.minimum(at, max(len(q.lex_rows) - 1, 0))
    hit = (q.lex_rows[at] == rows) if len(q.lex_rows) else np.zeros(len(rows), bool)
    lex = np.where(hit, q.lex_vals[at] if len(q.lex_vals) else 0.0, 0.0).astype(np.float64)
    return W_DENSE * dense + (1 - W_DENSE) * _z(lex, q.lex_mean, q.lex_sd)


# ---- structure and cues --------------------------------------------------------------------------


def _neighbour(rows: np.ndarray, links: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Base score of each row's linked neighbour (prev or next), NO_NEIGHBOUR where it has none in `rows`."""
    target = links[rows]
    at = np.minimum(np.searchsorted(rows, target), len(rows) - 1)
    ok = (target >= 0) & (rows[at] == target)
    return np.where(ok, base[at], NO_NEIGHBOUR)


def turn_groups(ns: Any, rows: np.ndarray) -> np.ndarray:
    """A code per row, shared by the passages of one turn (`tasks.passages`: adjacent rows of one
    session with the same neighbour links); a whole turn is a group of its own."""
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    prev, nxt, session = (np.asarray(a[rows]) for a in (ns.prev, ns.next, ns.session))
    same = (
        (np.diff(rows) == 1) & (prev[1:] == prev[:-1]) & (nxt[1:] == nxt[:-1]) & (session[1:] == session[:-1])
    )
    return np.cumsum(np.r_[True, ~same]) - 1


def turn_max(turn: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row, the highest value among its turn's rows."""
    best = np.full(int(turn[-1]) + 1 if len(turn) else 0, -np.inf)
    np.maximum.at(best, turn, values)
    return best[turn]


def session_scores(session: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per row, the mean of its session's SESSION_TOP best scores (among the given rows)."""
    n = len(scores)
    codes, inverse = np.unique(session, return_inverse=True)
    order = np.lexsort((-scores, inverse))
    sess_sorted = inverse[order]
    starts = np.r_[0, np.flatnonzero(sess_sorted[1:] != sess_sorted[:-1]) + 1]
    rank_in = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    top = rank_in < SESSION_TOP
    sums = np.bincount(sess_sorted[top], weights=scores[order][top], minlength=len(codes))
    counts = np.bincount(sess_sorted[top], minlength=len(codes))
    return (sums / np.maximum(counts, 1))[inverse]


def named_speakers(ns: Any, lowered: str) -> set[int]:
    """Codes of the speakers a (lower-cased) question names: by their own name, or by a name the
    turns call them by (`ns.aliases`: "Mel" for Melanie, "Caroline" for `user`), as whole words
    (`tasks.name_lookup`: a table per namespace, not a test per name)."""
    return name_lookup.named(name_lookup.table(ns, SPEAKER_NAMES), lowered)


def named_in(ns: Any, question: str) -> set[int]:
    """Codes of the speakers a question is about: those it names (`named_speakers`), else, for a
    first-person question, the speaker called FIRST_PERSON when the namespace has one."""
    lowered = question.lower()
    named = named_speakers(ns, lowered)
    if not named and FIRST_PERSON in ns.speakers and _FIRST_PERSON.search(lowered):
        named = {ns.speakers[FIRST_PERSON]}
    return named


def scored_words(ns: Any, words: list[str], question: str) -> list[str]:
    """The words level-0 rows are scored by (BM25): the question's `words` (analysed), less the words
    of the speakers it names (their labels and the names the turns call them by), unless
    NAMES_SEARCHED. Candidates are still found with every word (`tasks.candidates`)."""
    named = named_speakers(ns, question.lower())
    if NAMES_SEARCHED or not named:
        return words
    names_of = name_lookup.table(ns, True).names_of
    names = [name for code in sorted(named) for name in names_of.get(code, ())]
    dropped = set(analyse([" ".join(names)])[0])
    return [w for w in words if w not in dropped]


def score_rows(
    ns: Any, rows: np.ndarray, q: LevelQuery, question: str, today: date | None = None
) -> np.ndarray:
    """Scores of level-0 `rows` (sorted, unique), higher is better; `today`: the day the question is
    asked, when known (relative periods resolve against it)."""
    if len(rows) == 0:
        return np.zeros(0)
    base = hybrid(ns.levels[0], q, rows)
    turn = turn_groups(ns, rows)
    whole = turn_max(turn, base) if TURN_NEIGHBOUR else base
    scores = base + NEIGHBOUR * np.maximum(_neighbour(rows, ns.prev, whole), _neighbour(rows, ns.next, whole))
    scores = scores + SESSION * session_scores(np.asarray(ns.session[rows]), scores)
    named = named_in(ns, question)
    if named:
        by_named = np.isin(np.asarray(ns.speaker[rows]), list(named))
        _, inverse = np.unique(np.asarray(ns.session[rows]), return_inverse=True)
        took_part = np.bincount(inverse, weights=by_named)[inverse] > 0
        scores = scores + SPEAKER_SESSION * took_part + (SPEAKER * by_named if len(named) == 1 else 0.0)
    if PASSAGE_REST:
        scores = scores + PASSAGE_REST * (scores < turn_max(turn, scores))
    periods, relative = question_periods(question), relative_periods(question, today)
    if periods or relative:
        days = np.asarray(ns.days[rows])
        scores = scores + PERIOD * days_in(days, day_ranges(periods, relative, years_of(days)))
    return scores
