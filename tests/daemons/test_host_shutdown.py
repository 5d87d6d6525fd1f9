"""A host's shutdown and its guests coming back, through the whole event path: a real
libvirtd, real QEMU guests, the vmpower beacon in a real minion (``beacon_minion``), the
shipped reactor, ``vmpower.reconcile`` and the records.

How the shutdown is made: each guest's QEMU gets SIGTERM, which is what a host's shutdown does
to it when nothing shuts the guests down first. libvirt then reports SHUTDOWN "on host
request" (``VIR_DOMAIN_EVENT_SHUTDOWN_HOST``) and STOPPED/SHUTDOWN, and the beacon fires
``stopped`` with reason ``host_shutdown``. (An ACPI ``virsh shutdown``, as libvirt-guests does
it, is reported by libvirt 9 and QEMU 7.2 as SHUTDOWN "on guest request", exactly like a
guest's own power-off: tests/real/test_lab.py shows it.) Then every guest is started again,
as libvirt-guests or autostart does at boot: under the default ``on_host_shutdown: ignore``
none is powered off, and no record says ``stopped``.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from vmpower_lab import lab

from .conftest import BEACON_MINION
from .helpers import (
    history,
    vm_record,
    wait_for_job_return,
    wait_for_lifecycle,
    wait_for_record,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

GUESTS = 3


def reconcile_of(uuid, **expected):
    def match(ret):
        return (isinstance(ret, dict) and ret.get("uuid") == uuid
                and all(ret.get(key) == value for key, value in expected.items()))
    return match


def test_host_shutdown_of_every_guest_then_all_started_powers_none_off(
        salt_master, beacon_minion, event_listener, make_guest):
    created = time.time()
    guests = [make_guest("acpi", f"-{number}") for number in range(GUESTS)]
    for guest, dom in guests:
        wait_for_lifecycle(event_listener, salt_master.id, BEACON_MINION, "started", guest.uuid,
                           created)
        lab.wait_guest_ready(dom)
        wait_for_record(beacon_minion, guest.uuid, vm_state="active", power_state="running")

    since = time.time()
    for guest, _ in guests:
        os.kill(lab.qemu_pid(guest.name), signal.SIGTERM)  # the host is shutting down
    for guest, dom in guests:
        assert lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
        event = wait_for_lifecycle(event_listener, salt_master.id, BEACON_MINION, "stopped",
                                   guest.uuid, since)
        assert event.data["reason"] == "host_shutdown", event.data
        ret = wait_for_job_return(event_listener, salt_master.id, BEACON_MINION,
                                  "vmpower.reconcile", since,
                                  match=reconcile_of(guest.uuid, transition="stopped"))["return"]
        assert ret["action"] == "none", ret
        record = wait_for_record(beacon_minion, guest.uuid, power_state="shutdown")
        assert record["vm_state"] == "active", record  # not the operator's intent

    booted = time.time()
    for _, dom in guests:
        dom.create()  # libvirt-guests / autostart brings them back
    for guest, dom in guests:
        ret = wait_for_job_return(event_listener, salt_master.id, BEACON_MINION,
                                  "vmpower.reconcile", booted,
                                  match=reconcile_of(guest.uuid, transition="started"))["return"]
        assert ret["action"] == "none", ret
        wait_for_record(beacon_minion, guest.uuid, vm_state="active", power_state="running")

    for guest, dom in guests:
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, guest.name
        record = vm_record(beacon_minion, guest.uuid)
        assert (record["vm_state"], record["task_state"]) == ("active", ""), record
        entries = [e for e in history(beacon_minion, guest.uuid) if e["at"] >= since]
        assert [e for e in entries if e["action"] in ("start", "power_off")] == [], entries
        assert [e for e in entries if e["new"].get("vm_state")] == [], entries
