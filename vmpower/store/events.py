"""The fleet's side of the store: vmpower's bus events and job results as the master's returner
keeps them, what is known of each host, and the reads a fleet report needs.

Three tables beside the records (``instances``, ``audit``) of the same database, created on
first use in either backend: ``fleet_events`` (pruned by the retention setting; unlike the
audit log it is not append-only), ``fleet_hosts`` (one row per minion: last sync, event loop,
last resync) and ``fleet_counters`` (events skipped as malformed...). When the minions write
their records to the same database (a PostgreSQL fleet store), a report joins them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vmpower.core.fleet import RESYNC, SYNC, FleetEvent
from vmpower.store.base import COLUMNS, IN_CHUNK, Store, StoreError

FLEET_TABLES = """
CREATE TABLE IF NOT EXISTS fleet_events (
    id            {serial},
    at            {real} NOT NULL,
    minion        TEXT NOT NULL,
    authenticated INTEGER NOT NULL,
    forged        INTEGER NOT NULL DEFAULT 0,
    kind          TEXT NOT NULL,
    tag           TEXT NOT NULL,
    uuid          TEXT NOT NULL DEFAULT '',
    name          TEXT NOT NULL DEFAULT '',
    transition    TEXT NOT NULL DEFAULT '',
    reason        TEXT NOT NULL DEFAULT '',
    data          TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS fleet_events_by_uuid ON fleet_events (uuid, id);
CREATE INDEX IF NOT EXISTS fleet_events_by_at ON fleet_events (at);
CREATE TABLE IF NOT EXISTS fleet_hosts (
    minion             TEXT PRIMARY KEY,
    last_seen          {real} NOT NULL DEFAULT 0,
    last_sync_at       {real} NOT NULL DEFAULT 0,
    last_sync_took     {real},
    last_sync          TEXT NOT NULL DEFAULT '{{}}',
    loop               TEXT NOT NULL DEFAULT '{{}}',
    last_resync_at     {real} NOT NULL DEFAULT 0,
    last_resync_reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS fleet_counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL DEFAULT 0
);
"""
EVENT_COLUMNS = (
    "at",
    "minion",
    "authenticated",
    "forged",
    "kind",
    "tag",
    "uuid",
    "name",
    "transition",
    "reason",
    "data",
)
SQL_ADD_EVENT = (
    f"INSERT INTO fleet_events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"
)
SQL_SEEN = (
    "INSERT INTO fleet_hosts (minion, last_seen) VALUES (?, ?) "
    "ON CONFLICT (minion) DO UPDATE SET last_seen = excluded.last_seen"
)
SQL_SYNCED = (
    "INSERT INTO fleet_hosts (minion, last_seen, last_sync_at, last_sync_took, last_sync) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (minion) DO UPDATE SET "
    "last_seen = excluded.last_seen, last_sync_at = excluded.last_sync_at, "
    "last_sync_took = excluded.last_sync_took, last_sync = excluded.last_sync"
)
SQL_LOOP = (
    "INSERT INTO fleet_hosts (minion, last_seen, loop) VALUES (?, ?, ?) "
    "ON CONFLICT (minion) DO UPDATE SET last_seen = excluded.last_seen, loop = excluded.loop"
)
SQL_RESYNC = (
    "INSERT INTO fleet_hosts (minion, last_seen, last_resync_at, last_resync_reason) "
    "VALUES (?, ?, ?, ?) ON CONFLICT (minion) DO UPDATE SET last_seen = excluded.last_seen, "
    "last_resync_at = excluded.last_resync_at, last_resync_reason = excluded.last_resync_reason"
)
SQL_COUNT = (
    "INSERT INTO fleet_counters (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = fleet_counters.value + excluded.value"
)
HOST_COLUMNS = (
    "minion",
    "last_seen",
    "last_sync_at",
    "last_sync_took",
    "last_sync",
    "loop",
    "last_resync_at",
    "last_resync_reason",
)
# The newest change of every VM (an audit entry that changed a field, or of something done: an
# event dropped as stale, a decision to do nothing or a write of bookkeeping alone is in the
# history but is no change) and its newest bus event, one query each: a report of 50,000 VMs
# must not ask 50,000 times.
CHANGED = "(new <> '{}' OR action NOT IN ('dropped', 'none', 'update'))"
SQL_LAST_CHANGES = (
    "SELECT uuid, at, cause, action, reason FROM audit "
    f"WHERE id IN (SELECT max(id) FROM audit WHERE {CHANGED} GROUP BY uuid)"
)
SQL_LAST_CHANGES_PG = (
    "SELECT DISTINCT ON (uuid) uuid, at, cause, action, reason FROM audit "
    f"WHERE {CHANGED} ORDER BY uuid, id DESC"
)
SQL_LAST_EVENTS = (
    "SELECT uuid, at, minion, transition, reason FROM fleet_events "
    "WHERE id IN (SELECT max(id) FROM fleet_events WHERE kind = 'lifecycle' GROUP BY uuid)"
)
RECORD_COLUMNS = ("uuid", "name", "host", "vm_state", "power_state", "task_state", "updated_at")


class FleetStore:
    """The fleet tables of the store ``store`` (a ``vmpower.store.Store``, either backend)."""

    def __init__(self, store: Store):
        self.store = store
        self.path = store.path
        self._create()

    def _create(self) -> None:
        from vmpower.store.postgres import PostgresStore, lock_id

        if isinstance(self.store, PostgresStore):
            schema = FLEET_TABLES.format(
                real="DOUBLE PRECISION", serial="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
            )
            db = self.store._db
            try:
                # Under the same lock as the records' schema: a master and minions starting
                # together do not race to create it.
                with db.transaction():
                    db.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id("(fleet schema)"),))
                    db.execute(schema)
            except self.store._errors as exc:
                raise self.store._unreadable(exc) from exc
            return
        schema = FLEET_TABLES.format(real="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT")
        try:
            self.store._db.executescript(schema)
        except self.store._errors as exc:
            raise self.store._unreadable(exc) from exc

    # Writing
    def add(self, events: Sequence[FleetEvent], skipped: int = 0) -> None:
        """Keep ``events`` and update what is known of their hosts, in one transaction;
        ``skipped`` malformed events are counted."""
        rows, seen, synced, loops, resyncs = [], {}, [], [], []
        for event in events:
            rows.append(
                (
                    event.at,
                    event.minion,
                    int(event.authenticated),
                    int(event.forged),
                    event.kind,
                    event.tag,
                    event.uuid,
                    event.name,
                    event.transition,
                    event.reason,
                    event.data_json,
                )
            )
            seen[event.minion] = max(seen.get(event.minion, 0.0), event.at)
            # Only a fact says that a host synced and how its loop is: a claim could be anyone's.
            if event.kind == SYNC and event.authenticated:
                ret = event.data.get("return") or {}
                synced.append(
                    (
                        event.minion,
                        event.at,
                        event.at,
                        ret.get("took"),
                        json.dumps(ret, default=str, sort_keys=True),
                    )
                )
                if isinstance(ret.get("event_loop"), Mapping):
                    loops.append((event.minion, event.at, json.dumps(ret["event_loop"], sort_keys=True)))
            elif event.kind == RESYNC:
                resyncs.append((event.minion, event.at, event.at, event.reason))
        self._write(rows, sorted(seen.items()), synced, loops, resyncs, skipped)

    def host_status(
        self, minion: str, at: float, sync: Mapping | None = None, loop: Mapping | None = None
    ) -> None:
        """What a minion says of itself (the job returner on the minion): its last sync's
        summary and its event loop's status."""
        synced = (
            [(minion, at, at, sync.get("took"), json.dumps(sync, default=str, sort_keys=True))]
            if sync is not None
            else []
        )
        loops = [(minion, at, json.dumps(dict(loop), default=str, sort_keys=True))] if loop else []
        self._write([], [(minion, at)], synced, loops, [], 0)

    def _write(self, rows, seen, synced, loops, resyncs, skipped) -> None:
        store = self.store
        try:
            store._run(store.BEGIN)
            if rows:
                store._run_many(SQL_ADD_EVENT, rows)
            for sql, values in (
                (SQL_SEEN, seen),
                (SQL_SYNCED, synced),
                (SQL_LOOP, loops),
                (SQL_RESYNC, resyncs),
            ):
                if values:
                    store._run_many(sql, values)
            if skipped:
                store._run(SQL_COUNT, ("malformed_events", skipped))
            if rows:
                store._run(SQL_COUNT, ("events", len(rows)))
            store._run("COMMIT")
        except store._errors as exc:
            with contextlib.suppress(*store._errors):
                store._run("ROLLBACK")
            raise StoreError(
                f"the vmpower fleet store {self.path} could not be written: {store._describe(exc)}"
            ) from exc

    def prune(self, retention_days: float, now: float | None = None) -> int:
        """Delete events older than ``retention_days`` (0 keeps everything); how many went."""
        if not retention_days:
            return 0
        before = (time.time() if now is None else now) - retention_days * 86400
        try:
            return self.store._run("DELETE FROM fleet_events WHERE at < ?", (before,)).rowcount
        except self.store._errors as exc:
            raise StoreError(
                f"the vmpower fleet store {self.path} could not be pruned: {self.store._describe(exc)}"
            ) from exc

    # Reading
    def record_rows(self) -> list[Sequence]:
        """Every VM record of the fleet as tuples in ``RECORD_COLUMNS`` order, by host and name."""
        columns = ", ".join(RECORD_COLUMNS)
        return self.store._query(f"SELECT {columns} FROM instances ORDER BY host, name, uuid")

    def records(self) -> list[dict[str, Any]]:
        """Every VM record of the fleet (those the minions wrote to this database)."""
        rows = self.store._query(f"SELECT {', '.join(RECORD_COLUMNS)} FROM instances")
        return [dict(zip(RECORD_COLUMNS, row)) for row in rows]

    def last_changes(self) -> dict[str, dict[str, Any]]:
        from vmpower.store.postgres import PostgresStore

        # PostgreSQL walks audit_by_uuid once for DISTINCT ON (three times faster here than
        # the IN-subquery SQLite needs, which has no DISTINCT ON).
        sql = SQL_LAST_CHANGES_PG if isinstance(self.store, PostgresStore) else SQL_LAST_CHANGES
        return {
            row[0]: {"at": row[1], "cause": row[2], "action": row[3], "reason": row[4]}
            for row in self.store._query(sql)
        }

    @staticmethod
    def last_changes_of(store: Store, uuids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The newest change of each of ``uuids``, from any store (no fleet tables needed)."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(uuids), IN_CHUNK):
            part = list(uuids[start : start + IN_CHUNK])
            marks = ", ".join("?" * len(part))
            sql = (
                "SELECT uuid, at, cause, action, reason FROM audit WHERE id IN "
                f"(SELECT max(id) FROM audit WHERE uuid IN ({marks}) AND {CHANGED} GROUP BY uuid)"
            )
            for row in store._query(sql, part):
                found[row[0]] = {"at": row[1], "cause": row[2], "action": row[3], "reason": row[4]}
        return found

    def last_events(self) -> dict[str, dict[str, Any]]:
        return {
            row[0]: {"at": row[1], "minion": row[2], "transition": row[3], "reason": row[4]}
            for row in self.store._query(SQL_LAST_EVENTS)
        }

    def hosts(self) -> dict[str, dict[str, Any]]:
        found = {}
        for row in self.store._query(f"SELECT {', '.join(HOST_COLUMNS)} FROM fleet_hosts"):
            host = dict(zip(HOST_COLUMNS, row))
            host["last_sync"] = json.loads(host["last_sync"] or "{}")
            host["loop"] = json.loads(host["loop"] or "{}")
            found[host["minion"]] = host
        return found

    def records_per_host(self) -> dict[str, int]:
        return dict(self.store._query("SELECT host, count(*) FROM instances GROUP BY host"))

    def counters(self) -> dict[str, int]:
        return {
            name: int(value) for name, value in self.store._query("SELECT name, value FROM fleet_counters")
        }

    def events(
        self, uuid: str | None = None, minion: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` events of one VM or one minion (or all), oldest first."""
        where, args = [], []
        if uuid:
            where.append("uuid = ?")
            args.append(uuid)
        if minion:
            where.append("minion = ?")
            args.append(minion)
        sql = (
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM fleet_events"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY id DESC LIMIT ?"
        )
        rows = self.store._query(sql, args + [int(limit)])
        found = []
        for row in reversed(rows):
            event = dict(zip(EVENT_COLUMNS, row))
            event["authenticated"], event["forged"] = bool(event["authenticated"]), bool(event["forged"])
            event["data"] = json.loads(event["data"])
            found.append(event)
        return found

    def find_uuids(self, name_or_uuid: str, host: str | None = None) -> list[str]:
        """The UUIDs a name (or UUID) stands for in the fleet: names are unique per host only."""
        sql = "SELECT uuid FROM instances WHERE (uuid = ? OR name = ?)"
        args = [name_or_uuid, name_or_uuid]
        if host:
            sql += " AND host = ?"
            args.append(host)
        found = [row[0] for row in self.store._query(sql, args)]
        if not found:
            sql = "SELECT DISTINCT uuid FROM fleet_events WHERE uuid != '' AND (uuid = ? OR name = ?)"
            args = [name_or_uuid, name_or_uuid]
            if host:
                sql += " AND minion = ?"
                args.append(host)
            found = [row[0] for row in self.store._query(sql, args)]
        return sorted(set(found))


__all__ = ["COLUMNS", "FleetStore"]
