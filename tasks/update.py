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
from collections.abc import Callable, Sequence
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


class _Supersessions:
    """The rows an update run changes and their ops: one `walk` per (speaker, relation)."""

    def __init__(
        self, namespace: str, flow_run_id: str | None, seq_of: Callable[[dict[str, Any]], int]
    ) -> None:
        self.namespace, self.flow_run_id, self.seq_of = namespace, flow_run_id, seq_of
        self.at = now_utc()
        self.rows: dict[str, dict[str, Any]] = {}
        self.ops: list[dict[str, Any]] = []
        self.candidates = self.rejected = 0

    def walk(self, speaker: str, relation: str, stated: list[tuple[dict[str, Any], str]]) -> None:
        """Statements oldest first: one that changes the object of the current ones supersedes them."""
        holders: list[tuple[dict[str, Any], str]] = []  # current statements of the same object
        for m, obj in sorted(stated, key=self._order):
            changed_from = [(h, o) for h, o in holders if not _same(o, obj)]
            if not changed_from:
                holders.append((m, obj))
                continue
            self.candidates += 1
            sims = [_cosine(h["embedding"], m["embedding"]) for h, _ in changed_from]
            if max(sims) < MIN_SIMILARITY:
                self.rejected += 1
                holders.append((m, obj))
                continue
            self._supersede(f"{speaker} {relation}", m, obj, changed_from, sims)
            holders = [(m, obj)] + [(h, o) for h, o in holders if _same(o, obj)]

    def _order(self, stated: tuple[dict[str, Any], str]) -> tuple[Any, ...]:
        m = stated[0]  # when it was said; then its session and its place in it
        return (m["event_time"] or self.at, m["session"] or "", self.seq_of(m), m["id"])

    def _op(self, memory_id: str, action: str, before: Any, after: Any, reason: str) -> None:
        at = self.at + timedelta(microseconds=len(self.ops))  # op ids hash `at`: one per op
        self.ops.append(
            make_op(
                namespace=self.namespace,
                memory_id=memory_id,
                stage="update",
                action=action,
                before=before,
                after=after,
                reason=reason,
                flow_run_id=self.flow_run_id,
                at=at,
            )
        )

    def _supersede(
        self,
        fact: str,
        m: dict[str, Any],
        obj: str,
        changed_from: list[tuple[dict[str, Any], str]],
        sims: list[float],
    ) -> None:
        rows, at = self.rows, self.at
        newer = rows.get(m["id"], m)
        version = max(rows.get(h["id"], h)["version"] or 1 for h, _ in changed_from) + 1
        new_row = {**newer, "version": version, "updated_at": at}
        when = m["event_time"] or at
        for (h, old_obj), sim in zip(changed_from, sims, strict=True):
            old = rows.get(h["id"], h)
            if old["valid_to"] is not None and old["valid_to"] <= when:
                # already superseded through another of its facts in this run: the earlier end stands
                old_row = {**old, "updated_at": at}
            else:
                old_row = {**old, "valid_to": when, "superseded_by": m["id"], "updated_at": at}
            rows[h["id"]] = old_row
            reason = (
                f"{fact}: {old_obj!r} -> {obj!r}, stated by {m['id']} on {when:%Y-%m-%d} "
                f"(cosine {sim:.2f}); valid_to set, superseded_by {m['id']}"
            )
            self._op(h["id"], "supersede", old, old_row, reason)
        supersedes = ", ".join(h["id"] for h, _ in changed_from)
        self._op(m["id"], "version", newer, new_row, f"{fact} is now {obj!r}; supersedes {supersedes}")
        rows[m["id"]] = new_row


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
            for relation, obj in extract_facts(source(m)[0]):
                facts.setdefault((m["speaker"] or "", relation), []).append((m, obj))
        plan = _Supersessions(namespace, flow_run_id, seq_of=lambda m: source(m)[1])
        for (speaker, relation), stated in sorted(facts.items()):
            plan.walk(speaker, relation, stated)
        if plan.rows:
            with store.writer() as w:
                w.insert("memories", memories_table(list(plan.rows.values())), replace=True)
                w.insert("ops", ops_table(plan.ops))
        result.changed = len(plan.rows)
        result.figures = {
            "facts_found": sum(len(v) for v in facts.values()),
            "candidates": plan.candidates,
            "rejected_low_similarity": plan.rejected,
            "superseded": sum(1 for o in plan.ops if o["action"] == "supersede"),
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
