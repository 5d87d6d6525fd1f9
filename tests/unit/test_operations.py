"""HostOperations on libvirt's test driver and a real SQLite file: sync, reconcile, stop,
start and history, with the rules deciding."""

import gc
import threading
import time

import libvirt
import pytest

from vmpower.core.model import Cause, Transition, VmState
from vmpower.core.settings import parse_settings
from vmpower.hypervisor import Hypervisor, UnknownDomain
from vmpower.operations import HostOperations, OperationError
from vmpower.store import open_store

from .conftest import TEST_URI, Clock, journal_event

HOST = "minion-1"


@pytest.fixture
def store(tmp_path):
    with open_store(str(tmp_path / "records.sqlite")) as s:
        yield s



BOOT = "boot-1"


def operations(store, clock=None, boot_id=BOOT, alive=None, stopping=False, journal=None,
               **settings):
    return HostOperations(parse_settings({"uri": TEST_URI, "stop_timeout": 0, **settings}), HOST,
                          store, clock=clock or Clock(), boot_id=lambda: boot_id, alive=alive,
                          stopping=lambda: stopping, journal=journal)


def observed_stop(journal, clock, dom, reason="guest_shutdown", ago=15.0):
    """The stop of ``dom`` as this host's beacon journaled it: libvirt called back ``ago``
    seconds ago, and the beacon fired it once stop_grace (15 s) was over."""
    return journal_event(journal, dom.UUIDString(), Transition.STOPPED, reason, clock() - ago, BOOT)


def test_sync_adopts_every_domain_then_finds_nothing_to_do(store, testdriver):
    running, stopped = testdriver.define("running"), testdriver.define("stopped", start=False)
    ops = operations(store)
    first = ops.sync()
    assert first["host"] == HOST and first["checked"] >= 2
    assert store.get(running.UUIDString()).vm_state.value == "active"
    assert store.get(stopped.UUIDString()).vm_state.value == "stopped"
    second = ops.sync()
    assert (second["updated"], second["actions"]) == (0, [])


def test_a_sync_pauses_the_cyclic_collector_and_leaves_it_as_it_found_it(store, testdriver,
                                                                           monkeypatch):
    testdriver.define("web")
    ops = operations(store)
    during = []
    listing = Hypervisor.list_all

    def list_all(hv):
        during.append(gc.isenabled())
        return listing(hv)
    monkeypatch.setattr(Hypervisor, "list_all", list_all)
    ops.sync()
    assert during == [False] and gc.isenabled()
    gc.disable()  # a process that turned it off keeps it off
    try:
        ops.sync()
        assert not gc.isenabled()
    finally:
        gc.enable()
    monkeypatch.setattr(Hypervisor, "list_all", lambda hv: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a sync that fails resumes it too
        ops.sync()
    assert during == [False, False] and gc.isenabled()


def test_sync_records_a_shutdown_guest_as_stopped(store, testdriver):
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock)
    ops.sync()
    dom.shutdown()  # behind vmpower's back
    first = ops.sync()  # off for no time known: it waits for stop_grace
    assert first["actions"] == [] and first["retry_at"] > 0
    assert store.get(dom.UUIDString()).vm_state.value == "active"
    clock.step(15)
    report = ops.sync()
    assert [a["name"] for a in report["actions"]] == [dom.name()]
    record = store.get(dom.UUIDString())
    assert (record.vm_state.value, record.power_state.value) == ("stopped", "shutdown")
    assert "on_guest_shutdown=stop" in ops.history(dom.name())[-1]["reason"]


def test_sync_powers_off_a_stopped_vm_started_behind_its_back(store, testdriver):
    dom = testdriver.define("db", start=False)
    ops = operations(store)
    ops.sync()
    dom.create()
    report = ops.sync()
    assert report["actions"][0]["action"] == "power_off"
    assert not dom.isActive()
    assert store.get(dom.UUIDString()).vm_state.value == "stopped"


def test_a_sync_acts_with_one_call_per_vm_and_reads_the_states_after_in_one(store, testdriver,
                                                                             monkeypatch):
    # On a real host every libvirt call is a round trip: a sync powering off many VMs pays
    # for each call it makes per VM. Counted here: the calls, not their time.
    doms = [testdriver.define(f"late{i}", start=False) for i in range(3)]
    ops = operations(store)
    ops.sync()
    for dom in doms:
        dom.create()
    calls = []
    for name in ("destroy", "isActive", "state", "info"):
        original = getattr(libvirt.virDomain, name)
        monkeypatch.setattr(libvirt.virDomain, name, lambda self, *a, _o=original, _n=name:
                            calls.append(_n) or _o(self, *a))
    bulk = []
    original_bulk = libvirt.virConnect.domainListGetStats
    monkeypatch.setattr(libvirt.virConnect, "domainListGetStats",
                        lambda self, doms, *a: bulk.append(len(doms)) or original_bulk(self, doms, *a))
    report = ops.sync()
    assert [a["result"] for a in report["actions"]] == ["powered off"] * 3
    assert sorted(calls) == ["destroy"] * 3  # no state read before or after, one by one
    assert bulk == [3, 3]  # under the locks before acting, and after the actions
    assert all(store.get(d.UUIDString()).power_state.value == "shutdown" for d in doms)


def test_power_off_of_a_domain_already_off_or_gone_says_already_off(store, testdriver):
    off, gone = testdriver.define("off", start=False), testdriver.define("gone")
    with Hypervisor(TEST_URI) as hv:
        assert hv.power_off(off.UUIDString()) is False
        hv.list_all()  # as in a sync: the listing's handle is the one acted on
        gone.destroy()
        gone.undefine()
        testdriver.domains.remove(gone)
        assert hv.power_off(gone.UUIDString()) is False
    with Hypervisor(TEST_URI) as hv:
        on = testdriver.define("on")
        assert hv.power_off(on.UUIDString()) is True and not on.isActive()


def test_sync_skips_locked_and_misconfigured_vms_without_writing(store, testdriver):
    locked, bad = testdriver.define("locked", start=False), testdriver.define("bad", start=False)
    ops = operations(store, instances={locked.name(): {"task_state": "maintenance", },
                                       bad.name(): {"vm_state": "sideways"}})
    report = ops.sync()
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert "task_state=maintenance" in skipped[locked.name()]
    assert "vm_state must be one of" in skipped[bad.name()]
    assert store.get(locked.UUIDString()) is None and store.get(bad.UUIDString()) is None


def test_a_record_whose_domain_is_gone_is_recorded_as_nostate(store, testdriver):
    dom = testdriver.define("ghost", start=False)
    ops = operations(store)
    ops.sync()
    dom.undefine()
    testdriver.domains.remove(dom)
    ops.sync()
    assert store.get(dom.UUIDString()).power_state.value == "nostate"


def test_reconcile_drops_a_stale_event_and_says_why(store, testdriver, journal):
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock, journal=journal)
    ops.sync()
    seq = observed_stop(journal, clock, dom)  # observed, and the domain started since: late
    result = ops.reconcile(dom.UUIDString(), Transition.STOPPED, seq=seq)
    assert result["action"] == "dropped" and "stale" in result["reason"]
    assert dom.isActive()
    assert ops.history(dom.UUIDString())[-1]["action"] == "dropped"


def test_reconcile_rechecks_on_an_event_this_host_did_not_observe(store, testdriver, journal):
    dom = testdriver.define("web")
    ops = operations(store, journal=journal)
    ops.sync()
    result = ops.reconcile(dom.UUIDString(), Transition.STOPPED, seq=99)  # forged
    assert result["action"] == "none" and dom.isActive()
    assert "not what this host observed (seq 99 is not in this host's journal" in result["reason"]
    assert "in sync" in result["reason"] and "observed" not in result


def test_reconcile_acts_on_a_true_event(store, testdriver, journal):
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock, journal=journal)
    ops.sync()
    dom.destroy()
    seq = observed_stop(journal, clock, dom, "destroyed")
    result = ops.reconcile(dom.UUIDString(), Transition.STOPPED, reason="destroyed", seq=seq)
    assert result["vm_state"] == "stopped" and result["transition"] == "stopped"
    assert result["observed"] == {"seq": seq, "transition": "stopped", "reason": "destroyed"}
    assert ops.history(dom.UUIDString())[-1]["cause"] == Cause.EVENT.value


def test_reconcile_of_a_locked_vm_writes_nothing(store, testdriver):
    dom = testdriver.define("web")
    operations(store).sync()
    before = store.history(dom.UUIDString())
    dom.destroy()
    locked = operations(store, instances={dom.name(): {"task_state": "maintenance"}})
    result = locked.reconcile(dom.UUIDString(), Transition.STOPPED)
    assert result["skipped"] and store.history(dom.UUIDString()) == before
    assert store.get(dom.UUIDString()).power_state.value == "running"


def test_pinned_active_restarts_a_guest_that_shut_down(store, testdriver, journal):
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock, journal=journal, instances={dom.name(): {"vm_state": "active"}})
    ops.sync()
    dom.shutdown()
    result = ops.reconcile(dom.UUIDString(), Transition.STOPPED, seq=observed_stop(journal, clock, dom))
    assert result["action"] == "start" and dom.isActive()
    record = store.get(dom.UUIDString())
    assert (record.vm_state.value, record.power_state.value, record.restart_count) == ("active", "running", 1)


def test_stop_and_start_with_task_state_in_between(store, testdriver):
    dom = testdriver.define("web")
    ops = operations(store)
    stopped = ops.stop(dom.name(), timeout=5)
    assert stopped["vm_state"] == "stopped" and stopped["result"].startswith("shut down gracefully")
    actions = [e["action"] for e in ops.history(dom.name())]
    assert actions == ["adopt", "powering-off", "done"]
    assert store.get(dom.UUIDString()).task_state == ""
    again = ops.stop(dom.name())
    assert again["result"] == "already off"
    started = ops.start(dom.UUIDString())
    assert started["result"] == "started" and started["vm_state"] == "active" and dom.isActive()
    forced = ops.stop(dom.name(), force=True)
    assert forced["result"] == "powered off (force)" and not dom.isActive()


def test_operations_refuse_locked_and_unmanaged_vms(store, testdriver):
    dom = testdriver.define("web")
    with pytest.raises(OperationError, match="task_state=maintenance"):
        operations(store, instances={dom.name(): {"task_state": "maintenance"}}).stop(dom.name())
    with pytest.raises(OperationError, match="managed: false"):
        operations(store, instances={dom.name(): {"managed": False}}).stop(dom.name())
    with pytest.raises(OperationError, match="pillar pins vm_state=active, so it cannot be made stopped"):
        operations(store, instances={dom.name(): {"vm_state": "active"}}).stop(dom.name())
    assert dom.isActive()


def test_unknown_domains_are_named(store):
    ops = operations(store)
    with pytest.raises(UnknownDomain, match="no domain named or with UUID 'nope'"):
        ops.get_info("nope")
    with pytest.raises(UnknownDomain, match="'nope'"):
        ops.history("nope")


def test_get_info_reports_libvirts_units(store, testdriver):
    dom = testdriver.define("web")
    info = operations(store).get_info(dom.name())
    _, max_mem, mem, cpus, cpu_time = dom.info()
    cpu_time_read = info.pop("cpu_time")
    assert info == {"uuid": dom.UUIDString(), "name": dom.name(), "power_state": "running",
                    "max_mem": max_mem, "mem": mem, "num_cpu": cpus}
    assert 0 < cpu_time_read <= cpu_time  # nanoseconds, and it only grows


def test_status_reports_a_broken_connection_without_failing(store):
    status = operations(store, uri="test:///nonexistent/path.xml").status()
    assert status["connected"] is False and "cannot connect" in status["error"]


def _write_by_hand(location, uuid, column, value):
    """Put ``value`` into one column of one record, past vmpower (its database's own driver)."""
    if "://" in location:
        import psycopg
        with psycopg.connect(location, autocommit=True) as db:
            db.execute(f"UPDATE instances SET {column} = %s WHERE uuid = %s", (value, uuid))
        return
    import sqlite3
    db = sqlite3.connect(location)
    with db:
        db.execute(f"UPDATE instances SET {column} = ? WHERE uuid = ?", (value, uuid))
    db.close()


def _read_by_hand(location, uuid, column):
    if "://" in location:
        import psycopg
        with psycopg.connect(location, autocommit=True) as db:
            return db.execute(f"SELECT {column} FROM instances WHERE uuid = %s", (uuid,)).fetchone()[0]
    import sqlite3
    db = sqlite3.connect(location)
    try:
        return db.execute(f"SELECT {column} FROM instances WHERE uuid = ?", (uuid,)).fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("column,value", [("vm_state", "hibernated"), ("power_state", "frozen"),
                                          ("off_reason", "cosmic_ray")])
def test_an_unknown_stored_value_takes_only_that_vm_out_of_vmpowers_hands(
        store_location, testdriver, caplog, column, value):
    odd, other = testdriver.define("odd", start=False), testdriver.define("other", start=False)
    with open_store(store_location) as store:
        ops = operations(store)
        ops.sync()  # both recorded stopped
        _write_by_hand(store_location, odd.UUIDString(), column, value)
        history = store.history(odd.UUIDString())
        odd.create()
        other.create()  # both started behind vmpower's back: a sync powers them off...

        report = ops.sync()
        assert not other.isActive()  # ...the one whose record this version reads,
        assert other.name() in [a["name"] for a in report["actions"]]
        assert odd.isActive()  # not the other
        [skipped] = [s for s in report["skipped"] if s["name"] == odd.name()]
        assert f"{column}={value!r}" in skipped["reason"], skipped
        assert f"{column}={value!r}" in caplog.text

        reconciled = ops.reconcile(odd.UUIDString(), Transition.STARTED)
        assert reconciled["skipped"] and f"{column}={value!r}" in reconciled["reason"]
        with pytest.raises(OperationError, match=f"{column}={value!r}"):
            ops.stop(odd.name())
        assert odd.isActive()
        assert odd.name() in [row["name"] for row in ops.overview()]
        # Nothing written over it, nothing audited: a newer vmpower may own that value.
        assert _read_by_hand(store_location, odd.UUIDString(), column) == value
        assert store.history(odd.UUIDString()) == history

        # The operator's way out: reset_state with the vm_state meant.
        ops.reset_state(odd.name(), vm_state=VmState.STOPPED)
        ops.sync()
        assert not odd.isActive()


class _ListingThen(Hypervisor):
    """A hypervisor whose bulk listing is followed by ``then()``: what happens between a
    sync's listing and its locks."""

    then = staticmethod(lambda: None)

    def list_all(self):
        listed = super().list_all()
        type(self).then()
        return listed


def test_a_sync_never_writes_its_listing_over_a_newer_record_from_the_event_path(store, testdriver):
    dom = testdriver.define("web")
    uuid = dom.UUIDString()
    clock = Clock()
    events = operations(store, clock)
    events.sync()
    dom.suspend()
    events.reconcile(uuid)  # the event path records the pause
    assert store.get(uuid).power_state.value == "paused"

    def resumed_and_recorded():  # after the sync listed it paused
        dom.resume()
        events.reconcile(uuid)

    class Listing(_ListingThen):
        then = staticmethod(resumed_and_recorded)

    sync = HostOperations(events.settings, HOST, store, hypervisor=Listing, clock=clock,
                          boot_id=lambda: BOOT, stopping=lambda: False)
    report = sync.sync()
    record = store.get(uuid)
    assert (record.power_state.value, record.vm_state.value) == ("running", "active")
    assert report["updated"] == 0


def _until(condition, what):
    """Wait for ``condition()`` to hold (bounded only so that a broken build cannot hang)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.005)


def test_a_sync_asked_while_another_runs_runs_after_it_and_later_asks_merge(tmp_path, testdriver):
    path = str(tmp_path / "records.sqlite")
    listed, go = threading.Event(), threading.Event()

    def hold_after_listing():
        listed.set()
        go.wait()

    class Long(_ListingThen):
        then = staticmethod(hold_after_listing)

    settings = parse_settings({"uri": TEST_URI, "stop_timeout": 0})
    reports = {}

    def sync_in_thread(name, hypervisor):
        with open_store(path) as own:
            ops = HostOperations(settings, HOST, own, hypervisor=hypervisor, clock=Clock(),
                                 boot_id=lambda: BOOT, stopping=lambda: False)
            reports[name] = ops.sync()

    long = threading.Thread(target=sync_in_thread, args=("long", Long))
    long.start()
    listed.wait()
    arrived = testdriver.define("arrived")  # after the long sync listed
    asked = threading.Thread(target=sync_in_thread, args=("asked", Hypervisor))
    asked.start()
    with open_store(path) as store:
        try:
            _until(lambda: store.holder(f"sync-queue-{HOST}") is not None,
                   "the second sync waits in the queue")
            merged = operations(store).sync()
        finally:
            go.set()
            long.join()
            asked.join()
        assert merged["queued"].startswith("merged: a sync of minion-1 is running")
        assert merged["checked"] == 0
        assert "queued" not in reports["asked"] and "busy" in reports["asked"]
        assert store.get(arrived.UUIDString()) is not None  # listed after it was asked
        assert reports["long"]["checked"] < reports["asked"]["checked"]


class _StartFails(Hypervisor):
    """A host where starting a domain fails (its disk locked by another host, say)."""

    def start(self, uuid):
        raise libvirt.libvirtError("Failed to get \"write\" lock: Is another process using the image?")


def test_a_restart_that_fails_counts_toward_the_restart_limit(store, testdriver):
    dom = testdriver.define("pinned")
    uuid = dom.UUIDString()
    clock = Clock()
    settings = parse_settings({"uri": TEST_URI, "stop_timeout": 0, "stop_grace": 15,
                               "restart_backoff": 10, "restart_limit": 2,
                               "instances": {dom.name(): {"vm_state": "active"}}})
    ops = HostOperations(settings, HOST, store, hypervisor=_StartFails, clock=clock,
                         boot_id=lambda: BOOT, stopping=lambda: False)
    ops.sync()
    dom.destroy()
    ops.sync()
    clock.step(15)
    first = ops.sync()["actions"]
    assert [(a["action"], a["result"].split(":")[0]) for a in first] == [("start", "failed")]
    assert store.get(uuid).restart_count == 1
    clock.step(10)
    ops.sync()
    assert store.get(uuid).restart_count == 2
    clock.step(20)
    ops.sync()  # the limit: a person should look
    record = store.get(uuid)
    assert (record.vm_state.value, record.restart_count) == ("error", 2)
    assert not dom.isActive()
