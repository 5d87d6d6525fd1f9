"""The PostgreSQL store as a fleet uses it: one database for several minions, locks across them,
the minion's ``vmpower:store`` DSN, and clear errors for a DSN that leads nowhere.
Everything the two backends share runs on both in test_store.py."""

import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from salt.exceptions import CommandExecutionError

from vmpower.core.model import Cause, PowerState, Record, VmState
from vmpower.core.settings import parse_settings
from vmpower.operations import HostOperations
from vmpower.store import Change, PostgresStore, Store, StoreError, open_store
from vmpower.store import postgres as backend

from .conftest import TEST_URI
from .pgserver import PASSWORD

A, B = "minion-a", "minion-b"


def owned_by(host, uuid, name, **fields):
    values = {"uuid": uuid, "name": name, "host": host, "vm_state": VmState.ACTIVE,
                  "power_state": PowerState.RUNNING, "version": 1}
    values.update(fields)
    return Record(**values)


def test_two_minions_share_one_database_and_each_syncs_only_its_own(postgres_dsn, testdriver):
    mine = testdriver.define("mine")
    moved = testdriver.define("moved")  # running here, but the fleet's record says it lives on B
    with open_store(postgres_dsn) as store_a, open_store(postgres_dsn) as store_b:
        # Minion B's records, written through its own connection: one for the VM that is (also)
        # defined here, one for a VM only B has.
        b_moved = owned_by(B, moved.UUIDString(), moved.name(), vm_state=VmState.STOPPED,
                           power_state=PowerState.RUNNING)  # B says it runs it there
        b_only = owned_by(B, "0b6d0e1c-0000-4000-8000-00000000000b", "b-only")
        assert store_b.commit([Change(None, b_moved, Cause.SYNC, "adopt", "on B"),
                               Change(None, b_only, Cause.SYNC, "adopt", "on B")], at=1.0) == []

        ops_a = HostOperations(parse_settings({"uri": TEST_URI, "stop_timeout": 0}), A, store_a)
        report = ops_a.sync()
        skipped = {s["uuid"]: s["reason"] for s in report["skipped"]}
        assert f"lives on {B}, not {A}" in skipped[moved.UUIDString()]  # rule 2: hands off
        assert moved.isActive()  # B's record says stopped, but A does not act on B's VM
        assert store_b.get(moved.UUIDString()) == b_moved and len(store_b.history(moved.UUIDString())) == 1
        # A VM only B has is none of A's business: not "gone" (nostate), not even looked at.
        assert b_only.uuid not in {a["uuid"] for a in report["actions"]}
        assert store_a.get(b_only.uuid) == b_only and len(store_a.history(b_only.uuid)) == 1

        assert store_a.get(mine.UUIDString()).host == A
        assert mine.UUIDString() in store_b.for_host(A)  # what A adopted, B sees as A's
        assert set(store_b.for_host(B)) == {moved.UUIDString(), b_only.uuid}
        assert moved.UUIDString() not in store_a.for_host(A)
        assert ops_a.sync()["updated"] == 0  # and a second sync of A finds nothing to do


def test_locks_hold_across_minions_and_end_with_their_connection(postgres_dsn):
    a, b = open_store(postgres_dsn), open_store(postgres_dsn)
    try:
        with a.lock("u-1"), a.lock(f"host-{A}"):
            with pytest.raises(StoreError, match=f"could not take the vmpower lock 'u-1' within 0.1s: "
                                                 f"the instance lock of u-1 is held by pid {os.getpid()} "), \
                    b.lock("u-1", timeout=0.1):
                pass
            with b.locks([f"host-{B}", "u-2"], timeout=0.1):  # other hosts and VMs go on
                pass
        with b.lock("u-1", timeout=0.1):  # released on leaving the block
            pass
        with a.lock("u-1"):
            a.close()  # the connection ends: the server releases what it held
            with b.lock("u-1", timeout=10):
                pass
    finally:
        b.close()


def test_a_waiting_lock_is_taken_as_soon_as_it_is_released(postgres_dsn):
    with open_store(postgres_dsn) as holder, open_store(postgres_dsn) as waiter:
        order = []
        with holder.lock("u-1"):
            thread = threading.Thread(target=lambda: order.append(_take(postgres_dsn)))
            thread.start()
            thread.join(0.3)
            order.append("released")
        thread.join(10)
        assert order == ["released", "taken"]
        with waiter.lock("u-1", timeout=1):
            pass


def _take(dsn):
    with open_store(dsn) as store, store.lock("u-1", timeout=10):
        return "taken"


def test_minions_opening_a_new_database_together_create_the_schema_once(postgres_dsn):
    errors, start = [], threading.Barrier(6, timeout=60)

    def open_it():
        try:
            start.wait()
            with open_store(postgres_dsn) as store:
                store.count()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_the_audit_log_cannot_be_truncated(postgres_dsn):
    import psycopg

    with open_store(postgres_dsn) as store:
        store.commit([Change(None, owned_by(A, "u-1", "vm1"), Cause.SYNC, "adopt", "x")], at=1.0)
        with psycopg.connect(postgres_dsn, autocommit=True) as db, \
                pytest.raises(psycopg.Error, match="append-only"):
            db.execute("TRUNCATE audit")
        assert len(store.history("u-1")) == 1


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once it is closed


@pytest.mark.parametrize("case,message", [
    ("unreachable", "Connection refused"),
    ("bad password", 'password authentication failed for user "vmpower"'),
    ("no database", 'database "no_such_db" does not exist'),
])
def test_a_dsn_that_leads_nowhere_is_a_clear_error(postgres, case, message):
    dsn = {"unreachable": postgres.dsn("vmpower", port=_closed_port()),
           "bad password": postgres.dsn("vmpower", password="wrong-password"),
           "no database": postgres.dsn("no_such_db")}[case]
    masked = "the vmpower store postgresql://vmpower:\\*\\*\\*@127.0.0.1:"
    with pytest.raises(StoreError, match=masked) as error:
        open_store(dsn)
    assert message in str(error.value)
    assert PASSWORD not in str(error.value) and "wrong-password" not in str(error.value)
    assert error.value.__cause__ is None  # psycopg's exception is not chained: it may quote the DSN


def test_a_bad_dsn_acts_on_nothing_through_the_module(postgres, load_minion, testdriver):
    dom = testdriver.define("db", start=False)
    mods = load_minion(TEST_URI, store=postgres.dsn("no_such_db"), stop_timeout=0).functions
    dom.create()  # a sync with records saying "stopped" would power it off; without any, nothing
    with pytest.raises(CommandExecutionError, match='vmpower.sync: the vmpower store '
                       'postgresql://vmpower:\\*\\*\\*@.*database "no_such_db" does not exist'):
        mods["vmpower.sync"]()
    assert dom.isActive()


def test_the_minion_config_selects_postgresql(postgres, load_minion, testdriver):
    postgres_dsn = postgres.database()  # a database of its own, as an operator would make
    dom = testdriver.define("web")
    mods = load_minion(TEST_URI, store=postgres_dsn, stop_timeout=0).functions
    report = mods["vmpower.sync"]()
    assert report["host"] == "loader-minion"
    status = mods["vmpower.status"]()
    assert status["store"].startswith("postgresql://vmpower:***@") and PASSWORD not in status["store"]
    with open_store(postgres_dsn) as store:
        assert store.get(dom.UUIDString()).host == "loader-minion"
        assert status["records"] == store.count() >= 1
    assert mods["vmpower.history"](dom.name())[0]["action"] == "adopt"


def test_without_psycopg_sqlite_works_and_a_dsn_names_the_missing_package(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["psycopg"] = None  # as if it were not installed: importing it fails
        from vmpower import minion
        from vmpower.store import StoreError, open_store
        with open_store(sys.argv[1]) as store:
            print("sqlite", store.count())
        try:
            open_store("postgresql://vmpower:hunter2@db/fleet")
        except StoreError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "records.sqlite")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["sqlite 0", ("the vmpower store postgresql://vmpower:***@db/fleet needs the "
                   "PostgreSQL driver psycopg, which is not installed: pip install 'psycopg[binary]'")]


def test_the_scheme_may_be_written_in_any_case(postgres_dsn):
    with open_store(postgres_dsn.replace("postgresql://", "PostgreSQL://")) as store:
        assert store.count() == 0 and store.path.startswith("postgresql://vmpower:***@")


def test_other_schemes_are_refused():
    with pytest.raises(StoreError, match="mysql://... is not supported"):
        open_store("mysql://db/vmpower")
    assert PostgresStore.__mro__[1] is Store


@pytest.mark.parametrize("dsn,masked", [
    ("postgresql://vmpower:s3cret@db:5432/vmpower", "postgresql://vmpower:***@db:5432/vmpower"),
    ("postgres://vmpower@db/vmpower?password=s3cret&sslmode=require",
     "postgres://vmpower@db/vmpower?password=***&sslmode=require"),
    ("postgresql://vmpower@db:5432/vmpower", "postgresql://vmpower@db:5432/vmpower"),
    ("postgresql:///vmpower?host=/run/postgresql", "postgresql:///vmpower?host=/run/postgresql"),
    ("postgresql://vmpower:p%40ss:word@db/vmpower", "postgresql://vmpower:***@db/vmpower"),
])
def test_passwords_are_masked(dsn, masked):
    assert backend.mask_password(dsn) == masked


def test_lock_keys_are_stable_signed_64_bit_numbers():
    keys = {backend.lock_id(name) for name in ("u-1", "u-2", f"host-{A}", f"host-{B}")}
    assert len(keys) == 4 and all(-2 ** 63 <= key < 2 ** 63 for key in keys)
    assert backend.lock_id("u-1") == backend.lock_id("u-1") == 6892071172643459313


def test_no_statement_waits_unbounded_in_the_server(postgres_dsn):
    with open_store(postgres_dsn) as store:
        assert store._db.execute("SHOW lock_timeout").fetchone()[0] == "30s"
        assert store._db.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "1min"
