"""Input readers for ingest: jsonl, parquet and LoCoMo files -> one `RawRecord` per record, never a crash.

Every input is hostile: a record nested 10,000 deep, a number with 5,000 digits, a lone surrogate or
a value Arrow cannot convert fails that record only (it comes out with `error` set and goes to
quarantine); the file as a whole fails (`IngestError`) only when it cannot be read at all.
`check_input` is the cheap up-front check the command line runs before Prefect or Ray start.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memstage.defaults import FORMATS  # noqa: F401 - one list, read by the light CLI too

MAX_LINE_BYTES = 1_000_000
RAW_CHARS = 4096  # what a quarantine row keeps of a record
DEEP_PARSE_LIMIT = 200_000  # nesting a LoCoMo document may have and still be parsed (in a big-stack thread)
PARQUET_SLICE = 1024

# What one bad record can raise while it is parsed, converted or validated: each stays that record's.
RECORD_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, UnicodeError, ArithmeticError)


class IngestError(Exception):
    """The input as a whole cannot be read (missing file, unknown format); single bad records are quarantined."""


@dataclass
class RawRecord:
    record_no: int  # line number (jsonl), row number (parquet) or turn position (locomo), from 1
    raw_text: str | None  # the record as read, for the quarantine row (None: `source`, written on demand)
    value: dict[str, Any] | None  # parsed record, or None when it could not be parsed
    error: str | None = None
    source: Any = None  # the parsed record whose JSON is `raw`: written only for a record quarantined

    @property
    def raw(self) -> str:
        return self.raw_text if self.raw_text is not None else safe_json(self.source)


def clean_text(text: str) -> str:
    """`text` as storable UTF-8: lone surrogates become U+FFFD (quarantine rows keep what they can)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def safe_json(value: Any) -> str:
    """A record's JSON for the quarantine row; never raises (a value too deep or odd says so instead)."""
    try:
        text = json.dumps(value, default=str, sort_keys=True, ensure_ascii=False)
    except RECORD_ERRORS as exc:
        text = f"<record not representable as JSON: {type(exc).__name__}>"
    return clean_text(text[:RAW_CHARS])


def describe(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# ---- the whole-file checks -----------------------------------------------------------------------


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


def check_input(path: Path, fmt: str) -> str:
    """The checks that need no parse: a readable regular file of a known format. Returns the format."""
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    if path.is_dir():
        raise IngestError(f"{path}: is a directory; give a .jsonl, LoCoMo .json or .parquet file")
    if not path.is_file():
        raise IngestError(f"{path}: not a regular file")
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise IngestError(f"{path}: cannot be read ({exc.strerror})") from None
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise IngestError(f"{path}: not a readable Parquet file ({str(exc)[:200]})") from None
    elif fmt == "locomo" and not head.lstrip().startswith((b"[", b"{")):
        raise IngestError(f"{path}: not a LoCoMo JSON file (it does not start with [ or {{)")
    return fmt


# ---- jsonl ------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open("rb") as f:
        for no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            raw = clean_text(line[: RAW_CHARS * 4].decode("utf-8", errors="replace").rstrip("\n"))
            if len(line) > MAX_LINE_BYTES:
                yield RawRecord(
                    no, raw[:RAW_CHARS], None, f"line of {len(line)} bytes exceeds {MAX_LINE_BYTES}"
                )
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
            except RECORD_ERRORS as exc:  # too deep, or an integer of thousands of digits
                yield RawRecord(no, raw, None, f"invalid JSON: {describe(exc)}")
                continue
            if not isinstance(value, dict):
                yield RawRecord(no, raw, None, f"expected a JSON object, got {type(value).__name__}")
                continue
            yield RawRecord(no, raw, value)


# ---- parquet ----------------------------------------------------------------------------------


def read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise IngestError(f"{path}: not a readable Parquet file ({str(exc)[:200]})") from exc
    for start in range(0, table.num_rows, PARQUET_SLICE):
        part = table.slice(start, PARQUET_SLICE)
        try:
            rows: list[Any] = part.to_pylist()
        except Exception:  # noqa: BLE001 - one unconvertible value: find it row by row
            rows = [_parquet_row(part, i) for i in range(part.num_rows)]
        for i, row in enumerate(rows, start=start + 1):
            if isinstance(row, BaseException):
                yield RawRecord(i, f"<parquet row {i}>", None, f"unreadable row: {describe(row)}")
            else:
                yield RawRecord(i, None, row, source=row)


def _parquet_row(part: Any, i: int) -> dict[str, Any] | BaseException:
    try:
        return part.slice(i, 1).to_pylist()[0]
    except Exception as exc:  # noqa: BLE001
        return exc


# ---- LoCoMo -----------------------------------------------------------------------------------

_SESSION_KEY = re.compile(r"^session_(\d+)$")


def _int_or_inf(digits: str) -> int | float:
    """An integer Python can convert, else infinity: one record's field, not the document, is then bad."""
    return int(digits) if len(digits) < 4000 else float("inf") if digits[0] != "-" else float("-inf")


def _loads_deep(text: str) -> Any:
    """json.loads of a whole document; one nested deeper than the recursion limit is parsed in a thread
    with a big stack, and an integer too long to convert becomes infinity (its record is then quarantined)."""
    try:
        return json.loads(text, parse_int=_int_or_inf)
    except RecursionError:
        pass
    out: dict[str, Any] = {}

    def parse() -> None:
        try:
            out["value"] = json.loads(text, parse_int=_int_or_inf)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            out["error"] = exc

    old_limit, old_stack = sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(DEEP_PARSE_LIMIT)
    threading.stack_size(1 << 30)  # virtual; only the pages the parse touches are used
    try:
        t = threading.Thread(target=parse, name="memstage-deep-json")
        t.start()
        t.join()
    finally:
        threading.stack_size(old_stack)
        sys.setrecursionlimit(old_limit)
    if "error" in out:
        raise out["error"]
    return out["value"]


def read_locomo(
    path: Path, namespace_prefix: str | None, part: tuple[int, int] | None = None
) -> Iterator[RawRecord]:
    """The turns of a LoCoMo file. `part` (k, parts): only the records of the k-th of `parts`
    contiguous blocks of samples, numbered as in the whole file (a pool process reads one block)."""
    try:
        samples = _loads_deep(path.read_text(encoding="utf-8"))
    except RECORD_ERRORS as exc:
        raise IngestError(f"{path}: not a readable LoCoMo JSON file ({describe(exc)})") from None
    if not isinstance(samples, list):
        samples = [samples]
    lo, hi = (
        (0, len(samples))
        if part is None
        else (len(samples) * part[0] // part[1], len(samples) * (part[0] + 1) // part[1])
    )
    no = sum(_record_count(sample) for sample in samples[:lo])
    for sample in samples[lo:hi]:
        try:
            sample_id = str(sample.get("sample_id", "")) if isinstance(sample, dict) else ""
            conv = sample.get("conversation") if isinstance(sample, dict) else None
        except RECORD_ERRORS as exc:
            sample_id, conv = "", exc
        namespace = f"{namespace_prefix}-{sample_id}" if namespace_prefix else sample_id
        if not isinstance(conv, dict):
            no += 1
            yield RawRecord(
                no, safe_json(sample), None, f"sample {sample_id[:100]!r} has no conversation object"
            )
            continue
        for session_no, key in _sessions(conv):
            turns = conv[key] or []
            if not isinstance(turns, list):
                no += 1
                yield RawRecord(no, safe_json(turns), None, f"{sample_id[:100]} {key} is not a list of turns")
                continue
            for seq, turn in enumerate(turns, start=1):
                no += 1
                yield _locomo_turn(
                    no, turn, namespace, sample_id, key, seq, session_no, conv.get(f"{key}_date_time")
                )


def _sessions(conv: dict[str, Any]) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), k) for k in conv if (m := _SESSION_KEY.match(k)))


def _record_count(sample: Any) -> int:
    """How many records `read_locomo` yields for one sample (to number the records after it)."""
    conv = sample.get("conversation") if isinstance(sample, dict) else None
    if not isinstance(conv, dict):
        return 1
    return sum(len(t) if isinstance(t := conv[key] or [], list) else 1 for _, key in _sessions(conv))


def _locomo_turn(
    no: int, turn: Any, namespace: str, sample_id: str, key: str, seq: int, session_no: int, stamp: Any
) -> RawRecord:
    if not isinstance(turn, dict):
        return RawRecord(no, safe_json(turn), None, f"{sample_id[:100]} {key} turn {seq} is not an object")
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
    return RawRecord(no, None, value, source=turn)


def read_records(path: Path, fmt: str, namespace: str | None) -> Iterator[RawRecord]:
    fmt = check_input(path, fmt)
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "parquet":
        return read_parquet(path)
    return read_locomo(path, namespace)
