"""Generate: an answer from retrieved evidence, with the prompt laid out so that its prefix repeats.

A prefix KV cache (ours, vLLM's, SGLang's) only helps when consecutive prompts begin with the same
tokens, so the prompt goes from the most stable part to the least:
1. system text (fixed);
2. the namespace's standing memory block: its top level-2/1 nodes (topics, sessions), chosen by
   level and importance and written in a fixed order, so it changes only when the store does;
3. retrieved memories in a stable order (event time, then id; never by score), so two questions that
   retrieve overlapping evidence share the longest run of it; an `EvidenceWindow` can keep evidence
   shown earlier in place (append-only) so the next question re-uses it from the cache;
4. the question.
Plain functions over the retrieval result and Arrow tables: no Prefect, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

SYSTEM_TEXT = (
    "You answer questions about a person's past conversations using only the memories given. "
    "Memories are dated; answer briefly, with names and dates where the memories give them. "
    "If the memories do not say, answer that you do not know."
)
STANDING_BUDGET = 1500  # tokens for the standing block
CountText = Callable[[str], int]  # one text -> its token count


def _date(value: Any) -> str:
    if value is None:
        return ""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return text[:10]


def memory_line(memory: dict[str, Any]) -> str:
    day = _date(memory.get("event_time"))
    text = " ".join(str(memory.get("text") or "").split())
    return f"- [{day}] {text}" if day else f"- {text}"


def stable_key(memory: dict[str, Any]) -> tuple[str, str, str]:
    """Order by when it happened, then by id: independent of the question and of scores."""
    t = memory.get("event_time")
    t = t.isoformat() if hasattr(t, "isoformat") else str(t or "")
    return (t, str(memory.get("session") or ""), str(memory.get("memory_id") or memory.get("id") or ""))


def standing_block(memories: pa.Table, budget: int, count_tokens: CountText) -> str:
    """The namespace's standing memory: its level-2, then level-1 nodes by importance, within `budget`.

    Chosen by level and importance only (not by access count, which every query bumps: the block
    would shift and the cache would miss); written oldest first so that it reads like a history.
    Empty when the namespace has no nodes above level 0.
    """
    cols = set(memories.column_names)
    rows = [r for r in memories.to_pylist() if (r.get("level") or 0) >= 1 and r.get("text")]
    if not rows:
        return ""
    rows.sort(key=lambda r: (-(r["level"] or 0), -(r.get("importance") or 0.0), *stable_key(r)))
    chosen, used = [], 0
    for r in rows:
        n = int(r["tokens"]) if "tokens" in cols and r.get("tokens") else count_tokens(r["text"])
        if used + n > budget:
            continue
        chosen.append(r)
        used += n
    chosen.sort(key=lambda r: (-(r["level"] or 0), *stable_key(r)))
    return "\n".join(memory_line(r) for r in chosen)


@dataclass
class EvidenceWindow:
    """Append-only evidence for one namespace's question stream, reset when full.

    Memories retrieved for earlier questions keep their place, new ones are appended after them, so
    the next prompt starts with everything the last one showed (all cached) and only new evidence
    and the question are computed. Once the window would pass `max_tokens` it starts over from the
    current question's evidence.
    """

    max_tokens: int = 4000
    items: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    resets: int = 0

    def arrange(self, memories: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        shown = {m["memory_id"] for m in self.items}
        new = sorted((m for m in memories if m["memory_id"] not in shown), key=stable_key)
        need = sum(int(m.get("tokens") or 0) for m in new)
        if self.items and self.tokens + need > self.max_tokens:
            self.items, self.tokens, self.resets = [], 0, self.resets + 1
            new = sorted(memories, key=stable_key)
            need = sum(int(m.get("tokens") or 0) for m in new)
        self.items.extend(new)
        self.tokens += need
        return list(self.items)


def build_messages(
    retrieval: dict[str, Any],
    *,
    standing: str = "",
    system: str = SYSTEM_TEXT,
    window: EvidenceWindow | None = None,
) -> list[dict[str, str]]:
    """Chat messages for a retrieval result, stable parts first (see the module docstring)."""
    question = str(retrieval.get("question") or "").strip()
    if not question:
        raise ValueError("the retrieval result has no question")
    memories = list(retrieval.get("memories") or [])
    evidence = window.arrange(memories) if window is not None else sorted(memories, key=stable_key)
    sys_text = system
    if standing:
        sys_text += "\n\nWhat you know about this person overall:\n" + standing
    lines = "\n".join(memory_line(m) for m in evidence) or "(no memories found)"
    user = f"Memories:\n{lines}\n\nQuestion: {question}\nAnswer:"
    return [{"role": "system", "content": sys_text}, {"role": "user", "content": user}]


def answer_question(
    generator: Any,
    retrieval: dict[str, Any],
    *,
    standing: str = "",
    system: str = SYSTEM_TEXT,
    window: EvidenceWindow | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    on_text: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The generate stage: `{"answer", "usage": {prompt_tokens, cached_tokens, ttft_ms, total_ms, tokens_per_s}}`."""
    messages = build_messages(retrieval, standing=standing, system=system, window=window)
    result = generator.generate(messages, max_tokens=max_tokens, temperature=temperature, on_text=on_text)
    return {"answer": result.text.strip(), "usage": result.usage(), "engine": getattr(generator, "name", "")}
