"""Hard forget's reach into Prefect: remove what memstage wrote there, then byte-check Prefect's database.

By default memstage writes no memory text into Prefect (runtime/artifacts.py: ids, counts and
scores; query questions travel as redacted parameters; logs name record numbers), so this finds
nothing. What runs made with MEMSTAGE_ARTIFACT_TEXT=1 wrote is removed through Prefect's API:
artifacts holding the subject are deleted, flow-run parameters and names holding it are redacted.
Prefect's API cannot delete log lines or events (and an artifact's creation and deletion events
carry its data): with a local SQLite database (the PREFECT_HOME/prefect.db a temporary server uses)
those rows are deleted in the database itself, the one step not done through the API; with another
database they are counted and reported as unreachable. SQLite keeps deleted rows' bytes in free
pages, so after a deletion the file is vacuumed; then every file of it is searched for the subject.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

PAGE = 200
MAX_SCAN = 100_000  # rows of one kind read back from the API at most
REDACTED = "[redacted by hard forget]"


def _holds(value: Any, needle: str) -> bool:
    return needle.lower() in json.dumps(value, default=str, ensure_ascii=False).lower()


def _redact(value: Any, needle: str) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, needle) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, needle) for v in value]
    return REDACTED if _holds(value, needle) else value


def _pages(read: Any) -> list[Any]:
    out: list[Any] = []
    while len(out) < MAX_SCAN:
        page = read(offset=len(out))
        out.extend(page)
        if len(page) < PAGE:
            break
    return out


def scrub_api(subject: str) -> dict[str, Any]:
    """Delete artifacts and redact flow runs that hold `subject`; count log lines that still do."""
    from prefect.client.orchestration import get_client

    out: dict[str, Any] = {"artifacts_deleted": 0, "flow_runs_redacted": 0, "log_lines_holding_subject": 0}
    with get_client(sync_client=True) as client:
        artifacts = _pages(lambda offset: client.read_artifacts(limit=PAGE, offset=offset))
        for a in artifacts:
            if _holds([a.data, a.description, a.key, getattr(a, "metadata_", None)], subject):
                client.delete_artifact(a.id)
                out["artifacts_deleted"] += 1
        runs = _pages(lambda offset: client.read_flow_runs(limit=PAGE, offset=offset))
        for r in runs:
            if _holds([r.parameters, r.name], subject):
                name = REDACTED if _holds(r.name, subject) else None
                client.update_flow_run(r.id, parameters=_redact(r.parameters, subject), name=name)
                out["flow_runs_redacted"] += 1
        logs = _pages(lambda offset: client.read_logs(limit=PAGE, offset=offset))
        out["log_lines_holding_subject"] = sum(_holds(line.message, subject) for line in logs)
    if out["log_lines_holding_subject"]:
        out["unreachable"] = (
            f"{out['log_lines_holding_subject']} Prefect log lines hold the subject; Prefect's API cannot "
            "delete log lines (delete them in its database, or delete the flow runs they belong to)"
        )
    return out


def prefect_database() -> Path | None:
    """The SQLite file of the Prefect server these settings describe, or None (another database)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url or "")
    if not url.startswith("sqlite") or "///" not in url or ":memory:" in url:
        return None
    return Path(url.split("///", 1)[1]).expanduser()


def database_files(db: Path) -> list[Path]:
    return [p for p in (db, *(Path(f"{db}{s}") for s in ("-wal", "-shm", "-journal"))) if p.exists()]


def wait_for_deletion_events(db: Path, subject: str, wait_s: float = 60.0) -> bool:
    """Prefect writes an artifact's `...deleted` event (with the artifact's data) a few seconds after
    the deletion (its event persister flushes in batches): wait for it, so it is deleted too."""
    import time

    deadline = time.monotonic() + wait_s
    q = "SELECT 1 FROM events WHERE event LIKE 'prefect.artifact%deleted' AND instr(lower(payload), lower(?)) > 0"
    while time.monotonic() < deadline:
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            try:
                if conn.execute(q, [subject]).fetchone():
                    return True
            finally:
                conn.close()
        except sqlite3.Error:
            pass
        time.sleep(0.5)
    return False


def delete_in_sqlite(db: Path, subject: str) -> dict[str, Any]:
    """Rows Prefect's API cannot delete (events, their resources, log lines) that hold `subject`."""
    deleted: dict[str, int] = {}
    try:
        conn = sqlite3.connect(str(db), timeout=60)
        try:
            with conn:
                holds = "instr(lower(payload), lower(?)) > 0 OR instr(lower(resource), lower(?)) > 0"
                ids = [r[0] for r in conn.execute(f"SELECT id FROM events WHERE {holds}", [subject, subject])]
                for i in range(0, len(ids), 500):
                    part = ids[i : i + 500]
                    marks = ",".join("?" * len(part))
                    n = conn.execute(
                        f"DELETE FROM event_resources WHERE event_id IN ({marks})", part
                    ).rowcount
                    deleted["event_resources"] = deleted.get("event_resources", 0) + n
                    n = conn.execute(f"DELETE FROM events WHERE id IN ({marks})", part).rowcount
                    deleted["events"] = deleted.get("events", 0) + n
                n = conn.execute(
                    "DELETE FROM log WHERE instr(lower(message), lower(?)) > 0", [subject]
                ).rowcount
                if n:
                    deleted["log"] = n
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return {"database_delete": f"not done ({exc})"}
    return (
        {"rows_deleted_in_database": {k: v for k, v in deleted.items() if v}} if any(deleted.values()) else {}
    )


def vacuum(db: Path) -> str:
    """Rewrite the SQLite file so deleted rows leave no bytes (WAL checkpointed and truncated around it)."""
    try:
        conn = sqlite3.connect(str(db), timeout=60)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return "vacuumed"
    except sqlite3.Error as exc:
        return f"not vacuumed ({exc})"


def forget_in_prefect(subject: str) -> dict[str, Any]:
    """Everything above, as the `prefect` figures of a hard forget (never raises: it reports)."""
    from memstage.stores.compact import find_bytes_in

    try:
        out = scrub_api(subject)
    except Exception as exc:  # noqa: BLE001 - an unreachable API is reported, and the byte check still runs
        out = {"unreachable": f"Prefect's API: {type(exc).__name__}: {str(exc)[:200]}"}
    db = prefect_database()
    if db is None:
        out["database"] = "not a local SQLite file: not byte-checked here"
        out["subject_remains"] = bool(out.get("log_lines_holding_subject") or out.get("unreachable"))
        return out
    if out.get("artifacts_deleted"):
        out["deletion_events_seen"] = wait_for_deletion_events(db, subject)
    out.update(delete_in_sqlite(db, subject))
    if out.get("artifacts_deleted") or out.get("flow_runs_redacted") or out.get("rows_deleted_in_database"):
        out["vacuum"] = vacuum(db)
        if "log" in out.get("rows_deleted_in_database", {}):
            out.pop("unreachable", None)  # the log lines went with their database rows
    out["database"] = str(db)
    out["database_files_holding_subject"] = [str(p) for p in find_bytes_in(database_files(db), subject)]
    if out["database_files_holding_subject"]:
        out["database_tables_holding_subject"] = sqlite_tables_holding(db, subject)
    out["subject_remains"] = bool(out["database_files_holding_subject"])
    return out


def sqlite_tables_holding(db: Path, needle: str) -> list[str]:
    """'table.column' of Prefect's SQLite database holding `needle`: where the bytes are (read-only)."""
    hits = []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return ["(database not readable)"]
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for t in tables:
            for col in [r[1] for r in conn.execute(f"PRAGMA table_info('{t}')")]:
                q = f'SELECT 1 FROM "{t}" WHERE instr(lower(CAST("{col}" AS TEXT)), lower(?)) > 0 LIMIT 1'
                if conn.execute(q, [needle]).fetchone():
                    hits.append(f"{t}.{col}")
    except sqlite3.Error as exc:
        hits.append(f"(scan stopped: {exc})")
    finally:
        conn.close()
    return hits
