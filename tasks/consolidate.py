"""Consolidate: build the memory hierarchy over level-0 memories and merge near-duplicates.

- merge: active level-0 memories of the same speaker whose embeddings have cosine > `dup_threshold`
  collapse into the earliest one (the survivor keeps every source event id); the others are archived
  with `superseded_by` pointing at it.
- level 1: one node per session, or per episode when a session is long or its topic shifts (cosine
  between the windows before and after a turn); text = extractive summary (the most central turns,
  in order) headed by the session, its date and its speakers; level-0 children point at it (`parent`).
- level 2: topic nodes, average-linkage agglomerative clusters of level-1 nodes across sessions.

Ids are content hashes of the namespace and the children, so an unchanged store gives the same nodes
and a rerun changes nothing. All rows and their ops go in one transaction. Sized for 1M memories:
embeddings are read as one matrix, the building blocks (`tasks.hierarchy`) bound their memory, and
a child whose only change is its parent is written by one UPDATE of `parent` (its op row as usual).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memstage.gpu.encoder import model_info
from memstage.stores import queries
from memstage.stores.store import MemoryStore, now_utc
from memstage.tasks.contract import (
    CountTokens,
    Embed,
    StageResult,
    content_hash,
    make_op,
    memories_table,
    new_memory,
    ops_table,
    timed,
)
from memstage.tasks.hierarchy import (
    _norm,
    cluster_topics,
    extractive_summary,
    find_duplicates,
    split_episodes,
)
from memstage.tasks.index import embed_missing, level0_event_id
from memstage.tasks.index_build import embedding_matrix
from memstage.tasks.injection import node_flag

__all__ = ["cluster_topics", "extractive_summary", "find_duplicates", "run_consolidate", "split_episodes"]

DUP_THRESHOLD = 0.95
# Average-linkage cosine distance under which level-1 nodes share a topic. Distances are taken after
# subtracting the namespace's mean node vector: one conversation's sessions all look alike (two
# friends chatting, cosine ~0.8), and centring leaves what tells them apart.
TOPIC_DISTANCE = 0.7
OPS_CHUNK = 20_000  # ops rows held as Python dicts before they become an Arrow chunk (memory at 1M links)


def _date(t: datetime | None) -> str:
    return f"{t.day} {t:%B %Y}" if t else "undated"


def _node(
    namespace: str, level: int, node_id: str, text: str, children: list[dict[str, Any]], at: datetime
) -> dict[str, Any]:
    times = [c["event_time"] for c in children if c["event_time"] is not None]
    sessions = sorted({c["session"] for c in children if c["session"]})
    return new_memory(
        id=node_id,
        namespace=namespace,
        level=level,
        text=text,
        event_ids=sorted({e for c in children for e in (c["event_ids"] or [])}),
        at=at,
        session=sessions[0] if len(sessions) == 1 else None,
        event_time=min(times) if times else None,
        # its own text scanned, and "carried" when a child is flagged: a summary does not launder an injection
        flag=node_flag(text, (c.get("flag") for c in children)),
    )


class _Changes:
    """The rows a consolidate run changes and their ops, in order; `all_mem` always holds the latest row."""

    def __init__(self, namespace: str, all_mem: dict[str, dict[str, Any]], flow_run_id: str | None) -> None:
        self.namespace, self.all_mem, self.flow_run_id = namespace, all_mem, flow_run_id
        self.at = now_utc()
        self.rows: dict[str, dict[str, Any]] = {}
        self.parents: dict[str, str | None] = {}  # rows whose only change is `parent`: one UPDATE
        self.ops: list[dict[str, Any]] = []  # the latest ops; earlier ones in `op_chunks`, in order
        self.op_chunks: list[pa.Table] = []
        self.op_count = 0

    def change(self, new: dict[str, Any], action: str, reason: str) -> None:
        old = self.all_mem.get(new["id"])
        self.rows[new["id"]] = new
        self.op_count += 1
        if len(self.ops) >= OPS_CHUNK:  # a million op dicts would hold ~2 GB; their Arrow form a third
            self.op_chunks.append(ops_table(self.ops))
            self.ops = []
        self.ops.append(
            make_op(
                namespace=self.namespace,
                memory_id=new["id"],
                stage="consolidate",
                action=action,
                before=old,
                after=new,
                reason=reason,
                flow_run_id=self.flow_run_id,
                at=self.at,
            )
        )
        self.all_mem[new["id"]] = new

    def relink(self, cur: dict[str, Any], parent: str | None, reason: str) -> None:
        """A parent change: an op like `change`, the row itself written by an UPDATE of `parent` alone
        (not rewritten whole with its embedding) unless this run changes it otherwise too. `cur` (the
        latest row) is then updated in place: a second dict per child held ~1.2 GB at 1M children."""
        new = {**cur, "parent": parent, "updated_at": self.at}
        whole = new["id"] in self.rows
        self.change(new, "link", reason)
        if not whole:
            del self.rows[new["id"]]
            self.parents[new["id"]] = parent
            cur.update(parent=parent, updated_at=self.at)
            self.all_mem[cur["id"]] = cur

    def commit(self, store: MemoryStore) -> None:
        if self.rows or self.parents:
            with store.writer() as w:
                w.insert("memories", memories_table(list(self.rows.values())), replace=True)
                queries.set_parents(
                    w, self.namespace, list(self.parents), list(self.parents.values()), self.at
                )
                ops = pa.concat_tables([*self.op_chunks, ops_table(self.ops)])
                # op ids hash the op and this run's time, so none is stored yet: a plain INSERT
                # (the anti-join of `insert` held ~3x the ops' bytes at 100k ops) unless two collide
                fresh = len(pc.unique(ops.column("op_id"))) == ops.num_rows
                w.insert("ops", ops, absent=fresh)


Node1 = tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]  # (node, its children, their mean embedding)


def _matrix(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    return _norm(np.asarray([r["embedding"] for r in rows], dtype=np.float32)) if rows else np.zeros((0, 1))


def merge_duplicates(l0: list[dict[str, Any]], changes: _Changes, threshold: float) -> set[str]:
    """Archive near-duplicates of current level-0 memories (history is not merged); the survivor
    absorbs their source events. Returns the archived ids."""
    current = [m for m in l0 if m["valid_to"] is None]
    dups = find_duplicates(current, _matrix(current), threshold)
    mem, at = changes.all_mem, changes.at
    for dup_id, (surv_id, cos) in sorted(dups.items()):
        dup, surv = mem[dup_id], mem[surv_id]
        changes.change(
            {**dup, "status": "archived", "superseded_by": surv_id, "updated_at": at},
            "merge",
            f"near-duplicate of {surv_id} (cosine {cos}, same speaker); source events kept on the survivor",
        )
        ids = sorted(set(surv["event_ids"] or []) | set(dup["event_ids"] or []))
        if ids != sorted(surv["event_ids"] or []):
            changes.change(
                {**surv, "event_ids": ids, "updated_at": at}, "merge", f"absorbed near-duplicate {dup_id}"
            )
    return set(dups)


def session_nodes(namespace: str, l0: list[dict[str, Any]], changes: _Changes) -> list[Node1]:
    """Level 1: one node per session, or per episode of a long or shifting session; extractive text."""
    by_session: dict[str, list[dict[str, Any]]] = {}
    for m in l0:
        by_session.setdefault(m["session"] or "", []).append(changes.all_mem[m["id"]])
    nodes: list[Node1] = []
    for session, members in sorted(by_session.items()):
        emb = _matrix(members)
        spans = split_episodes(emb)
        for part, (lo, hi) in enumerate(spans):
            kids, kemb = members[lo:hi], emb[lo:hi]
            texts = [k["text"] for k in kids]
            speakers = ", ".join(sorted({k["speaker"] for k in kids if k["speaker"]}))
            label = session.replace("_", " ") + (f" part {part + 1}/{len(spans)}" if len(spans) > 1 else "")
            head = f"{label} ({_date(kids[0]['event_time'])}), {speakers}:"
            k = min(len(kids), max(2, math.ceil(len(kids) / 8)))
            body = " ".join(texts[i] for i in extractive_summary(texts, kemb, k))
            node_id = "m1-" + content_hash(namespace, sorted(k["id"] for k in kids))
            nodes.append(
                (_node(namespace, 1, node_id, f"{head} {body}", kids, changes.at), kids, kemb.mean(0))
            )
    return nodes


def topic_nodes(
    namespace: str, level1: list[Node1], distance: float, at: datetime
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Level 2: clusters of level-1 nodes from two sessions or more (what a person comes back to)."""
    if len(level1) < 2:
        return []
    raw = np.asarray([c for _, _, c in level1], dtype=np.float32)
    out = []
    for group in cluster_topics(_norm(raw - raw.mean(0)), distance):
        members = [level1[i] for i in group]
        if len({n["session"] for n, _, _ in members}) < 2:
            continue
        kids = [k for _, ks, _ in members for k in ks]
        kemb = _matrix(kids)
        centre = _norm(_norm(raw[group]).mean(0))
        top = sorted(sorted(range(len(kids)), key=lambda i: (-float(kemb[i] @ centre), i))[:3])
        dates = sorted(n["event_time"] for n, _, _ in members if n["event_time"])
        first, last = _date(dates[0] if dates else None), _date(dates[-1] if dates else None)
        head = f"Topic across {len(members)} sessions ({first} to {last}):"
        node_id = "m2-" + content_hash(namespace, sorted(n["id"] for n, _, _ in members))
        nodes = [n for n, _, _ in members]
        out.append(
            (
                _node(namespace, 2, node_id, head + " " + " ".join(kids[i]["text"] for i in top), nodes, at),
                nodes,
            )
        )
    return out


_KEPT_ON_UPDATE = ("embedding", "tokens", "created_at", "access_count", "last_access", "importance")
_COMPARED = ("text", "parent", "status", "event_ids", "valid_to", "superseded_by", "flag")


def reconcile_nodes(
    nodes: list[dict[str, Any]], changes: _Changes, *, embed: Embed, count_tokens: CountTokens
) -> None:
    """Insert new nodes, update changed ones (re-embedding only new texts), archive unwanted ones."""
    mem = changes.all_mem
    new_texts = [n for n in nodes if (mem.get(n["id"]) or {}).get("text") != n["text"]]
    retexted = {n["id"] for n in new_texts}
    if new_texts:
        texts = [n["text"] for n in new_texts]
        for n, v, t in zip(new_texts, embed(texts), count_tokens(texts), strict=True):
            n["embedding"], n["tokens"] = [float(x) for x in v], t
    for n in nodes:
        old = mem.get(n["id"])
        if old is None:
            changes.change(n, "insert", f"level-{n['level']} node over {len(n['event_ids'])} events")
            continue
        kept = [k for k in _KEPT_ON_UPDATE if not (n["id"] in retexted and k in ("embedding", "tokens"))]
        merged = {**n, **{k: old[k] for k in kept}}
        if any(merged[f] != old[f] for f in _COMPARED):
            changes.change(merged, "update", "children or their text changed")
    wanted = {n["id"] for n in nodes}
    for m in list(mem.values()):
        if m["level"] >= 1 and m["status"] == "active" and m["id"] not in wanted:
            changes.change(
                {**m, "status": "archived", "updated_at": changes.at},
                "archive",
                "its children changed; replaced by a node over the current children",
            )


def link_children(l0: list[dict[str, Any]], level1: list[Node1], changes: _Changes) -> None:
    parent_of = {k["id"]: n["id"] for n, kids, _ in level1 for k in kids}
    for m in l0:
        cur = changes.all_mem[m["id"]]
        if cur["parent"] != parent_of.get(m["id"]):
            changes.relink(cur, parent_of.get(m["id"]), f"child of level-1 node {parent_of.get(m['id'])}")


def _level0_in_order(
    store: MemoryStore, namespace: str, mem: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Active level-0 memories by session, then by the position of their own source event.

    Their own event (a level-0 id is `m0-<event id>`), not the earliest of `event_ids`: a survivor
    of a merge absorbs its duplicates' events, which may sit at an earlier position of another
    session (or another conversation's session of the same name), and ordering by those moved the
    survivor within its session on the next run, so episodes, summaries and links changed again
    (the issue saw 65 rows on a second maintain of 3,000 turns; 56 on the slow test's namespace)."""
    seq = {eid: r["seq"] for eid, r in queries.event_sources(store, namespace).items()}
    l0 = [m for m in mem.values() if m["level"] == 0 and m["status"] == "active"]

    def position(m: dict[str, Any]) -> int:
        own = level0_event_id(m["id"])
        if own in seq:
            return seq[own]
        return min((seq.get(e, 0) for e in m["event_ids"] or []), default=0)

    return sorted(l0, key=lambda m: (m["session"] or "", position(m), m["id"]))


def _load_memories(store: MemoryStore, namespace: str) -> dict[str, dict[str, Any]]:
    """Every memory of the namespace by id; `embedding` a row of one float32 matrix (or None), not a
    Python list of floats (which at 1M memories would take ~15 GB)."""
    table = store.memories(namespace, status=None, current=False)
    has = table.column("embedding").is_valid().to_numpy(zero_copy_only=False)
    dims = model_info().dims
    vectors = np.zeros((table.num_rows, dims), np.float32)
    lo = 0
    for chunk in table.column("embedding").chunks:  # chunk by chunk: no second copy of the whole column
        hi = lo + len(chunk)
        if chunk.null_count < len(chunk):
            vectors[lo:hi][has[lo:hi]] = embedding_matrix(chunk.drop_null(), dims)
        lo = hi
    table = table.drop_columns(["embedding"])
    out: dict[str, dict[str, Any]] = {}
    for lo in range(0, table.num_rows, 100_000):  # Python rows a slice at a time
        for k, row in enumerate(table.slice(lo, 100_000).to_pylist(), start=lo):
            row["embedding"] = vectors[k] if has[k] else None
            out[row["id"]] = row
    return out


def run_consolidate(
    store: MemoryStore,
    namespace: str,
    *,
    embed: Embed,
    count_tokens: CountTokens,
    dup_threshold: float = DUP_THRESHOLD,
    topic_distance: float = TOPIC_DISTANCE,
    flow_run_id: str | None = None,
) -> StageResult:
    """Merge near-duplicates, then (re)build level-1 session/episode nodes and level-2 topic nodes."""
    result = StageResult("consolidate", namespace)
    with timed(result):
        embed_missing(store, namespace, embed)  # level-0 texts changed by compress have null embeddings
        all_mem = _load_memories(store, namespace)
        changes = _Changes(namespace, all_mem, flow_run_id)
        l0 = _level0_in_order(store, namespace, all_mem)
        merged = merge_duplicates(l0, changes, dup_threshold)
        l0 = [m for m in l0 if m["id"] not in merged]
        level1 = session_nodes(namespace, l0, changes)
        level2 = topic_nodes(namespace, level1, topic_distance, changes.at)
        topic_of = {n["id"]: t["id"] for t, ns in level2 for n in ns}
        nodes = [n for n, _, _ in level1] + [t for t, _ in level2]
        for n in nodes:
            n["parent"] = topic_of.get(n["id"])
        reconcile_nodes(nodes, changes, embed=embed, count_tokens=count_tokens)
        link_children(l0, level1, changes)
        changes.commit(store)
        result.changed = len(changes.rows) + len(changes.parents)
        result.figures = {
            "merged_duplicates": len(merged),
            "level1_nodes": len(level1),
            "level2_nodes": len(level2),
            "rows_changed": len(changes.rows) + len(changes.parents),
            "ops": changes.op_count,
        }
    return result
