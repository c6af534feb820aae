"""Consolidate: build the memory hierarchy over level-0 memories and merge near-duplicates.

- merge: active level-0 memories of the same speaker whose embeddings have cosine > `dup_threshold`
  collapse into the earliest one (the survivor keeps every source event id); the others are archived
  with `superseded_by` pointing at it.
- level 1: one node per session, or per episode when a session is long or its topic shifts (cosine
  between the windows before and after a turn); text = extractive summary (the most central turns,
  in order) headed by the session, its date and its speakers; level-0 children point at it (`parent`).
- level 2: topic nodes, average-linkage agglomerative clusters of level-1 nodes across sessions.

Ids are content hashes of the namespace and the children, so an unchanged store gives the same nodes
and a rerun changes nothing. All rows and their ops go in one transaction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from memstage.stores import queries
from memstage.stores.store import MemoryStore, now_utc
from memstage.tasks.contract import (
    CountTokens,
    Embed,
    StageResult,
    content_hash,
    make_op,
    memories_table,
    ops_table,
    timed,
)
from memstage.tasks.index import embed_missing
from memstage.tasks.injection import node_flag

DUP_THRESHOLD = 0.95
MAX_EPISODE = 40  # turns; longer sessions are split at their weakest topic boundary
MIN_EPISODE = 8
SHIFT_THRESHOLD = 0.2  # window cosine below this is a topic shift
WINDOW = 4
_WORDS = re.compile(r"[a-z0-9]{4,}")
# Average-linkage cosine distance under which level-1 nodes share a topic. Distances are taken after
# subtracting the namespace's mean node vector: one conversation's sessions all look alike (two
# friends chatting, cosine ~0.8), and centring leaves what tells them apart.
TOPIC_DISTANCE = 0.7


def _norm(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-9)


def find_duplicates(
    mem: list[dict[str, Any]], emb: np.ndarray, threshold: float
) -> dict[str, tuple[str, float]]:
    """{duplicate id: (survivor id, cosine)}: connected components of the pairs above threshold, per
    speaker (scipy's csgraph); the earliest memory of each component survives."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    best = np.zeros(len(mem))
    rows: list[int] = []
    cols: list[int] = []
    by_speaker: dict[str, list[int]] = {}
    for i, m in enumerate(mem):
        by_speaker.setdefault(m["speaker"] or "", []).append(i)
    for idx in (np.asarray(v) for v in by_speaker.values() if len(v) > 1):
        sims = emb[idx] @ emb[idx].T
        a, b = np.nonzero(np.triu(sims, k=1) > threshold)
        rows += idx[a].tolist()
        cols += idx[b].tolist()
        np.maximum.at(best, idx[a], sims[a, b])
        np.maximum.at(best, idx[b], sims[a, b])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(mem), len(mem)))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    out = {}
    key = lambda i: (mem[i]["event_time"] or datetime.min.replace(tzinfo=UTC), mem[i]["id"])  # noqa: E731
    for members in groups.values():
        if len(members) < 2:
            continue
        survivor = min(members, key=key)
        for i in members:
            if i != survivor:
                out[mem[i]["id"]] = (mem[survivor]["id"], round(float(best[i]), 4))
    return out


def split_episodes(emb: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) spans of one session's turns: cut at topic shifts, and anything over MAX_EPISODE at its weakest point."""
    n = len(emb)

    def shift_scores(lo: int, hi: int) -> dict[int, float]:
        out = {}
        for i in range(lo + MIN_EPISODE, hi - MIN_EPISODE + 1):
            a = emb[max(lo, i - WINDOW) : i].mean(0)
            b = emb[i : min(hi, i + WINDOW)].mean(0)
            out[i] = float(_norm(a) @ _norm(b))
        return out

    def split(lo: int, hi: int) -> list[tuple[int, int]]:
        scores = shift_scores(lo, hi)
        if not scores:
            return [(lo, hi)]
        cut = min(scores, key=lambda i: (scores[i], i))
        if scores[cut] < SHIFT_THRESHOLD or hi - lo > MAX_EPISODE:
            return split(lo, cut) + split(cut, hi)
        return [(lo, hi)]

    return split(0, n) if n else []


def extractive_summary(texts: Sequence[str], emb: np.ndarray, k: int) -> list[int]:
    """Positions of the k best texts, in their original order: centrality (cosine to the centroid)
    weighted by how many distinct words a text has, since the most central turns of a chat are
    otherwise its pleasantries."""
    centrality = emb @ _norm(emb.mean(0))
    score = [
        float(centrality[i]) * math.log1p(len(set(_WORDS.findall(t.lower())))) for i, t in enumerate(texts)
    ]
    top = sorted(range(len(texts)), key=lambda i: (-score[i], i))[:k]
    return sorted(top)


def cluster_topics(emb: np.ndarray, distance: float) -> list[list[int]]:
    """Average-linkage agglomerative clusters (cosine distance), deterministic; singletons included."""
    if len(emb) < 2:
        return [[i] for i in range(len(emb))]
    from scipy.cluster.hierarchy import fcluster, linkage

    # scipy's average linkage on cosine distances, cut where a merge would pass `distance`
    labels = fcluster(linkage(emb, method="average", metric="cosine"), t=distance, criterion="distance")
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    return sorted(groups.values())


def _date(t: datetime | None) -> str:
    return f"{t.day} {t:%B %Y}" if t else "undated"


def _node(
    namespace: str, level: int, node_id: str, text: str, children: list[dict[str, Any]], at: datetime
) -> dict[str, Any]:
    times = [c["event_time"] for c in children if c["event_time"] is not None]
    sessions = sorted({c["session"] for c in children if c["session"]})
    return {
        "id": node_id,
        "namespace": namespace,
        "level": level,
        "text": text,
        "tokens": None,
        "embedding": None,
        "parent": None,
        "event_ids": sorted({e for c in children for e in (c["event_ids"] or [])}),
        "session": sessions[0] if len(sessions) == 1 else None,
        "speaker": None,
        "event_time": min(times) if times else None,
        "version": 1,
        "valid_from": min(times) if times else at,
        "valid_to": None,
        "superseded_by": None,
        "importance": 0.5,
        "access_count": 0,
        "last_access": None,
        "status": "active",
        "metadata": None,
        "created_at": at,
        "updated_at": at,
        # its own text scanned, and "carried" when a child is flagged: a summary does not launder an injection
        "flag": node_flag(text, (c.get("flag") for c in children)),
    }


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
        at = now_utc()
        all_mem = {m["id"]: m for m in store.memories(namespace, status=None, current=False).to_pylist()}
        seq = {eid: r["seq"] for eid, r in queries.event_sources(store, namespace).items()}
        l0 = [m for m in all_mem.values() if m["level"] == 0 and m["status"] == "active"]
        l0.sort(
            key=lambda m: (
                m["session"] or "",
                min((seq.get(e, 0) for e in m["event_ids"] or []), default=0),
                m["id"],
            )
        )
        changed: dict[str, dict[str, Any]] = {}
        ops: list[dict[str, Any]] = []

        def change(new: dict[str, Any], action: str, reason: str) -> None:
            old = all_mem.get(new["id"])
            changed[new["id"]] = new
            ops.append(
                make_op(
                    namespace=namespace,
                    memory_id=new["id"],
                    stage="consolidate",
                    action=action,
                    before=old,
                    after=new,
                    reason=reason,
                    flow_run_id=flow_run_id,
                    at=at,
                )
            )
            all_mem[new["id"]] = new

        # --- merge near-duplicates (current level-0 memories only: history is not merged) ---
        current = [m for m in l0 if m["valid_to"] is None]
        emb0 = (
            _norm(np.asarray([m["embedding"] for m in current], dtype=np.float32))
            if current
            else np.zeros((0, 1))
        )
        dups = find_duplicates(current, emb0, dup_threshold)
        for dup_id, (surv_id, cos) in sorted(dups.items()):
            dup = all_mem[dup_id]
            surv = all_mem[surv_id]
            change(
                {**dup, "status": "archived", "superseded_by": surv_id, "updated_at": at},
                "merge",
                f"near-duplicate of {surv_id} (cosine {cos}, same speaker); source events kept on the survivor",
            )
            ids = sorted(set(surv["event_ids"] or []) | set(dup["event_ids"] or []))
            if ids != sorted(surv["event_ids"] or []):
                change(
                    {**surv, "event_ids": ids, "updated_at": at}, "merge", f"absorbed near-duplicate {dup_id}"
                )
        l0 = [m for m in l0 if m["id"] not in dups]

        # --- level 1: sessions / episodes ---
        by_session: dict[str, list[dict[str, Any]]] = {}
        for m in l0:
            by_session.setdefault(m["session"] or "", []).append(all_mem[m["id"]])
        desired1: list[tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]] = []
        for session, members in sorted(by_session.items()):
            emb = _norm(np.asarray([m["embedding"] for m in members], dtype=np.float32))
            spans = split_episodes(emb)
            for part, (lo, hi) in enumerate(spans):
                kids, kemb = members[lo:hi], emb[lo:hi]
                texts = [k["text"] for k in kids]
                speakers = ", ".join(sorted({k["speaker"] for k in kids if k["speaker"]}))
                label = session.replace("_", " ") + (
                    f" part {part + 1}/{len(spans)}" if len(spans) > 1 else ""
                )
                head = f"{label} ({_date(kids[0]['event_time'])}), {speakers}:"
                k = min(len(kids), max(2, math.ceil(len(kids) / 8)))
                body = " ".join(texts[i] for i in extractive_summary(texts, kemb, k))
                node = _node(
                    namespace,
                    1,
                    "m1-" + content_hash(namespace, sorted(k["id"] for k in kids)),
                    f"{head} {body}",
                    kids,
                    at,
                )
                desired1.append((node, kids, kemb.mean(0)))

        # --- level 2: topics across sessions ---
        desired2: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        if len(desired1) >= 2:
            raw = np.asarray([c for _, _, c in desired1], dtype=np.float32)
            cent = _norm(raw - raw.mean(0))
            for group in cluster_topics(cent, topic_distance):
                members = [desired1[i] for i in group]
                if len({n["session"] for n, _, _ in members}) < 2:
                    continue  # a topic is something a person comes back to: two sessions at least
                kids = [k for _, ks, _ in members for k in ks]
                kemb = _norm(np.asarray([k["embedding"] for k in kids], dtype=np.float32))
                centre = _norm(_norm(raw[group]).mean(0))
                top = sorted(sorted(range(len(kids)), key=lambda i: (-float(kemb[i] @ centre), i))[:3])
                dates = sorted(n["event_time"] for n, _, _ in members if n["event_time"])
                head = f"Topic across {len(members)} sessions ({_date(dates[0] if dates else None)} to {_date(dates[-1] if dates else None)}):"
                node = _node(
                    namespace,
                    2,
                    "m2-" + content_hash(namespace, sorted(n["id"] for n, _, _ in members)),
                    head + " " + " ".join(kids[i]["text"] for i in top),
                    [n for n, _, _ in members],
                    at,
                )
                desired2.append((node, [n for n, _, _ in members]))
        topic_of = {n["id"]: t["id"] for t, ns in desired2 for n in ns}

        # --- diff desired nodes against what is stored ---
        nodes = [n for n, _, _ in desired1] + [t for t, _ in desired2]
        for n in nodes:
            n["parent"] = topic_of.get(n["id"])
        new_texts = [n for n in nodes if (all_mem.get(n["id"]) or {}).get("text") != n["text"]]
        retexted = {n["id"] for n in new_texts}
        if new_texts:
            vecs = embed([n["text"] for n in new_texts])
            for n, v, t in zip(new_texts, vecs, count_tokens([n["text"] for n in new_texts]), strict=True):
                n["embedding"], n["tokens"] = [float(x) for x in v], t
        for n in nodes:
            old = all_mem.get(n["id"])
            if old is None:
                change(n, "insert", f"level-{n['level']} node over {len(n['event_ids'])} events")
                continue
            keep = {
                "embedding": old["embedding"],
                "tokens": old["tokens"],
                "created_at": old["created_at"],
                "access_count": old["access_count"],
                "last_access": old["last_access"],
                "importance": old["importance"],
            }
            if n["id"] in retexted:
                keep = {k: v for k, v in keep.items() if k not in ("embedding", "tokens")}
            merged = {**n, **keep}
            fields = ("text", "parent", "status", "event_ids", "valid_to", "superseded_by", "flag")
            if any(merged[f] != old[f] for f in fields):
                change(merged, "update", "children or their text changed")
        wanted = {n["id"] for n in nodes}
        for m in list(all_mem.values()):
            if m["level"] >= 1 and m["status"] == "active" and m["id"] not in wanted:
                change(
                    {**m, "status": "archived", "updated_at": at},
                    "archive",
                    "its children changed; replaced by a node over the current children",
                )
        parent_of = {k["id"]: n["id"] for n, kids, _ in desired1 for k in kids}
        for m in l0:
            cur = all_mem[m["id"]]
            if cur["parent"] != parent_of.get(m["id"]):
                change(
                    {**cur, "parent": parent_of.get(m["id"]), "updated_at": at},
                    "link",
                    f"child of level-1 node {parent_of.get(m['id'])}",
                )

        if changed:
            with store.writer() as w:
                w.insert("memories", memories_table(list(changed.values())), replace=True)
                w.insert("ops", ops_table(ops))
        result.changed = len(changed)
        result.figures = {
            "merged_duplicates": len(dups),
            "level1_nodes": len(desired1),
            "level2_nodes": len(desired2),
            "rows_changed": len(changed),
            "ops": len(ops),
        }
    return result
