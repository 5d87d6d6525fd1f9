"""The beacon and its event loop on libvirt's test driver, in this process, partly through Salt.

The test driver delivers its events through libvirt's default event loop like a real libvirtd,
so the native thread, the watchers' threads, the callbacks, the queue and the translation here
are the real ones. ``Watcher.settle()`` waits (bounded) until a watcher's thread has handled
what was queued; the tests then look at what ``drain()`` returns, the tick path (these
watchers have no minion bus, so no immediate path).
Events the test driver cannot produce (crashes, PM suspend, guest or host shutdown, failures,
reboots) are fed to the registered callback functions with libvirt's own numbers, as libvirt
would call them. Every wait is a bounded polling loop; no assertion depends on timing.
"""

import dataclasses
import itertools
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import libvirt
import pytest
import salt.beacons

from vmpower import eventloop
from vmpower.core.settings import BeaconSettings
from vmpower.core.wakeup import ANSWER_WAIT
from vmpower.wakeup import WakeUps, wakeup_path

from .conftest import TEST_URI

WAIT = 30.0  # seconds; test-driver events arrive in well under a millisecond, but a loaded
# machine (other suites on the same cores) has stalled libvirt's loop for seconds
NO_DAEMON_URI = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
_names = itertools.count()


def wait_until(condition, what):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.002)
    pytest.fail(f"timed out after {WAIT}s waiting for {what}")


def summary(event):
    return event["transition"], event["reason"], event["libvirt"]["event"], event["libvirt"]["detail"]


class FakeClock:
    """Both of a watcher's clocks, moved by hand."""

    def __init__(self):
        self.now = 1_800_000_000.0
        self.mono = 0.0

    def time(self):
        return self.now

    def monotonic(self):
        return self.mono

    def advance(self, seconds):
        self.now += seconds
        self.mono += seconds


class Collector:
    """Drains one watcher and keeps everything it fired."""

    def __init__(self, watcher):
        self.watcher = watcher
        self.fired = []

    def drain(self):
        assert self.watcher.settle(WAIT), "the watcher's thread did not settle"
        new = self.watcher.drain()
        self.fired.extend(new)
        return new

    def of(self, dom):
        return [event for event in self.fired if event.get("uuid") == dom.UUIDString()]

    def resyncs(self):
        return [(event["reason"], event["lost"]) for event in self.fired if event["tag"] == "resync"]

    def wait_for(self, dom, count):
        """Drain until ``dom`` has fired ``count`` events in all; return them."""
        wait_until(lambda: self.drain() is not None and len(self.of(dom)) >= count,
                   f"{count} event(s) of {dom.name()}")
        return self.of(dom)

    def wait_held(self, count):
        wait_until(lambda: self.drain() is not None and self.watcher.health()["held"] == count,
                   f"{count} held STOPPED event(s)")


@pytest.fixture
def watch():
    """``watch(clock=None, **settings)`` -> a Collector over a new Watcher of the test driver,
    already connected; every watcher is closed after the test."""
    made = []

    def make(clock=None, **settings):
        clocks = {} if clock is None else {"clock": clock.time, "monotonic": clock.monotonic}
        collector = Collector(eventloop.Watcher(BeaconSettings(uri=TEST_URI, **settings), **clocks))
        made.append(collector.watcher)
        wait_until(lambda: collector.drain() is not None and collector.resyncs(), "connected")
        return collector

    yield make
    for watcher in made:
        watcher.retire()


class SaltBeacons:
    """Salt's own ``Beacon`` over the vmpower beacon, configured as ``beacons:<name>``."""

    def __init__(self, minion, config):
        self.opts = minion.opts
        self.functions = minion.functions
        self.name = f"vmpower_test{next(_names)}"
        self.opts["beacons"] = {self.name: [{"beacon_module": "vmpower"}, *config]}
        # The beacon's tick, as the watcher's idle check sees it: long, so that a stalled test
        # machine never has the watcher closed between two process() calls.
        self.opts["loop_interval"] = 30
        self.prefix = f"salt/beacon/{self.opts['id']}/{self.name}/"
        self.rebuild()

    def rebuild(self):
        """A new loader, as on a beacons refresh: Salt executes the beacon's file again."""
        self.beacons = salt.beacons.Beacon(self.opts, self.functions)

    @property
    def module(self):
        return self.beacons.beacons

    def settle(self):
        watcher = eventloop.event_loop()._watchers.get(self.name)
        if watcher is not None:
            assert watcher.settle(WAIT), "the watcher's thread did not settle"

    def process(self):
        """One beacon run (once the watcher's thread has handled what was queued); returns
        ``(tag tail, data)`` pairs."""
        self.settle()
        fired = self.beacons.process(self.opts["beacons"], grains={})
        assert all(item["tag"].startswith(self.prefix) for item in fired)
        return [(item["tag"][len(self.prefix):], item["data"]) for item in fired]

    def process_until(self, predicate, what):
        fired = []
        wait_until(lambda: fired.extend(self.process()) or predicate(fired), what)
        return fired

    @property
    def status_path(self):
        return os.path.join(self.opts["cachedir"], "vmpower", "eventloop.json")


@pytest.fixture
def salt_beacons(load_minion):
    """``salt_beacons(*config)`` -> SaltBeacons for a beacon of a unique name; closed afterwards."""
    made = []

    def make(*config):
        made.append(SaltBeacons(load_minion(TEST_URI), config))
        return made[-1]

    yield make
    for beacons in made:
        beacons.beacons.close_beacons()


def event_threads():
    return [thread for thread in threading.enumerate() if thread.name == eventloop.THREAD_NAME]


# What the test driver really does.
def test_a_new_watcher_resyncs_connected_once(watch):
    collector = watch()
    assert collector.resyncs() == [("connected", 0)]
    collector.drain()
    assert collector.resyncs() == [("connected", 0)]
    assert collector.watcher.connected


REAL = [
    ("start", lambda dom, path: dom.create(), ("started", "booted", "STARTED", "BOOTED")),
    ("suspend", lambda dom, path: dom.suspend(), ("paused", "paused", "SUSPENDED", "PAUSED")),
    ("resume", lambda dom, path: dom.resume(), ("resumed", "unpaused", "RESUMED", "UNPAUSED")),
    ("shutdown", lambda dom, path: dom.shutdown(), ("stopped", "guest_shutdown", "STOPPED", "SHUTDOWN")),
    ("start", lambda dom, path: dom.create(), ("started", "booted", "STARTED", "BOOTED")),
    ("destroy", lambda dom, path: dom.destroy(), ("stopped", "destroyed", "STOPPED", "DESTROYED")),
    ("start", lambda dom, path: dom.create(), ("started", "booted", "STARTED", "BOOTED")),
    ("save", lambda dom, path: dom.save(path), ("stopped", "saved", "STOPPED", "SAVED")),
    ("restore", lambda dom, path: dom.connect().restore(path),
     ("started", "restored", "STARTED", "RESTORED")),
    ("managed save", lambda dom, path: dom.managedSave(0), ("stopped", "saved", "STOPPED", "SAVED")),
]


def test_every_transition_the_test_driver_produces(watch, testdriver, tmp_path):
    collector = watch(stop_grace=0)
    dom = testdriver.define("real", start=False)
    save_file = str(tmp_path / "real.save")
    for count, (action, act, expected) in enumerate(REAL, start=1):
        before = time.time()
        act(dom, save_file)
        event = collector.wait_for(dom, count)[-1]
        assert summary(event) == expected, action
        assert event["tag"] == f"lifecycle/{expected[0]}"
        assert (event["uuid"], event["name"], event["uri"]) == (dom.UUIDString(), dom.name(), TEST_URI)
        assert before <= event["timestamp"] <= time.time()
    fired = collector.of(dom)
    assert len(fired) == len(REAL)  # DEFINED and the like fire nothing
    seqs = [event["seq"] for event in fired]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_transient_domain_is_seen_from_creation(watch, testdriver):
    collector = watch(stop_grace=0)
    dom = testdriver.conn.createXML(
        f"<domain type='test'><name>{testdriver.prefix}transient</name><memory>8192</memory>"
        f"<os><type>hvm</type></os></domain>")
    testdriver.domains.append(dom)
    assert summary(collector.wait_for(dom, 1)[-1]) == ("started", "booted", "STARTED", "BOOTED")


# What only a real hypervisor does, fed to the registered callbacks with libvirt's numbers.
L = libvirt
INJECTED = [
    ("guest panic", [(L.VIR_DOMAIN_EVENT_CRASHED, L.VIR_DOMAIN_EVENT_CRASHED_PANICKED)],
     ("crashed", "panicked", "CRASHED", "PANICKED")),
    ("QEMU killed", [(L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_FAILED)],
     ("stopped", "failed", "STOPPED", "FAILED")),
    ("QEMU crashed", [(L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_CRASHED)],
     ("stopped", "crashed", "STOPPED", "CRASHED")),
    ("guest shuts down", [(L.VIR_DOMAIN_EVENT_SHUTDOWN, L.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST),
                          (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)],
     ("stopped", "guest_shutdown", "STOPPED", "SHUTDOWN")),
    ("host asks for shutdown", [(L.VIR_DOMAIN_EVENT_SHUTDOWN, L.VIR_DOMAIN_EVENT_SHUTDOWN_HOST),
                                (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)],
     ("stopped", "host_shutdown", "STOPPED", "SHUTDOWN")),
    ("suspend to RAM", [(L.VIR_DOMAIN_EVENT_PMSUSPENDED, L.VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY)],
     ("suspended", "memory", "PMSUSPENDED", "MEMORY")),
    ("suspend to disk", [(L.VIR_DOMAIN_EVENT_PMSUSPENDED, L.VIR_DOMAIN_EVENT_PMSUSPENDED_DISK)],
     ("suspended", "disk", "PMSUSPENDED", "DISK")),
    ("I/O error", [(L.VIR_DOMAIN_EVENT_SUSPENDED, L.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR)],
     ("paused", "ioerror", "SUSPENDED", "IOERROR")),
    ("migrated in", [(L.VIR_DOMAIN_EVENT_STARTED, L.VIR_DOMAIN_EVENT_STARTED_MIGRATED)],
     ("started", "migrated", "STARTED", "MIGRATED")),
    ("migrated out", [(L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_MIGRATED)],
     ("stopped", "migrated", "STOPPED", "MIGRATED")),
    ("woken up", [(L.VIR_DOMAIN_EVENT_STARTED, L.VIR_DOMAIN_EVENT_STARTED_WAKEUP)],
     ("started", "wakeup", "STARTED", "WAKEUP")),
]


@pytest.mark.parametrize("case,callbacks,expected", INJECTED, ids=[case[0] for case in INJECTED])
def test_transitions_only_a_real_hypervisor_produces(watch, testdriver, case, callbacks, expected):
    collector = watch(stop_grace=0)
    dom = testdriver.define("injected", start=False)
    for event, detail in callbacks:
        collector.watcher.lifecycle_callback(None, dom, event, detail, None)
    collector.drain()
    assert [summary(event) for event in collector.of(dom)] == [expected]


class _UnreadableDomain:
    """A domain handle libvirt can no longer read (libvirt raises)."""

    def UUID(self):
        raise L.libvirtError("virDomainGetUUID: invalid domain pointer")


def test_an_event_that_cannot_be_read_costs_itself_and_a_resync_not_its_round(watch, testdriver):
    collector = watch(stop_grace=0)
    before, after = (testdriver.define(name, start=False) for name in ("before", "after"))
    for dom in (before, _UnreadableDomain(), after):  # one round: queued before the watcher reads
        collector.watcher.lifecycle_callback(None, dom, L.VIR_DOMAIN_EVENT_STARTED,
                                             L.VIR_DOMAIN_EVENT_STARTED_BOOTED, None)
    wait_until(lambda: collector.drain() is not None and ("overflow", 1) in collector.resyncs(),
               "the resync for the unreadable event")
    assert [summary(e) for e in collector.of(before) + collector.of(after)] == [
        ("started", "booted", "STARTED", "BOOTED")] * 2
    health = collector.watcher.health()
    assert health["dropped"] == 1 and health["failures"] == {"translate": 1}
    assert "could not be read" in collector.watcher.failures.last


def test_a_reboot_is_started_rebooted(watch, testdriver):
    collector = watch(stop_grace=0)
    dom = testdriver.define("rebooted", start=False)
    collector.watcher.reboot_callback(None, dom, None)
    collector.drain()
    assert [summary(event) for event in collector.of(dom)] == [("started", "rebooted", "REBOOT", "")]


def test_events_that_change_no_power_state_fire_nothing(watch, testdriver):
    collector = watch(stop_grace=0)
    dom = testdriver.define("quiet", start=False)
    for event, detail in [(L.VIR_DOMAIN_EVENT_DEFINED, L.VIR_DOMAIN_EVENT_DEFINED_UPDATED),
                          (L.VIR_DOMAIN_EVENT_SHUTDOWN, L.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED),
                          (L.VIR_DOMAIN_EVENT_UNDEFINED, L.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED)]:
        collector.watcher.lifecycle_callback(None, dom, event, detail, None)
    collector.drain()
    assert collector.of(dom) == []


# STOPPED's grace.
def test_stopped_waits_for_its_grace(watch, testdriver):
    clock = FakeClock()
    collector = watch(clock, stop_grace=30)
    dom = testdriver.define("grace")
    collector.wait_for(dom, 1)
    dom.destroy()
    collector.wait_held(1)
    clock.advance(29.9)
    collector.drain()
    assert [event["transition"] for event in collector.of(dom)] == ["started"]
    clock.advance(0.1)
    collector.drain()
    stopped = collector.of(dom)[-1]
    assert summary(stopped) == ("stopped", "destroyed", "STOPPED", "DESTROYED")
    assert stopped["timestamp"] == clock.now - 30  # when libvirt called back, not when released


def test_a_hard_reboot_fires_only_started(watch, testdriver):
    clock = FakeClock()
    collector = watch(clock, stop_grace=30)
    dom = testdriver.define("hard-reboot")
    collector.wait_for(dom, 1)
    dom.destroy()
    dom.create()
    collector.wait_for(dom, 2)
    clock.advance(3600)
    collector.drain()
    assert [event["transition"] for event in collector.of(dom)] == ["started", "started"]
    assert collector.watcher.health()["held"] == 0


def test_a_stopped_whose_grace_ended_before_the_next_event_is_fired_first(watch, testdriver):
    clock = FakeClock()
    collector = watch(clock, stop_grace=30)
    dom = testdriver.define("slow-restart")
    collector.wait_for(dom, 1)
    dom.destroy()
    collector.wait_held(1)
    clock.advance(31)  # the start comes after the grace, before the next drain
    dom.create()
    fired = collector.wait_for(dom, 3)
    assert [event["transition"] for event in fired] == ["started", "stopped", "started"]
    assert fired[1]["seq"] < fired[2]["seq"]


# The bounded queue.
def test_overflow_keeps_the_newest_and_resyncs_with_what_was_lost(watch, testdriver):
    collector = watch(stop_grace=0, queue_size=10)
    dom = testdriver.define("flood")
    collector.wait_for(dom, 1)
    seen = collector.watcher.health()["events_seen"]
    for number in range(1, 26):  # 25 events: paused, resumed, paused, ...
        dom.suspend() if number % 2 else dom.resume()
    wait_until(lambda: collector.watcher.health()["events_seen"] == seen + 25, "25 callbacks")
    fired = collector.drain()
    assert fired[0] == {"tag": "resync", "reason": "overflow", "lost": 15}
    newest = ["paused" if number % 2 else "resumed" for number in range(16, 26)]
    assert [event["transition"] for event in fired[1:]] == newest
    assert collector.watcher.health()["dropped"] == 15
    collector.drain()
    assert collector.resyncs().count(("overflow", 15)) == 1  # reported once


def test_a_smaller_queue_size_drops_like_an_overflow(testdriver):
    # Never connected, so only the events fed to it are queued.
    watcher = eventloop.Watcher(BeaconSettings(uri=NO_DAEMON_URI, stop_grace=0, queue_size=10))
    try:
        dom = testdriver.define("shrink", start=False)
        for _ in range(5):
            watcher.lifecycle_callback(None, dom, L.VIR_DOMAIN_EVENT_STARTED,
                                       L.VIR_DOMAIN_EVENT_STARTED_BOOTED, None)
        assert watcher.settle()
        watcher.configure(dataclasses.replace(watcher.settings, queue_size=2))
        assert watcher.settle()
        fired = watcher.drain()
        assert fired[0] == {"tag": "resync", "reason": "overflow", "lost": 3}
        assert [event["transition"] for event in fired[1:]] == ["started", "started"]
    finally:
        watcher.retire()


# The connection.
def test_a_lost_connection_reconnects_resyncs_and_keeps_delivering(watch, testdriver, caplog):
    collector = watch(stop_grace=0)
    dom = testdriver.define("survivor")
    collector.wait_for(dom, 1)
    # libvirt calls this with its own connection object when libvirtd goes away.
    collector.watcher.close_callback(collector.watcher._conn, L.VIR_CONNECT_CLOSE_REASON_EOF, None)
    assert not collector.watcher.connected
    with caplog.at_level(logging.WARNING, logger="vmpower.eventloop"):
        collector.drain()
    assert "libvirtd closed the connection" in caplog.text
    assert collector.resyncs() == [("connected", 0), ("reconnected", 0)]
    health = collector.watcher.health()
    assert health["connected"] and health["reconnects"] == 1
    dom.suspend()
    collector.wait_for(dom, 2)
    dom.resume()
    collector.wait_for(dom, 3)
    # Registered once again, not twice: one event per change.
    assert [event["transition"] for event in collector.of(dom)] == ["started", "paused", "resumed"]


def test_a_close_callback_about_an_old_connection_is_ignored(watch):
    collector = watch()
    collector.watcher.close_callback(object(), L.VIR_CONNECT_CLOSE_REASON_EOF, None)
    assert collector.watcher.connected


def test_no_daemon_means_capped_backoff_and_one_warning(caplog):
    clock = FakeClock()
    watcher = eventloop.Watcher(BeaconSettings(uri=NO_DAEMON_URI), clock=clock.time,
                                monotonic=clock.monotonic)
    with caplog.at_level(logging.DEBUG, logger="vmpower.eventloop"):
        for _ in range(200):
            assert watcher.settle()
            assert watcher.drain() == []
            clock.advance(1)
    watcher.retire()
    # Attempts at 0, 1, 3, 7, 15, 31, 63 s, then every 60 s: 123, 183.
    assert watcher.health()["failed_attempts"] == 9
    assert not watcher.connected and "cannot connect" in watcher.health()["last_error"]
    attempts = [r for r in caplog.records if "cannot connect to libvirt" in r.getMessage()]
    assert [r.levelno for r in attempts] == [logging.WARNING] + [logging.DEBUG] * 8


def test_libvirtd_coming_up_later_resyncs_connected(tmp_path, caplog):
    clock = FakeClock()
    node = tmp_path / "node.xml"
    watcher = eventloop.Watcher(BeaconSettings(uri=f"test://{node}"), clock=clock.time,
                                monotonic=clock.monotonic)
    try:
        assert watcher.settle()
        assert watcher.drain() == []
        node.write_text("<node><domain type='test'><name>late</name><memory>8192</memory>"
                        "<os><type>hvm</type></os></domain></node>")
        clock.advance(1)
        with caplog.at_level(logging.INFO, logger="vmpower.eventloop"):
            assert watcher.settle()
            assert watcher.drain() == [{"tag": "resync", "reason": "connected", "lost": 0}]
        assert "after 1 failed attempt" in caplog.text
    finally:
        watcher.retire()


# Salt's side: the beacon loaded by Salt's loader, closed and rebuilt by Salt's Beacon class.
def test_salt_fires_lifecycle_events_under_the_beacons_tag(salt_beacons, testdriver):
    beacons = salt_beacons({"uri": TEST_URI}, {"stop_grace": 0})
    assert beacons.process_until(lambda fired: fired, "the first connection") == [
        ("resync", {"reason": "connected", "lost": 0, "id": "loader-minion"})]
    dom = testdriver.define("tagged")
    fired = beacons.process_until(
        lambda fired: any(data.get("uuid") == dom.UUIDString() for _, data in fired), "the start")
    tag, data = next((tag, data) for tag, data in fired if data.get("uuid") == dom.UUIDString())
    assert tag == "lifecycle/started"
    assert set(data) == {"uuid", "name", "transition", "reason", "libvirt", "timestamp", "seq",
                         "uri", "id"}


def test_fifty_close_and_rebuild_cycles_leave_one_thread(salt_beacons, testdriver):
    beacons = salt_beacons({"uri": TEST_URI}, {"stop_grace": 0})
    beacons.process_until(lambda fired: fired, "the first connection")
    threads = threading.active_count()
    for _ in range(50):
        beacons.beacons.close_beacons()
        beacons.rebuild()
        beacons.process()  # runs again: the watcher's thread reconnects
        assert ("resync", {"reason": "restarted", "lost": 0, "id": "loader-minion"}) in beacons.process()
    assert threading.active_count() == threads
    assert len(event_threads()) == 1
    dom = testdriver.define("after-rebuilds")
    beacons.process_until(lambda fired: ("lifecycle/started", dom.UUIDString()) in
                          [(tag, data.get("uuid")) for tag, data in fired], "the start")


def test_fifty_reimports_without_close_reuse_the_loop(salt_beacons, testdriver):
    # A beacon configured in pillar is re-imported on every refresh and never closed.
    beacons = salt_beacons({"uri": TEST_URI}, {"stop_grace": 0})
    beacons.process_until(lambda fired: fired, "the first connection")
    threads = threading.active_count()
    dom = testdriver.define("pillar", start=False)
    functions = []  # kept, so that no id() is reused
    fired = []
    for cycle in range(50):
        beacons.rebuild()
        functions.append(beacons.module["vmpower.beacon"].func)
        if cycle == 25:
            dom.create()
        fired.extend(beacons.process())
    assert len({id(function) for function in functions}) == 50  # the file ran again each time
    assert threading.active_count() == threads
    assert len(event_threads()) == 1
    assert not [data for tag, data in fired if tag == "resync"]  # no gap, so no resync
    beacons.process_until(lambda more: fired.extend(more) or ("lifecycle/started", dom.UUIDString()) in
                          [(tag, data.get("uuid")) for tag, data in fired], "the start")


def test_validate_through_salts_loader(salt_beacons):
    validate = salt_beacons().module["vmpower.validate"]
    assert validate([{"uri": TEST_URI}, {"interval": 1}]) == (True, "Valid beacon configuration")
    valid, message = validate([{"stop_grace": "soon"}])
    assert not valid and "stop_grace" in message


def test_the_beacon_never_raises(salt_beacons, caplog):
    beacons = salt_beacons({"uri": NO_DAEMON_URI})
    with caplog.at_level(logging.DEBUG):
        for _ in range(5):
            assert beacons.process() == []
        wait_until(lambda: eventloop.event_loop()._watchers[beacons.name].failures.counts(),
                   "a failed attempt")
    warnings = [r for r in caplog.records
                if r.levelno >= logging.WARNING and "cannot connect to libvirt" in r.getMessage()]
    assert len(warnings) == 1
    beacon = beacons.module["vmpower.beacon"]
    with caplog.at_level(logging.ERROR):
        assert beacon("not a list") == []
    assert "vmpower beacon" in caplog.text


def test_a_new_uri_for_the_same_beacon_means_a_new_connection(tmp_path):
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    loop, path = eventloop.event_loop(), str(tmp_path / "eventloop.json")
    first = BeaconSettings(name="vmpower_moving", uri=TEST_URI)
    old = loop.watcher(first)
    assert old.settle()
    assert loop.drain(first, path)[0]["reason"] == "connected"
    moved = dataclasses.replace(first, uri=f"test://{node}")
    new = loop.watcher(moved)
    assert new is not old and new.settle()
    assert loop.drain(moved, path) == [{"tag": "resync", "reason": "connected", "lost": 0}]
    old.thread.join(10)
    assert not old.connected and old.state == "retired" and not old.thread.is_alive()
    wait_until(lambda: eventloop.read_status(path).get("watchers", {}).get(
        "vmpower_moving", {}).get("uri") == moved.uri, "the status file")
    loop.close("vmpower_moving", path)


FILE_ROOTS_MINION = """
import salt.config, salt.loader
try:
    import vmpower
    raise SystemExit("vmpower should only be importable from extension_modules/utils")
except ImportError:
    pass
opts = salt.config.minion_config(None)
opts.update(id="file-roots", file_client="local", cachedir={cachedir!r}, extension_modules={extmods!r})
beacons = salt.loader.beacons(opts, {{}})
import time
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    fired = beacons["vmpower.beacon"]([{{"uri": "test:///default"}}])
    if fired:
        break
    time.sleep(0.05)
print(fired)
"""


def test_a_file_roots_install_finds_the_library_in_extension_modules(tmp_path):
    # As saltutil.sync_all lays it out: the beacon in <extmods>/beacons, the library in
    # <extmods>/utils, which Salt puts on sys.path for execution modules but not for beacons.
    # A separate interpreter without site's .pth files, so this checkout is not importable.
    extmods = tmp_path / "extmods"
    shutil.copytree(os.path.dirname(os.path.dirname(eventloop.__file__)), extmods / "utils" / "vmpower")
    (extmods / "beacons").mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "..", "_beacons", "vmpower.py"),
                extmods / "beacons")
    script = FILE_ROOTS_MINION.format(cachedir=str(tmp_path / "cache"), extmods=str(extmods))
    site_packages = os.path.dirname(os.path.dirname(salt.__file__))
    done = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": site_packages}, cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "{'tag': 'resync', 'reason': 'connected', 'lost': 0}" in done.stdout


# Health, for vmpower.status.
def test_the_status_file_is_rewritten_only_when_something_changed(salt_beacons, testdriver,
                                                                   monkeypatch):
    writes = []
    write_json = eventloop.write_json
    monkeypatch.setattr(eventloop, "write_json", lambda *args: writes.append(1) or write_json(*args))
    beacons = salt_beacons({"uri": TEST_URI}, {"stop_grace": 0})
    beacons.process_until(lambda fired: fired, "the first connection")
    wait_until(lambda: writes and eventloop.read_status(beacons.status_path).get(
        "watchers", {}).get(beacons.name, {}).get("connected"), "the status file")
    status = eventloop.read_status(beacons.status_path)
    health = status["watchers"][beacons.name]
    assert status["thread_alive"] and status["pid"] == os.getpid()
    assert health["connected"] and health["uri"] == TEST_URI
    assert health["last_resync"]["reason"] == "connected"
    assert {"queue_depth", "events_seen", "dropped", "reconnects"} <= set(health)
    loop = eventloop.event_loop()
    loop.write_status(beacons.status_path)
    written = len(writes)
    loop.write_status(beacons.status_path)
    assert len(writes) == written  # nothing changed, nothing written
    testdriver.define("counted")
    beacons.process_until(lambda fired: fired, "the start")
    wait_until(lambda: eventloop.read_status(beacons.status_path)["watchers"][beacons.name][
        "events_seen"] >= 1, "the status file to count the event")
    assert len(writes) > written


def test_vmpower_status_reports_the_event_loop(salt_beacons, load_minion):
    beacons = salt_beacons({"uri": TEST_URI})
    beacons.process_until(lambda fired: fired, "the first connection")
    wait_until(lambda: eventloop.read_status(beacons.status_path).get("watchers"), "the status file")
    status = load_minion(TEST_URI).functions["vmpower.status"]()
    assert status["event_loop"] == eventloop.read_status(beacons.status_path)
    assert status["event_loop"]["watchers"][beacons.name]["connected"] is True


def test_vmpower_status_without_a_beacon_says_so(load_minion):
    status = load_minion(TEST_URI).functions["vmpower.status"]()
    assert "the vmpower beacon has not run" in status["event_loop"]["error"]


def test_the_event_thread_is_started_once():
    assert eventloop.ensure_running() is eventloop.ensure_running()
    assert len(event_threads()) == 1


# Storms: more than burst_limit events in a second become one resync.
def test_a_storm_becomes_one_burst_resync_counting_what_it_swallowed(watch, testdriver):
    collector = watch(stop_grace=0, burst_limit=10)
    doms = [testdriver.define(f"storm{number}", start=False) for number in range(40)]
    for dom in doms:  # 40 STARTED at once, as libvirt calls back (the machine's load aside)
        collector.watcher.lifecycle_callback(None, dom, L.VIR_DOMAIN_EVENT_STARTED,
                                             L.VIR_DOMAIN_EVENT_STARTED_BOOTED, None)
    wait_until(lambda: collector.drain() is not None and ("burst", 30) in collector.resyncs(),
               "the burst's resync")
    started = [event for event in collector.fired if event.get("transition") == "started"]
    assert len(started) == 10  # the first ten, one by one; the rest are the resync's
    assert collector.resyncs() == [("connected", 0), ("burst", 30)]
    assert collector.watcher.health()["coalesced"] == 30
    doms[0].create()  # after the storm, events are fired one by one again
    doms[0].suspend()
    assert collector.wait_for(doms[0], 3)[-1]["transition"] == "paused"


def test_a_storm_takes_the_held_stops_with_it(watch, testdriver):
    collector = watch(stop_grace=30, burst_limit=5)
    doms = [testdriver.define(f"calm{number}") for number in range(3)]
    for dom in doms:
        collector.wait_for(dom, 1)
    doms[0].destroy()
    collector.wait_held(1)
    for number in range(10):
        dom = testdriver.define(f"burst{number}", start=False)
        collector.watcher.lifecycle_callback(None, dom, L.VIR_DOMAIN_EVENT_STARTED,
                                             L.VIR_DOMAIN_EVENT_STARTED_BOOTED, None)
    wait_until(lambda: collector.drain() is not None and any(
        reason == "burst" for reason, _ in collector.resyncs()), "the burst's resync")
    assert collector.watcher.health()["held"] == 0  # the resync's sync covers the held stop
    (lost,) = [lost for reason, lost in collector.resyncs() if reason == "burst"]
    # What was not fired one by one: the starts past the limit and the held stop.
    fired = [e for e in collector.fired if e["tag"] != "resync" and e["name"].startswith(
        testdriver.prefix + "burst")]
    assert lost == 10 - len(fired) + 1 and len(fired) <= 5


# The immediate path: events go to ``deliver`` as they happen, and only there.
class Bus:
    """Stands in for the minion's bus (the real one is in tests/daemons): takes or refuses."""

    def __init__(self):
        self.taking = True
        self.got = []
        self.refused = 0

    def __call__(self, items):
        if self.taking:
            self.got.extend(items)
        else:
            self.refused += 1
        return self.taking


def test_immediate_delivery_and_the_tick_as_fallback_each_event_once(testdriver):
    bus = Bus()
    watcher = eventloop.Watcher(BeaconSettings(uri=TEST_URI, stop_grace=0), deliver=bus)
    try:
        wait_until(lambda: bus.got, "the connected resync on the bus")
        assert bus.got == [{"tag": "resync", "reason": "connected", "lost": 0}]
        dom = testdriver.define("fast")
        wait_until(lambda: any(item.get("uuid") == dom.UUIDString() for item in bus.got), "the start")
        assert watcher.settle() and watcher.drain() == []  # nothing left for the tick
        bus.taking = False  # the bus refuses: the same events go through the tick
        dom.suspend()
        dom.resume()
        fired = []  # libvirt's loop calls back a moment later: drain until both came
        wait_until(lambda: watcher.settle() and fired.extend(watcher.drain()) is None
                   and len(fired) >= 2, "the pause and the resume through the tick")
        assert [event["transition"] for event in fired] == ["paused", "resumed"]
        bus.taking = True
        dom.suspend()
        wait_until(lambda: bus.got[-1].get("transition") == "paused", "the pause on the bus")
        transitions = [item.get("transition") for item in bus.got if item.get("uuid") == dom.UUIDString()]
        assert transitions == ["started", "paused"]  # each event one way only
        health = watcher.health()
        assert (health["delivered_immediately"], health["delivered_by_tick"]) == (2, 2)
        # One failure per refused attempt: the pause and the resume are refused together, or
        # one by one when a drain ran between libvirt's two callbacks.
        assert bus.refused in (1, 2) and health["failures"] == {"deliver": bus.refused}
    finally:
        watcher.retire()


def test_immediate_off_means_only_the_tick(testdriver):
    bus = Bus()
    watcher = eventloop.Watcher(BeaconSettings(uri=TEST_URI, stop_grace=0, immediate=False),
                                deliver=bus)
    try:
        wait_until(lambda: watcher.settle() and watcher.connected, "connected")
        testdriver.define("slow")
        wait_until(lambda: watcher.settle() and len(watcher.drain()) > 0 or None, "events by tick")
        assert bus.got == []
    finally:
        watcher.retire()


def test_a_held_stop_fires_when_its_grace_ends_not_at_a_tick(testdriver):
    bus = Bus()
    watcher = eventloop.Watcher(BeaconSettings(uri=TEST_URI, stop_grace=0.2), deliver=bus)
    try:
        wait_until(lambda: bus.got, "connected")
        dom = testdriver.define("timely")
        wait_until(lambda: any(item.get("transition") == "started" for item in bus.got), "the start")
        dom.destroy()
        # Nobody drains: the watcher's own timer releases the stop once its grace is over.
        wait_until(lambda: any(item.get("transition") == "stopped" for item in bus.got), "the stop")
    finally:
        watcher.retire()


def test_the_master_coming_back_means_a_master_reconnected_resync(testdriver):
    bus = Bus()
    watcher = eventloop.Watcher(BeaconSettings(uri=TEST_URI), deliver=bus)
    try:
        wait_until(lambda: bus.got, "connected")
        watcher.master_reconnected()
        wait_until(lambda: bus.got[-1] == {"tag": "resync", "reason": "master_reconnected", "lost": 0},
                   "the master_reconnected resync")
    finally:
        watcher.retire()


def test_a_watcher_whose_beacon_stopped_running_is_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(eventloop, "MIN_IDLE_SLACK", 0.1)  # at once, rather than in 30 s
    loop = eventloop.EventLoop()
    path = str(tmp_path / "eventloop.json")
    settings = BeaconSettings(name="vmpower_removed", uri=TEST_URI)
    watcher = loop.watcher(settings)
    loop.drain(settings, path, {"loop_interval": 0.1})
    wait_until(lambda: watcher.settle() and watcher.connected, "connected")
    # Salt stops calling beacon() (removed from config or pillar): one tick and the slack later
    # the supervisor closes the watcher.
    wait_until(lambda: (loop.close_idle(), watcher.settle(), watcher.state == "closed")[-1],
               "the watcher to be closed")
    assert not watcher.connected
    loop.drain(settings, path, {"loop_interval": 0.1})  # back in the config: connected again
    wait_until(lambda: watcher.settle() and watcher.connected, "connected again")
    assert watcher.drain()[-1] == {"tag": "resync", "reason": "restarted", "lost": 0}
    watcher.retire()


def test_a_beacon_late_by_seconds_keeps_its_watcher(tmp_path):
    """Salt's loop stalls for seconds while the minion re-initialises after its master came
    back (3.4 s seen with a 1 s tick): the watcher stays connected, which is no gap in the
    watch; a beacon no longer run for longer than the slack has its watcher closed."""
    late = 0.0
    loop = eventloop.EventLoop(monotonic=lambda: time.monotonic() + late)
    path = str(tmp_path / "eventloop.json")
    settings = BeaconSettings(name="vmpower_late", uri=TEST_URI)
    watcher = loop.watcher(settings)
    loop.drain(settings, path, {"loop_interval": 1})
    wait_until(lambda: watcher.settle() and watcher.connected, "connected")
    late = 5.0
    loop.close_idle()
    assert watcher.settle() and watcher.connected and watcher.state == "connected"
    late = 1 + eventloop.MIN_IDLE_SLACK + 1
    loop.close_idle()
    assert watcher.settle() and watcher.state == "closed"
    watcher.retire()


def test_a_bus_that_says_not_now_keeps_the_events_for_the_tick_without_a_failure(testdriver):
    watcher = eventloop.Watcher(BeaconSettings(uri=TEST_URI, stop_grace=0), deliver=lambda items: None)
    try:
        wait_until(lambda: watcher.settle() and watcher.connected, "connected")
        assert watcher.drain() == [{"tag": "resync", "reason": "connected", "lost": 0}]
        assert watcher.health()["failures"] == {}
    finally:
        watcher.retire()


def test_a_watcher_whose_beacon_salt_disabled_is_closed_at_once(tmp_path):
    loop = eventloop.EventLoop()
    path = str(tmp_path / "eventloop.json")
    settings = BeaconSettings(name="vmpower_disabled", uri=TEST_URI)
    opts = {"id": "h", "file_client": "local", "loop_interval": 3600,
            "beacons": {"vmpower_disabled": [{"uri": TEST_URI}]}}
    loop.drain(settings, path, opts)
    watcher = loop.watcher(settings)
    wait_until(lambda: watcher.settle() and watcher.connected, "connected")
    loop.close_idle()
    assert watcher.settle() and watcher.connected  # a tick of an hour has not passed
    opts["beacons"]["vmpower_disabled"].append({"enabled": False})  # beacons.disable_beacon
    loop.close_idle()
    assert watcher.settle() and watcher.state == "closed"
    watcher.retire()


def test_settle_waits_for_callbacks_made_while_a_round_runs(testdriver, monkeypatch):
    """Callbacks that arrive while the thread is in a round are the next round's; settle()
    called then returns only once that next round is over, even when the thread takes the lock
    for it before settle()'s waiter wakes (a drain after settle() would otherwise miss them)."""
    watcher = eventloop.Watcher(BeaconSettings(uri=NO_DAEMON_URI, stop_grace=0))
    step = watcher._step
    in_round = threading.Event()

    def slow_step(raw, *args):
        if raw:
            in_round.set()
            time.sleep(0.2)  # a round long enough for more callbacks to queue behind it
        return step(raw, *args)

    monkeypatch.setattr(watcher, "_step", slow_step)
    try:
        dom = testdriver.define("behind", start=False)
        misses = 0
        for _ in range(5):
            in_round.clear()
            watcher.lifecycle_callback(None, dom, L.VIR_DOMAIN_EVENT_STARTED,
                                       L.VIR_DOMAIN_EVENT_STARTED_BOOTED, None)
            assert in_round.wait(5)
            watcher.lifecycle_callback(None, dom, L.VIR_DOMAIN_EVENT_STOPPED,
                                       L.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, None)
            assert watcher.settle()
            transitions = [event["transition"] for event in watcher.drain() if "transition" in event]
            misses += transitions != ["started", "stopped"]
        assert misses == 0
    finally:
        watcher.retire()


# The wake-up a job hands over: the beacon fires a retry resync when it is due.
RETRY = {"tag": "resync", "reason": "retry", "lost": 0}


class WakeUpLoop:
    """An EventLoop of its own (a minion process) on a clock moved by hand, with one watcher of
    the test driver whose events go through the tick (a masterless minion: no bus)."""

    def __init__(self, tmp_path, boot="boot-1", mono=1000.0):
        self.mono = mono
        self.loop = eventloop.EventLoop(monotonic=lambda: self.mono, boot_id=lambda: boot)
        self.settings = BeaconSettings(name=f"vmpower_wake{next(_names)}", uri=TEST_URI)
        self.opts = {"id": "h", "file_client": "local", "loop_interval": 3600,
                     "cachedir": str(tmp_path)}
        self.status = str(tmp_path / "eventloop.json")
        self.fired = []
        self.drain()
        self.watcher = self.loop.watcher(self.settings)
        wait_until(lambda: self.drain() is not None and RESYNC_CONNECTED in self.fired, "connected")

    def drain(self):
        watcher = self.loop._watchers.get(self.settings.name)
        if watcher is not None:
            assert watcher.settle(WAIT), "the watcher's thread did not settle"
        self.fired.extend(self.loop.drain(self.settings, self.status, self.opts))
        return self.fired

    def retries(self):
        """Ask the loop to look at the wake-up now; the retry resyncs fired so far."""
        self.loop.wake_up_if_due()
        self.drain()
        return self.fired.count(RETRY)

    def close(self):
        self.watcher.retire()


RESYNC_CONNECTED = {"tag": "resync", "reason": "connected", "lost": 0}


@pytest.fixture
def wake_loop(tmp_path, testdriver):
    made = []

    def make(**kwargs):
        made.append(WakeUpLoop(tmp_path, **kwargs))
        return made[-1]

    yield make
    for loop in made:
        loop.close()


def test_a_wake_up_fires_one_retry_resync_when_it_is_due(wake_loop, tmp_path):

    loop = wake_loop()
    WakeUps(wakeup_path(str(tmp_path))).update("boot-1", 1015.0, 1000.0)
    assert loop.retries() == 0
    loop.mono = 1014.9
    assert loop.retries() == 0
    loop.mono = 1015.0
    assert loop.retries() == 1
    loop.mono = 1015.0 + ANSWER_WAIT - 0.1
    assert loop.retries() == 1  # fired once; again only if no sync answers it in time
    status = loop.loop.status()["wakeup"]
    assert status["pending"] and status["fired"] == 1


def test_an_unanswered_wake_up_is_fired_again_and_an_answered_one_is_not(wake_loop, tmp_path):

    loop = wake_loop()
    wakeups = WakeUps(wakeup_path(str(tmp_path)))
    wakeups.update("boot-1", 1001.0, 1000.0)
    loop.mono = 1001.0
    assert loop.retries() == 1
    loop.mono = 1001.0 + ANSWER_WAIT  # no sync came
    assert loop.retries() == 2
    wakeups.update("boot-1", None, 1017.0, answered_before=1016.5)  # a sync came and ended
    loop.mono = 1100.0
    assert loop.retries() == 2
    assert not loop.loop.status()["wakeup"]["pending"]


def test_after_a_minion_restart_the_wake_up_still_comes(wake_loop, tmp_path):
    """The file outlives the minion process: a new one fires what the old one had pending,
    on time in the same boot, at once for one of an earlier boot."""

    WakeUps(wakeup_path(str(tmp_path))).update("boot-1", 1030.0, 1000.0)
    later = wake_loop(mono=1020.0)  # the minion restarted: a new process, the same boot
    assert later.retries() == 0
    later.mono = 1030.0
    assert later.retries() == 1
    later.close()
    rebooted = wake_loop(boot="boot-2", mono=5.0)  # the host rebooted
    assert rebooted.retries() == 1


def test_a_due_wake_up_waits_while_the_master_is_away(wake_loop, tmp_path):
    loop = wake_loop()

    class Link:
        connected = False

        def is_alive(self):
            return True

        def health(self):
            return {}

    loop.loop._master_link = Link()
    WakeUps(wakeup_path(str(tmp_path))).update("boot-1", 1001.0, 1000.0)
    loop.mono = 1002.0
    assert loop.retries() == 0  # Salt would drop it
    Link.connected = True
    assert loop.retries() == 1


def test_a_retry_due_while_salt_has_the_beacon_closed_fires_when_it_runs_again(wake_loop,
                                                                               tmp_path):
    loop = wake_loop()
    loop.loop.close(loop.settings.name, loop.status)
    assert loop.watcher.settle(WAIT) and loop.watcher.state == "closed"
    WakeUps(wakeup_path(str(tmp_path))).update("boot-1", 1001.0, 1000.0)
    loop.mono = 1001.0
    loop.loop.wake_up_if_due()
    assert loop.watcher.settle(WAIT) and loop.watcher._outbox == []  # not while closed
    # Salt runs the beacon again: it connects, says so, and fires the retry.
    wait_until(lambda: loop.drain() is not None and RETRY in loop.fired, "the retry resync")


# What the watcher's thread reads from the domain and when the callback stamped it.
def test_each_event_names_its_own_domain_in_order_with_few_uuids_kept(watch, testdriver, monkeypatch):
    from vmpower.eventloop import watcher as watcher_module

    monkeypatch.setattr(watcher_module, "UUIDS_KEPT", 2)  # fewer than the domains: kept ones go
    collector = watch(stop_grace=0)
    doms = [testdriver.define(f"kept-{i}", start=False) for i in range(5)]
    steps = [(L.VIR_DOMAIN_EVENT_SUSPENDED, 0, "paused"), (L.VIR_DOMAIN_EVENT_RESUMED, 0, "resumed")] * 3
    for event, detail, _ in steps:
        for dom in doms:
            collector.watcher.lifecycle_callback(None, dom, event, detail, None)
    collector.drain()
    for dom in doms:
        fired = collector.of(dom)
        assert [(e["uuid"], e["name"], e["transition"]) for e in fired] == [
            (dom.UUIDString(), dom.name(), transition) for _, _, transition in steps]
    assert len(collector.watcher._uuids) <= 2


class ThreadClock:
    """A clock whose every reading is new and remembers which thread it was given to."""

    def __init__(self, start):
        self.now = start
        self.given: dict[str, set] = {}

    def __call__(self):
        self.now += 0.001
        self.given.setdefault(threading.current_thread().name, set()).add(self.now)
        return self.now


def test_a_fired_event_is_stamped_by_the_callback_and_shaped_as_lifecycle_data(testdriver):
    from vmpower.core.model import LifecycleEvent, Transition

    clock = ThreadClock(1_800_000_000.0)
    watcher = eventloop.Watcher(BeaconSettings(uri=TEST_URI, stop_grace=0), clock=clock)
    try:
        collector = Collector(watcher)
        wait_until(lambda: collector.drain() is not None and collector.resyncs(), "connected")
        dom = testdriver.define("stamped", start=False)
        threading.Thread(target=watcher.lifecycle_callback, name="libvirt-like",
                         args=(None, dom, L.VIR_DOMAIN_EVENT_SUSPENDED, 0, None)).start()
        [event] = collector.wait_for(dom, 1)
        assert event["timestamp"] in clock.given["libvirt-like"]
        observed = LifecycleEvent(event["timestamp"], dom.UUIDString(), dom.name(), Transition.PAUSED,
                                  "paused", "SUSPENDED", "PAUSED")
        assert event == eventloop.lifecycle_data(observed, event["seq"], TEST_URI)
    finally:
        watcher.retire()
