"""Where the records live: by default /var/lib/vmpower, out of the reach of
``saltutil.clear_cache``; a store left in the old place (the minion's cachedir) is carried over
on first open, by one process even when several open it at once."""

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from vmpower import minion
from vmpower.core.model import Cause, PowerState, Record, VmState
from vmpower.core.settings import parse_settings
from vmpower.store import Change, StoreError, open_store


def rec(uuid="u-1", **kw):
    fields = {"uuid": uuid, "name": "vm1", "host": "h1", "vm_state": VmState.STOPPED,
              "power_state": PowerState.SHUTDOWN, "version": 1}
    fields.update(kw)
    return Record(**fields)


def test_the_default_store_is_out_of_salts_cachedir():
    opts = {"cachedir": "/var/cache/salt/minion", "id": "m1"}
    assert minion.store_path(opts, parse_settings({})) == "/var/lib/vmpower/records.sqlite"
    assert minion.store_path(opts, parse_settings({"store": "/srv/r.sqlite"})) == "/srv/r.sqlite"
    assert minion.legacy_store_path(opts) == "/var/cache/salt/minion/vmpower/records.sqlite"


def _legacy_store(path, n=3):
    """An old store with records still in its WAL: written, never checkpointed."""
    path.parent.mkdir(parents=True)
    store = open_store(str(path))
    store.commit([Change(None, rec(f"u-{i}"), Cause.SYNC, "adopt", "pinned stopped")
                  for i in range(n)], at=1.0)
    store._db.execute("PRAGMA wal_autocheckpoint=0")
    store.commit([Change(rec("u-0"), rec("u-0", task_state="maintenance", version=2), Cause.API,
                         "lock", "in the WAL only")], at=2.0)
    return store  # left open, as a job of the old version might still hold it


def test_a_store_in_the_cachedir_is_carried_over_with_its_wal(tmp_path, caplog):
    legacy = tmp_path / "cache" / "vmpower" / "records.sqlite"
    old = _legacy_store(legacy)
    target = tmp_path / "lib" / "vmpower" / "records.sqlite"
    try:
        assert minion.carry_over(str(legacy), str(target)) is True
    finally:
        old.close()
    assert "carried the records over from" in caplog.text
    with open_store(str(target)) as store:
        assert store.count() == 3
        assert store.get("u-0").task_state == "maintenance"  # what was only in the WAL too
        assert [e["reason"] for e in store.history("u-0")] == ["pinned stopped", "in the WAL only"]
    assert not legacy.exists() and (legacy.parent / "records.sqlite.moved").exists()
    assert not (legacy.parent / "records.sqlite-wal").exists()
    # Never a second time: the old file is out of the way, and the new one is there.
    assert minion.carry_over(str(legacy), str(target)) is False
    with open_store(str(target)) as store, store.lock("u-0", timeout=1):
        assert (target.parent / "records.sqlite.locks" / "u-0.lock").exists()  # locks beside it


def test_nothing_to_carry_over_and_an_existing_store_wins(tmp_path):
    target = tmp_path / "lib" / "records.sqlite"
    assert minion.carry_over(str(tmp_path / "none.sqlite"), str(target)) is False
    assert not target.exists()
    legacy = tmp_path / "cache" / "records.sqlite"
    _legacy_store(legacy).close()
    with open_store(str(target)) as store:
        store.commit([Change(None, rec("new"), Cause.SYNC, "adopt", "x")], at=1.0)
    assert minion.carry_over(str(legacy), str(target)) is False
    assert legacy.exists()  # left alone: the new store is the truth now
    with open_store(str(target)) as store:
        assert store.count() == 1


def test_an_unreadable_old_store_is_a_clear_error_not_a_fresh_start(tmp_path):
    legacy = tmp_path / "cache" / "records.sqlite"
    legacy.parent.mkdir()
    legacy.write_bytes(b"not a database " * 200)
    target = tmp_path / "lib" / "records.sqlite"
    with pytest.raises(StoreError, match=f"cannot carry the vmpower store {legacy} over to {target}"):
        minion.carry_over(str(legacy), str(target))
    assert not target.exists() and legacy.exists()
    assert list(target.parent.glob("*.tmp")) == []


def test_processes_opening_at_once_carry_it_over_once(tmp_path):
    legacy = tmp_path / "cache" / "records.sqlite"
    _legacy_store(legacy, n=50).close()
    target = tmp_path / "lib" / "records.sqlite"
    code = textwrap.dedent("""
        import sys
        from vmpower import minion
        from vmpower.store import open_store
        moved = minion.carry_over(sys.argv[1], sys.argv[2])
        with open_store(sys.argv[2]) as store:
            print(moved, store.count(), flush=True)
    """)
    openers = [subprocess.Popen([sys.executable, "-c", code, str(legacy), str(target)],
                                stdout=subprocess.PIPE, text=True) for _ in range(4)]
    results = sorted(opener.communicate(timeout=120)[0].split() for opener in openers)
    assert results == [["False", "50"]] * 3 + [["True", "50"]]


def test_the_minions_operations_open_the_carried_over_store(tmp_path, monkeypatch):
    cachedir = tmp_path / "cache"
    _legacy_store(cachedir / "vmpower" / "records.sqlite").close()
    target = tmp_path / "lib" / "vmpower" / "records.sqlite"
    monkeypatch.setattr(minion, "DEFAULT_STORE", str(target))  # not the machine's /var/lib
    opts = {"cachedir": str(cachedir), "id": "m1", "vmpower": {"uri": "test:///default"}}
    with minion.operations(opts, {}) as ops:
        assert ops.store.path == str(target) and ops.store.count() == 3
    assert sqlite3.connect(target).execute("SELECT count(*) FROM instances").fetchone() == (3,)


def test_open_store_picks_the_backend(tmp_path):
    with open_store(tmp_path / "r.sqlite") as store:  # a path-like works too
        assert type(store).__name__ == "SqliteStore"
    with pytest.raises(StoreError, match="mysql://... is not supported"):
        open_store("mysql://db/vmpower")


def test_the_records_survive_saltutil_clear_cache(load_minion, testdriver, tmp_path, monkeypatch):
    dom = testdriver.define("kept", start=False)
    target = tmp_path / "lib" / "vmpower" / "records.sqlite"
    monkeypatch.setattr(minion, "DEFAULT_STORE", str(target))  # the default, not the machine's
    mods = load_minion("test:///default", store="").functions  # no vmpower:store: the default
    mods["vmpower.sync"]()
    before = mods["vmpower.history"](dom.name())
    assert before and target.exists()
    decoy = tmp_path / "cache" / "vmpower" / "what-clear_cache-removes"
    decoy.parent.mkdir(parents=True, exist_ok=True)
    decoy.write_text("x")
    assert mods["saltutil.clear_cache"]() is True  # Salt's own
    assert not decoy.exists()
    assert mods["vmpower.history"](dom.name()) == before
