"""Index: level-0 memories from events, embeddings for every memory that lacks one, and per-level indexes.

Three steps, each safe to rerun: `materialise_level0` turns new events into level-0 memories;
`embed_missing` fills the `embedding` of memories whose text is new or changed (stages that change
a memory's text set its embedding to null); `build_indexes` (`tasks.build_batch`, `tasks.index_build`) writes the
namespace's columnar artifacts, FAISS and BM25 indexes as one versioned folder with manifest rows —
skipped when the namespace's fingerprint is unchanged, so a second run changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from memstage.stores import queries
from memstage.stores.index_reads import split_by
from memstage.stores.store import MemoryStore, now_utc
from memstage.tasks.build_batch import build_indexes
from memstage.tasks.contract import (
    CountTokens,
    Embed,
    StageResult,
    commit_memory_changes,
    make_op,
    memories_table,
    new_memory,
    ops_table,
    timed,
)
from memstage.tasks.index_build import embedding_matrix, remove_stale_artifacts
from memstage.tasks.injection import flag_text
from memstage.tasks.passages import passage_source

__all__ = ["build_indexes", "embedding_matrix", "remove_stale_artifacts", "run_index"]

EMBED_CHUNK = 512


def level0_id(event_id: str) -> str:
    return "m0-" + event_id


def level0_event_id(memory_id: str) -> str:
    """The event a level-0 memory was made from (the inverse of `level0_id`)."""
    return memory_id.removeprefix("m0-")


def level0_text(speaker: str, text: str, metadata: dict[str, Any]) -> str:
    """The memory a turn becomes: who said it, what, and what an image they shared showed."""
    out = f"{speaker}: {text}"
    caption = metadata.get("blip_caption")
    if caption:
        out += f" [shared an image: {caption}]"
    return out


def index_text(memory: dict[str, Any], events: Sequence[dict[str, Any]]) -> str:
    """The text a memory is found by (embedded and BM25-indexed); `memory["text"]` stays what is packed.

    A level-0 memory is found by what its turn(s) said in full (`level0_text` of its source events),
    so a stage that shortens its text for the prompt (compress) does not make it harder to find:
    on the LoCoMo dev split, indexing compressed texts lost 0.03 recall@1000 against indexing the
    originals and packing the compressed texts. A passage of a long turn (`tasks.passages`) is found
    by its own original words. Other levels are found by their own text.
    """
    if memory.get("level") != 0 or not events:
        return memory["text"]
    passage = passage_source(memory.get("metadata"))
    if passage is not None:  # a passage of a long turn is found by its own words (tasks.passages)
        first = events[0]
        meta = json.loads(first["metadata"] or "{}") if passage.get("k") == 1 else {}
        return level0_text(memory.get("speaker") or first["speaker"], passage["source"], meta)
    return "\n".join(level0_text(e["speaker"], e["text"], json.loads(e["metadata"] or "{}")) for e in events)


def index_texts(
    store: MemoryStore,
    namespace: str,
    ids: Sequence[str],
    texts: Sequence[str],
    metadata: Sequence[str | None] | None = None,
) -> list[str]:
    """`index_text` of each memory id (whose stored text is in `texts`, metadata JSON in `metadata`),
    reading source events in one query."""
    events = queries.source_events(store, namespace, ids)
    metas = metadata if metadata is not None else [None] * len(ids)
    return [
        index_text({"level": 0, "text": t, "metadata": m}, events[i]) if i in events else t
        for i, t, m in zip(ids, texts, metas, strict=True)
    ]


def new_level0_events(store: MemoryStore, namespace: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The events of `namespace` that have no level-0 memory yet (never recreating one a stage
    archived), and the texts their memories will have (see `level0_rows`)."""
    new = queries.events_without_level0(store, namespace)
    texts = level0_texts([e["speaker"] for e in new], [e["text"] for e in new], [e["metadata"] for e in new])
    return new, texts


def new_level0_many(store: MemoryStore, namespaces: list[str]) -> dict[str, tuple[pa.Table, list[str]]]:
    """`new_level0_events` of several namespaces, read in one query and kept as columns: namespace ->
    (its new events: id, session, speaker, text, event_time, metadata; their level-0 texts)."""
    table = queries.events_without_level0_many(store, namespaces)
    out = {}
    for ns, part in split_by(table, "namespace", namespaces).items():
        columns = (part.column(c).to_pylist() for c in ("speaker", "text", "metadata"))
        out[ns] = (part.drop_columns(["namespace"]), level0_texts(*columns))
    return out


def level0_of_events(events: pa.Table, namespaces: list[str]) -> dict[str, tuple[pa.Table, list[str]]]:
    """`new_level0_many` of events not stored yet (an `events` table as parsed), in the order that read
    gives: by namespace, session and seq."""
    order = [("namespace", "ascending"), ("session", "ascending"), ("seq", "ascending")]
    table = events.sort_by(order).select(
        ["namespace", "id", "session", "speaker", "text", "event_time", "metadata"]
    )
    out = {}
    for ns, part in split_by(table, "namespace", namespaces).items():
        columns = (part.column(c).to_pylist() for c in ("speaker", "text", "metadata"))
        out[ns] = (part.drop_columns(["namespace"]), level0_texts(*columns))
    return out


def level0_texts(speakers: list[str], texts: list[str], metadata: list[str | None]) -> list[str]:
    """`level0_text` of each event (metadata as its stored JSON), parsing only metadata that can hold
    a caption: without the key's letters and without a \\u escape it has none."""
    out = []
    for speaker, text, meta in zip(speakers, texts, metadata, strict=True):
        if meta and ("blip_caption" in meta or "\\u" in meta):
            out.append(level0_text(speaker, text, json.loads(meta)))
        else:
            out.append(f"{speaker}: {text}")
    return out


def level0_rows(
    namespace: str,
    new: Sequence[dict[str, Any]],
    texts: Sequence[str],
    *,
    count_tokens: CountTokens,
    flow_run_id: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The level-0 memory rows (embedding null) of `new_level0_events`, and their `ops` rows."""
    if not new:
        return [], []
    tokens = count_tokens(texts)
    at = now_utc()
    rows, ops = [], []
    for ev, text, n_tok in zip(new, texts, tokens, strict=True):
        row = new_memory(
            id=level0_id(ev["id"]),
            namespace=namespace,
            level=0,
            text=text,
            event_ids=[ev["id"]],
            at=at,
            tokens=n_tok,
            session=ev["session"],
            speaker=ev["speaker"],
            event_time=ev["event_time"],
            metadata=ev["metadata"],
            flag=flag_text(text),  # instruction-like turns are marked at ingest (tasks.injection)
        )
        rows.append(row)
        ops.append(
            make_op(
                namespace=namespace,
                memory_id=row["id"],
                stage="index",
                action="insert",
                before=None,
                after=row,
                reason="level-0 memory for a new event",
                flow_run_id=flow_run_id,
                at=at,
            )
        )
    return rows, ops


def insert_memories(
    store: MemoryStore,
    rows: Sequence[dict[str, Any]],
    ops: Sequence[dict[str, Any]],
    embeddings: pa.Table | None = None,
) -> int:
    """Insert new memory rows and their `ops` rows in one transaction; returns how many were new.
    `embeddings` (id, embedding) of all of them: stored with the rows, so no later UPDATE rewrites them."""
    if not rows:
        return 0
    table = memories_table(rows)
    if embeddings is not None:
        position = {i: k for k, i in enumerate(embeddings.column("id").to_pylist())}
        order = pa.array([position[r["id"]] for r in rows], pa.int64())
        column = embeddings.column("embedding").take(order).cast(table.schema.field("embedding").type)
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding", column)
    with store.writer() as w:
        # Only rows not stored yet, and only their ops rows: a concurrent run may have stored some.
        stored = w.existing_ids("memories", table.column("id").to_pylist())
        if stored:
            table = table.filter(pa.array([i not in stored for i in table.column("id").to_pylist()]))
            ops = [op for op in ops if op["memory_id"] not in stored]
        new = w.insert("memories", table)
        w.insert("ops", ops_table(ops))
    return new


def materialise_level0(
    store: MemoryStore, namespace: str, *, count_tokens: CountTokens, flow_run_id: str | None = None
) -> StageResult:
    """One active level-0 memory per event that has none yet (never recreating one a stage archived)."""
    result = StageResult("index.level0", namespace)
    with timed(result):
        new, texts = new_level0_events(store, namespace)
        rows, ops = level0_rows(namespace, new, texts, count_tokens=count_tokens, flow_run_id=flow_run_id)
        result.changed = insert_memories(store, rows, ops)
        rescanned = scan_unscanned(store, namespace, flow_run_id=flow_run_id)
    result.figures = {"level0_created": result.changed, "flags_scanned": rescanned}
    result.changed += rescanned
    return result


def scan_unscanned(store: MemoryStore, namespace: str, *, flow_run_id: str | None = None) -> int:
    """Memories stored before the detector existed (flag null) get their flag, once, with an `ops` row each."""
    old = queries.unscanned_memories(store, namespace).to_pylist()
    at, rows, ops = now_utc(), [], []
    for m in old:
        new = {**m, "flag": flag_text(m["text"])}
        rows.append(new)
        ops.append(
            make_op(
                namespace=namespace,
                memory_id=m["id"],
                stage="index",
                action="update",
                before=m,
                after=new,
                reason="injection scan of a memory stored before flags existed",
                flow_run_id=flow_run_id,
                at=at,
            )
        )
    return commit_memory_changes(store, rows, ops)


def pending_embeddings(store: MemoryStore, namespace: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of the active memories whose embedding is null: new, or text changed by a stage."""
    todo = queries.unembedded(store, namespace)
    ids = todo.column("id").to_pylist()
    if not ids:  # the usual case on ingest: no index_texts query
        return [], []
    texts, metadata = todo.column("text").to_pylist(), todo.column("metadata").to_pylist()
    return ids, index_texts(store, namespace, ids, texts, metadata)


def pending_many(store: MemoryStore, namespaces: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """`pending_embeddings` of several namespaces: one query for all; source events read only for
    the namespaces that have any (none, on a plain ingest)."""
    todo = queries.unembedded_many(store, namespaces)
    out: dict[str, tuple[list[str], list[str]]] = {}
    for ns, part in split_by(todo, "namespace", namespaces).items():
        ids = part.column("id").to_pylist()
        texts, metadata = part.column("text").to_pylist(), part.column("metadata").to_pylist()
        out[ns] = (ids, index_texts(store, ns, ids, texts, metadata)) if ids else ([], [])
    return out


def embeddings_table(ids: Sequence[str], vectors: np.ndarray) -> pa.Table:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim == 2:  # one flat buffer, no array per row
        flat = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
        column = flat.cast(pa.list_(pa.float32()))
    else:
        column = pa.array(list(matrix), pa.list_(pa.float32()))
    return pa.table({"id": pa.array(list(ids), pa.string()), "embedding": column})


def commit_embeddings(store: MemoryStore, namespace: str, embeddings: pa.Table) -> int:
    """Store computed embeddings (a derived column: no `ops` row, the memory's content is unchanged)."""
    if embeddings.num_rows == 0:
        return 0
    queries.set_embeddings(store, namespace, embeddings)
    return embeddings.num_rows


def embed_missing(
    store: MemoryStore, namespace: str, embed: Embed, *, progress: Callable[[int], None] | None = None
) -> int:
    """Embed the active memories whose embedding is null, in chunks; returns how many were embedded."""
    ids, texts = pending_embeddings(store, namespace)
    for start in range(0, len(ids), EMBED_CHUNK):
        chunk = ids[start : start + EMBED_CHUNK]
        commit_embeddings(
            store, namespace, embeddings_table(chunk, embed(texts[start : start + EMBED_CHUNK]))
        )
        if progress:
            progress(len(chunk))
    return len(ids)


def run_index(
    store: MemoryStore,
    namespace: str,
    *,
    embed: Embed,
    count_tokens: CountTokens,
    flow_run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> StageResult:
    """The whole index stage for one namespace: level-0 memories, embeddings, indexes."""
    result = StageResult("index", namespace)
    with timed(result):
        created = materialise_level0(store, namespace, count_tokens=count_tokens, flow_run_id=flow_run_id)
        embedded = embed_missing(store, namespace, embed, progress=progress)
        built = build_indexes(store, namespace, flow_run_id=flow_run_id)
    result.changed = created.changed + embedded + built.changed
    result.figures = {
        "level0_created": created.changed,
        "embedded": embedded,
        "indexes_rebuilt": built.changed,
        "memories_indexed": built.figures.get("memories_indexed", 0),
    }
    return result
