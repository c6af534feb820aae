"""Ingest: raw turns and documents in, validated and normalised into `events`, bad records into `quarantine`.

Formats: `jsonl` (one turn per line), `locomo` (the LoCoMo benchmark's file: one namespace per
conversation), `parquet` (the jsonl columns), and `auto`, which picks by extension and content.
Ids are content hashes, so ingesting the same file twice stores nothing new. A bad record never
stops the others: it is kept in `quarantine` with the reason, and the run reports it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from memstage.stores.schema import EVENTS, QUARANTINE
from memstage.stores.store import MemoryStore, NamespaceError, now_utc, to_json, validate_namespace
from memstage.tasks.contract import StageResult, content_hash, timed

FORMATS = ("auto", "jsonl", "locomo", "parquet")
MAX_TEXT_CHARS = 100_000  # longer than any turn or page a person writes; bigger is a broken record
MAX_LINE_BYTES = 1_000_000
DEFAULT_SESSION = "default"


class IngestError(Exception):
    """The input as a whole cannot be read (missing file, unknown format); single bad records are quarantined."""


@dataclass
class RawRecord:
    record_no: int  # line number (jsonl), row number (parquet) or turn position (locomo), from 1
    raw: str  # the record as read, for the quarantine row
    value: dict[str, Any] | None  # parsed record, or None when it could not be parsed
    error: str | None = None


# ---- reading ---------------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".json":
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith((b"[", b"{")) and (b'"conversation"' in head or b'"qa"' in head):
            return "locomo"
        raise IngestError(
            f"{path}: a .json file that is not in LoCoMo format; use --format jsonl for one turn per line"
        )
    raise IngestError(
        f"{path}: cannot tell the format from the extension {suffix!r}; pass --format jsonl|locomo|parquet"
    )


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open("rb") as f:
        for no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            raw = line.decode("utf-8", errors="replace").rstrip("\n")
            if len(line) > MAX_LINE_BYTES:
                yield RawRecord(no, raw[:4096], None, f"line of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(no, raw, None, f"invalid UTF-8 at byte {exc.start}")
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRecord(no, raw, None, f"invalid JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(value, dict):
                yield RawRecord(no, raw, None, f"expected a JSON object, got {type(value).__name__}")
                continue
            yield RawRecord(no, raw, value)


def read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise IngestError(f"{path}: not a readable Parquet file ({exc})") from exc
    for no, row in enumerate(table.to_pylist(), start=1):
        yield RawRecord(no, to_json(row), row)


_SESSION_KEY = re.compile(r"^session_(\d+)$")


@functools.lru_cache(maxsize=4096)  # every turn of a session carries the same stamp
def parse_locomo_time(text: str) -> datetime:
    """'1:56 pm on 8 May, 2023' -> 2023-05-08 13:56 UTC."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def read_locomo(path: Path, namespace_prefix: str | None) -> Iterator[RawRecord]:
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(f"{path}: not a readable LoCoMo JSON file ({exc})") from exc
    if not isinstance(samples, list):
        samples = [samples]
    no = 0
    for sample in samples:
        sample_id = str(sample.get("sample_id", "")) if isinstance(sample, dict) else ""
        conv = sample.get("conversation") if isinstance(sample, dict) else None
        namespace = f"{namespace_prefix}-{sample_id}" if namespace_prefix else sample_id
        if not isinstance(conv, dict):
            no += 1
            yield RawRecord(
                no, to_json(sample)[:4096], None, f"sample {sample_id!r} has no conversation object"
            )
            continue
        sessions = sorted((int(m.group(1)), k) for k in conv if (m := _SESSION_KEY.match(k)))
        for session_no, key in sessions:
            stamp = conv.get(f"{key}_date_time")
            for seq, turn in enumerate(conv[key] or [], start=1):
                no += 1
                if not isinstance(turn, dict):
                    yield RawRecord(
                        no, to_json(turn)[:4096], None, f"{sample_id} {key} turn {seq} is not an object"
                    )
                    continue
                meta = {k: turn[k] for k in ("dia_id", "blip_caption", "img_url", "query") if k in turn}
                meta["sample_id"] = sample_id
                value = {
                    "namespace": namespace,
                    "session": key,
                    "seq": seq,
                    "speaker": turn.get("speaker"),
                    "text": turn.get("text"),
                    "time": stamp,
                    "id": turn.get("dia_id"),
                    "metadata": meta,
                    "_time_format": "locomo",
                    "_session_no": session_no,
                }
                yield RawRecord(no, to_json(turn), value)


# ---- validation ------------------------------------------------------------------------------


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
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"unparsable time {record.get('time')!r}: {exc}") from None
    seq = record.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise ValueError(f"seq must be an integer, got {type(seq).__name__}")
    return {
        "namespace": namespace,
        "session": str(session),
        "seq": seq,
        "speaker": speaker or "unknown",
        "text": text,
        "event_time": event_time,
        "metadata": metadata,
        "source_id": record.get("id"),
    }


def event_id(ev: dict[str, Any]) -> str:
    """Content hash: an explicit source id wins; else the turn itself, its position only when it has no time."""
    if ev["source_id"] is not None:
        return content_hash(ev["namespace"], "id", str(ev["source_id"]), ev["text"])
    position = None if ev["event_time"] is not None else ev["seq"]
    return content_hash(ev["namespace"], ev["session"], ev["speaker"], ev["text"], ev["event_time"], position)


def normalise(
    records: Iterator[RawRecord],
    *,
    source: str,
    default_namespace: str | None,
    flow_run_id: str | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Raw records -> (events, quarantine) tables; duplicates within the input collapse to one event."""
    at = now_utc()
    events: dict[str, dict[str, Any]] = {}
    bad: list[dict[str, Any]] = []
    next_seq: dict[tuple[str, str], int] = {}
    for rec in records:
        error = rec.error
        ev = None
        if error is None:
            try:
                ev = validate(rec.value or {}, default_namespace)
            except ValueError as exc:
                error = str(exc)
        if ev is None:
            ns = (rec.value or {}).get("namespace") if isinstance(rec.value, dict) else None
            bad.append(
                {
                    "id": content_hash(source, rec.record_no, rec.raw),
                    "namespace": ns if isinstance(ns, str) else (default_namespace or ""),
                    "source": source,
                    "record_no": rec.record_no,
                    "raw": rec.raw[:4096],
                    "reason": f"record {rec.record_no} of {source}: {error}",
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
                "metadata": to_json(ev["metadata"]),
                "ingested_at": at,
            },
        )
    return (
        pa.Table.from_pylist(list(events.values()), schema=EVENTS),
        pa.Table.from_pylist(bad, schema=QUARANTINE),
    )


def read_records(path: Path, fmt: str, namespace: str | None) -> Iterator[RawRecord]:
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "parquet":
        return read_parquet(path)
    return read_locomo(path, namespace)


def parse_file(
    path: Path, fmt: str = "auto", namespace: str | None = None, flow_run_id: str | None = None
) -> tuple[pa.Table, pa.Table]:
    """Read and validate a whole file: (events, quarantine). For LoCoMo, `namespace` is a prefix."""
    path = Path(path)
    if namespace is not None:
        validate_namespace(namespace)
    fmt_used = detect_format(path) if fmt == "auto" else fmt
    default_ns = None if fmt_used == "locomo" else namespace
    return normalise(
        read_records(path, fmt_used, namespace),
        source=str(path),
        default_namespace=default_ns,
        flow_run_id=flow_run_id,
    )


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
