"""An event is a trigger, never a fact: what a lifecycle event claims (its transition, its
reason, how long the domain has been off) counts only when this host's own beacon observed
it, as its journal says; anything else is a re-check of the live state, with the grace.

HostOperations on libvirt's test driver and a real SQLite file, with the host's monotonic
clock stepped by hand; the journal is written as the beacon writes it.
"""

import time

import libvirt
import pytest
from salt.exceptions import CommandExecutionError

from vmpower import hostinfo
from vmpower.core.model import Transition
from vmpower.core.settings import BeaconSettings, parse_settings
from vmpower.eventloop import Watcher
from vmpower.journal import Journal, journal_path
from vmpower.operations import HostOperations
from vmpower.store import open_store

from .conftest import TEST_URI, Clock, journal_event

HOST = "minion-1"
BOOT = "boot-1"
GRACE = 15.0



@pytest.fixture
def store(tmp_path):
    with open_store(str(tmp_path / "records.sqlite")) as s:
        yield s


def operations(store, clock, journal=None, **settings):
    return HostOperations(parse_settings({"uri": TEST_URI, "stop_timeout": 0,
                                          "stop_grace": GRACE, **settings}),
                          HOST, store, clock=clock, boot_id=lambda: BOOT, stopping=lambda: False,
                          journal=journal)


def observe(journal, dom, transition, reason, at, uri=TEST_URI, boot_id=BOOT):
    """What the beacon writes when it fires an event: libvirt called back at ``at``."""
    return journal_event(journal, dom.UUIDString(), transition, reason, at, boot_id, uri)


def test_a_stopped_claim_one_second_into_a_hard_reboot_changes_nothing(store, testdriver):
    """Forged, or typed by hand as ``vmpower.reconcile <uuid> transition=stopped``: it does not
    count as a stop the beacon held for stop_grace. The VM is not recorded stopped, and when
    the reboot's start half comes it is not powered off."""
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock)
    ops.sync()
    dom.destroy()  # the hard reboot's first half
    clock.step(1)
    result = ops.reconcile(dom.UUIDString(), Transition.STOPPED)
    assert result["action"] == "none" and result["retry_at"] > 0, result
    record = store.get(dom.UUIDString())
    assert record.vm_state.value == "active", result
    dom.create()  # ... and its start half
    ops.reconcile(dom.UUIDString(), Transition.STARTED)
    clock.step(60)
    report = ops.sync()
    assert report["actions"] == [] and dom.isActive()
    record = store.get(dom.UUIDString())
    assert (record.vm_state.value, record.power_state.value) == ("active", "running")
    assert [e["action"] for e in ops.history(dom.UUIDString())
            if e["action"] in ("power_off", "start")] == []


def test_a_forged_host_shutdown_reason_is_not_stored_and_a_pinned_vm_is_restarted(store, testdriver):
    """The guest shut itself down; an event claims the host asked (``reason: host_shutdown``).
    The off reason stored is only ever the host's own observation, so the VM pinned active is
    restarted after the grace, as its real reason (a guest shutdown) says."""
    dom = testdriver.define("pinned")
    clock = Clock()
    ops = operations(store, clock, instances={dom.name(): {"vm_state": "active"}})
    ops.sync()
    dom.shutdown()
    forged = ops.reconcile(dom.UUIDString(), Transition.STOPPED, reason="host_shutdown")
    assert "on_host_shutdown" not in forged["reason"], forged
    assert store.get(dom.UUIDString()).off_reason == ""
    assert not dom.isActive()  # within the grace: nothing done yet
    clock.step(GRACE)
    report = ops.sync()
    assert [a["action"] for a in report["actions"]] == ["start"], report
    assert dom.isActive()
    record = store.get(dom.UUIDString())
    assert (record.vm_state.value, record.power_state.value, record.restart_count) == (
        "active", "running", 1)


def test_a_stop_this_host_observed_is_timed_from_when_libvirt_called_back(store, testdriver, journal):
    """The beacon journaled the stop with the monotonic time libvirt called back: held for the
    whole grace (the beacon's stop_grace is vmpower's), it is acted on at once; held less (a
    beacon with a shorter grace of its own), the rest of the grace is waited out."""
    short, full = testdriver.define("short"), testdriver.define("full")
    clock = Clock()
    ops = operations(store, clock, journal)
    ops.sync()
    short.destroy()
    full.destroy()
    early = observe(journal, short, Transition.STOPPED, "destroyed", clock() - 1)
    on_time = observe(journal, full, Transition.STOPPED, "destroyed", clock() - GRACE)
    waiting = ops.reconcile(short.UUIDString(), Transition.STOPPED, seq=early)
    assert waiting["action"] == "none" and "waiting 14s more" in waiting["reason"], waiting
    acted = ops.reconcile(full.UUIDString(), Transition.STOPPED, seq=on_time)
    assert acted["action"] == "power_off" and acted["vm_state"] == "stopped", acted
    assert store.get(full.UUIDString()).off_since == clock() - GRACE


def test_the_off_reason_stored_is_the_one_this_host_observed(store, testdriver, journal):
    """The beacon saw the host ask (libvirt-guests, ``virsh shutdown``): the VM pinned active
    is left off (on_host_shutdown=ignore), whatever the event claims; and an event that claims
    the host asked, with the seq of what the beacon saw as a guest shutdown, is believed in
    the observation only."""
    by_host, by_guest = testdriver.define("by-host"), testdriver.define("by-guest")
    clock = Clock()
    ops = operations(store, clock, journal, instances={by_host.name(): {"vm_state": "active"},
                                                       by_guest.name(): {"vm_state": "active"}})
    ops.sync()
    by_host.shutdown()
    by_guest.shutdown()
    host_seq = observe(journal, by_host, Transition.STOPPED, "host_shutdown", clock() - GRACE)
    guest_seq = observe(journal, by_guest, Transition.STOPPED, "guest_shutdown", clock() - GRACE)
    kept_off = ops.reconcile(by_host.UUIDString(), Transition.STOPPED, reason="guest_shutdown",
                             seq=host_seq)
    assert "on_host_shutdown=ignore" in kept_off["reason"] and not by_host.isActive()
    assert "this host observed stopped (host_shutdown), which is what counts" in kept_off["reason"]
    assert store.get(by_host.UUIDString()).off_reason == "host_shutdown"
    restarted = ops.reconcile(by_guest.UUIDString(), Transition.STOPPED, reason="host_shutdown",
                              seq=guest_seq)
    assert restarted["action"] == "start" and by_guest.isActive(), restarted
    assert store.get(by_guest.UUIDString()).off_reason == ""


@pytest.mark.parametrize("observed", [
    {"uuid": "other"},  # the seq of another domain's stop
    {"boot_id": "boot-0"},  # observed before this host rebooted
    {"uri": "qemu:///system"},  # observed by a beacon watching another libvirt
], ids=["another-domain", "another-boot", "another-uri"])
def test_a_real_seq_of_something_else_is_not_believed(store, testdriver, journal, observed):
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock, journal)
    ops.sync()
    dom.destroy()
    uuid = dom.UUIDString() if observed.get("uuid") != "other" else testdriver.define("x").UUIDString()
    seq = journal_event(journal, uuid, Transition.STOPPED, "destroyed", clock() - GRACE,
                        observed.get("boot_id", BOOT), observed.get("uri", TEST_URI))
    result = ops.reconcile(dom.UUIDString(), Transition.STOPPED, seq=seq)
    assert result["action"] == "none" and "retry_at" in result, result
    assert "not what this host observed" in result["reason"] and "observed" not in result
    assert store.get(dom.UUIDString()).vm_state.value == "active"


@pytest.mark.parametrize("after", ["start", "gap"])
def test_an_observation_that_is_not_the_beacons_latest_word_is_not_believed(store, testdriver,
                                                                              journal, after):
    """The beacon journaled the stop, then the domain's start (a later event), or a gap in its
    watch (events may have been missed): the stop no longer says how long it has been off."""
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock, journal)
    ops.sync()
    dom.destroy()
    seq = observe(journal, dom, Transition.STOPPED, "destroyed", clock() - 30)
    if after == "start":
        observe(journal, dom, Transition.STARTED, "booted", clock() - 20)
    else:
        journal_event(journal, "", "gap", "reconnected", clock() - 20, BOOT)
    dom.create()
    dom.destroy()  # off again, a moment ago
    result = ops.reconcile(dom.UUIDString(), Transition.STOPPED, seq=seq)
    assert result["action"] == "none" and "not this host's latest word" in result["reason"], result
    assert store.get(dom.UUIDString()).vm_state.value == "active"


def test_the_beacons_own_journal_is_what_reconcile_believes(store, testdriver, tmp_path):
    """The watcher journals what it fires, numbered: its stopped event, fired once the grace
    is over, is acted on at once; during a hard reboot it fires only the start, and a stopped
    claim then is a re-check that waits."""
    mono = Clock(500.0)
    journal_file = str(tmp_path / "journal.sqlite")
    watcher = Watcher(BeaconSettings(uri=TEST_URI, stop_grace=GRACE), clock=time.time,
                      monotonic=mono, journal=Journal(journal_file, boot_id=lambda: BOOT),
                      boot_id=lambda: BOOT)
    fired = []

    def drain(until):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert watcher.settle(30)
            fired.extend(watcher.drain())
            if until():
                return
            time.sleep(0.002)
        pytest.fail("the watcher did not fire what was expected")

    def of(dom, transition):
        return [e for e in fired if e.get("uuid") == dom.UUIDString() and e["transition"] == transition]

    try:
        drain(lambda: any(e["tag"] == "resync" for e in fired))
        rebooted, stopped = testdriver.define("rebooted"), testdriver.define("stopped")
        drain(lambda: of(rebooted, "started") and of(stopped, "started"))
        with Journal(journal_file) as reader:
            ops = operations(store, mono, reader)
            ops.sync()
            stopped.destroy()
            rebooted.destroy()
            rebooted.create()  # a hard reboot: the beacon fires only its start
            drain(lambda: len(of(rebooted, "started")) == 2 and watcher.health()["held"] == 1)
            mono.step(1)
            forged = ops.reconcile(rebooted.UUIDString(), Transition.STOPPED)
            assert forged["action"] == "none" and rebooted.isActive(), forged
            mono.step(GRACE)
            drain(lambda: of(stopped, "stopped"))
            [event] = of(stopped, "stopped")
            assert event["seq"] > of(rebooted, "started")[-1]["seq"]
            result = ops.reconcile(stopped.UUIDString(), Transition(event["transition"]),
                                   reason=event["reason"], seq=event["seq"])
            assert result["observed"] == {"seq": event["seq"], "transition": "stopped",
                                          "reason": "destroyed"}
            assert result["action"] == "power_off" and result["vm_state"] == "stopped", result
            assert store.get(rebooted.UUIDString()).vm_state.value == "active"
            assert rebooted.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        watcher.retire()


def test_the_module_reads_the_minions_journal_by_the_seq_the_reactor_passes(load_minion, testdriver):
    """Through Salt's loader: the reactor passes the event's data as text; the module finds
    the minion's journal in its cachedir, where the minion's beacon writes it."""
    dom = testdriver.define("web")
    loaded = load_minion(TEST_URI, stop_timeout=0, stop_grace=GRACE)
    mods = loaded.functions
    mods["vmpower.sync"]()
    dom.destroy()
    with Journal(journal_path(loaded.opts["cachedir"])) as journal:
        seq = journal_event(journal, dom.UUIDString(), Transition.STOPPED, "destroyed",
                            time.monotonic() - GRACE, hostinfo.boot_id())
    result = mods["vmpower.reconcile"](uuid=dom.UUIDString(), transition="stopped",
                                       reason="destroyed", seq=str(seq))
    assert result["observed"]["seq"] == seq and result["vm_state"] == "stopped", result
    with pytest.raises(CommandExecutionError, match="seq must be an event's sequence number"):
        mods["vmpower.reconcile"](uuid=dom.UUIDString(), seq="soon")


# A sync believes what this host's beacon observed last, as a reconcile of that event would.
def test_a_sync_dates_an_off_spell_from_the_stop_the_beacon_observed(store, testdriver, tmp_path):
    """The STOPPEDs were fired while the master was away (Salt dropped them): the resync's sync
    finds the VMs off for the first time. The beacon saw ``web`` go off 40 s ago, so its grace
    is over and the sync acts now. Nothing else is believed: ``gapped``'s stop came before a
    gap in the beacon's watch, ``rebooted``'s in another boot, and ``running`` runs again."""
    web, gapped, rebooted, running = (testdriver.define(name)
                                      for name in ("web", "gapped", "rebooted", "running"))
    clock = Clock()
    with Journal(str(tmp_path / "journal.sqlite"), boot_id=lambda: BOOT) as journal:
        ops = operations(store, clock, journal)
        ops.sync()
        for dom in (web, gapped, rebooted):
            dom.destroy()
        observe(journal, gapped, Transition.STOPPED, "guest_shutdown", clock() - 40)
        journal_event(journal, "", "gap", "reconnected", clock() - 39, BOOT)
        observe(journal, web, Transition.STOPPED, "guest_shutdown", clock() - 40)
        observe(journal, rebooted, Transition.STOPPED, "guest_shutdown", clock() - 40,
                boot_id="boot-0")
        observe(journal, running, Transition.STOPPED, "guest_shutdown", clock() - 40)
        report = ops.sync()
    states = [(store.get(dom.UUIDString()).vm_state.value, store.get(dom.UUIDString()).power_state.value)
              for dom in (web, gapped, rebooted, running)]
    assert states == [("stopped", "shutdown"), ("active", "shutdown"), ("active", "shutdown"),
                      ("active", "running")], report
    assert running.isActive()
    assert 0 < report["retry_at"] - time.time() <= GRACE + 0.001  # for the two not believed
