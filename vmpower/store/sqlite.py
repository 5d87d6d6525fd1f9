"""The SQLite backend, the default: one file, ``/var/lib/vmpower/records.sqlite`` unless configured.

Crash-safe (WAL journal, full fsync on commit); writers take the database's write lock up front
(``BEGIN IMMEDIATE``). Every job opens the store, so an open that finds the schema complete
(every table, index, trigger and added column) does no schema work and takes no lock for it.
Locks are flocks on files of their own in ``<path>.locks/``: the kernel releases them when
their holder dies, however it dies. The holder writes who it is (pid, host, job, since) into
the lock file, so a wait that times out can name it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import sqlite3
from collections.abc import Sequence

from vmpower.store.base import ADDED_COLUMNS, APPEND_ONLY, SCHEMA_LOCK, TABLES, Store, StoreError

log = logging.getLogger(__name__)

SCHEMA = TABLES.format(real="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT") + f"""
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END;
"""
_SCHEMA_OBJECTS = re.findall(r"CREATE (?:TABLE|INDEX|TRIGGER) IF NOT EXISTS (\w+)", SCHEMA)
# True when the file holds every table, index and trigger of SCHEMA.
SCHEMA_PRESENT = (f"SELECT count(*) = {len(_SCHEMA_OBJECTS)} FROM sqlite_master WHERE name IN "
                  f"({', '.join(repr(name) for name in _SCHEMA_OBJECTS)})")


class SqliteStore(Store):
    """The SQLite store at ``path``; locks live in ``<path>.locks/``."""

    BEGIN = "BEGIN IMMEDIATE"
    _errors = (sqlite3.Error,)

    def __init__(self, path: str):
        super().__init__(path)
        self._lock_dir = path + ".locks"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.makedirs(self._lock_dir, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise self._unreadable(exc) from exc
        try:
            self._db.execute("PRAGMA synchronous=FULL")  # a setting of the connection, not the file
            if not self._ready():
                # One process at a time: turning a new (or old) file to WAL needs it to itself,
                # and SQLite refuses that at once, without its busy wait, to two openers doing it
                # together.
                with self.lock(SCHEMA_LOCK):
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.executescript(SCHEMA)
                    self._migrate()
        except StoreError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            raise self._unreadable(exc) from exc

    def _ready(self) -> bool:
        """Whether the file is in WAL mode with the whole schema, the columns added since the
        first release included (a file that is not a database raises sqlite3.Error)."""
        return (self._db.execute(SCHEMA_PRESENT).fetchone()[0] == 1
                and not self._missing_columns()
                and self._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal")

    def _missing_columns(self):
        present = {row[1] for row in self._db.execute("PRAGMA table_info(instances)")}
        return [(name, kind) for name, kind in ADDED_COLUMNS if name not in present]

    def _migrate(self) -> None:
        """Add the columns a store made by an older vmpower lacks, under the write lock, so
        that two processes opening it at once do not both add them."""
        if not self._missing_columns():
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            missing = self._missing_columns()
            for name, kind in missing:
                self._db.execute(f"ALTER TABLE instances ADD COLUMN {name} {kind.format(real='REAL')}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if missing:
            log.info("vmpower: the store %s gained the columns %s", self.path,
                     ", ".join(name for name, _ in missing))

    def _run(self, sql: str, args: Sequence = ()):
        return self._db.execute(sql, tuple(args))

    def _run_many(self, sql: str, rows: Sequence[Sequence]) -> None:
        self._db.executemany(sql, rows)

    def _lock_path(self, key: str) -> str:
        return os.path.join(self._lock_dir, key.replace("/", "_") + ".lock")

    def _try_lock(self, key: str) -> int | None:
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _write_holder(self, key: str, fd: int, holder: str) -> None:
        # In the lock file itself, written only by the flock's holder.
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)

    def _read_holder(self, key: str) -> str | None:
        try:
            with open(self._lock_path(key)) as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def _release(self, key: str, fd: int) -> None:
        try:
            os.ftruncate(fd, 0)  # a released lock names no holder
        finally:
            os.close(fd)  # releases the lock
