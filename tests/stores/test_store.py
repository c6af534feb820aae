"""The store: schema and migrations, the one-writer lock, transactions, namespace rules."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from memstage.stores import schema
from memstage.stores.store import (
    MemoryStore,
    NamespaceError,
    StoreError,
    StoreLockedError,
    validate_namespace,
)


def test_new_store_has_every_table_at_the_current_schema_version(store):
    tables = set(
        store.query("SELECT table_name FROM information_schema.tables").column("table_name").to_pylist()
    )
    assert set(schema.TABLES) <= tables
    version = store.query("SELECT value FROM schema_meta WHERE key = 'version'").column("value")[0].as_py()
    assert int(version) == schema.SCHEMA_VERSION


def test_newer_schema_version_is_refused(store):
    with store.writer() as w:
        w.execute("UPDATE schema_meta SET value = '999' WHERE key = 'version'")
    with pytest.raises(StoreError, match="newer than this memstage"), store.writer():
        pass


def test_a_failed_transaction_writes_nothing(store):
    row = {"id": "q1", "namespace": "a", "source": "s", "record_no": 1, "raw": "x", "reason": "r"}
    with pytest.raises(RuntimeError), store.writer() as w:
        w.insert("quarantine", pa.Table.from_pylist([row]))
        raise RuntimeError("boom")
    assert store.counts()["quarantine"] == 0


def test_insert_ignores_existing_keys_and_reports_only_new_rows(store):
    row = {"id": "q1", "namespace": "a", "source": "s", "record_no": 1, "raw": "x", "reason": "r"}
    with store.writer() as w:
        assert w.insert("quarantine", pa.Table.from_pylist([row])) == 1
    with store.writer() as w:
        assert w.insert("quarantine", pa.Table.from_pylist([row, {**row, "id": "q2"}])) == 1
    assert store.counts()["quarantine"] == 2


def test_second_writer_gets_a_clear_error_naming_the_holder(store, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from memstage.stores.store import MemoryStore
            with MemoryStore({str(store.home)!r}).writer():
                print("locked", flush=True)
                time.sleep(30)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(StoreLockedError, match=r"another writer holds .*memstage.lock \(pid \d+"),
            store.writer(),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with store.writer():  # released when the holder dies, even by SIGKILL
        pass


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "-x", "x" * 200, "spaces here"])
def test_bad_namespace_names_are_refused(bad):
    with pytest.raises(NamespaceError):
        validate_namespace(bad)


def test_unknown_namespace_error_lists_the_known_ones(indexed_sample):
    with pytest.raises(NamespaceError, match="known: demo"):
        indexed_sample.require_namespace("nobody")


def test_reopening_a_store_keeps_its_data(indexed_sample):
    again = MemoryStore(indexed_sample.home)
    assert again.counts("demo")["events"] == 19


def test_hold_shares_one_connection_and_keeps_every_transaction(store, monkeypatch):
    import duckdb

    row = {"id": "h1", "namespace": "a", "source": "s", "record_no": 1, "raw": "x", "reason": "r"}
    opened = []
    real_connect = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *a, **k: opened.append(a) or real_connect(*a, **k))
    other = MemoryStore(store.home)  # a second handle on the same file shares the held connection
    with store.hold(), store.hold():  # re-entrant
        with store.writer() as w:
            w.insert("quarantine", pa.Table.from_pylist([row]))
        assert other.counts()["quarantine"] == 1  # committed, and visible to every reader
        with pytest.raises(RuntimeError), other.writer() as w:
            w.insert("quarantine", pa.Table.from_pylist([{**row, "id": "h2"}]))
            raise RuntimeError("boom")  # this transaction alone is rolled back
    assert len(opened) == 1
    assert store.query("SELECT id FROM quarantine").column("id").to_pylist() == ["h1"]


def test_hold_keeps_other_processes_out_until_released(store):
    script = (
        f"from memstage.stores.store import MemoryStore\nwith MemoryStore({str(store.home)!r}).writer(): pass"
    )
    with store.hold():
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert other.returncode != 0 and "another writer holds" in other.stderr
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).returncode == 0


def test_threads_reading_and_writing_one_store_wait_instead_of_failing(tmp_path):
    """DuckDB allows one configuration (read-only or read-write) per file per process: a reader
    thread and a writer thread of one process used to fail with ConnectionException when they met
    (seen in `memstage eval`'s maintain, whose stage tasks run as threads); now each waits."""
    import threading
    import time

    MemoryStore(tmp_path)
    errors: list[str] = []
    writes = [0]
    stop = time.monotonic() + 3

    def reader() -> None:
        store = MemoryStore(tmp_path)
        while time.monotonic() < stop and not errors:
            try:
                store.query("SELECT count(*) AS n FROM events")
            except Exception as exc:  # noqa: BLE001 - recorded, then asserted on
                errors.append(repr(exc))

    def writer() -> None:
        store = MemoryStore(tmp_path, lock_timeout_s=30)
        while time.monotonic() < stop and not errors:
            try:
                with store.writer() as w:
                    w.execute("CREATE TABLE IF NOT EXISTS t (x INT)")
                    w.execute("INSERT INTO t VALUES (1)")
                writes[0] += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)] + [
        threading.Thread(target=writer) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and writes[0] > 0
    assert MemoryStore(tmp_path).query("SELECT count(*) AS n FROM t").column("n")[0].as_py() == writes[0]


def test_duckdb_memory_setting_bounds_the_store_connections(tmp_path, monkeypatch) -> None:
    """MEMSTAGE_DUCKDB_MEMORY becomes DuckDB's memory_limit on the store's connections (the scale
    bench's 1M build needs DuckDB's buffers bounded); a value that is no amount of memory is refused."""
    from memstage.settings import Settings, get_settings

    with pytest.raises(ValueError, match="MEMSTAGE_DUCKDB_MEMORY='lots' is not an amount of memory"):
        Settings.from_env({"MEMSTAGE_DUCKDB_MEMORY": "lots"})
    monkeypatch.setenv("MEMSTAGE_DUCKDB_MEMORY", "512MiB")
    get_settings.cache_clear()
    try:
        store = MemoryStore(tmp_path / "home")
        limit = store.query("SELECT current_setting('memory_limit') AS m").column("m")[0].as_py()
        with store.writer() as w:
            in_writer = w.query("SELECT current_setting('memory_limit') AS m").column("m")[0].as_py()
    finally:
        get_settings.cache_clear()
    assert limit == in_writer
    assert limit.replace(" ", "").lower() in ("512.0mib", "512mib", "536.8mb")
