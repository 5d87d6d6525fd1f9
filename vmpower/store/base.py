"""What both backends share: the schema, every query, compare-and-set, the audit diff and the
lock protocol. A backend only says how to connect, run a statement and take one lock.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from vmpower.core.model import Cause, PowerState, Record, VmState
from vmpower.core.settings import POSTGRES_SCHEMES, store_scheme

log = logging.getLogger(__name__)

# The tables and indexes, in SQL both databases take; ``{real}`` and ``{serial}`` are the two
# column types they spell differently. The append-only triggers are each backend's own.
TABLES = """
CREATE TABLE IF NOT EXISTS instances (
    uuid            TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    host            TEXT NOT NULL,
    vm_state        TEXT NOT NULL,
    power_state     TEXT NOT NULL,
    task_state      TEXT NOT NULL DEFAULT '',
    updated_at      {real} NOT NULL,
    version         INTEGER NOT NULL,
    restart_count   INTEGER NOT NULL DEFAULT 0,
    last_restart_at {real} NOT NULL DEFAULT 0,
    off_since       {real} NOT NULL DEFAULT 0,
    boot_id         TEXT NOT NULL DEFAULT '',
    task_owner      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_by_host ON instances (host);
CREATE INDEX IF NOT EXISTS instances_by_name ON instances (name);
CREATE TABLE IF NOT EXISTS audit (
    id      {serial},
    at      {real} NOT NULL,
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
"""
APPEND_ONLY = "the audit log is append-only"  # what the triggers say to an UPDATE or DELETE
COLUMNS = ("uuid", "name", "host", "vm_state", "power_state", "task_state", "updated_at",
           "version", "restart_count", "last_restart_at", "off_since", "boot_id", "task_owner")
# Columns added after the first release, with their types (``{real}`` as in TABLES): a store
# created before them gets them by ALTER TABLE when it is opened (each backend's migration).
ADDED_COLUMNS = (("off_since", "{real} NOT NULL DEFAULT 0"),
                 ("boot_id", "TEXT NOT NULL DEFAULT ''"),
                 ("task_owner", "TEXT NOT NULL DEFAULT ''"))
# Not shown in the audit's old/new: host-internal bookkeeping (a monotonic clock reading and
# the boot it belongs to) that means nothing to people and would clutter every entry.
NOT_AUDITED = ("uuid", "version", "updated_at", "off_since", "boot_id")
AUDIT_COLUMNS = ("id", "at", "uuid", "name", "host", "cause", "action", "old", "new", "reason")
LOCK_TIMEOUT = 300.0

# Every statement, written once with ``?`` placeholders (the PostgreSQL backend turns them
# into its driver's ``%s``; none of these statements holds a literal ``?`` or ``%``).
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM instances"
SQL_GET = f"{_SELECT} WHERE uuid = ?"
SQL_FIND = f"{_SELECT} WHERE uuid = ? OR name = ? ORDER BY uuid = ? DESC LIMIT 1"
SQL_FIND_ON_HOST = f"{_SELECT} WHERE uuid = ? OR (name = ? AND host = ?) ORDER BY uuid = ? DESC LIMIT 1"
SQL_FOR_HOST = f"{_SELECT} WHERE host = ?"
SQL_COUNT = "SELECT count(*) FROM instances"
SQL_COUNT_ON_HOST = f"{SQL_COUNT} WHERE host = ?"
SQL_HISTORY = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit WHERE uuid = ? ORDER BY id"
SQL_INSERT = (f"INSERT INTO instances ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
              f"ON CONFLICT (uuid) DO NOTHING")
SQL_UPDATE = (f"UPDATE instances SET {', '.join(f'{c} = ?' for c in COLUMNS[1:])} "
              f"WHERE uuid = ? AND version = ?")
SQL_AUDIT = (f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS[1:])}) "
             f"VALUES ({', '.join('?' * (len(AUDIT_COLUMNS) - 1))})")
IN_CHUNK = 500  # UUIDs per ``IN (...)``: well under SQLite's limit on bound parameters


def sql_get_many(count: int) -> str:
    return f"{_SELECT} WHERE uuid IN ({', '.join('?' * count)})"


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
    fields = [c for c in COLUMNS if c not in NOT_AUDITED]
    old, new = {}, {}
    for field in fields:
        a = getattr(after, field)
        b = getattr(before, field) if before else None
        if before is None or a != b:
            new[field] = _plain(a)
            if before is not None:
                old[field] = _plain(b)
    return old, new


def open_store(location) -> Store:
    """The record store at ``location``, open: SQLite at a file path, PostgreSQL at a
    ``postgresql://`` DSN (one database for a fleet). Any other scheme is a StoreError."""
    location = os.fspath(location)
    scheme = store_scheme(location)
    if scheme is None:
        from vmpower.store.sqlite import SqliteStore
        return SqliteStore(location)
    if scheme in POSTGRES_SCHEMES:
        from vmpower.store.postgres import PostgresStore
        return PostgresStore(location)
    raise StoreError(f"the vmpower store {scheme}://... is not supported: give a SQLite file "
                     f"path or a postgresql:// DSN")


class Store(abc.ABC):
    """The record store: a SQLite file, or a PostgreSQL database; ``open_store(location)``
    opens the right backend, and both behave the same. ``path`` says where the store is, for people: the file, or the DSN with
    its password masked. Not for use by several threads at once.

    A backend sets ``_errors`` (its driver's exceptions) and ``BEGIN``, connects in
    ``__init__`` (``_db``), and implements ``_run``, ``_run_many``, ``_try_lock`` and
    ``_release``.
    """

    BEGIN = "BEGIN"
    _errors: Tuple[type, ...] = ()
    _db: Any

    def __init__(self, location: str):
        self.path = location
        self._held: Dict[str, Any] = {}  # lock name -> what releases it

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _describe(self, exc: BaseException) -> str:
        """The driver's error message, as it may be shown to people."""
        return str(exc).strip()

    def _unreadable(self, exc: BaseException) -> StoreError:
        return StoreError(f"the vmpower store {self.path} is unreadable: {self._describe(exc)}")

    # What a backend provides
    @abc.abstractmethod
    def _run(self, sql: str, args: Sequence = ()):
        """Execute one statement; a cursor with ``fetchall()`` and ``rowcount``."""

    @abc.abstractmethod
    def _run_many(self, sql: str, rows: Sequence[Sequence]) -> None:
        """Execute one statement for each of ``rows``."""

    @abc.abstractmethod
    def _try_lock(self, key: str) -> Optional[Any]:
        """Take the cross-process lock ``key`` if it is free: what releases it, or None."""

    @abc.abstractmethod
    def _release(self, key: str, handle: Any) -> None:
        """Release a lock ``_try_lock`` took."""

    # Reading
    def _query(self, sql: str, args: Iterable = ()) -> List[Sequence]:
        try:
            return self._run(sql, tuple(args)).fetchall()
        except self._errors as exc:
            raise StoreError(f"the vmpower store {self.path} could not be read: "
                             f"{self._describe(exc)}") from exc

    def get(self, uuid: str) -> Optional[Record]:
        rows = self._query(SQL_GET, (uuid,))
        return _row_to_record(rows[0]) if rows else None

    def find(self, name_or_uuid: str, host: Optional[str] = None) -> Optional[Record]:
        """The record with this UUID, else one with this name; with ``host``, only that
        minion's VM goes by the name (names are unique per hypervisor, not in a fleet)."""
        if host is None:
            rows = self._query(SQL_FIND, (name_or_uuid,) * 3)
        else:
            rows = self._query(SQL_FIND_ON_HOST, (name_or_uuid, name_or_uuid, host, name_or_uuid))
        return _row_to_record(rows[0]) if rows else None

    def get_many(self, uuids: Sequence[str]) -> Dict[str, Record]:
        """The records of these UUIDs that exist, in a query per ``IN_CHUNK`` of them."""
        found: Dict[str, Record] = {}
        for start in range(0, len(uuids), IN_CHUNK):
            part = uuids[start:start + IN_CHUNK]
            rows = self._query(sql_get_many(len(part)), part)
            found.update((row[0], _row_to_record(row)) for row in rows)
        return found

    def count(self, host: Optional[str] = None) -> int:
        """How many records there are, or with ``host``, how many that minion owns."""
        if host is None:
            return self._query(SQL_COUNT)[0][0]
        return self._query(SQL_COUNT_ON_HOST, (host,))[0][0]

    def for_host(self, host: str) -> Dict[str, Record]:
        """Every record owned by the minion ``host``: a store shared by a fleet holds others too."""
        rows = self._query(SQL_FOR_HOST, (host,))
        return {row[0]: _row_to_record(row) for row in rows}

    def history(self, uuid: str, limit: Optional[int] = None) -> List[dict]:
        rows = self._query(SQL_HISTORY, (uuid,))
        if limit:
            rows = rows[-limit:]
        entries = [dict(zip(AUDIT_COLUMNS, row)) for row in rows]
        for entry in entries:
            entry["old"], entry["new"] = json.loads(entry["old"]), json.loads(entry["new"])
        return entries

    # Writing
    def commit(self, changes: Sequence[Change], at: float, notes: Sequence[Note] = ()) -> List[Change]:
        """Write ``changes`` and the audit entries of ``changes`` and ``notes`` in one transaction.

        Each update is compare-and-set on the record's version: one that lost a race (or an
        insert of a record that now exists) is left out and returned, so the caller can
        re-read and decide again. Everything else commits together. Rows are written in UUID
        order, so two writers that share rows wait for each other instead of deadlocking.
        """
        conflicts: List[Change] = []
        audit_rows = [(at, n.record.uuid, n.record.name, n.record.host, n.cause.value, n.action,
                       "{}", "{}", n.reason) for n in notes]
        try:
            self._run(self.BEGIN)
            for change in sorted(changes, key=lambda c: c.after.uuid):
                after = change.after
                values = [_plain(getattr(after, c)) for c in COLUMNS]
                if change.before is None:
                    cursor = self._run(SQL_INSERT, values)
                else:
                    cursor = self._run(SQL_UPDATE, values[1:] + [after.uuid, change.before.version])
                if cursor.rowcount != 1:
                    conflicts.append(change)
                    continue
                old, new = diff(change.before, after)
                audit_rows.append((at, after.uuid, after.name, after.host, change.cause.value,
                                   change.action, json.dumps(old), json.dumps(new), change.reason))
            if audit_rows:
                self._run_many(SQL_AUDIT, audit_rows)
            self._run("COMMIT")
        except self._errors as exc:
            with contextlib.suppress(*self._errors):
                self._run("ROLLBACK")
            raise StoreError(f"the vmpower store {self.path} could not be written: "
                             f"{self._describe(exc)}") from exc
        order = {id(change): i for i, change in enumerate(changes)}
        return sorted(conflicts, key=lambda c: order[id(c)])

    # Locks
    def lock(self, key: str, timeout: float = LOCK_TIMEOUT):
        """Hold the cross-process lock named ``key`` (an instance UUID, or ``host-<id>``).

        Its holder dying, however it dies, releases it. Not re-entrant: a store that holds a
        lock waits for it like anyone else.
        """
        return self.locks([key], timeout)

    @contextlib.contextmanager
    def locks(self, keys: Iterable[str], timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold several locks, taken in sorted order so that two holders cannot deadlock."""
        taken: List[str] = []
        try:
            for key in sorted(set(keys)):
                self._wait_for(key, timeout)
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                handle = self._held.pop(key)
                try:
                    self._release(key, handle)
                except self._errors + (OSError,) as exc:  # a lost connection lost its locks too
                    log.warning("vmpower: releasing the lock %r of %s: %s", key, self.path, exc)

    def _wait_for(self, key: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            if key not in self._held:
                try:
                    handle = self._try_lock(key)
                except self._errors + (OSError,) as exc:
                    raise StoreError(f"could not take the vmpower lock {key!r} in {self.path}: "
                                     f"{self._describe(exc)}") from exc
                if handle is not None:
                    self._held[key] = handle
                    return
            if time.monotonic() >= deadline:
                raise StoreError(f"could not take the vmpower lock {key!r} within "
                                 f"{timeout:.0f}s: another vmpower job holds it")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
