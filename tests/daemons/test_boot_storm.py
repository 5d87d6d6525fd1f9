"""A boot storm with real daemons: 32 real guests (32 MiB, TCG) started at once on
the real libvirtd, under a real salt-minion with the vmpower beacon and the shipped reactor on
a real salt-master. Every wait is bounded; nothing asserts how long a step took.
"""

import threading
import time

import pytest

from .helpers import (
    DEFAULT_URI,
    beacon_config,
    beacon_events,
    beacon_status,
    events_since,
    vm_record,
    wait_for_event,
    wait_for_start_syncs,
    wait_until,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real


def resync(listener, master, minion_id, since, reason, timeout=120):
    return wait_for_event(listener, f"salt/beacon/{minion_id}/vmpower/resync", since, timeout,
                          daemon_id=master.id, match=lambda data: data.get("reason") == reason)


def _job_news(listener, since):
    return events_since(listener, since, "salt/job/*/new")


BOOT_STORM = 32
#: Low, because 32 real QEMU guests starting at once on a small CI machine (2 cores) make a few
#: lifecycle events per second, not hundreds; a big host's storm is far denser.
STORM_LIMIT = 2


def test_a_boot_storm_becomes_burst_resyncs_and_every_record_is_right(
        salt_master, minion_factory, libvirt_daemon, event_listener, make_guest):
    """32 real guests (32 MiB, TCG) started at once: the storm is answered by ``burst``
    resyncs (a full sync each) instead of a reconcile per event, so the master runs far fewer
    jobs than libvirt made callbacks; after the syncs every guest's record says running."""
    minion_id = "vmpower-minion-s"
    since = time.time()
    # Observe mode: vmpower records the truth and never acts. A guest first seen by a sync
    # while still shut off (the storm's syncs run while libvirt is still starting the rest) is
    # adopted stopped, and acting on it once it runs would power it off, as Nova would; what
    # this test checks is that the storm's truth reaches every record.
    with minion_factory.started(minion_id, uri=DEFAULT_URI,
                                vmpower={"sync_interval": 3600, "mode": "observe"},
                                beacons={"vmpower": beacon_config(uri=DEFAULT_URI,
                                                                  burst_limit=STORM_LIMIT)}
                                ) as minion:
        # Both syncs of the minion's start are over: one still to come would count among the
        # storm's jobs.
        wait_for_start_syncs(event_listener, salt_master.id, minion_id, since)
        guests = [make_guest("stubborn", suffix=f"-{number}", start=False)
                  for number in range(BOOT_STORM)]
        storm = time.time()
        starters = [threading.Thread(target=dom.create) for _guest, dom in guests]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join(120)
        resync(event_listener, salt_master, minion_id, storm, "burst")
        for guest, _dom in guests:
            wait_until(lambda guest=guest: (r := vm_record(minion, guest.uuid)) and
                       r["power_state"] == "running", 120,
                       lambda guest=guest: f"the record of {guest.name} to be running: "
                                           f"{vm_record(minion, guest.uuid)}")
        # Each guest's start is a STARTED (and a RESUMED): every one was either fired or
        # counted into a burst's resync (a burst still under way is counted when it ends).
        def accounted():
            fired = beacon_events(event_listener, minion_id, storm, daemon_id=salt_master.id)
            coalesced = beacon_status(minion).get("coalesced", 0)
            return len(fired) + coalesced >= BOOT_STORM and fired
        wait_until(accounted, 60, lambda: f"every start to be fired or coalesced: "
                                          f"{beacon_status(minion)}")

        def every_event_has_its_job():  # the reactor runs one job per event it is fired
            jobs = [event for event in _job_news(event_listener, storm)
                    if event.data.get("minions") == [minion_id]]
            return len(jobs) >= len(beacon_events(event_listener, minion_id, storm, kind="*",
                                                  daemon_id=salt_master.id))
        wait_until(every_event_has_its_job, 60, "the reactor's job for every event fired")
        # Jobs first, then the events: an event always reaches the master before the job it
        # causes, so every job counted here has its event counted below, even one fired late.
        jobs = [event for event in _job_news(event_listener, storm)
                if event.data.get("minions") == [minion_id]]
        fired = beacon_events(event_listener, minion_id, storm, kind="*", daemon_id=salt_master.id)
        resyncs = [event for event in fired if event.tag.endswith("/vmpower/resync")]
        assert {event.data["reason"] for event in resyncs} == {"burst"}
        assert len(jobs) <= len(fired), [event.data.get("fun") for event in jobs]  # one per event
        assert len(jobs) < 2 * BOOT_STORM, [event.data.get("fun") for event in jobs]
