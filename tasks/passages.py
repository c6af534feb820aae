"""Passages: a long turn's level-0 memory split into windows of whole sentences, each its own memory.

A turn of more than SPLIT_WORDS words (an assistant's answer of hundreds of tokens) would, as one
memory, be packed whole or not at all: one that ranks early eats the budget several short evidence
turns needed, and its embedding dilutes whatever it says among everything else. The compress stage
therefore splits it into passages of whole sentences of about WINDOW_WORDS words (a sentence longer
than that is cut at word boundaries). Passage 1 keeps the turn's memory id (`m0-<event>`); the
others are `m0-<event>#pNN`. Every passage is a level-0 memory of the same turn: same event ids,
session, speaker and time, so it is scored, packed and credited like any level-0 memory (the eval's
rule: a turn is retrieved when one of its level-0 memories, whole or a passage, is packed). Each is
found by its own original words (`metadata.passage.source`), not by the whole turn's.
With SPLIT_MODE "topic" (the default; the compress stage passes its encoder) the windows are cut
where the turn's topic changes (`tasks.topic_split`) rather than every WINDOW_WORDS words, so a
remark set among unrelated text becomes a passage of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from memstage.tasks.contract import Embed, make_op

SPLIT_WORDS = 120  # a turn with more words than this is split into passages
WINDOW_WORDS = 80  # a passage holds whole sentences up to about this many words
MAX_PASSAGES = 99  # ids are numbered with two digits; windows widen to stay under this
# "topic": cut where the sentences' topic changes (tasks.topic_split, each sentence of a long turn
# embedded with the compress stage's encoder; without an encoder, fixed windows); "fixed": windows of
# WINDOW_WORDS. Recall@1000 fixed -> topic (strict credit in brackets), bench/passage_split.py:
# long 0.778 -> 0.816 (0.722 -> 0.769), assistant 0.707 -> 0.781 (0.676 -> 0.751), ontopic 0.693 ->
# 0.739 (0.623 -> 0.651), higher at every budget; fixed windows of the same mean size (45 words):
# long 0.806 (0.723), assistant 0.755 (0.697), ontopic 0.746 (0.646); with no near-duplicate merging
# long 0.776 -> 0.816 (0.726 -> 0.772), so the gain is not the variants' reused filler being merged.
# No turn of the dev split or the other variants is long enough to split (their figures are unchanged).
SPLIT_MODE = "topic"

_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")
_PREFIX = re.compile(r"^(?P<speaker>[^:\n]{1,80}): (?P<body>.*)$", re.S)
_IMAGE = re.compile(r"\s*\[shared an image: (?P<caption>[^\]]*)\]\s*$")


def passage_id(memory_id: str, k: int) -> str:
    """Passage k (0-based) of a turn's memory: the first keeps the memory's id."""
    return memory_id if k == 0 else f"{memory_id}#p{k + 1:02d}"


def turn_of(memory_id: str) -> str:
    """The id of the turn's memory a passage belongs to (a whole turn's own id)."""
    return memory_id.split("#p", 1)[0]


def _pieces(body: str, width: int) -> list[str]:
    """Sentences, a sentence longer than `width` words cut into runs of `width` words."""
    out = []
    for s in (s.strip() for s in _SENTENCE.findall(body)):
        words = s.split()
        out += [" ".join(words[i : i + width]) for i in range(0, len(words), width)] if words else []
    return out


def windows(body: str, width: int | None = None, embed: Embed | None = None) -> list[str]:
    """`body` as consecutive windows of whole sentences of at most about `width` words; one window
    when it has SPLIT_WORDS words or fewer. No word is lost or repeated. With SPLIT_MODE "topic" and
    `embed`, the windows are cut where the topic changes (`tasks.topic_split`)."""
    if len(body.split()) <= SPLIT_WORDS:
        return [body]
    width = width or WINDOW_WORDS
    if SPLIT_MODE == "topic" and embed is not None:
        from memstage.tasks.topic_split import topic_windows

        pieces = _pieces(body, width)
        out = topic_windows(pieces, embed(pieces), width)
        if len(out) <= MAX_PASSAGES:
            return out
    while True:
        out: list[str] = []
        size = 0
        for piece in _pieces(body, width):
            n = len(piece.split())
            if out and size + n <= width:
                out[-1] += " " + piece
                size += n
            else:
                out.append(piece)
                size = n
        if len(out) <= MAX_PASSAGES:
            return out
        width *= 2


def _parts(text: str) -> tuple[str | None, str, str]:
    """(speaker, body, image caption) of a level-0 text `speaker: body [shared an image: ...]`."""
    m = _PREFIX.match(text)
    speaker, body = (m.group("speaker"), m.group("body")) if m else (None, text)
    image = _IMAGE.search(body)
    caption = image.group(0).strip() if image else ""
    return speaker, body[: image.start()] if image else body, caption


def batched(texts: list[str], embed: Embed | None) -> Embed | None:
    """`embed` with every sentence of the long ones among `texts` embedded up front, in one call (the
    encoder sorts a call's texts by length into full batches; a call per turn ran 11x slower than
    fixed windows on the `long` variant's compress); a text not seen then is embedded on demand."""
    if SPLIT_MODE != "topic" or embed is None:
        return embed
    bodies = (_parts(t)[1] for t in texts)
    pieces = list(
        dict.fromkeys(p for b in bodies if len(b.split()) > SPLIT_WORDS for p in _pieces(b, WINDOW_WORDS))
    )
    if not pieces:
        return embed
    table = dict(zip(pieces, embed(pieces), strict=True))

    def looked_up(wanted: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(wanted) if t not in table]
        if missing:
            table.update(zip(missing, embed(missing), strict=True))
        return np.stack([table[t] for t in wanted])

    return looked_up


def split_turn(text: str, embed: Embed | None = None) -> list[tuple[str, str]]:
    """A level-0 text (`speaker: body [shared an image: ...]`) as (passage text, its source words),
    one pair per passage; the image caption goes with the first. A short turn: one pair, unchanged."""
    speaker, body, caption = _parts(text)
    parts = windows(body, embed=embed)
    if len(parts) == 1:
        return [(text, text)]
    out = []
    for k, part in enumerate(parts):
        said = f"{speaker}: {part}" if speaker else part
        out.append((said + (f" {caption}" if k == 0 and caption else ""), part))
    return out


def passage_meta(metadata: str | None, k: int, n: int, source: str) -> dict[str, Any]:
    """A passage's metadata: the turn's, with `passage` = {k (1-based), n, source words}."""
    meta = json.loads(metadata or "{}")
    meta["passage"] = {"k": k + 1, "n": n, "source": source}
    return meta


def passage_source(metadata: str | None) -> dict[str, Any] | None:
    """The `passage` entry of a memory's metadata JSON, or None for a whole turn."""
    if not metadata or '"passage"' not in metadata:
        return None
    p = json.loads(metadata).get("passage")
    return p if isinstance(p, dict) and isinstance(p.get("source"), str) else None


# ---- the compress stage's units -------------------------------------------------------------------


def units_of(todo: list[dict[str, Any]], embed: Embed | None = None) -> list[dict[str, Any]]:
    """What gets compressed: each memory, or each passage of a long turn's memory (`tasks.passages`):
    the memory row with the passage's text, id, metadata and `_split` = its turn's passage count."""
    out = []
    embed = batched([m["text"] for m in todo], embed)
    for m in todo:
        parts = split_turn(m["text"], embed)
        for k, (text, source) in enumerate(parts):
            if len(parts) == 1:
                out.append({**m, "_split": 1})
                continue
            meta = passage_meta(m["metadata"], k, len(parts), source)
            out.append(
                {
                    **m,
                    "id": passage_id(m["id"], k),
                    "text": text,
                    "metadata": json.dumps(meta, sort_keys=True),
                    "_split": len(parts),
                    "_turn": m,
                    "_k": k,
                }  # fmt: skip
            )
    return out


def choose(unit: dict[str, Any], sized: list[tuple[str, int]], whole: int) -> tuple[str, int, int] | None:
    """(text, tokens, tokens before) of a unit: its shortest-preferred compressed candidate; a passage
    is written even when nothing is shorter (its turn's memory changes), a whole memory then is not.
    A passage's `tokens_before`: the whole turn's for the first, 0 for the others (the ratio is the
    passages' tokens over the turn's)."""
    raw, raw_tokens = sized[-1]
    best = next(((c, n) for c, n in sized[:-1] if n < raw_tokens and c != raw), None)
    if unit["_split"] == 1:
        return None if best is None else (*best, whole)
    text, n = best or (raw, raw_tokens)
    return text, n, whole if unit["_k"] == 0 else 0


def passage_op(
    namespace: str,
    turn: dict[str, Any],
    new: dict[str, Any],
    unit: dict[str, Any],
    chosen: tuple[str, int, int],
    whole: int,
    flow_run_id: str | None,
    at: datetime,
) -> dict[str, Any]:
    """The ops row of one written unit: an update of the memory (or of the turn's memory, which
    becomes its first passage), an insert for every further passage."""
    if unit["_split"] == 1:
        action, before, reason = "update", turn, f"compressed {whole} -> {chosen[1]} tokens"
    else:
        k, n = unit["_k"] + 1, unit["_split"]
        action, before = ("update", turn) if k == 1 else ("insert", None)
        reason = f"passage {k}/{n} of a {whole}-token turn, {chosen[1]} tokens"
    return make_op(namespace=namespace, memory_id=new["id"], stage="compress", action=action,
                   before=before, after=new, reason=reason, flow_run_id=flow_run_id, at=at)  # fmt: skip
