"""libvirt's event loop in a Salt minion: one native thread per process, one watcher per beacon.

The ``vmpower`` beacon is a thin shell over this module. Salt re-imports the beacon's file on
every beacons refresh, closes and rebuilds the beacon around state runs, and never closes a
beacon configured in pillar. This module is imported the ordinary way, so its globals (the event
thread, the watchers, the sequence counter) live as long as the process, and every rebuild of
the beacon finds them again.

Threads: libvirt calls the watchers' ``*_callback`` methods from the event thread. They only
append a raw tuple to a bounded queue, under a lock that is never held for longer than an
append or a swap. Everything else (translating through ``vmpower.core.mapping``, holding back
STOPPED, reconnecting, writing the status file) happens in ``drain()`` and ``close()``, which
Salt calls from the minion's own loop, one at a time.

Job processes are forked by the minion and run no event loop of their own: the loop's health
reaches ``vmpower.status`` through a small JSON file that the minion process rewrites when it
changes (``write_status``) and job processes read (``read_status``).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import tempfile
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from vmpower import forksafe
from vmpower.core.mapping import LifecycleTranslator, translate_reboot
from vmpower.core.model import LifecycleEvent, Transition
from vmpower.core.settings import BeaconSettings

# The beacon's __virtual__ checks HAS_LIBVIRT here. Importing vmpower.hypervisor also installs
# vmpower's libvirt error handler: libvirt's default one prints every error to stderr, so each
# failed reconnection attempt would reach the minion's log.
from vmpower.hypervisor import HAS_LIBVIRT  # noqa: F401

try:
    import libvirt
except ImportError:  # pragma: no cover - reported by the beacon's __virtual__
    libvirt = None

log = logging.getLogger(__name__)

THREAD_NAME = "vmpower-libvirt-events"
RECONNECT_FIRST = 1.0  # seconds before the second attempt of an outage; doubled after each failure
RECONNECT_MAX = 60.0
LOOP_ERROR_PAUSE = 1.0
# The raw queue's "event" for a VIR_DOMAIN_EVENT_ID_REBOOT callback (lifecycle events are ints).
REBOOT = None

RawEvent = Tuple[float, str, str, Optional[int], int]  # (time, uuid, name, event, detail)

# Process-wide state. _start_lock guards the registration and the thread's start; the status
# reads _thread and _loop_errors (written by the event thread only) without it.
_start_lock = threading.Lock()
_registered_pid: Optional[int] = None
_thread: Optional[threading.Thread] = None
_loop_errors = 0
# seq of the published lifecycle events: increasing across every watcher of the process.
_sequence = itertools.count(1)


def _run_forever() -> None:
    global _loop_errors
    while True:
        try:
            forksafe.run_iteration()  # virEventRunDefaultImpl, never while the process forks
        except Exception:  # every watcher depends on this loop: it must outlive a failed iteration
            _loop_errors += 1
            time.sleep(LOOP_ERROR_PAUSE)  # neither a busy loop nor a log storm from this thread


def ensure_running() -> threading.Thread:
    """Register libvirt's default event implementation and start its thread, once per process.

    Call it before opening a connection that should deliver events. The thread cannot be
    stopped (libvirt has no way to unregister the implementation), so it is started at most
    once and shared by every watcher, whatever Salt does to the beacon.
    """
    global _registered_pid, _thread
    with _start_lock:
        if _registered_pid is None:
            libvirt.virEventRegisterDefaultImpl()
            _registered_pid = os.getpid()
        elif _registered_pid != os.getpid():
            # A forked child has the parent's libvirt state but not its thread; running a second
            # loop over that inherited state would compete with the parent's.
            raise RuntimeError(f"libvirt's event loop belongs to process {_registered_pid}; "
                               f"a forked process cannot run it")
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run_forever, name=THREAD_NAME, daemon=True)
            _thread.start()
        return _thread


def lifecycle_data(event: LifecycleEvent, seq: int, uri: str) -> dict:
    """A lifecycle event as the beacon fires it (Salt turns ``tag`` into the tag's tail)."""
    return {"tag": f"lifecycle/{event.transition.value}", "uuid": event.uuid, "name": event.name,
            "transition": event.transition.value, "reason": event.reason,
            "libvirt": {"event": event.libvirt_event, "detail": event.libvirt_detail},
            "timestamp": event.timestamp, "seq": seq, "uri": uri}


def resync_data(reason: str, lost: int) -> dict:
    """A resync as the beacon fires it: events may have been missed, a full sync is due.

    ``lost`` counts the events the queue dropped; a gap in the connection cannot be counted,
    so it is 0 for ``connected``, ``reconnected`` and ``restarted``.
    """
    return {"tag": "resync", "reason": reason, "lost": lost}


def _close_reason(reason: int) -> str:
    return {
        libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
        libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
        libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
        libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the client",
    }.get(reason, f"closed (reason {reason})")


def _quietly(what: str, call: Callable, *args) -> None:
    """One step of tearing down a connection that may be dead already: a failure changes nothing."""
    try:
        call(*args)
    except libvirt.libvirtError as exc:
        log.debug("vmpower: %s failed: %s", what, exc)


class Watcher:
    """One libvirt connection whose lifecycle and reboot events feed a bounded queue.

    ``clock`` stamps the events (epoch seconds; the STOPPED grace is measured in it) and
    ``monotonic`` paces reconnection attempts; tests pass their own.
    """

    def __init__(self, settings: BeaconSettings, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()  # the queue and its counters, shared with the event thread
        self._queue: Deque[RawEvent] = collections.deque()
        self._unreported_drops = 0
        self._conn = None
        self._callback_ids: List[int] = []
        self._lost: Optional[int] = None  # the close callback's reason, set from the event thread
        self._resync_reason = "connected"  # what the next successful connection announces
        self._next_attempt = 0.0
        self._failures = 0  # consecutive failed connection attempts
        self._translator = LifecycleTranslator()
        self._held: Dict[str, LifecycleEvent] = {}  # uuid -> STOPPED in its grace, oldest first
        self.events_seen = 0
        self.dropped = 0
        self.reconnects = 0
        self.queue_depth = 0  # events waiting when the queue was last drained
        self.last_resync: Optional[dict] = None
        self.last_error: Optional[str] = None

    @property
    def uri(self) -> str:
        return self.settings.uri

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._lost is None

    # libvirt's callbacks, on the event thread: enqueue and nothing else.
    def lifecycle_callback(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        """``VIR_DOMAIN_EVENT_ID_LIFECYCLE``."""
        self._enqueue((self._clock(), dom.UUIDString(), dom.name(), event, detail))

    def reboot_callback(self, _conn, dom, _opaque) -> None:
        """``VIR_DOMAIN_EVENT_ID_REBOOT``."""
        self._enqueue((self._clock(), dom.UUIDString(), dom.name(), REBOOT, 0))

    def close_callback(self, conn, reason: int, _opaque) -> None:
        """The connection is gone (libvirtd died, socket closed, keepalive timeout)."""
        if conn is self._conn:  # not a late word about a connection already replaced
            self._lost = reason

    def _enqueue(self, item: RawEvent) -> None:
        with self._lock:
            self.events_seen += 1
            if len(self._queue) >= self.settings.queue_size:
                self._queue.popleft()
                self.dropped += 1
                self._unreported_drops += 1
            self._queue.append(item)

    # Salt's side, on the minion's loop.
    def configure(self, settings: BeaconSettings) -> None:
        """Apply a changed configuration of the same beacon and URI."""
        if settings == self.settings:
            return
        keepalive_changed = (settings.keepalive_interval, settings.keepalive_count) != (
            self.settings.keepalive_interval, self.settings.keepalive_count)
        with self._lock:
            self.settings = settings
            while len(self._queue) > settings.queue_size:  # a smaller queue: drop as on overflow
                self._queue.popleft()
                self.dropped += 1
                self._unreported_drops += 1
        if keepalive_changed and self._conn is not None:
            self._keep_alive(self._conn)

    def drain(self) -> List[dict]:
        """Everything there is to fire now, as beacon data, in order.

        Checks the connection first (reconnecting when it is gone and the back-off allows, which
        fires a resync), then fires an ``overflow`` resync if the queue dropped events, then the
        queued events through the core's translation, holding STOPPED back for ``stop_grace``.
        libvirt's errors are handled here; they never reach the caller.
        """
        out: List[dict] = []
        self._check_connection(out)
        with self._lock:
            raw, self._queue = self._queue, collections.deque()
            lost, self._unreported_drops = self._unreported_drops, 0
        self.queue_depth = len(raw)
        if lost:
            self._resync(out, "overflow", lost)
        for item in raw:
            self._translate(item, out)
        self._release_held(self._clock(), out)
        return out

    def close(self) -> None:
        """Salt closes the beacon: deregister and close the connection, keep queue and thread.

        The next ``drain()`` reconnects at once and fires a ``restarted`` resync, because events
        in between are missed. Closing a watcher that is not connected changes nothing (Salt
        closes a ``disable_during_state_run`` beacon on every loop while a state runs).
        """
        if self._conn is None:
            return
        self._disconnect()
        self._resync_reason = "restarted"
        self._next_attempt = 0.0

    def health(self) -> dict:
        """The watcher's counters, as ``vmpower.status`` reports them."""
        return {"uri": self.uri, "connected": self.connected, "queue_depth": self.queue_depth,
                "queue_size": self.settings.queue_size, "held": len(self._held),
                "events_seen": self.events_seen, "dropped": self.dropped,
                "reconnects": self.reconnects, "last_resync": self.last_resync,
                "failed_attempts": self._failures, "last_error": self.last_error}

    # The connection.
    def _check_connection(self, out: List[dict]) -> None:
        if self._conn is not None:
            problem = self._problem()
            if problem is None:
                return
            log.warning("vmpower: lost the libvirt connection to %s (%s); reconnecting", self.uri, problem)
            self.last_error = problem
            self._disconnect()
            self._resync_reason = "reconnected"
            self._next_attempt = 0.0  # at once: back-off is only between failed attempts
        if self._monotonic() < self._next_attempt:
            return
        try:
            self._connect()
        except libvirt.libvirtError as exc:
            self._failed(exc)
            return
        if self._failures:
            log.info("vmpower: connected to libvirt at %s after %d failed attempt(s)",
                     self.uri, self._failures)
        self._failures = 0
        self.last_error = None
        if self._resync_reason == "reconnected":
            self.reconnects += 1
        self._resync(out, self._resync_reason, 0)

    def _problem(self) -> Optional[str]:
        """Why the connection is unusable, or None; isAlive() is local, not a round trip."""
        if self._lost is not None:
            return _close_reason(self._lost)
        try:
            alive = self._conn.isAlive()
        except libvirt.libvirtError as exc:
            return str(exc)
        return None if alive else "the connection is no longer alive"

    def _connect(self) -> None:
        ensure_running()  # the event implementation must exist before the connection is opened
        conn = libvirt.open(self.uri)
        self._conn, self._callback_ids, self._lost = conn, [], None
        try:
            for event_id, callback in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.lifecycle_callback),
                                       (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self.reboot_callback)):
                self._callback_ids.append(conn.domainEventRegisterAny(None, event_id, callback, None))
        except libvirt.libvirtError:
            self._disconnect()
            raise
        try:
            conn.registerCloseCallback(self.close_callback, None)
        except libvirt.libvirtError as exc:  # a driver without a peer to lose
            log.debug("vmpower: %s has no close callback: %s", self.uri, exc)
        self._keep_alive(conn)

    def _keep_alive(self, conn) -> None:
        try:
            conn.setKeepAlive(self.settings.keepalive_interval, self.settings.keepalive_count)
        except libvirt.libvirtError as exc:  # drivers inside the client (test:///) have no peer to ping
            log.debug("vmpower: %s has no keepalive: %s", self.uri, exc)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for callback_id in self._callback_ids:
            _quietly("deregistering an event callback", conn.domainEventDeregisterAny, callback_id)
        self._callback_ids = []
        _quietly("unregistering the close callback", conn.unregisterCloseCallback)
        _quietly("closing the connection", conn.close)

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        delay = min(RECONNECT_FIRST * 2 ** min(self._failures - 1, 16), RECONNECT_MAX)
        self._next_attempt = self._monotonic() + delay
        self.last_error = f"cannot connect: {exc}"
        # The first failure of an outage deserves a warning (libvirtd not up yet, a wrong URI);
        # repeating it at every attempt would be the error storm the spec forbids.
        log.log(logging.WARNING if self._failures == 1 else logging.DEBUG,
                "vmpower: cannot connect to libvirt at %s: %s; retrying in %gs", self.uri, exc, delay)

    # The events.
    def _translate(self, item: RawEvent, out: List[dict]) -> None:
        timestamp, uuid, name, event, detail = item
        self._release_held(timestamp, out)
        translation = (translate_reboot() if event is REBOOT
                       else self._translator.lifecycle(uuid, event, detail))
        if translation.transition is None:
            return  # DEFINED, UNDEFINED, SHUTDOWN: no power change of their own
        # Any later transition of the domain cancels its held STOPPED: a hard reboot is
        # stopped-then-started, and only the start is news.
        self._held.pop(uuid, None)
        lifecycle = LifecycleEvent(timestamp, uuid, name, translation.transition, translation.reason,
                                   translation.libvirt_event, translation.libvirt_detail)
        if translation.transition is Transition.STOPPED and self.settings.stop_grace > 0:
            self._held[uuid] = lifecycle
        else:
            out.append(lifecycle_data(lifecycle, next(_sequence), self.uri))

    def _release_held(self, now: float, out: List[dict]) -> None:
        """Fire the held STOPPED events whose grace has passed by ``now``."""
        while self._held:
            uuid, held = next(iter(self._held.items()))
            if held.timestamp + self.settings.stop_grace > now:
                return  # held in the order they happened, so the rest are not due either
            del self._held[uuid]
            out.append(lifecycle_data(held, next(_sequence), self.uri))

    def _resync(self, out: List[dict], reason: str, lost: int) -> None:
        self.last_resync = {"reason": reason, "lost": lost, "at": self._clock()}
        out.append(resync_data(reason, lost))


class EventLoop:
    """The process's watchers, one per configured beacon, and the status file they share."""

    def __init__(self):
        self._watchers: Dict[str, Watcher] = {}
        self._written: Optional[dict] = None
        self._write_failed = False

    def watcher(self, settings: BeaconSettings) -> Watcher:
        """The watcher of the beacon ``settings.name``, created or reconfigured as needed."""
        current = self._watchers.get(settings.name)
        if current is not None and current.uri != settings.uri:
            current.close()  # the beacon now watches another host: its queue belongs to the old one
            current = None
        if current is None:
            current = self._watchers[settings.name] = Watcher(settings)
        else:
            current.configure(settings)
        return current

    def drain(self, settings: BeaconSettings, status_path: str) -> List[dict]:
        """What the beacon fires now; the status file is rewritten if anything changed."""
        events = self.watcher(settings).drain()
        self.write_status(status_path)
        return events

    def close(self, name: str, status_path: str) -> None:
        """Salt closes the beacon ``name``: its watcher disconnects until the next drain."""
        watcher = self._watchers.get(name)
        if watcher is not None:
            watcher.close()
            self.write_status(status_path)

    def status(self) -> dict:
        """The health of the event thread and of every watcher."""
        thread = _thread
        return {"pid": os.getpid(), "thread_alive": bool(thread and thread.is_alive()),
                "loop_errors": _loop_errors,
                "watchers": {name: watcher.health() for name, watcher in self._watchers.items()}}

    def write_status(self, path: str) -> None:
        """Write ``status()`` to ``path`` (atomically) if it changed since the last write."""
        snapshot = self.status()
        if snapshot == self._written:
            return
        try:
            _write_json(path, {**snapshot, "updated_at": time.time()})
        except OSError as exc:  # health reporting must not stop the events
            log.log(logging.DEBUG if self._write_failed else logging.WARNING,
                    "vmpower: cannot write the event loop status to %s: %s", path, exc)
            self._write_failed = True
            return
        self._write_failed = False
        self._written = snapshot


def _write_json(path: str, data: dict) -> None:
    """Replace ``path`` in one step, so a reader never sees half a file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eventloop-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_status(path: str) -> dict:
    """The event loop's status as the minion process last wrote it (for job processes)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {"error": f"no event loop status at {path}: the vmpower beacon has not run "
                         f"in this minion"}
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read the event loop status at {path}: {exc}"}


_event_loop = EventLoop()


def event_loop() -> EventLoop:
    """This process's EventLoop (a module global, so it outlives re-imports of the beacon)."""
    return _event_loop
