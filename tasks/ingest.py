"""Ingest: raw turns and documents in, validated and normalised into `events`, bad records into `quarantine`.

Readers in tasks/readers.py. Formats: `jsonl` (one turn per line), `locomo` (the LoCoMo benchmark's file: one namespace per
conversation), `parquet` (the jsonl columns), and `auto`, which picks by extension and content.
Ids are content hashes, so ingesting the same file twice stores nothing new. A bad record never
stops the others: it is kept in `quarantine` with the reason, and the run reports it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from memstage.stores.schema import EVENTS, QUARANTINE
from memstage.stores.store import MemoryStore, NamespaceError, now_utc, validate_namespace
from memstage.tasks import workers
from memstage.tasks.contract import StageResult, content_hash, timed
from memstage.tasks.readers import (  # noqa: F401 - FORMATS, IngestError, detect_format: this module's API too
    FORMATS,
    RECORD_ERRORS,
    IngestError,
    RawRecord,
    check_input,
    clean_text,
    describe,
    detect_format,
    read_locomo,
    read_records,
)

PARALLEL_BYTES = 4_000_000  # a LoCoMo file this big (~10k turns) is read on the worker pool
MAX_TEXT_CHARS = 100_000  # longer than any turn or page a person writes; bigger is a broken record
DEFAULT_SESSION = "default"


SEQ_LIMIT = 2**62  # an int64 column, with room for the next position after it
MAX_METADATA_CHARS = 100_000


# ---- validation ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # every turn of a session carries the same stamp
def parse_locomo_time(text: str) -> datetime:
    """'1:56 pm on 8 May, 2023' -> 2023-05-08 13:56 UTC."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def _parse_time(value: Any, fmt: str | None) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bool):
        raise ValueError("time must be an ISO 8601 string or epoch seconds, got a boolean")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), tz=UTC)
    if not isinstance(value, str):
        raise ValueError(f"time must be an ISO 8601 string or epoch seconds, got {type(value).__name__}")
    if fmt == "locomo":
        return parse_locomo_time(value)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_SURROGATE = re.compile("[\ud800-\udfff]")  # a regex: a per-character loop was most of parsing's time


def validate(record: dict[str, Any], default_namespace: str | None) -> dict[str, Any]:
    """One raw record -> a normalised event dict (without id/seq), or ValueError saying what is wrong."""
    text = record.get("text")
    if text is None:
        raise ValueError("missing text")
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if _SURROGATE.search(text):
        raise ValueError("text is not valid UTF-8 (lone surrogate characters)")
    text = text.replace("\x00", "").strip()
    if not text:
        raise ValueError("empty text")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"text of {len(text)} characters exceeds the {MAX_TEXT_CHARS}-character limit")
    namespace = record.get("namespace") or default_namespace
    if namespace is None:
        raise ValueError("missing namespace (give it in the record or with --namespace)")
    if not isinstance(namespace, str):
        raise ValueError(f"namespace must be a string, got {type(namespace).__name__}")
    try:
        validate_namespace(namespace)
    except NamespaceError as exc:
        raise ValueError(str(exc)) from None
    session = record.get("session", DEFAULT_SESSION)
    if session is None:
        session = DEFAULT_SESSION
    if not isinstance(session, str | int):
        raise ValueError(f"session must be a string, got {type(session).__name__}")
    speaker = record.get("speaker")
    if speaker is not None and not isinstance(speaker, str):
        raise ValueError(f"speaker must be a string, got {type(speaker).__name__}")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be an object, got {type(metadata).__name__}")
    try:
        event_time = _parse_time(record.get("time"), record.get("_time_format"))
    except (*RECORD_ERRORS, OSError) as exc:
        raise ValueError(f"unparsable time {str(record.get('time'))[:100]!r}: {describe(exc)}") from None
    seq = record.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise ValueError(f"seq must be an integer, got {type(seq).__name__}")
    if seq is not None and not -SEQ_LIMIT < seq < SEQ_LIMIT:
        raise ValueError(f"seq outside the range +-2**62 ({len(str(seq))} digits)")
    source_id = record.get("id")
    ev = {
        "namespace": namespace,
        "session": str(session),
        "seq": seq,
        "speaker": speaker or "unknown",
        "text": text,
        "event_time": event_time,
        "metadata": _metadata_json(metadata),
        "source_id": None if source_id is None else str(source_id),
    }
    for field in ("session", "speaker", "source_id"):
        if ev[field] is not None and _SURROGATE.search(ev[field]):
            raise ValueError(f"{field} is not valid UTF-8 (lone surrogate characters)")
    if ev["source_id"] is not None and len(ev["source_id"]) > 1000:
        raise ValueError(f"id of {len(ev['source_id'])} characters exceeds 1000")
    return ev


def _metadata_json(metadata: dict[str, Any]) -> str:
    """The metadata as a JSON string; too deep, non-finite numbers or lone surrogates are errors."""
    try:
        text = json.dumps(metadata, sort_keys=True, ensure_ascii=False, allow_nan=False, default=str)
    except RecursionError:
        raise ValueError("metadata nested too deeply") from None
    except ValueError as exc:  # NaN / Infinity (a JSON number too big for a float), or a huge integer
        raise ValueError(f"metadata holds a number JSON cannot store: {str(exc)[:100]}") from None
    if len(text) > MAX_METADATA_CHARS:
        raise ValueError(f"metadata of {len(text)} characters exceeds {MAX_METADATA_CHARS}")
    if _SURROGATE.search(text):
        raise ValueError("metadata is not valid UTF-8 (lone surrogate characters)")
    return text


def event_id(ev: dict[str, Any]) -> str:
    """Content hash: an explicit source id wins; else the turn itself, its position only when it has no time."""
    if ev["source_id"] is not None:
        return content_hash(ev["namespace"], "id", ev["source_id"], ev["text"])
    position = None if ev["event_time"] is not None else ev["seq"]
    return content_hash(ev["namespace"], ev["session"], ev["speaker"], ev["text"], ev["event_time"], position)


def normalise(
    records: Iterator[RawRecord],
    *,
    source: str,
    default_namespace: str | None,
    flow_run_id: str | None = None,
    at: datetime | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Raw records -> (events, quarantine) tables; duplicates within the input collapse to one event."""
    at = at or now_utc()
    events: dict[str, dict[str, Any]] = {}
    bad: list[dict[str, Any]] = []
    next_seq: dict[tuple[str, str], int] = {}
    for rec in records:
        error = rec.error
        ev = None
        if error is None:
            try:
                ev = validate(rec.value or {}, default_namespace)
            except RECORD_ERRORS as exc:  # anything one record raises is that record's, never the file's
                error = str(exc) if isinstance(exc, ValueError) else describe(exc)
        if ev is None:
            ns = (rec.value or {}).get("namespace") if isinstance(rec.value, dict) else None
            raw = clean_text(rec.raw[:4096])
            bad.append(
                {
                    "id": content_hash(source, rec.record_no, raw),
                    "namespace": clean_text(ns[:200]) if isinstance(ns, str) else (default_namespace or ""),
                    "source": source,
                    "record_no": rec.record_no,
                    "raw": raw,
                    "reason": clean_text(f"record {rec.record_no} of {source}: {error}"[:1000]),
                    "flow_run_id": flow_run_id,
                    "at": at,
                }
            )
            continue
        key = (ev["namespace"], ev["session"])
        if ev["seq"] is None:
            ev["seq"] = next_seq.get(key, 0) + 1
        next_seq[key] = max(next_seq.get(key, 0), ev["seq"])
        eid = event_id(ev)
        events.setdefault(
            eid,
            {
                "id": eid,
                "namespace": ev["namespace"],
                "session": ev["session"],
                "seq": ev["seq"],
                "speaker": ev["speaker"],
                "text": ev["text"],
                "event_time": ev["event_time"],
                "source": source,
                "metadata": ev["metadata"],
                "ingested_at": at,
            },
        )
    return (
        pa.Table.from_pylist(list(events.values()), schema=EVENTS),
        pa.Table.from_pylist(bad, schema=QUARANTINE),
    )


def parse_file(
    path: Path, fmt: str = "auto", namespace: str | None = None, flow_run_id: str | None = None
) -> tuple[pa.Table, pa.Table]:
    """Read and validate a whole file: (events, quarantine). For LoCoMo, `namespace` is a prefix.
    A big LoCoMo file is read on the worker pool, a block of samples per process (`parse_parallel`)."""
    path = Path(path)
    if namespace is not None:
        validate_namespace(namespace)
    fmt_used = check_input(path, fmt)
    if fmt_used == "locomo" and path.stat().st_size >= PARALLEL_BYTES and workers.pool_size() > 1:
        return parse_parallel(path, namespace, flow_run_id)
    default_ns = None if fmt_used == "locomo" else namespace
    return normalise(
        read_records(path, fmt_used, namespace),
        source=str(path),
        default_namespace=default_ns,
        flow_run_id=flow_run_id,
    )


def _parse_part(
    path: Path, prefix: str | None, flow_run_id: str | None, at: datetime, part: tuple[int, int]
) -> tuple[pa.Table, pa.Table]:
    """`normalise` of one block of a LoCoMo file's samples (in a pool process)."""
    records = read_locomo(path, prefix, part)
    return normalise(records, source=str(path), default_namespace=None, flow_run_id=flow_run_id, at=at)


def parse_parallel(path: Path, prefix: str | None, flow_run_id: str | None) -> tuple[pa.Table, pa.Table]:
    """`parse_file` of a LoCoMo file on the worker pool: each process reads the file and validates one
    contiguous block of its samples (records numbered as in the whole file, one `at` for all); the
    blocks' tables joined in order, a turn repeated in two blocks kept once (the first, as read
    serially). LoCoMo turns carry their position, so no block needs the one before it."""
    parts = workers.pool_size()
    args = [[x] * parts for x in (path, prefix, flow_run_id, now_utc())]
    done = list(workers.get_pool().map(_parse_part, *args, [(k, parts) for k in range(parts)]))
    events = pa.concat_tables([e for e, _ in done])
    ids = events.column("id").to_pylist()
    if len(set(ids)) < len(ids):
        seen: set[str] = set()
        events = events.filter(pa.array([not (i in seen or seen.add(i)) for i in ids], pa.bool_()))
    return events, pa.concat_tables([q for _, q in done])


def commit_events(store: MemoryStore, events: pa.Table, quarantine: pa.Table) -> StageResult:
    """Write new events and quarantine rows in one transaction; already stored ids are left as they are."""
    namespaces = sorted(set(events.column("namespace").to_pylist()))
    result = StageResult("ingest", ",".join(namespaces))
    with timed(result), store.writer() as w:
        new_events = w.insert("events", events)
        new_bad = w.insert("quarantine", quarantine)
    result.changed = new_events
    result.figures = {
        "namespaces": namespaces,
        "records": events.num_rows + quarantine.num_rows,
        "events_new": new_events,
        "events_already_stored": events.num_rows - new_events,
        "quarantined": quarantine.num_rows,
        "quarantined_new": new_bad,
        "quarantine_reasons": quarantine.column("reason").to_pylist()[:20],
    }
    return result
