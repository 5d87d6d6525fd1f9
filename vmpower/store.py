"""The record store: one record per domain and an append-only audit log, in SQLite.

Crash-safe (WAL journal, full fsync on commit), compare-and-set on ``version``, and per-instance
and per-host locks that hold across processes, since Salt runs every job in its own process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from vmpower.core.model import Cause, PowerState, Record, VmState

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    uuid            TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    host            TEXT NOT NULL,
    vm_state        TEXT NOT NULL,
    power_state     TEXT NOT NULL,
    task_state      TEXT NOT NULL DEFAULT '',
    updated_at      REAL NOT NULL,
    version         INTEGER NOT NULL,
    restart_count   INTEGER NOT NULL DEFAULT 0,
    last_restart_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_by_host ON instances (host);
CREATE INDEX IF NOT EXISTS instances_by_name ON instances (name);
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL NOT NULL,
    uuid    TEXT NOT NULL,
    name    TEXT NOT NULL,
    host    TEXT NOT NULL,
    cause   TEXT NOT NULL,
    action  TEXT NOT NULL,
    old     TEXT NOT NULL,
    new     TEXT NOT NULL,
    reason  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_uuid ON audit (uuid, id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
COLUMNS = ("uuid", "name", "host", "vm_state", "power_state", "task_state", "updated_at",
           "version", "restart_count", "last_restart_at")
LOCK_TIMEOUT = 300.0


class StoreError(RuntimeError):
    """The store cannot be read or written; nothing may be decided without it."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One record write with its audit entry: ``before`` is None for a new record."""

    before: Optional[Record]
    after: Record
    cause: Cause
    action: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Note:
    """An audit entry for a decision that changed no record (an event found stale...)."""

    record: Record
    cause: Cause
    action: str
    reason: str


_VM_STATES = {state.value: state for state in VmState}
_POWER_STATES = {state.value: state for state in PowerState}


def _row_to_record(row: Sequence) -> Record:
    # Positional, in COLUMNS order (Record's field order): a sync reads every record of the host.
    return Record(row[0], row[1], row[2], _VM_STATES[row[3]], _POWER_STATES[row[4]], *row[5:])


def _plain(value):
    return value.value if hasattr(value, "value") else value


def diff(before: Optional[Record], after: Record) -> tuple:
    """The fields that differ, as ``(old, new)`` dicts of plain values."""
    fields = [c for c in COLUMNS if c not in ("uuid", "version", "updated_at")]
    old, new = {}, {}
    for field in fields:
        a = getattr(after, field)
        b = getattr(before, field) if before else None
        if before is None or a != b:
            new[field] = _plain(a)
            if before is not None:
                old[field] = _plain(b)
    return old, new


class Store:
    """The SQLite store at ``path``; locks live in ``<path>.locks/``."""

    def __init__(self, path: str):
        self.path = path
        self._lock_dir = path + ".locks"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.makedirs(self._lock_dir, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"the vmpower store {path} is unreadable: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Reading
    def _query(self, sql: str, args: Iterable = ()) -> List[Sequence]:
        try:
            return self._db.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"the vmpower store {self.path} could not be read: {exc}") from exc

    def get(self, uuid: str) -> Optional[Record]:
        rows = self._query(f"SELECT {', '.join(COLUMNS)} FROM instances WHERE uuid = ?", (uuid,))
        return _row_to_record(rows[0]) if rows else None

    def find(self, name_or_uuid: str) -> Optional[Record]:
        rows = self._query(f"SELECT {', '.join(COLUMNS)} FROM instances WHERE uuid = ? OR name = ?"
                           " ORDER BY uuid = ? DESC LIMIT 1", (name_or_uuid,) * 3)
        return _row_to_record(rows[0]) if rows else None

    def get_many(self, uuids: Sequence[str]) -> Dict[str, Record]:
        """The records of these UUIDs that exist, in as few queries as SQLite allows."""
        found: Dict[str, Record] = {}
        chunk = 500  # well under SQLite's limit on bound parameters
        for start in range(0, len(uuids), chunk):
            part = uuids[start:start + chunk]
            rows = self._query(f"SELECT {', '.join(COLUMNS)} FROM instances WHERE uuid IN "
                               f"({', '.join('?' * len(part))})", part)
            found.update((row[0], _row_to_record(row)) for row in rows)
        return found

    def count(self) -> int:
        return self._query("SELECT count(*) FROM instances")[0][0]

    def for_host(self, host: str) -> Dict[str, Record]:
        rows = self._query(f"SELECT {', '.join(COLUMNS)} FROM instances WHERE host = ?", (host,))
        return {row[0]: _row_to_record(row) for row in rows}

    def history(self, uuid: str, limit: Optional[int] = None) -> List[dict]:
        sql = "SELECT id, at, uuid, name, host, cause, action, old, new, reason FROM audit " \
              "WHERE uuid = ? ORDER BY id"
        rows = self._query(sql, (uuid,))
        if limit:
            rows = rows[-limit:]
        keys = ("id", "at", "uuid", "name", "host", "cause", "action", "old", "new", "reason")
        entries = [dict(zip(keys, row)) for row in rows]
        for entry in entries:
            entry["old"], entry["new"] = json.loads(entry["old"]), json.loads(entry["new"])
        return entries

    # Writing
    def commit(self, changes: Sequence[Change], at: float, notes: Sequence[Note] = ()) -> List[Change]:
        """Write ``changes`` and the audit entries of ``changes`` and ``notes`` in one transaction.

        Each update is compare-and-set on the record's version: one that lost a race (or an
        insert of a record that now exists) is left out and returned, so the caller can
        re-read and decide again. Everything else commits together.
        """
        conflicts: List[Change] = []
        audit_rows = [(at, n.record.uuid, n.record.name, n.record.host, n.cause.value, n.action,
                       "{}", "{}", n.reason) for n in notes]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for change in changes:
                after = change.after
                values = [_plain(getattr(after, c)) for c in COLUMNS]
                if change.before is None:
                    cursor = self._db.execute(
                        f"INSERT OR IGNORE INTO instances ({', '.join(COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(COLUMNS))})", values)
                else:
                    sets = ", ".join(f"{c} = ?" for c in COLUMNS[1:])
                    cursor = self._db.execute(
                        f"UPDATE instances SET {sets} WHERE uuid = ? AND version = ?",
                        values[1:] + [after.uuid, change.before.version])
                if cursor.rowcount != 1:
                    conflicts.append(change)
                    continue
                old, new = diff(change.before, after)
                audit_rows.append((at, after.uuid, after.name, after.host, change.cause.value,
                                   change.action, json.dumps(old), json.dumps(new), change.reason))
            self._db.executemany(
                "INSERT INTO audit (at, uuid, name, host, cause, action, old, new, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", audit_rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise StoreError(f"the vmpower store {self.path} could not be written: {exc}") from exc
        return conflicts

    # Locks
    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the cross-process lock named ``key`` (an instance UUID, or ``host-<id>``).

        An flock on a file of its own: the kernel releases it when its holder dies, however
        it dies. Not re-entrant: a process takes each lock once at a time.
        """
        path = os.path.join(self._lock_dir, key.replace("/", "_") + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            pause = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreError(f"could not take the vmpower lock {key!r} within "
                                         f"{timeout:.0f}s: another vmpower job holds it") from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def locks(self, keys: Iterable[str], timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold several locks, taken in sorted order so that two holders cannot deadlock."""
        with contextlib.ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.enter_context(self.lock(key, timeout))
            yield
