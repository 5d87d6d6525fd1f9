"""A fleet's everyday operations against a real libvirtd and real QEMU guests, one
test per case, through Salt's loader (``load_minion``) and, where a job process of its own is
needed, a real ``salt-call --local`` (tests/real/saltcall.py) on the same store and pillar.

Each asserts on what vmpower recorded (the records, read from the SQLite file, and the audit
log, through ``vmpower.history``) and on what the domain really did, never on how long a step
took. ``stop_grace`` is 0 in the cases whose subject is not the grace, so that a test passes
because of the rule it is about and not because the VM went off only a moment ago.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import libvirt
import pytest

from vmpower.core.settings import BeaconSettings
from vmpower.eventloop import Watcher
from vmpower.journal import Journal, journal_path
from vmpower_lab import lab

from ..daemons.helpers import read_record
from .conftest import URI
from .saltcall import SaltCall, wait_until

pytestmark = pytest.mark.real

RUNNING, SHUTOFF, CRASHED = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_SHUTOFF,
                             libvirt.VIR_DOMAIN_CRASHED)


@pytest.fixture
def store(tmp_path) -> str:
    """This test's own SQLite store (never the shared default)."""
    return str(tmp_path / "store" / "records.sqlite")


def about(report: dict, uuid: str) -> dict:
    """What a sync report says about ``uuid``, by section."""
    return {key: [entry for entry in report.get(key) or [] if entry.get("uuid") == uuid]
            for key in ("actions", "skipped", "warnings", "busy")}


def acting(entries) -> list[dict]:
    """Audit entries that acted on the domain."""
    return [entry for entry in entries if entry["action"] in ("start", "power_off")]


def qemu_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
def test_hard_reboot_while_a_sync_runs_does_nothing(load_minion, libvirt_daemon, make_guest, store):
    """A sync that lands inside a hard reboot's gap (``virsh destroy`` then ``virsh start``)
    neither records the VM stopped nor acts: the VM went off less than ``stop_grace`` ago.
    The sync after the start finds it running, as recorded."""
    vmpower = load_minion(URI, store=store, stop_grace=60).functions
    guest, dom = make_guest("stubborn")
    lab.wait_guest_ready(dom)
    vmpower["vmpower.sync"]()
    before = read_record(store, guest.uuid)
    assert (before["vm_state"], before["power_state"]) == ("active", "running"), before
    pid = lab.qemu_pid(guest.name)
    audit = len(vmpower["vmpower.history"](guest.uuid))

    dom.destroy()  # the hard reboot's stop...
    in_gap = vmpower["vmpower.sync"]()
    during = read_record(store, guest.uuid)
    resync = vmpower["vmpower.reconcile"](guest.uuid)  # a resync's reconcile, no event claimed
    dom.create()  # ...and its start
    after_report = vmpower["vmpower.sync"]()

    assert about(in_gap, guest.uuid)["actions"] == [], in_gap
    assert during["vm_state"] == "active" and during["task_state"] == "", during
    assert resync["action"] == "none", resync
    assert about(after_report, guest.uuid)["actions"] == [], after_report
    after = read_record(store, guest.uuid)
    assert (after["vm_state"], after["power_state"]) == ("active", "running"), after
    assert dom.state()[0] == RUNNING and lab.qemu_pid(guest.name) != pid  # really rebooted
    entries = vmpower["vmpower.history"](guest.uuid)[audit:]
    assert acting(entries) == [], entries
    assert [e for e in entries if e["new"].get("vm_state")] == [], entries


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pillar", [{}, {"vm_state": "active"}], ids=["default", "pinned-active"])
def test_crash_that_libvirt_preserves_is_recorded_not_destroyed(load_minion, libvirt_daemon,
                                                                 make_guest, store, pillar):
    """``<on_crash>preserve</on_crash>``: the guest panics, libvirt keeps the domain
    ``crashed`` (for a dump). vmpower records it and does not destroy (nor restart) it, by
    sync and by the ``crashed`` event's reconcile alike."""
    guest, dom = make_guest("panic", on_crash="preserve")
    instances = {guest.name: pillar} if pillar else {}
    vmpower = load_minion(URI, {"vmpower": {"instances": instances}}, store=store,
                          stop_grace=0).functions
    lab.wait_guest_ready(dom)
    vmpower["vmpower.sync"]()
    assert read_record(store, guest.uuid)["vm_state"] == "active"
    pid = lab.qemu_pid(guest.name)
    audit = len(vmpower["vmpower.history"](guest.uuid))

    dom.shutdown()  # the power button: this boot sector panics (pvpanic)
    assert lab.wait_for_state(dom, CRASHED) == libvirt.VIR_DOMAIN_CRASHED_PANICKED
    report = vmpower["vmpower.sync"]()
    event = vmpower["vmpower.reconcile"](guest.uuid, "crashed")

    assert about(report, guest.uuid)["actions"] == [], report
    assert event["action"] == "none", event
    assert tuple(dom.state()) == (CRASHED, libvirt.VIR_DOMAIN_CRASHED_PANICKED)
    assert qemu_alive(pid)  # not destroyed
    record = read_record(store, guest.uuid)
    assert record["power_state"] == "crashed", record
    assert record["vm_state"] == "active", record  # libvirt handles it: not recorded stopped
    entries = vmpower["vmpower.history"](guest.uuid)[audit:]
    assert acting(entries) == [], entries
    assert any("preserve" in entry["reason"] for entry in entries), entries


# ---------------------------------------------------------------------------------------------
def test_stop_whose_job_process_is_killed_is_cleared_by_the_next_sync(
        load_minion, libvirt_daemon, make_guest, store, tmp_path):
    """The job process of a ``vmpower.stop`` (a real ``salt-call``) is killed with SIGKILL
    while it waits for a guest that ignores ACPI. ``task_state=powering-off`` is left on the
    record by a process that is gone: the next sync clears it (audited) and decides about the
    VM again -- here pillar now pins it stopped, so the sync powers it off."""
    guest, dom = make_guest("stubborn")
    lab.wait_guest_ready(dom)
    vmpower = load_minion(URI, store=store, stop_grace=0).functions
    vmpower["vmpower.sync"]()
    job = SaltCall(tmp_path / "job", URI, store=store, stop_grace=0)

    proc = job.spawn("vmpower.stop", guest.name, timeout=600)
    try:
        busy = wait_until(lambda: (r := read_record(store, guest.uuid)) and
                          r["task_state"] == "powering-off" and r, 120,
                          "the stop job to set task_state=powering-off")
    finally:
        proc.kill()  # SIGKILL: no except, no finally in the job runs
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert busy["task_owner"], busy  # vmpower said who set it
    assert dom.state()[0] == RUNNING  # the stubborn guest never went off
    assert read_record(store, guest.uuid)["task_state"] == "powering-off"  # wedged until now

    pinned = load_minion(URI, {"vmpower": {"instances": {guest.name: {"vm_state": "stopped"}}}},
                         store=store, stop_grace=0).functions
    report = pinned["vmpower.sync"]()

    record = read_record(store, guest.uuid)
    assert (record["task_state"], record["task_owner"]) == ("", ""), record
    assert record["vm_state"] == "stopped" and record["power_state"] == "shutdown", record
    assert [a["action"] for a in about(report, guest.uuid)["actions"]] == ["power_off"], report
    assert dom.state()[0] == SHUTOFF
    entries = pinned["vmpower.history"](guest.uuid)
    cleared = [e for e in entries
               if e["old"].get("task_state") == "powering-off" and e["new"].get("task_state") == ""]
    assert len(cleared) == 1 and cleared[0]["cause"] == "sync", entries
    assert "gone" in cleared[0]["reason"], cleared
    assert acting(entries)[-1]["action"] == "power_off", entries


# ---------------------------------------------------------------------------------------------
def test_renamed_domain_keeps_the_pillar_lock_under_its_new_name(load_minion, libvirt_daemon,
                                                                  make_guest, store):
    """``virsh domrename`` of a VM recorded stopped, pillar ``task_state: maintenance`` under
    its new name, then the VM is started behind vmpower's back: no action (rule 6 would power
    it off). Once the lock is lifted the record takes the new name (audited) and the rules
    apply again."""
    guest, dom = make_guest("acpi", start=False)
    first = load_minion(URI, store=store, stop_grace=0).functions
    first["vmpower.sync"]()
    assert read_record(store, guest.uuid)["vm_state"] == "stopped"
    new_name = guest.name + "-renamed"
    dom.rename(new_name, 0)
    dom.create()  # behind vmpower's back, under its new name
    audit = len(first["vmpower.history"](guest.uuid))

    locked = load_minion(URI, {"vmpower": {"instances": {new_name: {"task_state": "maintenance"}}}},
                         store=store, stop_grace=0).functions
    report = locked["vmpower.sync"]()
    reconciled = locked["vmpower.reconcile"](guest.uuid, "started")

    assert about(report, guest.uuid)["actions"] == [], report
    assert reconciled["action"] == "none", reconciled
    assert "maintenance" in reconciled["reason"], reconciled
    assert dom.state()[0] == RUNNING
    entries = locked["vmpower.history"](guest.uuid)[audit:]
    assert acting(entries) == [], entries

    free = load_minion(URI, store=store, stop_grace=0).functions
    free["vmpower.sync"]()
    record = read_record(store, guest.uuid)
    assert record["name"] == new_name, record
    renames = [e for e in free["vmpower.history"](guest.uuid)
               if e["new"].get("name") == new_name]
    assert len(renames) == 1 and renames[0]["old"]["name"] == guest.name, renames
    assert dom.state()[0] == SHUTOFF  # vm_state=stopped, running: powered off once unlocked


# ---------------------------------------------------------------------------------------------
def test_sync_while_another_job_holds_one_vms_lock(load_minion, libvirt_daemon, make_guest, store):
    """Another job process holds one VM's instance lock: a sync does not wait for it; it
    lists that VM under ``busy`` and syncs the rest (here: powers off a VM recorded stopped
    that was started behind vmpower's back). The next sync, once the lock is free, handles the
    busy one too."""
    held, held_dom = make_guest("acpi", "-held", start=False)
    other, other_dom = make_guest("acpi", "-other", start=False)
    vmpower = load_minion(URI, store=store, stop_grace=0).functions
    vmpower["vmpower.sync"]()
    held_dom.create()
    other_dom.create()  # both started behind vmpower's back: both need powering off

    # Another vmpower process that takes the instance lock of one VM and keeps it.
    code = ("import sys, time; from vmpower.store import open_store; s = open_store(sys.argv[1]); "
            "l = s.lock(sys.argv[2]); l.__enter__(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, store, held.uuid], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        report = vmpower["vmpower.sync"]()
        assert about(report, held.uuid)["busy"], report
        assert about(report, held.uuid)["actions"] == [], report
        assert [a["action"] for a in about(report, other.uuid)["actions"]] == ["power_off"], report
        assert other_dom.state()[0] == SHUTOFF
        assert held_dom.state()[0] == RUNNING  # left alone while busy
    finally:
        proc.kill()
        proc.communicate(timeout=60)

    again = vmpower["vmpower.sync"]()
    assert [a["action"] for a in about(again, held.uuid)["actions"]] == ["power_off"], again
    assert held_dom.state()[0] == SHUTOFF


def test_sync_while_a_long_stop_runs_finishes_and_leaves_that_vm_alone(
        load_minion, libvirt_daemon, make_guest, store, tmp_path):
    """A real ``vmpower.stop`` with a long timeout on a guest that ignores ACPI (it holds the
    VM's lock and has set its task_state) while a sync runs: the sync returns, syncs the rest
    and leaves that VM alone (``busy`` or ``skipped``, naming why)."""
    slow, slow_dom = make_guest("stubborn", "-slow")
    other, other_dom = make_guest("acpi", "-other", start=False)
    lab.wait_guest_ready(slow_dom)
    vmpower = load_minion(URI, store=store, stop_grace=0).functions
    vmpower["vmpower.sync"]()
    other_dom.create()
    job = SaltCall(tmp_path / "job", URI, store=store, stop_grace=0)
    proc = job.spawn("vmpower.stop", slow.name, timeout=600)
    try:
        wait_until(lambda: (r := read_record(store, slow.uuid)) and r["task_state"] == "powering-off",
                   120, "the stop job to set task_state=powering-off")
        report = vmpower["vmpower.sync"]()
        mine = about(report, slow.uuid)
        left_alone = mine["busy"] + mine["skipped"]
        assert len(left_alone) == 1 and mine["actions"] == [], report
        assert "powering-off" in left_alone[0]["reason"] or "lock" in left_alone[0]["reason"], report
        assert [a["action"] for a in about(report, other.uuid)["actions"]] == ["power_off"], report
        assert slow_dom.state()[0] == RUNNING
    finally:
        proc.kill()
        proc.communicate(timeout=60)


# ---------------------------------------------------------------------------------------------
def test_crash_loop_of_a_vm_pinned_active_honours_its_back_offs(load_minion, libvirt_daemon,
                                                                make_guest, store):
    """A guest that powers itself off about two seconds after every boot, pinned ``active``:
    vmpower restarts it, each restart after its back-off (none, then ``restart_backoff``,
    then twice that), counts every restart exactly, and gives up at ``restart_limit`` with
    ``vm_state=error``. The syncs are run as often as the test likes; only the records say
    when a restart happened."""
    guest, _ = make_guest("selfstop", start=False)
    backoff, limit = 1.0, 3
    settings = {"store": store, "stop_grace": 0, "restart_backoff": backoff,
                "restart_limit": limit}
    pillar = {"vmpower": {"instances": {guest.name: {"vm_state": "active"}}}}
    vmpower = load_minion(URI, pillar, **settings).functions
    vmpower["vmpower.start"](guest.name)

    def looped():
        vmpower["vmpower.sync"]()
        record = read_record(store, guest.uuid)
        return record if record["vm_state"] == "error" else None

    record = wait_until(looped, 240, "the VM to reach vm_state=error", interval=0.3)
    assert record["restart_count"] == limit, record
    entries = vmpower["vmpower.history"](guest.uuid)
    starts = [e for e in entries if e["action"] == "start"]
    assert len(starts) == limit, entries
    for number, entry in enumerate(starts, 1):
        assert f"restart {number} of {limit}" in entry["reason"], entry
        assert entry["new"]["restart_count"] == number, entry
    # Each restart came no earlier than its back-off after the one before, as recorded.
    times = [entry["new"]["last_restart_at"] for entry in starts]
    for number in range(1, limit):
        assert times[number] - times[number - 1] >= backoff * 2 ** (number - 1), times
    errors = [e for e in entries if e["new"].get("vm_state") == "error"]
    assert len(errors) == 1 and entries.index(errors[0]) > entries.index(starts[-1]), entries
    # Given up: the next sync leaves it off.
    report = vmpower["vmpower.sync"]()
    assert about(report, guest.uuid)["actions"] == [], report
    assert read_record(store, guest.uuid)["restart_count"] == limit


# ---------------------------------------------------------------------------------------------
def test_host_shutdown_of_every_guest_then_all_started_powers_none_off(load_minion, libvirt_daemon,
                                                                         make_guest, store):
    """The host shuts every guest down (SIGTERM to each QEMU, as a host's shutdown does: libvirt
    reports SHUTDOWN "on host request" and the beacon's ``stopped`` says ``host_shutdown``),
    each event is reconciled by its ``seq`` (as the reactor passes it; reconcile believes the
    reason because the beacon's journal says so), a sync follows; then every guest is started
    again, as libvirt-guests or autostart does at boot. Under the default
    ``on_host_shutdown: ignore`` none is recorded stopped and none is powered off."""
    guests = [make_guest("acpi", f"-{number}") for number in range(3)]
    minion = load_minion(URI, store=store, stop_grace=0)
    vmpower = minion.functions
    # The beacon's event watcher, journaling where the minion's beacon does.
    watcher = Watcher(BeaconSettings(uri=URI, stop_grace=0),
                      journal=Journal(journal_path(minion.opts["cachedir"])))
    fired = []

    def stopped(uuid):
        assert watcher.settle()
        fired.extend(watcher.drain())
        return [e for e in fired if e.get("uuid") == uuid and e.get("transition") == "stopped"]

    try:
        wait_until(lambda: watcher.settle() and fired.extend(watcher.drain()) is None
                   and any(e["tag"] == "resync" for e in fired), 60, "the watcher to connect")
        for _, dom in guests:
            lab.wait_guest_ready(dom)
        vmpower["vmpower.sync"]()
        audit = {guest.uuid: len(vmpower["vmpower.history"](guest.uuid)) for guest, _ in guests}

        for guest, _ in guests:
            os.kill(lab.qemu_pid(guest.name), signal.SIGTERM)
        for guest, dom in guests:
            assert lab.wait_for_state(dom, SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
            [event] = wait_until(lambda guest=guest: stopped(guest.uuid), 60,
                                 f"the beacon's stopped event of {guest.name}")
            assert event["reason"] == "host_shutdown", event
            ret = vmpower["vmpower.reconcile"](guest.uuid, "stopped", reason="host_shutdown",
                                               seq=event["seq"])
            assert ret["action"] == "none", ret
            assert "on_host_shutdown=ignore" in ret["reason"], ret
    finally:
        watcher.retire()
    down = vmpower["vmpower.sync"]()
    for guest, _ in guests:
        assert about(down, guest.uuid)["actions"] == [], down
        record = read_record(store, guest.uuid)
        assert (record["vm_state"], record["power_state"]) == ("active", "shutdown"), record

    for _, dom in guests:
        dom.create()  # libvirt-guests / autostart at boot
    for guest, _ in guests:
        assert vmpower["vmpower.reconcile"](guest.uuid, "started")["action"] == "none"
    up = vmpower["vmpower.sync"]()
    for guest, dom in guests:
        assert about(up, guest.uuid)["actions"] == [], up
        assert dom.state()[0] == RUNNING, guest.name
        record = read_record(store, guest.uuid)
        assert (record["vm_state"], record["power_state"]) == ("active", "running"), record
        entries = vmpower["vmpower.history"](guest.uuid)[audit[guest.uuid]:]
        assert acting(entries) == [], entries
        assert [e for e in entries if e["new"].get("vm_state")] == [], entries
