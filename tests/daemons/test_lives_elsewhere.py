"""A VM that lives elsewhere is never started on the host it left, even once that host's
libvirtd has forgotten why its copy is off.

Two real libvirtds in their own namespaces (``lab_hosts``) and a real salt-minion on host A
with the vmpower beacon and its own SQLite store: nothing in A's records tells it that host B
has the VM. The guest, pinned ``vm_state: active``, is live-migrated A -> B with
``--persistent``, so A keeps a shut-off definition; A's libvirtd restarts while the beacon
still holds the migration's STOPPED in its grace, and the copy becomes ``shut off
(unknown)``. Whatever A's vmpower then decides (the resync's sync, the held event, a retry),
it must not start that copy: the VM would run on two hosts.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from vmpower_lab import hosts as labhosts

from .helpers import (
    beacon_config,
    beacon_status,
    history,
    salt_call,
    start_and_settle,
    vm_record,
    wait_for_event,
    wait_for_job_return,
    wait_for_start_syncs,
    wait_until,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

MINION_A = "vmpower-hr"
GRACE = 15  # vmpower's default stop_grace: the restart comes well within it


def _state(uri: str, uuid: str):
    """``(state, reason)`` of ``uuid`` on the host at ``uri``, read on a connection of its own
    (a libvirtd restart closes the others)."""
    conn = libvirt.open(uri)
    try:
        return tuple(conn.lookupByUUIDString(uuid).state())
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _summary(entries) -> list[tuple]:
    return [(e["cause"], e["action"], e["reason"], e["old"], e["new"]) for e in entries]


def test_a_libvirtd_restart_in_the_migration_grace_never_starts_the_source_copy(
        salt_master, minion_factory, event_listener, lab_hosts, make_host_guest):
    host_a, host_b = lab_hosts["hosta"], lab_hosts["hostb"]
    guest, dom = make_host_guest("hosta", "acpi", start=False)
    since = time.time()
    with minion_factory.started(
            MINION_A, uri=host_a.uri,
            vmpower={"sync_interval": 3600, "stop_timeout": 30, "stop_grace": GRACE,
                     "instances": {guest.name: {"vm_state": "active"}}},
            beacons={"vmpower": beacon_config(uri=host_a.uri, stop_grace=GRACE)}) as minion:
        wait_for_start_syncs(event_listener, salt_master.id, MINION_A, since)
        start_and_settle(salt_master, minion, event_listener, guest, dom)
        assert vm_record(minion, guest.uuid)["host"] == MINION_A

        moved = time.time()
        conn_b = libvirt.open(host_b.uri)
        try:
            labhosts.migrate(dom, conn_b, persistent=True)
        finally:
            conn_b.close()
        # libvirtd sends the STOPPED (migrated) to the beacon after the migration returns: a
        # restart before it was sent loses it, and there is then nothing held to test.
        wait_until(lambda: beacon_status(minion).get("held"), GRACE,
                   "the beacon to hold the migration's STOPPED in its grace")
        restarted = time.time()  # before: the beacon may reconnect before the restart returns
        host_a.restart_libvirtd()  # within the grace: the STOPPED (migrated) is still held
        assert _state(host_a.uri, guest.uuid) == (libvirt.VIR_DOMAIN_SHUTOFF,
                                                  libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN)
        wait_for_event(event_listener, f"salt/beacon/{MINION_A}/vmpower/resync", restarted, 120,
                       daemon_id=salt_master.id,
                       match=lambda data: data.get("reason") == "reconnected")

        # The beacon's observation outlives the restart: once the grace is over, the STOPPED
        # (migrated) it held is fired and reconciled, and A lets the record go.
        wait_for_job_return(event_listener, salt_master.id, MINION_A, "vmpower.reconcile", moved,
                            timeout=120, match=lambda ret: isinstance(ret, dict)
                            and ret.get("uuid") == guest.uuid and ret.get("transition") == "stopped")
        record = vm_record(minion, guest.uuid)
        assert (record["host"], record["power_state"], record["off_reason"]) == (
            "", "shutdown", ""), record
        # A sync asked now (what the periodic one would do) starts nothing, and takes nothing
        # back: it writes nothing at all.
        written = len(history(minion, guest.uuid))
        report = salt_call(minion, "vmpower.sync")
        assert [a for a in report["actions"] if a.get("uuid") == guest.uuid] == [], report
        assert history(minion, guest.uuid)[written:] == [], _summary(history(minion, guest.uuid))
        entries = [e for e in history(minion, guest.uuid) if e["at"] >= moved]
        print(f"A's decisions since the migration: {_summary(entries)}")
        assert [e for e in entries if e["action"] == "start"] == [], entries
        assert _state(host_a.uri, guest.uuid)[0] == libvirt.VIR_DOMAIN_SHUTOFF
        assert _state(host_b.uri, guest.uuid)[0] == libvirt.VIR_DOMAIN_RUNNING
