"""The event path under pressure, with real daemons: a hung libvirtd, events that
travel as they happen, a forged tag (the boot storm is in test_boot_storm.py).

Every minion here is started by the test that needs it (``minion_factory.started``), on the
real libvirtd (``qemu:///system``) or on a socket the test makes. Every wait is bounded; the
only bound that says something is the immediate path's, a wait much shorter than the beacon's
tick (what the immediate path is for), and it is no assertion about speed.
"""

import contextlib
import os
import socket
import threading
import time

import pytest

from .helpers import (
    DEFAULT_URI,
    beacon_config,
    beacon_events,
    beacon_status,
    fire_beacon_event,
    salt_call,
    salt_cmd,
    wait_for_event,
    wait_for_job_return,
    wait_for_lifecycle,
    wait_for_start_syncs,
    wait_until,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

#: The socket of the real libvirtd (the lab's monolithic daemon).
LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"
#: The beacon's tick for the immediate-path test: events must not wait for it.
SLOW_TICK = 30


def resync(listener, master, minion_id, since, reason, timeout=120):
    return wait_for_event(listener, f"salt/beacon/{minion_id}/vmpower/resync", since, timeout,
                          daemon_id=master.id, match=lambda data: data.get("reason") == reason)


class SilentLibvirtd:
    """A unix socket that accepts connections and never answers: libvirtd with every worker
    stuck on a hung QEMU monitor, as a client sees it."""

    def __init__(self, path):
        self.path = str(path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(16)
        self.accepted = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                client, _ = self.server.accept()
                self.accepted.append(client)  # kept open, never read, never answered

    def hand_over(self, target):
        """The real libvirtd takes over: the path now leads to it, and the hung connections
        end (as they do when a stuck libvirtd is restarted)."""
        self._stop.set()
        self._thread.join(5)
        self.server.close()
        os.unlink(self.path)
        os.symlink(target, self.path)
        for client in self.accepted:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
                client.close()


def test_a_hung_libvirtd_never_freezes_the_minion_and_the_loop_recovers(
        salt_master, minion_factory, libvirt_daemon, event_listener, tmp_path_factory):
    """The beacon's URI leads to a socket that accepts and never answers: the minion still
    answers ``test.ping`` and ``vmpower.status``, which says the loop is stuck in connect and
    since when. Then a real libvirtd takes over, and the loop connects and resyncs."""
    directory = tmp_path_factory.mktemp("hung")
    hung = SilentLibvirtd(directory / "libvirt-sock")
    uri = f"qemu+unix:///system?socket={hung.path}"
    minion_id = "vmpower-minion-h"
    since = time.time()
    with minion_factory.started(minion_id, uri=DEFAULT_URI, vmpower={"sync_interval": 3600},
                                beacons={"vmpower": beacon_config(uri=uri)}) as minion:
        wait_until(lambda: hung.accepted, 60, "the beacon to knock on the silent socket")
        health = wait_until(lambda: (h := beacon_status(minion)).get("stuck") and h, 60,
                            "the status to say the loop is stuck")
        assert health["blocked_in"] == "connect" and health["blocked_since"] >= since
        assert health["state"] == "connecting" and not health["connected"]
        # The minion's loop is free: it answers and runs jobs.
        for _ in range(3):
            assert salt_cmd(salt_master, minion_id, "test.ping", cli_timeout=30)[minion_id] is True
        status = salt_cmd(salt_master, minion_id, "vmpower.status", cli_timeout=30)[minion_id]
        watcher = status["event_loop"]["watchers"]["vmpower"]
        assert watcher["stuck"] and watcher["blocked_in"] == "connect", status
        assert status["event_loop"]["stuck"] is True

        handed_over = time.time()
        hung.hand_over(LIBVIRT_SOCKET)
        event = resync(event_listener, salt_master, minion_id, handed_over, "connected")
        assert event["lost"] == 0
        health = wait_until(lambda: (h := beacon_status(minion)).get("connected") and h, 60,
                            "the status to say connected")
        assert not health["stuck"] and health["blocked_in"] is None
        # And the reactor answers the resync with a sync on that minion.
        wait_for_job_return(event_listener, salt_master.id, minion_id, "vmpower.sync", handed_over)


def test_events_reach_the_master_as_they_happen_not_at_the_tick(
        salt_master, minion_factory, libvirt_daemon, event_listener, make_guest):
    """With ``loop_interval: 30`` the beacon runs every 30 s, yet a real guest's events are on
    the master's bus within a wait much shorter than that, each exactly once."""
    minion_id = "vmpower-minion-i"
    since = time.time()
    with minion_factory.started(minion_id, uri=DEFAULT_URI, vmpower={"sync_interval": 3600, "stop_grace": 1},
                                beacons={"vmpower": beacon_config(uri=DEFAULT_URI, stop_grace=1)},
                                overrides={"loop_interval": SLOW_TICK}) as minion:
        wait_for_start_syncs(event_listener, salt_master.id, minion_id, since, timeout=SLOW_TICK * 3)
        after = time.time()
        guest, dom = make_guest("stubborn")
        started = wait_for_lifecycle(event_listener, salt_master.id, minion_id, "started",
                                     guest.uuid, after, timeout=SLOW_TICK / 3)
        dom.suspend()
        paused = wait_for_lifecycle(event_listener, salt_master.id, minion_id, "paused",
                                    guest.uuid, after, timeout=SLOW_TICK / 3)
        dom.destroy()  # held for its 1 s grace, then fired by the watcher's own timer
        stopped = wait_for_lifecycle(event_listener, salt_master.id, minion_id, "stopped",
                                     guest.uuid, after, timeout=SLOW_TICK / 3)
        assert (started.data["reason"], paused.data["reason"], stopped.data["reason"]) == (
            "booted", "paused", "destroyed")
        assert stopped.data["id"] == minion_id and stopped.data["uri"] == DEFAULT_URI
        time.sleep(SLOW_TICK + 5)  # a whole tick: nothing may come a second time through it
        fired = beacon_events(event_listener, minion_id, after, guest.uuid, daemon_id=salt_master.id)
        seqs = [event.data["seq"] for event in fired]
        assert len(seqs) == len(set(seqs)), [event.tag for event in fired]
        for transition in ("started", "paused", "stopped"):
            assert len([e for e in fired if e.data["transition"] == transition]) == 1, transition
        health = beacon_status(minion)
        assert health["immediate"] and health["delivered_by_tick"] == 0, health
        assert health["delivered_immediately"] >= len(fired)


def test_with_the_immediate_path_off_events_come_through_the_tick(
        salt_master, minion_factory, libvirt_daemon, event_listener, make_guest):
    """``immediate: false``: the same events arrive, through ``beacon()``, each once."""
    minion_id = "vmpower-minion-t"
    since = time.time()
    with minion_factory.started(minion_id, uri=DEFAULT_URI, vmpower={"sync_interval": 3600, "stop_grace": 1},
                                beacons={"vmpower": beacon_config(uri=DEFAULT_URI, stop_grace=1,
                                                                  immediate=False)}) as minion:
        wait_for_start_syncs(event_listener, salt_master.id, minion_id, since)
        after = time.time()
        guest, dom = make_guest("stubborn")
        wait_for_lifecycle(event_listener, salt_master.id, minion_id, "started", guest.uuid, after)
        dom.suspend()
        wait_for_lifecycle(event_listener, salt_master.id, minion_id, "paused", guest.uuid, after)
        dom.destroy()
        wait_for_lifecycle(event_listener, salt_master.id, minion_id, "stopped", guest.uuid, after)
        time.sleep(3)  # a few more ticks: nothing comes twice
        fired = beacon_events(event_listener, minion_id, after, guest.uuid, daemon_id=salt_master.id)
        for transition in ("started", "paused", "stopped"):
            assert len([e for e in fired if e.data["transition"] == transition]) == 1, transition
        health = beacon_status(minion)
        assert not health["immediate"] and health["delivered_immediately"] == 0, health
        assert health["delivered_by_tick"] >= len(fired)


def test_a_forged_tag_with_commas_reaches_no_minion(salt_master, salt_minion, salt_minion_2,
                                                    libvirt_daemon, event_listener):
    """``salt/beacon/<a>,<b>/vmpower/resync`` (from any minion) names no valid minion id: the
    shipped reactor ignores it, where a string target would have synced both."""
    since = time.time()
    forged = f"salt/beacon/{salt_minion.id},{salt_minion_2.id}/vmpower/resync"
    fire_beacon_event(salt_minion, forged, {"reason": "connected", "lost": 0, "id": salt_minion.id})
    wait_for_event(event_listener, forged, since, daemon_id=salt_master.id)
    # A genuine one after it, as a marker: once its sync has returned, the forged one has been
    # through the reactor too.
    marker = time.time()
    fire_beacon_event(salt_minion_2, f"salt/beacon/{salt_minion_2.id}/vmpower/resync",
                      {"reason": "connected", "lost": 0, "id": salt_minion_2.id})
    wait_for_job_return(event_listener, salt_master.id, salt_minion_2.id, "vmpower.sync", marker)
    time.sleep(2)
    published = [event.data for event in wait_until(
        lambda: [e for e in _job_news(event_listener, since) if e.data.get("fun") == "vmpower.sync"],
        30, "the marker's job")]
    # Only minion 2's own syncs: the marker's, and any its beacon asked for on its own (the
    # connected resync of a minion started just before this test). None from the forged tag.
    assert published and all(data.get("minions") == [salt_minion_2.id] for data in published), published
    assert salt_call(salt_minion, "test.ping") is True


def _job_news(listener, since):
    from .helpers import events_since
    return events_since(listener, since, "salt/job/*/new")
