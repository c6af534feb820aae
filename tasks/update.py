"""Update: a newer memory that states a changed fact about the same subject supersedes the older one.

Detection is deliberately narrow (precision over recall): a fact is a first-person statement of one of
a few relations — where the speaker lives, where / as what they work, who their partner is, how many
of something they have — read from the original event text (compression rewrites pronouns). Two
current level-0 memories of the same speaker with the same relation and different objects, the newer
one embedding-similar enough to the older, are a change: the older gets `valid_to` = the newer's
event time and `superseded_by`; the newer gets version = older + 1. Nothing is deleted, and
`memories_as_of` answers what was current at any date.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
from memstage.stores import queries
from memstage.stores.store import MemoryStore, now_utc
from memstage.tasks.contract import StageResult, make_op, memories_table, ops_table, timed
from memstage.tasks.index import Embed, embed_missing

MIN_SIMILARITY = 0.3  # cosine between the two memories; the relation match is the main signal
_CAP = r"[A-Z][\w&'-]*(?:\s(?:[A-Z][\w&'-]*|of|de|the))*"
_NUM = r"\d+|one|two|three|four|five|six|seven|eight|nine|ten"
_ROLE = r"[a-z]+(?:\s(?!is\b|and\b|at\b|for\b|in\b|but\b|now\b|was\b|with\b)[a-z]+)?"
_PARTNER = r"boyfriend|girlfriend|partner|husband|wife|fianc[eé]e?"
RELATIONS: dict[str, list[re.Pattern[str]]] = {
    "lives in": [
        re.compile(
            rf"\b(?:I|[Ww]e)\s+(?:just\s+|recently\s+|finally\s+)?(?:moved|relocated)\s+(?:to|into)\s+(?P<obj>{_CAP})"
        ),
        re.compile(rf"\b(?:I|[Ww]e)\s+(?:now\s+|still\s+)?live\s+in\s+(?P<obj>{_CAP})"),
        re.compile(rf"\b(?:I'm|I am|[Ww]e're|[Ww]e are)\s+(?:now\s+)?living\s+in\s+(?P<obj>{_CAP})"),
    ],
    "works at": [
        re.compile(rf"\bI\s+(?:now\s+|just\s+)?(?:work|started working)\s+(?:at|for)\s+(?P<obj>{_CAP})"),
        re.compile(rf"\bI(?:'m| am)\s+(?:now\s+)?working\s+(?:at|for)\s+(?P<obj>{_CAP})"),
        re.compile(rf"\b[Mm]y\s+(?:new\s+)?job\s+(?:at|with)\s+(?P<obj>{_CAP})"),
        re.compile(
            rf"\bI\s+(?:got|landed|started|accepted)\s+(?:a\s+|my\s+)?(?:new\s+)?job\s+(?:at|with)\s+(?P<obj>{_CAP})"
        ),
    ],
    "works as": [
        re.compile(rf"\bI\s+(?:now\s+)?work\s+as\s+an?\s+(?P<obj>{_ROLE})\b"),
        re.compile(rf"\b[Mm]y\s+new\s+job\s+as\s+an?\s+(?P<obj>{_ROLE})\b"),
    ],
    "partner": [
        re.compile(
            rf"\b[Mm]y\s+(?:new\s+)?(?:{_PARTNER}),?\s+(?:is\s+)?(?:named\s+|called\s+)?(?P<obj>[A-Z][a-z]+)\b"
        ),
        re.compile(
            r"\bI(?:'m| am)\s+(?:now\s+)?(?:dating|seeing|engaged to|married to)\s+(?P<obj>[A-Z][a-z]+)\b"
        ),
        re.compile(r"\bI\s+(?:married|started dating|got engaged to)\s+(?P<obj>[A-Z][a-z]+)\b"),
    ],
    "has count of": [
        re.compile(
            rf"\b(?:I|[Ww]e)\s+(?:now\s+)?(?:have|own)\s+(?P<obj>{_NUM})\s+(?!more\b|other\b|extra\b|new\b)(?:[a-z]+\s)?(?P<noun>[a-z]+s)\b"
        ),
    ],
}
_NEGATION = re.compile(
    r"\b(?:not|never|no longer|if|would|might|maybe|wish|hope|want|wanna|plan|planning|lost|quit|left|fired|former|ex)\b|n't\b",
    re.I,
)
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
_WORDNUM = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}


def extract_facts(text: str) -> list[tuple[str, str]]:
    """(relation, object) pairs of first-person statements in `text`; questions and hedged or negated
    sentences state nothing."""
    facts = []
    for sentence in _SENTENCE.findall(text):
        if sentence.rstrip().endswith("?"):
            continue
        for relation, patterns in RELATIONS.items():
            for pat in patterns:
                m = pat.search(sentence)
                if m is None or _NEGATION.search(sentence[: m.start()] + m.group(0)):
                    continue
                obj = m.group("obj").strip().rstrip(".,;:!").lower()
                obj = re.sub(r"^the\s+", "", obj)
                if relation == "has count of":
                    facts.append((f"has count of {m.group('noun')}", _WORDNUM.get(obj, obj)))
                else:
                    facts.append((relation, obj))
                break
    return facts


def _same(a: str, b: str) -> bool:
    return a == b or a.startswith(b + " ") or b.startswith(a + " ")


def run_update(
    store: MemoryStore, namespace: str, *, embed: Embed, flow_run_id: str | None = None
) -> StageResult:
    """Find changed facts among the current level-0 memories and record the supersessions."""
    result = StageResult("update", namespace)
    with timed(result):
        embed_missing(store, namespace, embed)
        mem = store.memories(namespace, level=0, status="active", current=True).to_pylist()
        events = queries.event_sources(store, namespace)

        def source(m: dict[str, Any]) -> tuple[str, int]:
            evs = [events[e] for e in (m["event_ids"] or []) if e in events]
            return (evs[0]["text"], evs[0]["seq"] or 0) if evs else (m["text"], 0)

        facts: dict[tuple[str, str], list[tuple[dict[str, Any], str]]] = {}
        for m in mem:
            text, _ = source(m)
            for relation, obj in extract_facts(text):
                facts.setdefault((m["speaker"] or "", relation), []).append((m, obj))
        at = now_utc()
        rows: dict[str, dict[str, Any]] = {}
        ops: list[dict[str, Any]] = []
        candidates = rejected = 0
        order = lambda mo: (mo[0]["event_time"] or at, mo[0]["session"] or "", source(mo[0])[1], mo[0]["id"])  # noqa: E731
        for (speaker, relation), stated in sorted(facts.items()):
            stated.sort(key=order)
            holders: list[tuple[dict[str, Any], str]] = []  # current statements of the same object
            for m, obj in stated:
                changed_from = [(h, o) for h, o in holders if not _same(o, obj)]
                if not changed_from:
                    holders.append((m, obj))
                    continue
                candidates += 1
                newer = rows.get(m["id"], m)
                sims = [_cosine(h["embedding"], m["embedding"]) for h, _ in changed_from]
                if max(sims) < MIN_SIMILARITY:
                    rejected += 1
                    holders.append((m, obj))
                    continue
                version = max(rows.get(h["id"], h)["version"] or 1 for h, _ in changed_from) + 1
                new_row = {**newer, "version": version, "updated_at": at}
                for (h, old_obj), sim in zip(changed_from, sims, strict=True):
                    old = rows.get(h["id"], h)
                    when = m["event_time"] or at
                    if old["valid_to"] is not None and old["valid_to"] <= when:
                        # already superseded through another of its facts in this run: the earlier end stands
                        old_row = {**old, "updated_at": at}
                    else:
                        old_row = {**old, "valid_to": when, "superseded_by": m["id"], "updated_at": at}
                    rows[h["id"]] = old_row
                    reason = (
                        f"{speaker} {relation}: {old_obj!r} -> {obj!r}, stated by {m['id']} on {when:%Y-%m-%d} "
                        f"(cosine {sim:.2f}); valid_to set, superseded_by {m['id']}"
                    )
                    ops.append(
                        make_op(
                            namespace=namespace,
                            memory_id=h["id"],
                            stage="update",
                            action="supersede",
                            before=old,
                            after=old_row,
                            reason=reason,
                            flow_run_id=flow_run_id,
                            at=at + timedelta(microseconds=len(ops)),  # op ids hash `at`: one per op
                        )
                    )
                ops.append(
                    make_op(
                        namespace=namespace,
                        memory_id=m["id"],
                        stage="update",
                        action="version",
                        before=newer,
                        after=new_row,
                        reason=f"{speaker} {relation} is now {obj!r}; supersedes {', '.join(h['id'] for h, _ in changed_from)}",
                        flow_run_id=flow_run_id,
                        at=at + timedelta(microseconds=len(ops)),
                    )
                )
                rows[m["id"]] = new_row
                holders = [(m, obj)] + [(h, o) for h, o in holders if _same(o, obj)]
        if rows:
            with store.writer() as w:
                w.insert("memories", memories_table(list(rows.values())), replace=True)
                w.insert("ops", ops_table(ops))
        result.changed = len(rows)
        result.figures = {
            "facts_found": sum(len(v) for v in facts.values()),
            "candidates": candidates,
            "rejected_low_similarity": rejected,
            "superseded": sum(1 for o in ops if o["action"] == "supersede"),
        }
    return result


def _cosine(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    if a is None or b is None:
        return 0.0
    x, y = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-9))


def memories_as_of(
    store: MemoryStore, namespace: str, when: datetime, *, level: int | None = None
) -> pa.Table:
    """The memories that were current at `when`: known by then, and not yet superseded."""
    return queries.memories_as_of(store, namespace, when, level=level)
