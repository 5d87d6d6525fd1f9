"""The PostgreSQL backend: one database for a whole fleet of minions (``vmpower:store`` set to a
``postgresql://`` DSN). Each record's ``host`` says which minion owns the VM, and each minion
syncs only its own (``for_host``).

Needs psycopg 3 (``pip install 'vmpower[postgres]'``); without it vmpower still runs on SQLite,
and a DSN is a clear error. The schema is created on first use, under a transaction-level
advisory lock so that minions starting together do not race. The audit log is append-only
through triggers, as in SQLite. Compare-and-set works unchanged at READ COMMITTED: an UPDATE
that waited on a concurrent writer re-checks ``version`` on the row it committed.

Locks are session-level advisory locks (``pg_try_advisory_lock``, polled like the flocks of
SQLite) on a 64-bit key derived from the lock's name, held on the store's own connection: they
hold across processes and minions, and the server releases them when that connection ends,
however its process died. A connection lost while holding them fails every later statement of
the store too, so nothing goes on writing unlocked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
from collections.abc import Sequence

from vmpower.store.base import ADDED_COLUMNS, APPEND_ONLY, SCHEMA_LOCK, TABLES, Store, StoreError

log = logging.getLogger(__name__)

try:
    import psycopg
    from psycopg import conninfo
except ImportError:  # an optional extra: reported when a DSN is used
    psycopg = None

# Bounds on waits inside the server: for a lock another session holds, and for a session that
# holds a transaction open doing nothing (SQLite's counterpart is its 30 s busy timeout).
WAIT_LIMIT = "30s"
IDLE_IN_TRANSACTION_LIMIT = "60s"
# Unless the DSN says otherwise: an unreachable server is an error within seconds, not minutes.
CONNECT_DEFAULTS = {"connect_timeout": "10", "application_name": "vmpower"}
TRIGGERS = {"audit_no_update": "BEFORE UPDATE ON audit FOR EACH ROW",
            "audit_no_delete": "BEFORE DELETE ON audit FOR EACH ROW",
            "audit_no_truncate": "BEFORE TRUNCATE ON audit FOR EACH STATEMENT"}
REAL = "DOUBLE PRECISION"
# A store made by an older vmpower gains the columns added since (IF NOT EXISTS: a no-op on a
# new one), in the same transaction and under the same advisory lock as the rest of the schema.
MIGRATION = "".join(f"ALTER TABLE instances ADD COLUMN IF NOT EXISTS {name} {kind.format(real=REAL)};\n"
                    for name, kind in ADDED_COLUMNS)
# Who holds each advisory lock (written by its holder when it takes it, deleted when it lets
# go): pg_locks names only a backend, not the vmpower job behind it.
HOLDERS = "CREATE TABLE IF NOT EXISTS lock_holders (key TEXT PRIMARY KEY, holder TEXT NOT NULL);\n"
SCHEMA = TABLES.format(real=REAL,
                       serial="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY") + MIGRATION + HOLDERS + f"""
CREATE OR REPLACE FUNCTION vmpower_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$;
""" + "".join(f"DROP TRIGGER IF EXISTS {name} ON audit;\n"
              f"CREATE TRIGGER {name} {when} EXECUTE FUNCTION vmpower_audit_append_only();\n"
              for name, when in TRIGGERS.items())
SCHEMA_READY = ("SELECT to_regclass('instances') IS NOT NULL AND to_regclass('lock_holders') IS NOT NULL "
                "AND (SELECT count(*) FROM pg_trigger "
                "WHERE tgrelid = to_regclass('audit') AND tgname IN "
                f"({', '.join(repr(name) for name in TRIGGERS)})) = {len(TRIGGERS)} "
                "AND (SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('instances') "
                "AND NOT attisdropped AND attname IN "
                f"({', '.join(repr(name) for name, _ in ADDED_COLUMNS)})) = {len(ADDED_COLUMNS)}")


def lock_id(key: str) -> int:
    """The advisory lock key of the lock named ``key``: a signed 64-bit hash of its name."""
    digest = hashlib.blake2b(f"vmpower:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def mask_password(dsn: str) -> str:
    """The DSN with its password, in the user part or as a ``password=`` parameter, as ``***``."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return dsn
    head, question, query = rest.partition("?")
    at = head.rfind("@")
    if at != -1 and ":" in head[:at]:
        head = head[:head.index(":")] + ":***" + head[at:]
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", query)
    return f"{scheme}://{head}{question}{query}"


def _passwords(dsn: str) -> list[str]:
    """The password as written in the DSN and as decoded, to keep out of error messages."""
    found = []
    if mask_password(dsn) != dsn:
        found += re.findall(r"://[^:/?@]*:([^?]*)@", dsn)[:1]
        found += re.findall(r"[?&]password=([^&]*)", dsn)
    try:
        decoded = conninfo.conninfo_to_dict(dsn).get("password")
    except Exception:  # a DSN psycopg cannot parse fails with its own message when connecting
        decoded = None
    if decoded:
        found.append(decoded)
    return sorted({p for p in found if len(p) >= 3}, key=len, reverse=True)


@functools.lru_cache(maxsize=256)
def _driver_sql(sql: str) -> str:
    return sql.replace("?", "%s")  # vmpower's SQL is written with SQLite's placeholders


class PostgresStore(Store):
    """The store in the PostgreSQL database named by ``dsn``."""

    _errors = (psycopg.Error,) if psycopg else ()

    def __init__(self, dsn: str):
        scheme, sep, rest = dsn.partition("://")
        dsn = scheme.lower() + sep + rest  # libpq knows its URI schemes in lowercase only
        super().__init__(mask_password(dsn))
        if psycopg is None:
            raise StoreError(f"the vmpower store {self.path} needs the PostgreSQL driver psycopg, "
                             f"which is not installed: pip install 'psycopg[binary]'")
        self._secrets = _passwords(dsn)
        try:
            given = conninfo.conninfo_to_dict(dsn)
            defaults = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
            self._db = psycopg.connect(dsn, autocommit=True, **defaults)
        except psycopg.Error as exc:
            raise self._unreadable(exc) from None  # psycopg's own exception may quote the DSN
        try:
            # No statement waits unbounded for another session's row or table lock (a writer
            # whose job hung mid-transaction), and such a transaction is ended by the server.
            # One round trip for both (no parameters: psycopg sends it as one simple query).
            self._db.execute(f"SET lock_timeout = '{WAIT_LIMIT}'; "
                             f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_LIMIT}'")
            self._create_schema()
        except psycopg.Error as exc:
            self._db.close()
            raise self._unreadable(exc) from exc

    def _describe(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _create_schema(self) -> None:
        if self._db.execute(SCHEMA_READY).fetchone()[0]:
            return
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id(SCHEMA_LOCK),))
            self._db.execute(SCHEMA)

    def _run(self, sql: str, args: Sequence = ()):
        return self._db.execute(_driver_sql(sql), tuple(args) or None)

    def _run_many(self, sql: str, rows: Sequence[Sequence]) -> None:
        with self._db.cursor() as cursor:
            cursor.executemany(_driver_sql(sql), rows)

    def _try_lock(self, key: str) -> int | None:
        ident = lock_id(key)
        taken = self._db.execute("SELECT pg_try_advisory_lock(%s)", (ident,)).fetchone()[0]
        return ident if taken else None

    def _write_holder(self, key: str, ident: int, holder: str) -> None:
        self._db.execute("INSERT INTO lock_holders (key, holder) VALUES (%s, %s) "
                         "ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder", (key, holder))

    def _read_holder(self, key: str) -> str | None:
        row = self._db.execute("SELECT holder FROM lock_holders WHERE key = %s", (key,)).fetchone()
        return row[0] if row else None

    def _take_many(self, keys: list[str]) -> list[str]:
        # A sync locks the VMs it will write in one go: each statement of the lock protocol
        # once for them all, not once for each (a round trip and a transaction of the
        # server's each).
        if len(keys) < 2:
            return super()._take_many(keys)
        idents = [lock_id(key) for key in keys]
        try:
            rows = self._db.execute("SELECT pg_try_advisory_lock(id) FROM unnest(%s::bigint[]) "
                                    "WITH ORDINALITY AS t(id, n) ORDER BY n", (idents,)).fetchall()
        except psycopg.Error as exc:
            # Locks taken before the statement failed stay taken (they are the session's, not
            # the transaction's): let go of them all (none was held before; unlocking one not
            # held only returns false).
            with contextlib.suppress(psycopg.Error):
                self._db.execute("SELECT pg_advisory_unlock(id) FROM unnest(%s::bigint[]) AS id", (idents,))
            raise StoreError(f"could not take the vmpower locks {', '.join(map(repr, keys))} in "
                             f"{self.path}: {self._describe(exc)}") from exc
        taken = [(key, ident) for (key, ident), (ok,) in zip(zip(keys, idents), rows) if ok]
        self._held.update(taken)
        if taken:
            try:
                self._db.execute("INSERT INTO lock_holders (key, holder) "
                                 "SELECT * FROM unnest(%s::text[], %s::text[]) "
                                 "ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder",
                                 ([key for key, _ in taken], [self._holder_text(key) for key, _ in taken]))
            except psycopg.Error as exc:  # the locks hold; only their labels are missing
                log.warning("vmpower: cannot record the holder of the locks %s in %s: %s",
                            ", ".join(repr(key) for key, _ in taken), self.path, self._describe(exc))
        return [key for key, _ in taken]

    def _release_many(self, taken: list[tuple[str, int]]) -> None:
        if len(taken) < 2:
            super()._release_many(taken)
            return
        try:
            try:
                # Before letting go, so that it never deletes the next holder's row.
                self._db.execute("DELETE FROM lock_holders WHERE key = ANY(%s)", ([key for key, _ in taken],))
            finally:
                self._db.execute("SELECT pg_advisory_unlock(id) FROM unnest(%s::bigint[]) AS id",
                                 ([ident for _, ident in taken],))
        except psycopg.Error as exc:  # a lost connection lost its locks too
            log.warning("vmpower: releasing the locks %s of %s: %s", ", ".join(repr(key) for key, _ in taken),
                        self.path, self._describe(exc))

    def _release(self, key: str, ident: int) -> None:
        try:
            # Before letting go, so that it never deletes the next holder's row.
            self._db.execute("DELETE FROM lock_holders WHERE key = %s", (key,))
        finally:
            self._db.execute("SELECT pg_advisory_unlock(%s)", (ident,))
