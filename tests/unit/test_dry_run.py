"""Dry runs (``test=True``) and observe mode (``vmpower:mode: observe``) through the execution
module as Salt loads it, on libvirt's test driver and a real SQLite store: what would be done
is reported with its reason, and nothing else changes (records and audit entries compared
before and after); observe mode records the truth and audits what it would have done, and
never acts."""

import sqlite3
import time

import pytest
from salt.exceptions import CommandExecutionError

from vmpower import hostinfo
from vmpower.core.model import Transition
from vmpower.journal import Journal, journal_path

from .conftest import TEST_URI, journal_event


@pytest.fixture
def minion(load_minion, tmp_path):
    def load(pillar=None, **settings):
        settings.setdefault("store", str(tmp_path / "records.sqlite"))
        return load_minion(TEST_URI, pillar, **{"stop_timeout": 0, "stop_grace": 0, **settings})
    return load


def snapshot(path):
    """Every record and every audit entry of the store, read past vmpower."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (db.execute("SELECT * FROM instances ORDER BY uuid").fetchall(),
                db.execute("SELECT * FROM audit ORDER BY id").fetchall())
    finally:
        db.close()


def test_sync_test_true_says_what_it_would_do_and_changes_nothing(minion, testdriver):
    web = testdriver.define("web")
    off = testdriver.define("off", start=False)
    loaded = minion()
    mods, store = loaded.functions, loaded.opts["vmpower"]["store"]
    mods["vmpower.sync"]()
    web.destroy()   # recorded active: a sync would record it stopped
    off.create()    # recorded stopped: a sync would power it off (rule 6)
    newcomer = testdriver.define("new")  # never seen: a sync would adopt it
    before = snapshot(store)
    report = mods["vmpower.sync"](test=True)
    assert report["test"] is True and report["updated"] == 0
    would = {w["name"]: w for w in report["would_write"]}
    assert would[newcomer.name()]["action"] == "adopt"
    actions = {a["name"]: a for a in report["actions"]}
    assert actions[off.name()]["action"] == "power_off"
    assert actions[off.name()]["result"] == "test: would power off"
    assert "stopped" in actions[off.name()]["reason"]
    assert actions[web.name()]["would_write"]["vm_state"] == "stopped"
    assert snapshot(store) == before
    assert off.isActive()  # not powered off
    # The same sync for real does what the dry run said.
    real = mods["vmpower.sync"]()
    assert {a["name"] for a in real["actions"]} == set(actions)
    assert not off.isActive()


def test_reconcile_test_true_changes_nothing(minion, testdriver):
    off = testdriver.define("off", start=False)
    loaded = minion()
    mods, store = loaded.functions, loaded.opts["vmpower"]["store"]
    mods["vmpower.sync"]()
    off.create()
    before = snapshot(store)
    ret = mods["vmpower.reconcile"](off.UUIDString(), transition="started", test=True)
    assert (ret["action"], ret["result"], ret["test"]) == ("power_off", "test: would power off", True)
    assert snapshot(store) == before and off.isActive()
    # A stop the beacon observed and journaled before the domain started again: stale.
    with Journal(journal_path(loaded.opts["cachedir"])) as journal:
        seq = journal_event(journal, off.UUIDString(), Transition.STOPPED, "destroyed",
                            time.monotonic(), hostinfo.boot_id())
    stale = mods["vmpower.reconcile"](off.UUIDString(), transition="stopped", seq=seq, test=True)
    assert stale["action"] == "dropped"  # stale: said, and no audit entry written
    assert snapshot(store) == before
    with pytest.raises(CommandExecutionError, match="test must be true or false"):
        mods["vmpower.reconcile"](off.UUIDString(), test="perhaps")


def test_observe_mode_records_and_reports_but_never_acts(minion, testdriver):
    off = testdriver.define("off", start=False)
    loaded = minion(mode="observe")
    mods, store = loaded.functions, loaded.opts["vmpower"]["store"]
    first = mods["vmpower.sync"]()
    assert first["mode"] == "observe" and first["updated"] >= 1  # adopted: recorded
    off.create()  # rule 6 would power it off
    report = mods["vmpower.sync"]()
    [action] = [a for a in report["actions"] if a["name"] == off.name()]
    assert (action["action"], action["result"]) == ("power_off", "observe mode: would power off; not done")
    assert off.isActive()  # left running
    records, _audit = snapshot(store)
    mine = next(row for row in records if row[0] == off.UUIDString())
    assert mine[3:5] == ("stopped", "running")  # the truth recorded, the intent kept
    entries = mods["vmpower.history"](off.name())
    assert entries[-1]["action"] == "observe"
    assert entries[-1]["reason"].startswith("observe mode: would power off: ")
    ret = mods["vmpower.reconcile"](off.UUIDString(), transition="started")
    assert ret["result"] == "observe mode: would power off; not done" and off.isActive()


def test_a_bad_mode_is_a_clear_error(minion):
    with pytest.raises(CommandExecutionError, match="vmpower:mode must be one of enforce, observe"):
        minion(mode="lazy").functions["vmpower.sync"]()
