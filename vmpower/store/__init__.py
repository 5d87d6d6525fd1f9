"""The record store: one record per domain and an append-only audit log, with compare-and-set
on ``version`` and per-instance and per-host locks that hold across processes (Salt runs every
job in its own process).

``open_store(location)`` opens it: SQLite at a file path (the default,
``/var/lib/vmpower/records.sqlite``), or PostgreSQL at a ``postgresql://`` DSN, one database for
a fleet of minions. Both backends run
the same SQL and the same diff, audit and lock logic (``base``); each says only how to connect,
run a statement and take one lock.
"""

from vmpower.store.base import (
    COLUMNS,
    LOCK_TIMEOUT,
    Change,
    LockBusy,
    Note,
    Store,
    StoreError,
    describe_holder,
    diff,
    open_store,
    record_of,
)
from vmpower.store.postgres import PostgresStore
from vmpower.store.sqlite import SqliteStore

__all__ = ["COLUMNS", "LOCK_TIMEOUT", "Change", "LockBusy", "Note", "PostgresStore", "SqliteStore", "Store",
           "StoreError", "describe_holder", "diff", "open_store", "record_of"]
