"""What both backends share: the schema, every query, compare-and-set, the audit diff and the
lock protocol. A backend only says how to connect, run a statement and take one lock.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from vmpower.core.model import Cause, PowerState, Record, VmState, stored_state
from vmpower.core.settings import POSTGRES_SCHEMES, store_scheme

if TYPE_CHECKING:  # typing.Self is Python 3.11's; typing_extensions is no runtime dependency
    from typing_extensions import Self

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
    task_owner      TEXT NOT NULL DEFAULT '',
    off_reason      TEXT NOT NULL DEFAULT '',
    drift_since     {real} NOT NULL DEFAULT 0
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
           "version", "restart_count", "last_restart_at", "off_since", "boot_id", "task_owner",
           "off_reason", "drift_since")
# Columns added after the first release, with their types (``{real}`` as in TABLES): a store
# created before them gets them by ALTER TABLE when it is opened (each backend's migration).
ADDED_COLUMNS = (("off_since", "{real} NOT NULL DEFAULT 0"),
                 ("boot_id", "TEXT NOT NULL DEFAULT ''"),
                 ("task_owner", "TEXT NOT NULL DEFAULT ''"),
                 ("off_reason", "TEXT NOT NULL DEFAULT ''"),
                 ("drift_since", "{real} NOT NULL DEFAULT 0"))
# Not shown in the audit's old/new: host-internal bookkeeping (a monotonic clock reading and
# the boot it belongs to, when a drift began) that means nothing to people and would clutter
# every entry.
NOT_AUDITED = ("uuid", "version", "updated_at", "off_since", "boot_id", "drift_since")
AUDIT_COLUMNS = ("id", "at", "uuid", "name", "host", "cause", "action", "old", "new", "reason")
# How long reconcile, stop and start wait for an instance lock (a sync does not wait at all:
# ``try_locks``). Bounded, and well below the minutes a hung job would hold it: a wait that
# fails says who holds the lock, so the operator can tell a long stop from a stuck job.
LOCK_TIMEOUT = 30.0

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


#: The lock held while a process creates or upgrades the store's schema; no instance UUID or
#: ``host-<id>`` lock is named so.
SCHEMA_LOCK = "(schema)"


class StoreError(RuntimeError):
    """The store cannot be read or written; nothing may be decided without it."""


class LockBusy(StoreError):
    """A lock was not free within the time allowed; ``holder`` says who holds it (a dict with
    ``pid``, ``host``, ``job``, ``since``), or is None when the holder has not said."""

    def __init__(self, message: str, key: str, holder: dict | None):
        super().__init__(message)
        self.key = key
        self.holder = holder


def _this_job() -> str:
    """What this process is, for the lock files: a Salt job process is named after its job
    (``ProcessPayload(jid=...)``); anything else by its command."""
    name = multiprocessing.current_process().name
    if name != "MainProcess":
        return name
    return " ".join([os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python"),
                     *sys.argv[1:3]])


def describe_holder(holder: dict | None) -> str:
    """``pid 1234 on h1 (vmpower.stop, since 12:00:01 UTC)``, from a lock's holder."""
    if not holder:
        return "a process that has not said who it is"
    since = holder.get("since")
    when = (time.strftime("%H:%M:%S UTC", time.gmtime(since))
            if isinstance(since, (int, float)) else "?")
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"({holder.get('job') or 'unknown job'}, since {when})")


@dataclasses.dataclass(frozen=True)
class Change:
    """One record write with its audit entry: ``before`` is None for a new record."""

    before: Record | None
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


def record_of(row: Sequence) -> Record:
    """The record a stored row holds (a row of ``Store.rows_for_host``, say)."""
    # Positional, in COLUMNS order (Record's field order): a sync reads every record of the host.
    # A state this version does not know is kept as it is; the rules leave that VM alone.
    return Record(row[0], row[1], row[2], stored_state(_VM_STATES, row[3]),
                  stored_state(_POWER_STATES, row[4]), *row[5:])


def _plain(value):
    return value.value if hasattr(value, "value") else value


def diff(before: Record | None, after: Record) -> tuple:
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
    _errors: tuple[type, ...] = ()
    _db: Any

    def __init__(self, location: str):
        self.path = location
        self._held: dict[str, Any] = {}  # lock name -> what releases it
        #: What the locks this store takes say about their holder's job; a caller may set it
        #: to something more telling (``vmpower.stop web1``, with the Salt jid).
        self.job = _this_job()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
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
    def _try_lock(self, key: str) -> Any | None:
        """Take the cross-process lock ``key`` if it is free: what releases it, or None."""

    @abc.abstractmethod
    def _release(self, key: str, handle: Any) -> None:
        """Release a lock ``_try_lock`` took."""

    @abc.abstractmethod
    def _write_holder(self, key: str, handle: Any, holder: str) -> None:
        """Leave ``holder`` (a JSON text) where others can read it while the lock is held."""

    @abc.abstractmethod
    def _read_holder(self, key: str) -> str | None:
        """What the holder of lock ``key`` left (``_write_holder``), or None."""

    # Reading
    def _query(self, sql: str, args: Iterable = ()) -> list[Sequence]:
        try:
            return self._run(sql, tuple(args)).fetchall()
        except self._errors as exc:
            raise StoreError(f"the vmpower store {self.path} could not be read: "
                             f"{self._describe(exc)}") from exc

    def get(self, uuid: str) -> Record | None:
        rows = self._query(SQL_GET, (uuid,))
        return record_of(rows[0]) if rows else None

    def find(self, name_or_uuid: str, host: str | None = None) -> Record | None:
        """The record with this UUID, else one with this name; with ``host``, only that
        minion's VM goes by the name (names are unique per hypervisor, not in a fleet)."""
        if host is None:
            rows = self._query(SQL_FIND, (name_or_uuid,) * 3)
        else:
            rows = self._query(SQL_FIND_ON_HOST, (name_or_uuid, name_or_uuid, host, name_or_uuid))
        return record_of(rows[0]) if rows else None

    def get_many(self, uuids: Sequence[str]) -> dict[str, Record]:
        """The records of these UUIDs that exist, in a query per ``IN_CHUNK`` of them."""
        found: dict[str, Record] = {}
        for start in range(0, len(uuids), IN_CHUNK):
            part = uuids[start:start + IN_CHUNK]
            rows = self._query(sql_get_many(len(part)), part)
            found.update((row[0], record_of(row)) for row in rows)
        return found

    def count(self, host: str | None = None) -> int:
        """How many records there are, or with ``host``, how many that minion owns."""
        if host is None:
            return self._query(SQL_COUNT)[0][0]
        return self._query(SQL_COUNT_ON_HOST, (host,))[0][0]

    def for_host(self, host: str) -> dict[str, Record]:
        """Every record owned by the minion ``host``: a store shared by a fleet holds others too."""
        return {uuid: record_of(row) for uuid, row in self.rows_for_host(host).items()}

    def rows_for_host(self, host: str) -> dict[str, Sequence]:
        """``for_host`` as stored: each record a row in ``Record``'s field order, its states as
        text. A sync reads every record of the host and decides on the few distinct ones, so
        it builds a ``Record`` (``record_of``) only for those."""
        return {row[0]: row for row in self._query(SQL_FOR_HOST, (host,))}

    def history(self, uuid: str, limit: int | None = None) -> list[dict]:
        rows = self._query(SQL_HISTORY, (uuid,))
        if limit:
            rows = rows[-limit:]
        entries = [dict(zip(AUDIT_COLUMNS, row)) for row in rows]
        for entry in entries:
            entry["old"], entry["new"] = json.loads(entry["old"]), json.loads(entry["new"])
        return entries

    # Writing
    def commit(self, changes: Sequence[Change], at: float, notes: Sequence[Note] = ()) -> list[Change]:
        """Write ``changes`` and the audit entries of ``changes`` and ``notes`` in one transaction.

        Each update is compare-and-set on the record's version: one that lost a race (or an
        insert of a record that now exists) is left out and returned, so the caller can
        re-read and decide again. Everything else commits together. Rows are written in UUID
        order, so two writers that share rows wait for each other instead of deadlocking.
        """
        conflicts: list[Change] = []
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
        """Hold the cross-process lock named ``key`` (an instance UUID, or ``host-<id>``),
        waiting at most ``timeout`` seconds for it; LockBusy names its holder otherwise.

        Its holder dying, however it dies, releases it. Not re-entrant: a store that holds a
        lock waits for it like anyone else.
        """
        return self.locks([key], timeout)

    @contextlib.contextmanager
    def locks(self, keys: Iterable[str], timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold several locks, taken in sorted order so that two holders cannot deadlock;
        ``timeout`` bounds the whole wait."""
        taken: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            for key in sorted(set(keys)):
                self._wait_for(key, deadline, timeout)
                taken.append(key)
            yield
        finally:
            self._release_all(taken)

    @contextlib.contextmanager
    def try_locks(self, keys: Iterable[str]) -> Iterator[tuple[list[str], dict[str, dict | None]]]:
        """Take each of the locks ``keys`` that is free now, without waiting; yields
        ``(held, busy)``: the keys now held (sorted) and, for each busy key, its holder (as in
        LockBusy.holder). The held ones are released on leaving the block.

        A sync uses it: a VM whose lock another job holds is left for later, not waited for.
        A key this store holds already counts as busy (locks are not re-entrant).
        """
        held: list[str] = []
        busy: dict[str, dict | None] = {}
        try:
            wanted = sorted(set(keys))
            held = self._take_many([key for key in wanted if key not in self._held])
            busy = {key: self.holder(key) for key in wanted if key not in held}
            yield held, busy
        finally:
            self._release_all(held)

    def holder(self, key: str) -> dict | None:
        """Who holds lock ``key``, as its holder wrote it when it took it; None if unknown.
        Only meaningful while the lock is held (a released lock says nothing)."""
        if key in self._held:
            return json.loads(self._holder_text(key))
        try:
            text = self._read_holder(key)
        except self._errors + (OSError,) as exc:
            log.debug("vmpower: cannot read the holder of the lock %r in %s: %s", key, self.path, exc)
            return None
        try:
            holder = json.loads(text) if text else None
        except ValueError:  # read while its holder was writing it
            return None
        return holder if isinstance(holder, dict) else None

    def _holder_text(self, key: str) -> str:
        return json.dumps({"key": key, "pid": os.getpid(), "host": socket.gethostname(),
                           "job": self.job, "since": round(time.time(), 3)}, sort_keys=True)

    def _take(self, key: str) -> bool:
        """Try lock ``key`` once; True if it is held now."""
        try:
            handle = self._try_lock(key)
        except self._errors + (OSError,) as exc:
            raise StoreError(f"could not take the vmpower lock {key!r} in {self.path}: "
                             f"{self._describe(exc)}") from exc
        if handle is None:
            return False
        self._held[key] = handle
        try:
            self._write_holder(key, handle, self._holder_text(key))
        except self._errors + (OSError,) as exc:  # the lock holds; only its label is missing
            log.warning("vmpower: cannot record the holder of the lock %r in %s: %s", key,
                        self.path, self._describe(exc))
        return True

    def _take_many(self, keys: list[str]) -> list[str]:
        """Try each of ``keys`` (sorted, none held by this store) once; those held now, in
        order. Raises holding none of them. A backend may take them in fewer round trips."""
        taken: list[str] = []
        try:
            for key in keys:
                if self._take(key):
                    taken.append(key)
        except BaseException:
            self._release_all(taken)
            raise
        return taken

    def _release_all(self, keys: list[str]) -> None:
        self._release_many([(key, self._held.pop(key)) for key in reversed(keys)])

    def _release_many(self, taken: list[tuple[str, Any]]) -> None:
        """Release each ``(key, handle)``; one that fails is logged, and the rest released. A
        backend may release them in fewer round trips."""
        for key, handle in taken:
            try:
                self._release(key, handle)
            except self._errors + (OSError,) as exc:  # a lost connection lost its locks too
                log.warning("vmpower: releasing the lock %r of %s: %s", key, self.path, exc)

    def _what(self, key: str) -> str:
        """What lock ``key`` protects, in words, for an error message."""
        if key == SCHEMA_LOCK:
            return "the lock on the store's schema (held while a vmpower process sets it up)"
        if key.startswith("sync-queue-"):
            return f"the queue of the syncs of minion {key[len('sync-queue-'):]}"
        if key.startswith("host-"):
            return f"the sync lock of minion {key[len('host-'):]}"
        try:
            record = self.get(key)
        except StoreError:
            record = None
        return f"the instance lock of {record.name} ({key})" if record else f"the instance lock of {key}"

    def _wait_for(self, key: str, deadline: float, timeout: float) -> None:
        pause = 0.001
        while True:
            if key not in self._held and self._take(key):
                return
            if time.monotonic() >= deadline:
                holder = self.holder(key) if key not in self._held else json.loads(self._holder_text(key))
                raise LockBusy(f"could not take the vmpower lock {key!r} within {timeout:g}s: "
                               f"{self._what(key)} is held by {describe_holder(holder)}",
                               key, holder)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.05)
