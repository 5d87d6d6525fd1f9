"""The store, on both backends (SQLite, and a real PostgreSQL server): compare-and-set, the
append-only audit log, locks across processes; and SQLite's crash safety and a clear error for
a file that cannot be read. PostgreSQL's own (a fleet in one database, bad DSNs): test_store_postgres.py."""

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from vmpower.core.model import Cause, PowerState, Record, VmState
from vmpower.store import Change, LockBusy, StoreError, open_store
from vmpower.store.base import SCHEMA_LOCK


def rec(uuid="u-1", **kw):
    fields = {"uuid": uuid, "name": "vm1", "host": "h1", "vm_state": VmState.ACTIVE,
                  "power_state": PowerState.RUNNING, "version": 1}
    fields.update(kw)
    return Record(**fields)


@pytest.fixture
def store(store_location):
    with open_store(store_location) as s:
        yield s


@pytest.fixture
def sqlite_store(tmp_path):
    with open_store(str(tmp_path / "records.sqlite")) as s:
        yield s


def raw_connection(location):
    """A connection of the database's own driver, past vmpower; and the errors it raises."""
    if "://" in location:
        import psycopg
        return psycopg.connect(location, autocommit=True), psycopg.Error
    return sqlite3.connect(location), sqlite3.DatabaseError


def test_both_backends_open_through_store(store_location):
    with open_store(store_location) as store:
        assert type(store).__name__ == ("PostgresStore" if "://" in store_location else "SqliteStore")
        assert store.count() == 0


def test_insert_update_and_history(store):
    first = rec()
    assert store.commit([Change(None, first, Cause.SYNC, "adopt", "first seen")], at=1.0) == []
    second = first.replace(power_state=PowerState.SHUTDOWN, version=2)
    assert store.commit([Change(first, second, Cause.EVENT, "update", "guest shut down")], at=2.0) == []
    assert store.get("u-1") == second
    assert store.find("vm1") == second and store.find("u-1") == second
    entries = store.history("u-1")
    assert [e["cause"] for e in entries] == ["sync", "event"]
    assert entries[1]["old"] == {"power_state": "running"}
    assert entries[1]["new"] == {"power_state": "shutdown"}
    assert entries[1]["reason"] == "guest shut down"
    assert store.history("u-1", limit=1) == entries[1:]


def test_a_name_can_be_looked_up_on_one_host(store):
    store.commit([Change(None, rec("u-1", name="web1", host="h1"), Cause.SYNC, "adopt", "x"),
                  Change(None, rec("u-2", name="web1", host="h2"), Cause.SYNC, "adopt", "x")], at=1.0)
    assert store.find("web1", host="h2").uuid == "u-2" and store.find("web1", host="h1").uuid == "u-1"
    assert store.find("web1", host="h3") is None
    assert store.find("u-2", host="h1").uuid == "u-2"  # a UUID is unique in the whole store
    assert (store.count(), store.count("h1"), store.count("h3")) == (2, 1, 0)


def test_a_stale_version_loses_and_writes_nothing(store):
    first = rec()
    store.commit([Change(None, first, Cause.SYNC, "adopt", "x")], at=1.0)
    winner = first.replace(vm_state=VmState.STOPPED, version=2)
    store.commit([Change(first, winner, Cause.API, "stop", "x")], at=2.0)
    loser = Change(first, first.replace(power_state=PowerState.PAUSED, version=2), Cause.SYNC, "update", "x")
    other = rec("u-2")
    conflicts = store.commit([loser, Change(None, other, Cause.SYNC, "adopt", "x")], at=3.0)
    assert conflicts == [loser]
    assert store.get("u-1") == winner and store.get("u-2") == other
    assert len(store.history("u-1")) == 2  # the loser left no audit entry
    # A second insert of an existing record is a conflict too, not an overwrite.
    assert store.commit([Change(None, rec("u-2", name="other"), Cause.SYNC, "adopt", "x")], at=4.0)


def test_the_audit_log_is_append_only(store, store_location):
    store.commit([Change(None, rec(), Cause.SYNC, "adopt", "x")], at=1.0)
    db, error = raw_connection(store_location)
    with pytest.raises(error, match="append-only"):
        db.execute("UPDATE audit SET reason = 'rewritten'")
    with pytest.raises(error, match="append-only"):
        db.execute("DELETE FROM audit")
    db.close()
    assert [e["reason"] for e in store.history("u-1")] == ["x"]


def test_a_store_reopened_keeps_everything(store_location):
    with open_store(store_location) as store:
        store.commit([Change(None, rec(updated_at=1700000000.123456), Cause.SYNC, "adopt", "x")], at=2.5)
    with open_store(store_location) as again:  # the schema is there already: nothing is recreated
        assert again.get("u-1") == rec(updated_at=1700000000.123456)  # full float precision
        assert [e["at"] for e in again.history("u-1")] == [2.5]


def test_concurrent_compare_and_set_has_exactly_one_winner(store, store_location):
    first = rec()
    store.commit([Change(None, first, Cause.SYNC, "adopt", "x")], at=1.0)
    writers = 4
    start = threading.Barrier(writers, timeout=60)
    results = [None] * writers

    def write(i):  # a store of its own in each thread, as each Salt job has
        change = Change(first, first.replace(task_state=f"writer-{i}", version=2), Cause.API, "w", "x")
        with open_store(store_location) as mine:
            start.wait()
            results[i] = mine.commit([change], at=2.0)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(r) for r in results) == [0, 1, 1, 1]  # one wrote, three lost the race
    winner = results.index([])
    assert store.get("u-1").task_state == f"writer-{winner}"
    assert len(store.history("u-1")) == 2


def test_get_many_crosses_sqlites_parameter_limit(store):
    records = [rec(f"u-{i}", name=f"vm{i}") for i in range(1200)]
    store.commit([Change(None, r, Cause.SYNC, "adopt", "x") for r in records], at=1.0)
    found = store.get_many([r.uuid for r in records] + ["missing"])
    assert len(found) == 1200 and store.count() == 1200
    assert len(store.for_host("h1")) == 1200 and store.for_host("h2") == {}


def test_a_corrupt_store_is_a_clear_error(tmp_path):
    path = tmp_path / "records.sqlite"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    with pytest.raises(StoreError, match=f"the vmpower store {path} is unreadable"):
        open_store(str(path))


def test_an_unwritable_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="is unreadable"):
        open_store(str(blocker / "records.sqlite"))


def test_it_is_configured_to_survive_a_crash(sqlite_store):
    db = sqlite3.connect(sqlite_store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sqlite_store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def _python(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, text=True)


def test_a_writer_killed_mid_transaction_leaves_the_last_commit_intact(sqlite_store):
    store = sqlite_store
    store.commit([Change(None, rec(), Cause.SYNC, "adopt", "committed")], at=1.0)
    writer = _python("""
        import os, sys
        from vmpower.core.model import Cause, Record, VmState, PowerState
        from vmpower.store import open_store
        store = open_store(sys.argv[1])
        store._db.execute("BEGIN IMMEDIATE")
        for i in range(1000):
            store._db.execute("INSERT INTO audit (at, uuid, name, host, cause, action, old, new, reason)"
                              " VALUES (1, 'u-x', 'x', 'h', 'sync', 'adopt', '{}', '{}', 'torn')")
        print("half-way", flush=True)
        os.kill(os.getpid(), 9)
    """, store.path)
    assert writer.stdout.readline().strip() == "half-way"
    writer.wait()
    assert writer.returncode == -9
    with open_store(store.path) as reopened:
        assert reopened.get("u-1") == rec()
        assert reopened.history("u-x") == []
        assert [e["reason"] for e in reopened.history("u-1")] == ["committed"]


def test_the_instance_lock_holds_across_processes(store, store_location):
    holder = _python("""
        import sys, time
        from vmpower.store import open_store
        with open_store(sys.argv[1]).lock("u-1"):
            print("holding", flush=True)
            time.sleep(30)
    """, store_location)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(StoreError, match="could not take the vmpower lock 'u-1'"), \
                store.lock("u-1", timeout=0.2):
            pass
        with store.lock("u-2", timeout=0.2):  # other instances are not held up
            pass
    finally:
        holder.kill()
        holder.wait()
    with store.lock("u-1", timeout=5):  # released when its holder dies
        pass


# The instances table as vmpower made it before off_since, boot_id and task_owner.
OLD_INSTANCES = """
CREATE TABLE instances (
    uuid TEXT PRIMARY KEY, name TEXT NOT NULL, host TEXT NOT NULL, vm_state TEXT NOT NULL,
    power_state TEXT NOT NULL, task_state TEXT NOT NULL DEFAULT '', updated_at {real} NOT NULL,
    version INTEGER NOT NULL, restart_count INTEGER NOT NULL DEFAULT 0,
    last_restart_at {real} NOT NULL DEFAULT 0)"""
OLD_ROW = ("INSERT INTO instances VALUES ('u-old', 'vm-old', 'h1', 'active', 'running', "
           "'maintenance', 5.0, 3, 2, 4.0)")


def _make_old_store(location):
    db, _ = raw_connection(location)
    db.execute(OLD_INSTANCES.format(real="DOUBLE PRECISION" if "://" in location else "REAL"))
    db.execute(OLD_ROW)
    if "://" not in location:
        db.commit()
    db.close()


def test_a_store_made_before_the_new_columns_gains_them(store_location):
    _make_old_store(store_location)
    with open_store(store_location) as store:
        old = store.get("u-old")
        assert old == Record("u-old", "vm-old", "h1", VmState.ACTIVE, PowerState.RUNNING,
                             "maintenance", 5.0, 3, 2, 4.0)  # the new fields at their defaults
        assert (old.off_since, old.boot_id, old.task_owner) == (0.0, "", "")
        owned = old.replace(task_state="powering-off", task_owner='{"pid": 1}', off_since=12.5,
                            boot_id="b-1", version=4)
        assert store.commit([Change(old, owned, Cause.API, "stop", "x")], at=6.0) == []
    with open_store(store_location) as again:  # a second open finds nothing left to add
        assert again.get("u-old") == owned
        # The audit shows who set the task_state; the monotonic bookkeeping stays out of it.
        assert again.history("u-old")[-1]["new"] == {"task_state": "powering-off",
                                                     "task_owner": '{"pid": 1}'}


def test_processes_opening_an_old_store_at_once_all_succeed(store_location):
    _make_old_store(store_location)
    code = """
        import sys
        from vmpower.store import open_store
        with open_store(sys.argv[1]) as store:
            print(store.get("u-old").boot_id == "", flush=True)
    """
    openers = [_python(code, store_location) for _ in range(4)]
    outputs = [opener.communicate(timeout=120)[0].strip() for opener in openers]
    assert outputs == ["True"] * 4 and [o.returncode for o in openers] == [0] * 4


def test_sqlite_openers_set_up_the_schema_one_at_a_time(sqlite_store):
    # Two openers turning a file to WAL together: SQLite can refuse one at once, without its busy
    # wait ("database is locked"; 1 of 150 rounds of four openers of an old store, before).
    holder = _python("""
        import sys, time
        from vmpower.store import open_store
        from vmpower.store.base import SCHEMA_LOCK
        store = open_store(sys.argv[1])
        with store.lock(SCHEMA_LOCK):
            print("holding", flush=True)
            time.sleep(60)
    """, sqlite_store.path)
    opener_code = """
        import sys
        from vmpower.store import open_store
        with open_store(sys.argv[1]) as store:
            print(store.count(), flush=True)
    """
    try:
        assert holder.stdout.readline().strip() == "holding"
        # A store whose schema is complete is opened without the lock: every job opens it.
        complete = _python(opener_code, sqlite_store.path)
        assert complete.communicate(timeout=60)[0].strip() == "0" and complete.returncode == 0
        sqlite_store._db.execute("DROP TRIGGER audit_no_delete")  # now the schema lacks a part
        opener = _python(opener_code, sqlite_store.path)
        with pytest.raises(subprocess.TimeoutExpired):  # it waits while the schema is set up
            opener.communicate(timeout=1)
        busy = (r"the lock on the store's schema \(held while a vmpower process sets it up\) "
                f"is held by pid {holder.pid} ")
        with pytest.raises(LockBusy, match=busy), sqlite_store.lock(SCHEMA_LOCK, timeout=0.2):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert opener.communicate(timeout=60)[0].strip() == "0" and opener.returncode == 0
    triggers = sqlite_store._db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
    assert "audit_no_delete" in {name for (name,) in triggers}  # the opener put it back


def test_a_sync_takes_the_free_locks_and_is_told_who_holds_the_others(store, store_location):
    store.commit([Change(None, rec("u-1", name="web1"), Cause.SYNC, "adopt", "x")], at=1.0)
    holder = _python("""
        import sys, time
        from vmpower.store import open_store
        store = open_store(sys.argv[1])
        store.job = "vmpower.stop web1 (jid 20261201120001)"
        with store.lock("u-1"):
            print("holding", flush=True)
            time.sleep(60)
    """, store_location)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with store.try_locks(["u-2", "u-1", "u-3", "u-2"]) as (held, busy):
            assert held == ["u-2", "u-3"] and list(busy) == ["u-1"]
            assert busy["u-1"]["pid"] == holder.pid
            assert busy["u-1"]["job"] == "vmpower.stop web1 (jid 20261201120001)"
            with store.try_locks(["u-2"]) as (again, busy_again):  # not re-entrant
                assert again == [] and busy_again["u-2"]["pid"] == os.getpid()
        with store.try_locks(["u-2", "u-3"]) as (held, busy):  # released on leaving the block
            assert held == ["u-2", "u-3"] and busy == {}
        # A blocking wait is bounded, and its error names the lock, the VM and the holder.
        with pytest.raises(LockBusy) as raised, store.lock("u-1", timeout=0.2):
            pass
        message = str(raised.value)
        assert message.startswith("could not take the vmpower lock 'u-1' within 0.2s: "
                                  "the instance lock of web1 (u-1) is held by pid "
                                  f"{holder.pid} on {socket.gethostname()} "
                                  "(vmpower.stop web1 (jid 20261201120001), since ")
        assert raised.value.holder["pid"] == holder.pid and raised.value.key == "u-1"
    finally:
        holder.kill()
        holder.wait()
    # Its holder died: free (at once for a flock; PostgreSQL frees it when the server has seen
    # the connection end, so wait for that).
    with store.lock("u-1", timeout=10):
        assert store.holder("u-1")["pid"] == os.getpid()
    assert store.holder("u-1") is None  # a released lock names no holder


def test_the_host_lock_is_named_as_the_sync_lock(store, store_location):
    with open_store(store_location) as second, store.lock("host-m1"), \
            pytest.raises(LockBusy, match="the sync lock of minion m1 is held by pid "), \
            second.lock("host-m1", timeout=0):
        pass


def test_several_locks_share_one_bounded_wait(store, store_location):
    with open_store(store_location) as second, store.lock("u-2"):
        with pytest.raises(LockBusy, match="'u-2' within 0.3s"), \
                second.locks(["u-1", "u-2", "u-3"], timeout=0.3):
            pass
        with second.try_locks(["u-1", "u-3"]) as (held, busy):  # u-1 was given back
            assert held == ["u-1", "u-3"] and busy == {}


def test_locks_taken_together_name_their_holder_to_others_until_released(store, store_location):
    with open_store(store_location) as other:
        with store.try_locks(["u-3", "u-1", "u-2"]) as (held, busy):
            assert held == ["u-1", "u-2", "u-3"] and busy == {}
            assert [other.holder(key)["pid"] for key in held] == [os.getpid()] * 3
            with other.try_locks(["u-2", "u-4"]) as (theirs, taken):
                assert theirs == ["u-4"] and taken["u-2"]["pid"] == os.getpid()
        assert [other.holder(key) for key in ("u-1", "u-2", "u-3")] == [None] * 3
        with other.try_locks(["u-1", "u-2", "u-3"]) as (theirs, taken):
            assert theirs == ["u-1", "u-2", "u-3"] and taken == {}
