"""The ``vmpower`` execution module as Salt loads it: through the ``salt.loader`` entry point,
with pillar, against libvirt's test driver and a real SQLite file."""

import inspect
import os

import pytest
from salt.exceptions import CommandExecutionError

from .conftest import TEST_URI


@pytest.fixture
def minion(load_minion):
    """The minion's execution modules on the test driver; pillar and settings per call."""
    def load(pillar=None, **settings):
        return load_minion(TEST_URI, pillar, **{"stop_timeout": 0, **settings}).functions
    return load


PUBLIC = ["get_info", "list_instances", "get_num_instances", "stop", "start", "reconcile", "sync",
          "status", "history", "reset_state"]


def test_every_public_function_is_loaded_and_documented(minion):
    mods = minion()
    for name in PUBLIC:
        func = mods[f"vmpower.{name}"]
        assert "CLI Example:" in inspect.getdoc(func.func), name


def test_the_module_comes_from_the_entry_point(minion):
    path = inspect.getfile(minion()["vmpower.sync"].func)
    assert os.path.samefile(os.path.dirname(path),
                            os.path.join(os.path.dirname(__file__), "..", "..", "_modules"))


def test_a_walk_through_get_info_stop_sync_history(minion, testdriver):
    dom = testdriver.define("web")
    mods = minion()
    assert dom.name() in mods["vmpower.list_instances"]()
    assert mods["vmpower.get_num_instances"]() == len(mods["vmpower.list_instances"]())
    assert mods["vmpower.get_info"](dom.name())["power_state"] == "running"
    assert mods["vmpower.stop"](dom.name(), timeout=1)["vm_state"] == "stopped"
    report = mods["vmpower.sync"]()
    assert {"checked", "updated", "actions", "skipped", "took"} <= set(report)
    history = mods["vmpower.history"](dom.name())
    assert [e["cause"] for e in history][-2:] == ["api", "api"]
    assert mods["vmpower.status"]()["connected"] is True


def test_pillar_overrides_minion_config(minion, testdriver):
    dom = testdriver.define("web", start=False)
    mods = minion(pillar={"vmpower": {"instances": {dom.name(): {"task_state": "maintenance"}}}})
    report = mods["vmpower.sync"]()
    assert dom.name() in [s["name"] for s in report["skipped"]]


@pytest.mark.parametrize("call,args,kwargs,message", [
    ("get_info", [""], {}, "name must be a domain name or UUID"),
    ("get_info", ["no-such-vm"], {}, "no domain named or with UUID 'no-such-vm'"),
    ("stop", ["x"], {"timeout": "soon"}, "timeout must be a number of seconds"),
    ("stop", ["x"], {"force": "maybe"}, "force must be true or false"),
    ("reconcile", ["not-a-uuid"], {}, "'not-a-uuid' is not a UUID"),
    ("reconcile", ["6695eb01-f6a4-8304-79aa-97f2502e193f"], {"transition": "exploded"},
     "transition must be one of"),
    ("history", ["x"], {"limit": "all"}, "limit must be a whole number"),
])
def test_bad_arguments_are_named(minion, call, args, kwargs, message):
    with pytest.raises(CommandExecutionError, match=message):
        minion()[f"vmpower.{call}"](*args, **kwargs)


def test_pillar_wins_over_minion_config(load_minion, testdriver):
    dom = testdriver.define("web", start=False)
    mods = load_minion("test:///nowhere.xml", pillar={"vmpower": {"uri": TEST_URI}},
                       instances={dom.name(): {"task_state": "maintenance"}}).functions
    report = mods["vmpower.sync"]()  # the pillar's URI, the minion config's instance lock
    assert dom.name() in [s["name"] for s in report["skipped"]]


def test_bad_global_settings_stop_the_call(minion):
    with pytest.raises(CommandExecutionError, match="vmpower:stop_timeout must be a number"):
        minion(stop_timeout="forever")["vmpower.sync"]()


def test_a_corrupt_store_acts_on_nothing(minion, testdriver, tmp_path):
    dom = testdriver.define("db", start=False)
    mods = minion()
    mods["vmpower.sync"]()
    dom.create()  # would be powered off by a sync...
    store = tmp_path / "cache" / "vmpower" / "records.sqlite"
    for leftover in (store.with_name("records.sqlite-wal"), store.with_name("records.sqlite-shm")):
        leftover.unlink(missing_ok=True)
    store.write_bytes(b"garbage" * 1000)
    with pytest.raises(CommandExecutionError, match="the vmpower store .* is unreadable"):
        mods["vmpower.sync"]()
    assert dom.isActive()  # ...but not without its records


def _recorded_stopped_then_started(minion, testdriver):
    """A domain vmpower recorded stopped, then started behind its back: a sync powers it off
    unless pillar holds it."""
    dom = testdriver.define("web", start=False)
    minion()["vmpower.sync"]()
    dom.create()
    return dom


def _skipped(report, dom):
    return {s["name"]: s["reason"] for s in report["skipped"]}.get(dom.name(), "")


@pytest.mark.parametrize("spelling", ["upper case", "no dashes", "upper case, no dashes"])
def test_a_lock_under_a_uuid_key_in_any_spelling_holds(minion, testdriver, spelling):
    dom = _recorded_stopped_then_started(minion, testdriver)
    key = dom.UUIDString()
    key = key.upper() if "upper" in spelling else key
    key = key.replace("-", "") if "no dashes" in spelling else key
    mods = minion(pillar={"vmpower": {"instances": {key: {"task_state": "maintenance"}}}})
    report = mods["vmpower.sync"]()
    assert dom.isActive()
    assert "task_state=maintenance" in _skipped(report, dom)
    with pytest.raises(CommandExecutionError, match="task_state=maintenance"):
        mods["vmpower.stop"](dom.name())


def test_a_lock_under_the_name_holds_beside_an_entry_under_the_uuid(minion, testdriver):
    dom = _recorded_stopped_then_started(minion, testdriver)
    instances = {dom.name(): {"task_state": "maintenance"}, dom.UUIDString(): {"vm_state": "stopped"}}
    report = minion(pillar={"vmpower": {"instances": instances}})["vmpower.sync"]()
    assert dom.isActive()
    assert "task_state=maintenance" in _skipped(report, dom)


def test_a_bad_entry_under_the_name_is_reported_beside_an_entry_under_the_uuid(minion, testdriver):
    dom = _recorded_stopped_then_started(minion, testdriver)
    instances = {dom.name(): {"vm_state": "sideways"}, dom.UUIDString(): {"vm_state": "stopped"}}
    report = minion(pillar={"vmpower": {"instances": instances}})["vmpower.sync"]()
    assert dom.isActive()
    assert f"vmpower:instances:{dom.name()}:vm_state must be one of" in _skipped(report, dom)


def test_entries_that_conflict_leave_the_vm_alone_and_name_both_keys(minion, testdriver):
    dom = _recorded_stopped_then_started(minion, testdriver)
    uuid_key = dom.UUIDString().upper()
    instances = {dom.name(): {"vm_state": "active"}, uuid_key: {"vm_state": "stopped"},
                 dom.UUIDString(): {"vm_state": "stopped"}}
    mods = minion(pillar={"vmpower": {"instances": instances}})
    report = mods["vmpower.sync"]()
    assert dom.isActive()
    reason = _skipped(report, dom)
    for key in (dom.name(), uuid_key, dom.UUIDString()):
        assert f"vmpower:instances:{key}" in reason, reason
    with pytest.raises(CommandExecutionError, match=f"vmpower:instances:{dom.name()}"):
        mods["vmpower.stop"](dom.name())
    assert dom.isActive()


def test_a_record_this_version_cannot_read_is_skipped_and_the_sync_goes_on(load_minion, testdriver):
    import sqlite3

    odd, other = testdriver.define("odd", start=False), testdriver.define("other", start=False)
    loaded = load_minion(TEST_URI, stop_timeout=0)
    mods = loaded.functions
    mods["vmpower.sync"]()
    db = sqlite3.connect(loaded.store_path)
    with db:  # as a newer vmpower sharing the store might have written it
        db.execute("UPDATE instances SET vm_state = 'hibernated' WHERE uuid = ?", (odd.UUIDString(),))
    db.close()
    odd.create()
    other.create()
    report = mods["vmpower.sync"]()
    assert odd.isActive() and not other.isActive()
    assert "vm_state='hibernated'" in _skipped(report, odd)
    assert mods["vmpower.reconcile"](odd.UUIDString())["skipped"]
    with pytest.raises(CommandExecutionError, match="vm_state='hibernated'"):
        mods["vmpower.start"](odd.name())
    assert mods["vmpower.history"](odd.name())
