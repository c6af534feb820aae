"""The tables of the memory store: explicit Arrow schemas, their DuckDB DDL, and the migrations.

Every table carries `namespace`; every read and write in `stores.store` names one. The Arrow schemas
are the contract between stages: a task returns tables of these shapes and the store commits them.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2

TS = pa.timestamp("us", tz="UTC")

EVENTS = pa.schema(
    [
        ("id", pa.string()),  # content hash, stable across re-ingest
        ("namespace", pa.string()),
        ("session", pa.string()),
        ("seq", pa.int64()),  # position within the session
        ("speaker", pa.string()),
        ("text", pa.string()),
        ("event_time", TS),
        ("source", pa.string()),  # file the record came from
        ("metadata", pa.string()),  # JSON object: dia_id, blip_caption, ...
        ("ingested_at", TS),
    ]
)

MEMORIES = pa.schema(
    [
        ("id", pa.string()),
        ("namespace", pa.string()),
        ("level", pa.int8()),  # 0 raw item, 1 session/episode, 2+ topic
        ("text", pa.string()),
        ("tokens", pa.int32()),
        ("embedding", pa.list_(pa.float32())),  # null until the index stage embeds it
        ("parent", pa.string()),
        ("event_ids", pa.list_(pa.string())),
        ("session", pa.string()),
        ("speaker", pa.string()),
        ("event_time", TS),
        ("version", pa.int32()),
        ("valid_from", TS),
        ("valid_to", TS),  # null while current
        ("superseded_by", pa.string()),
        ("importance", pa.float32()),
        ("access_count", pa.int32()),
        ("last_access", TS),
        ("status", pa.string()),  # active | archived
        ("metadata", pa.string()),  # JSON object
        ("created_at", TS),
        ("updated_at", TS),
        # instruction-like text (tasks.injection): comma-joined reasons, "" when clean, null if never scanned
        ("flag", pa.string()),
    ]
)

OPS = pa.schema(
    [
        ("op_id", pa.string()),
        ("namespace", pa.string()),
        ("memory_id", pa.string()),
        ("stage", pa.string()),
        ("action", pa.string()),  # insert | update | supersede | merge | archive | restore | delete ...
        ("before", pa.string()),  # JSON of the row before (null for inserts)
        ("after", pa.string()),  # JSON of the row after (null for deletes)
        ("reason", pa.string()),
        ("flow_run_id", pa.string()),
        ("at", TS),
    ]
)

QUARANTINE = pa.schema(
    [
        ("id", pa.string()),  # hash of source + record number + raw, so re-ingest does not duplicate it
        ("namespace", pa.string()),
        ("source", pa.string()),
        ("record_no", pa.int64()),
        ("raw", pa.string()),  # the record as read, truncated to 4 KiB, decoded with replacement
        ("reason", pa.string()),
        ("flow_run_id", pa.string()),
        ("at", TS),
    ]
)

INDEX_MANIFEST = pa.schema(
    [
        ("namespace", pa.string()),
        ("level", pa.int8()),
        ("kind", pa.string()),  # dense | lexical
        ("version", pa.int32()),
        ("path", pa.string()),  # relative to the data directory
        ("count", pa.int64()),
        ("model", pa.string()),
        ("fingerprint", pa.string()),  # hash of the (id, text) set indexed; equal fingerprint = nothing to do
        ("created_at", TS),
        ("current", pa.bool_()),
    ]
)

RUNS = pa.schema(
    [
        ("run_id", pa.string()),
        ("flow_run_id", pa.string()),
        ("stage", pa.string()),
        ("namespace", pa.string()),
        ("started_at", TS),
        ("duration_s", pa.float64()),
        ("changed", pa.int64()),
        ("figures", pa.string()),  # JSON of the stage's figures (counts, tokens before/after, ...)
        ("status", pa.string()),  # ok | failed
    ]
)

TABLES: dict[str, pa.Schema] = {
    "events": EVENTS,
    "memories": MEMORIES,
    "ops": OPS,
    "quarantine": QUARANTINE,
    "index_manifest": INDEX_MANIFEST,
    "runs": RUNS,
}

PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "events": ("id",),
    "memories": ("id",),
    "ops": ("op_id",),
    "quarantine": ("id",),
    "index_manifest": ("namespace", "level", "kind", "version"),
    "runs": ("run_id",),
}


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_int8(t):
        return "TINYINT"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    raise TypeError(f"no DuckDB type for {t}")


def create_table_sql(name: str) -> str:
    schema = TABLES[name]
    cols = ", ".join(f'"{f.name}" {_duck_type(f.type)}' for f in schema)
    pk = ", ".join(PRIMARY_KEYS[name])
    return f"CREATE TABLE IF NOT EXISTS {name} ({cols}, PRIMARY KEY ({pk}))"


# Each migration takes the store from version N-1 to N. Version 1 is the initial layout, created
# by create_table_sql; later versions append (from_version, [sql, ...]) here and bump SCHEMA_VERSION.
MIGRATIONS: list[tuple[int, list[str]]] = [
    # 2: memories.flag (instruction-like memories); rows stored before it read null until rescanned
    (2, ["ALTER TABLE memories ADD COLUMN IF NOT EXISTS flag VARCHAR"]),
]
