"""The vmpower beacon in a real salt-minion, on the real libvirtd with real QEMU guests: every
power change arrives on the master's bus as the spec says.

The minion is ``beacon_minion`` (``vmpower-minion-b``: beacon in its minion config,
``qemu:///system``, ``stop_grace`` = ``STOP_GRACE``). Events are read from the master's bus
through salt-factories' event listener. Every wait is bounded; no assertion is about how long
something took.
"""

import os
import signal
import time

import pytest

from vmpower_lab import lab

from .conftest import BEACON_MINION, STOP_GRACE
from .helpers import (
    DEFAULT_URI,
    beacon_events,
    beacon_status,
    wait_for_event,
    wait_for_lifecycle,
    wait_until,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

#: The data of a lifecycle event, as the spec lists it (Salt adds the minion's ``id``).
SPEC_FIELDS = {"uuid", "name", "transition", "reason", "libvirt", "timestamp", "seq", "uri"}


def lifecycle(listener, master, transition, guest, since, timeout=60):
    return wait_for_lifecycle(listener, master.id, BEACON_MINION, transition, guest.uuid, since,
                              timeout)


def test_guest_shutting_itself_down_arrives_as_stopped_guest_shutdown(
        salt_master, beacon_minion, event_listener, make_guest):
    """A guest that powers itself off, unasked, is ``lifecycle/stopped`` with reason
    ``guest_shutdown`` and every field of the spec, fired once its ``stop_grace`` is over."""
    since = time.time()
    guest, dom = make_guest("selfstop")
    started = lifecycle(event_listener, salt_master, "started", guest, since)
    assert lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN

    stopped = lifecycle(event_listener, salt_master, "stopped", guest, since)
    data = stopped.data
    assert set(data) == SPEC_FIELDS | {"id"}, data
    assert data["id"] == BEACON_MINION
    assert (data["uuid"], data["name"], data["uri"]) == (guest.uuid, guest.name, DEFAULT_URI)
    assert (data["transition"], data["reason"]) == ("stopped", "guest_shutdown")
    assert data["libvirt"] == {"event": "STOPPED", "detail": "SHUTDOWN"}
    assert isinstance(data["timestamp"], float) and data["timestamp"] >= since
    assert isinstance(data["seq"], int) and data["seq"] > started.data["seq"]
    # Held back for stop_grace after libvirt called back, then fired.
    assert stopped.stamp.timestamp() >= data["timestamp"] + STOP_GRACE
    assert started.data["reason"] == "booted"
    assert beacon_events(event_listener, BEACON_MINION, since, guest.uuid, "lifecycle/stopped",
                         salt_master.id) == [stopped]


def test_killed_qemu_arrives_as_stopped_failed(salt_master, beacon_minion, event_listener,
                                               make_guest):
    """``kill -9`` of the guest's QEMU process is ``lifecycle/stopped`` with reason ``failed``
    (libvirt's STOPPED/FAILED; ``crashed`` would do as well)."""
    guest, dom = make_guest("stubborn")
    lab.wait_guest_ready(dom)
    since = time.time()
    os.kill(lab.qemu_pid(guest.name), signal.SIGKILL)
    assert lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED

    data = lifecycle(event_listener, salt_master, "stopped", guest, since).data
    assert data["reason"] in ("failed", "crashed"), data
    assert data["libvirt"]["event"] == "STOPPED" and data["libvirt"]["detail"] in ("FAILED", "CRASHED")
    assert (data["uuid"], data["name"]) == (guest.uuid, guest.name)


def test_suspend_and_resume_arrive_as_paused_and_resumed(salt_master, beacon_minion,
                                                         event_listener, make_guest):
    """``virsh suspend`` / ``virsh resume`` are ``lifecycle/paused`` / ``lifecycle/resumed``."""
    created = time.time()
    guest, dom = make_guest("stubborn")
    lifecycle(event_listener, salt_master, "started", guest, created)  # and the RESUMED before it
    lab.wait_guest_ready(dom)
    since = time.time()
    dom.suspend()
    paused = lifecycle(event_listener, salt_master, "paused", guest, since)
    dom.resume()
    resumed = lifecycle(event_listener, salt_master, "resumed", guest, since)

    assert (paused.data["transition"], paused.data["reason"]) == ("paused", "paused")
    assert paused.data["libvirt"] == {"event": "SUSPENDED", "detail": "PAUSED"}
    assert (resumed.data["transition"], resumed.data["reason"]) == ("resumed", "unpaused")
    assert resumed.data["libvirt"] == {"event": "RESUMED", "detail": "UNPAUSED"}
    assert resumed.data["seq"] > paused.data["seq"]
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_libvirtd_killed_and_restarted_fires_reconnected_and_events_go_on(
        salt_master, beacon_minion, event_listener, libvirtd_may_die, make_guest):
    """libvirtd dies (SIGKILL) and comes back: the beacon notices, reconnects, fires
    ``resync`` with reason ``reconnected``, and lifecycle events keep arriving."""
    wait_until(lambda: beacon_status(beacon_minion).get("connected"), 30,
               "the beacon to be connected")
    reconnects = beacon_status(beacon_minion)["reconnects"]
    since = time.time()
    libvirtd_may_die.kill()
    wait_until(lambda: beacon_status(beacon_minion).get("connected") is False, 30,
               "the beacon to notice that libvirtd is gone")
    libvirtd_may_die.start()

    resync = wait_for_event(event_listener, f"salt/beacon/{BEACON_MINION}/vmpower/resync",
                            since, timeout=120, daemon_id=salt_master.id,
                            match=lambda data: data.get("reason") == "reconnected")
    assert resync == {"reason": "reconnected", "lost": 0, "id": BEACON_MINION}
    health = wait_until(lambda: (s := beacon_status(beacon_minion)).get("connected") and s, 30,
                        "the beacon's status to say connected")
    assert health["reconnects"] == reconnects + 1, health
    assert health["last_resync"]["reason"] == "reconnected"

    after = time.time()
    guest, _ = make_guest("stubborn")
    started = lifecycle(event_listener, salt_master, "started", guest, after)
    assert (started.data["reason"], started.data["uri"]) == ("booted", DEFAULT_URI)
