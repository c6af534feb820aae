"""Batched reads of the index stage and the ingest plan: one query for many namespaces, split by namespace.

The ingest flow indexes many namespaces at once (100 in a round of the H200 benchmark): one read per
namespace cost a query's fixed price each time (3.9 s of plan reads for 105 namespaces there). Each
read here takes a list of namespaces and returns {namespace: its rows}, the same rows in the same
order as the namespace read alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_NAMESPACE_ROWS = """
WITH m AS (
    SELECT namespace, id, level, text, tokens, embedding, parent, event_ids, session, speaker, event_time,
           flag, metadata
    FROM memories WHERE namespace IN (SELECT unnest(?)) AND status = 'active' AND valid_to IS NULL),
x AS (SELECT namespace, id, unnest(event_ids) AS event_id FROM m WHERE level = 0),
ev AS (
    SELECT x.namespace, x.id, min(e.seq) AS seq,
           list(json_extract_string(e.metadata, '$.dia_id') ORDER BY e.seq) AS dia_ids,
           list({'speaker': e.speaker, 'text': e.text, 'metadata': e.metadata} ORDER BY e.seq) AS events
    FROM x JOIN events e ON e.namespace = x.namespace AND e.id = x.event_id GROUP BY x.namespace, x.id)
SELECT m.*, ev.seq, ev.dia_ids, ev.events
FROM m LEFT JOIN ev ON ev.namespace = m.namespace AND ev.id = m.id
ORDER BY m.namespace, m.level, coalesce(m.session, ''), coalesce(ev.seq, 1 << 30), m.id
"""


def namespaces_rows(store: Any, namespaces: list[str]) -> dict[str, pa.Table]:
    """The active, current memories of each namespace with what their artifacts need, in artifact
    order: by level, then session and turn number (so a turn's neighbours are the adjacent rows).
    Source events are joined through unnested ids (a hash join, not a per-pair list_contains). One
    query (one scan and join) for all of them, split by namespace."""
    rows = store.query(_NAMESPACE_ROWS, [list(namespaces)])
    return {
        ns: part.drop_columns(["namespace"]) for ns, part in split_by(rows, "namespace", namespaces).items()
    }


def split_by(rows: pa.Table, column: str, keys: list[str]) -> dict[str, pa.Table]:
    """Rows sorted by `column` -> {key: its slice} for every key (empty for a key with no rows)."""
    out = {k: rows.slice(0, 0) for k in keys}
    start = 0
    for item in pc.value_counts(rows.column(column)).to_pylist() if rows.num_rows else []:
        out[item["values"]] = rows.slice(start, item["counts"])
        start += item["counts"]
    return out


def split_levels(rows: pa.Table) -> dict[int, pa.Table]:
    """The rows of each level: zero-copy slices, as `namespaces_rows` orders rows by level (a filter
    copied the whole table: 4.5 GB more at 1M memories)."""
    level = rows.column("level").to_numpy(zero_copy_only=False).astype(np.int64)
    if not len(level):  # a namespace emptied by a forget: no level
        return {}
    if not (np.diff(level) >= 0).all():  # not ordered by level: filter
        return {int(v): rows.filter(pc.equal(rows.column("level"), v)) for v in np.unique(level)}
    starts = np.flatnonzero(np.r_[True, level[1:] != level[:-1]])
    ends = np.r_[starts[1:], len(level)]
    return {int(level[a]): rows.slice(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)}


def current_manifests(store: Any, namespaces: list[str]) -> dict[str, pa.Table]:
    """The current `index_manifest` rows of each namespace (as `store.current_indexes`), one query."""
    rows = store.query(
        "SELECT * FROM index_manifest WHERE namespace IN (SELECT unnest(?)) AND current "
        "ORDER BY namespace, level, kind",
        [list(namespaces)],
    )
    return split_by(rows, "namespace", namespaces)
