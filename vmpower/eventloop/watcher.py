"""One libvirt connection's state machine, on a thread of its own.

A ``Watcher`` is one beacon's connection to libvirt. Everything that can block (opening the
connection, registering callbacks, keepalive, deregistering, closing) runs on the watcher's own
thread, never on the minion's loop: against a libvirtd that accepts connections and never
answers, ``libvirt.openReadOnly`` does not return, and the minion must go on answering jobs.
Salt's side (``drain()``, ``close()``, ``configure()``) only swaps lists and sets flags under a
lock that is never held for longer than that.

States: ``connecting`` (an attempt is under way; a hung libvirtd keeps it there, and
``health()`` says since when), ``connected``, ``backoff`` (waiting before the next attempt,
capped exponential), ``closed`` (Salt closed the beacon, or it stopped running it), ``retired``
(replaced by a watcher of another URI; the thread has ended).

Threads: libvirt calls ``*_callback`` from its event thread (``vmpower.eventloop.native``);
they append a raw tuple to a bounded queue and wake the watcher's thread, nothing else. The
watcher's thread translates (``vmpower.core.mapping``), holds STOPPED back
(``vmpower.core.grace``), coalesces storms (``vmpower.core.burst``) and delivers: through
``deliver`` (the minion's event bus, as ``event.send`` does) as soon as an event is known, or,
when that is off or fails, into the outbox that ``beacon()`` returns at its next tick. Each
event goes one way or the other, never both.

Before a round's events go out, the watcher writes them in the host's journal
(``vmpower.journal``), which numbers them (``seq``): what its beacon observed (the transition,
libvirt's reason, when libvirt called back on the monotonic clock) is what a reconcile
believes of an event, and nothing the event itself claims. Every gap in the watch (connected,
disconnected, closed, events dropped, a burst begun) is journaled too.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from vmpower import forksafe, hostinfo
from vmpower.core.burst import BurstGuard
from vmpower.core.grace import StopGrace
from vmpower.core.journal import GAP, Observation
from vmpower.core.mapping import LifecycleTranslator, translate_reboot
from vmpower.core.model import LifecycleEvent
from vmpower.core.settings import DEFAULT_STOP_GRACE, BeaconSettings
from vmpower.eventloop import native
from vmpower.eventloop.failures import Failures
from vmpower.journal import Journal, JournalError

libvirt = native.libvirt
log = logging.getLogger("vmpower.eventloop")

RECONNECT_FIRST = 1.0  # seconds before the second attempt of an outage; doubled after each failure
RECONNECT_MAX = 60.0
CHECK_EVERY = 1.0  # seconds between two looks at a connection's health (isAlive is local)
STUCK_AFTER = 10.0  # a blocking libvirt call running this long means libvirtd is not answering
# The raw queue's "event" for a VIR_DOMAIN_EVENT_ID_REBOOT callback (lifecycle events are ints).
REBOOT = None
UUIDS_KEPT = 4096  # UUIDs formatted and kept; more (a host rarely has so many domains) start anew

# (time, monotonic, domain, event, detail): the domain's UUID and name are read on the watcher's
# thread (libvirt keeps both in the virDomain object: no call to libvirtd).
RawEvent = tuple[float, float, Any, int | None, int]
Deliver = Callable[[list[dict]], bool | None]  # True sent, False refused, None not now
# A journal row before it is numbered: (uuid, transition, reason, monotonic, timestamp). It
# becomes an Observation only when there is a journal to write it in.
Row = tuple[str, Any, str, float, float]
# What a round fires and journals: (data to fire or None, row to journal or None).
Pending = tuple[dict | None, Row | None]
# Resyncs whose gap in the watch is journaled with them (a burst's is journaled as it begins;
# master_reconnected is a gap in the delivery, not in what the beacon observed).
GAP_RESYNCS = frozenset({"connected", "reconnected", "restarted", "overflow"})


class _Numbering:
    """``seq`` of the fired events: increasing across every watcher of the process and, through
    the journal, which numbers what it journals after its own last row, across processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last = 0

    def assign(self, rows: Sequence, journal: Journal | None) -> tuple[list[int], Exception | None]:
        """Numbers for ``rows``, journaled if ``journal`` can be written (else counted on from
        the last number known); and why the journal could not be written, if it could not."""
        with self._lock:  # one watcher at a time: numbers follow the order they are journaled
            numbers, error = None, None
            if journal is not None:
                with forksafe.no_fork_inside():  # a job forked now would copy SQLite's locks
                    try:
                        numbers = journal.append(rows, after=self.last)
                    except JournalError as exc:
                        error = exc
                        with contextlib.suppress(*JournalError):
                            self.last = max(self.last, journal.last_seq())
            if numbers is None:
                numbers = list(range(self.last + 1, self.last + 1 + len(rows)))
            if numbers:
                self.last = numbers[-1]
            return numbers, error


_numbering = _Numbering()


def lifecycle_data(event: LifecycleEvent, seq: int, uri: str) -> dict:
    """A lifecycle event as the beacon fires it (Salt turns ``tag`` into the tag's tail)."""
    return _lifecycle_dict(event.timestamp, event.uuid, event.name, event.transition.value,
                           event.reason, event.libvirt_event, event.libvirt_detail, seq, uri)


def _lifecycle_dict(timestamp: float, uuid: str, name: str, transition: str, reason: str,
                    libvirt_event: str, libvirt_detail: str, seq: int, uri: str) -> dict:
    # The watcher builds this straight from a callback's translation, with no LifecycleEvent
    # in between: it runs once per event.
    return {"tag": f"lifecycle/{transition}", "uuid": uuid, "name": name,
            "transition": transition, "reason": reason,
            "libvirt": {"event": libvirt_event, "detail": libvirt_detail},
            "timestamp": timestamp, "seq": seq, "uri": uri}


def resync_data(reason: str, lost: int) -> dict:
    """A resync as the beacon fires it: events may have been missed, a full sync is due.

    ``lost`` counts the events that were not fired one by one (dropped by an overflowing queue,
    or coalesced by a burst); a gap in a connection cannot be counted, so it is 0 for
    ``connected``, ``reconnected``, ``restarted`` and ``master_reconnected``, and for ``retry``
    (a decision taken earlier is due again), which is no gap at all.
    """
    return {"tag": "resync", "reason": reason, "lost": lost}


def _close_reason(reason: int) -> str:
    return {
        libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
        libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
        libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
        libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the client",
    }.get(reason, f"closed (reason {reason})")


class Watcher:
    """One libvirt connection whose lifecycle and reboot events become beacon events.

    ``stop_grace`` is the grace in effect when the beacon has none of its own
    (``vmpower:stop_grace``). ``clock`` stamps the events (epoch seconds); ``monotonic`` runs
    the grace, the burst guard and the back-off, and stamps what is journaled, with the host's
    ``boot_id``; tests pass their own. ``deliver`` is the immediate path (None: only
    ``drain()``); ``journal`` is where the host's observations go (None: nowhere, so no
    reconcile believes any of its events).
    """

    def __init__(self, settings: BeaconSettings, stop_grace: float = DEFAULT_STOP_GRACE,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 deliver: Deliver | None = None, journal: Journal | None = None,
                 boot_id: Callable[[], str] = hostinfo.boot_id):
        self.settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._deliver = deliver
        self._journal = journal
        self._boot_id = boot_id()
        self._journal_failed = False  # a round was not journaled: the next begins with a gap
        self._cond = threading.Condition(threading.Lock())
        # libvirt's callbacks append to the queue without a lock (a deque's append and popleft
        # are atomic), and only they write events_seen and _callback_drops; the watcher's thread
        # alone takes from it, and wakes only when told that it sleeps (_asleep).
        self._raw: collections.deque[RawEvent] = collections.deque()
        self._queue_size = settings.queue_size
        self._callback_drops = 0  # events the callbacks dropped to keep the queue bounded
        self._callback_drops_taken = 0  # ...of which the watcher has counted
        self._asleep = False
        # Shared with Salt's side, under _cond:
        self._unreported_drops = 0
        self._outbox: list[dict] = []
        self._poked = False
        self._wanted = True  # False once Salt closed the beacon, until its next drain()
        self._close_requested = False  # sticky until the thread has disconnected
        self._rounds = 0  # rounds of the thread that have ended (settle() waits for one more)
        self._rounds_started = 0
        self._retired = False
        self._pending_settings: tuple[BeaconSettings, float] | None = None
        self._master_reconnected = False
        self._wake_up = False  # a decision is due again: fire a retry resync when the beacon runs
        self.last_drain = monotonic()
        # The watcher's thread only:
        self._conn = None
        self._callback_ids: list[int] = []
        self._lost: int | None = None  # the close callback's reason, set from the event thread
        self._resync_reason = "connected"  # what the next successful connection announces
        self._next_attempt = 0.0
        self._next_check = 0.0
        self._failures = 0  # consecutive failed connection attempts
        self._translator = LifecycleTranslator()
        # A domain's raw UUID -> libvirt's string of it: a raw UUID costs libvirt less to read.
        self._uuids: dict[bytes, str] = {}
        # Each held STOPPED as it will be fired and journaled (its row keeps the monotonic
        # time libvirt called back).
        self._grace: StopGrace[Pending] = StopGrace(settings.grace(stop_grace), monotonic)
        self._burst = BurstGuard(settings.burst_limit)
        self._pending: list[Pending] = []
        # Read by health() from any thread (plain attributes, each written by one thread).
        self.state = "connecting"
        self.state_since = clock()
        self.blocked: tuple[str, float, float] | None = None  # (call, since, since monotonic)
        self.failures = Failures()
        self.events_seen = 0
        self.dropped = 0
        self.reconnects = 0
        self.coalesced = 0
        self.delivered_immediately = 0
        self.delivered_by_tick = 0
        self.queue_depth = 0
        self.generation = 0  # successful connections so far
        self.last_resync: dict | None = None
        self.last_error: str | None = None
        # Counted on the watcher's thread, never in libvirt's callback (which only enqueues).
        self.transitions: collections.Counter = collections.Counter()  # power changes seen
        self.resyncs: collections.Counter = collections.Counter()  # resyncs, by reason
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"vmpower-watch-{settings.name}")
        self._thread.start()

    @property
    def uri(self) -> str:
        return self.settings.uri

    @property
    def connected(self) -> bool:
        return self.state == "connected" and self._lost is None

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # libvirt's callbacks, on the event thread, which must never wait: one append, and a
    # wake-up only when the watcher's thread sleeps. Reading the domain, translating and counting
    # all happen on the watcher's thread.
    def lifecycle_callback(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        """``VIR_DOMAIN_EVENT_ID_LIFECYCLE``."""
        self._enqueue((self._clock(), self._monotonic(), dom, event, detail))

    def reboot_callback(self, _conn, dom, _opaque) -> None:
        """``VIR_DOMAIN_EVENT_ID_REBOOT``."""
        self._enqueue((self._clock(), self._monotonic(), dom, REBOOT, 0))

    def close_callback(self, conn, reason: int, _opaque) -> None:
        """The connection is gone (libvirtd died, socket closed, keepalive timeout)."""
        if conn is self._conn:  # not a late word about a connection already replaced
            self._lost = reason
            self._poke()

    def _enqueue(self, item: RawEvent) -> None:
        self.events_seen += 1
        queue = self._raw
        if len(queue) >= self._queue_size:  # full: the oldest goes, and is counted
            try:
                queue.popleft()
            except IndexError:  # the watcher took it meanwhile: nothing was dropped
                pass
            else:
                self._callback_drops += 1
        queue.append(item)
        if self._asleep:
            # One wake-up per sleep: until the watcher's thread runs again (it may wait for the
            # GIL for a while), the callbacks after this one would each take _cond for nothing.
            self._asleep = False
            self._poke()

    def _poke(self) -> None:
        with self._cond:
            self._poked = True
            self._cond.notify()

    # Salt's side, on the minion's loop: flags and swaps only.
    def drain(self) -> list[dict]:
        """What the immediate path did not deliver, in order; the beacon fires it.

        Also tells the watcher its beacon still runs: a watcher Salt closed connects again
        (its thread does) and announces the gap with a ``restarted`` resync.
        """
        with self._cond:
            out, self._outbox = self._outbox, []
            self.last_drain = self._monotonic()
            if not self._wanted or not out:
                self._wanted = True
                self._poked = True  # a fake clock in tests moves between drains: look again
                self._cond.notify()
        self.delivered_by_tick += sum(1 for item in out if item["tag"] != "resync")
        return out

    def close(self) -> None:
        """Salt closes the beacon (or stopped running it): the thread disconnects.

        The next ``drain()`` connects again and fires a ``restarted`` resync, because events in
        between are missed. Closing a closed watcher changes nothing.
        """
        with self._cond:
            self._wanted = False
            self._close_requested = self._poked = True
            self._cond.notify()

    def retire(self) -> None:
        """The watcher is replaced: its thread disconnects and ends."""
        with self._cond:
            self._retired = self._poked = True
            self._wanted = False
            self._cond.notify()

    def configure(self, settings: BeaconSettings, stop_grace: float | None = None) -> None:
        """A changed configuration of the same beacon and URI, applied by the thread."""
        stop_grace = self._grace.seconds if stop_grace is None else stop_grace
        if (settings, settings.grace(stop_grace)) == (self.settings, self._grace.seconds):
            return
        with self._cond:
            self._pending_settings = (settings, stop_grace)
            self._poked = True
            self._cond.notify()

    @property
    def deliver(self) -> Deliver | None:
        return self._deliver

    def master_reconnected(self) -> None:
        """The minion's link to its master came back: Salt dropped what was fired meanwhile."""
        with self._cond:
            self._master_reconnected = self._poked = True
            self._cond.notify()

    def wake_up(self) -> None:
        """A decision taken earlier is due again: fire a ``retry`` resync (once Salt runs the
        beacon, if it has closed it meanwhile)."""
        with self._cond:
            self._wake_up = self._poked = True
            self._cond.notify()

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until the thread has handled everything queued so far (tests, benchmarks);
        False if it did not within ``timeout`` (it is blocked in libvirt)."""
        with self._cond:
            # The first round to start after this call takes everything queued so far; rounds
            # end in the order they start, so it is over once that many rounds are.
            target = self._rounds_started + 1
            self._poked = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._rounds >= target, timeout)

    def health(self) -> dict:
        """The watcher's state and counters, as ``vmpower.status`` reports them."""
        blocked = self.blocked
        stuck = blocked is not None and self._monotonic() - blocked[2] >= STUCK_AFTER
        return {"uri": self.uri, "connected": self.connected, "state": self.state,
                "state_since": self.state_since, "stuck": stuck,
                "blocked_in": blocked[0] if blocked else None,
                "blocked_since": blocked[1] if blocked else None,
                "queue_depth": self.queue_depth, "queue_size": self.settings.queue_size,
                "held": len(self._grace), "events_seen": self.events_seen, "dropped": self.dropped,
                "coalesced": self.coalesced, "reconnects": self.reconnects,
                "immediate": self._deliver is not None and self.settings.immediate,
                "delivered_immediately": self.delivered_immediately,
                "delivered_by_tick": self.delivered_by_tick,
                "last_resync": self.last_resync, "failed_attempts": self._failures,
                "failures": self.failures.counts(), "last_error": self.last_error,
                "journal": self._journal.path if self._journal is not None else None,
                "transitions": dict(self.transitions), "resyncs": dict(self.resyncs)}

    # The thread.
    def _run(self) -> None:
        while True:
            with self._cond:
                # Told before it looks at the queue: a callback that appends after the look
                # finds it asleep and wakes it (it takes _cond, so only once the wait began).
                # A callback that finds it awake again after that look was preceded by one
                # that woke it, so the wait ends all the same.
                self._asleep = True
                if not self._poked and not self._raw:
                    self._cond.wait(self._wait_time())
                self._asleep = False
                self._poked = False
                self._rounds_started += 1
                raw = self._take_queued()
                lost, self._unreported_drops = self._unreported_drops, 0
                wanted, retired = self._wanted, self._retired
                close, self._close_requested = self._close_requested, False
                pending, self._pending_settings = self._pending_settings, None
                master_back, self._master_reconnected = self._master_reconnected, False
                wake_up, self._wake_up = self._wake_up, False
            try:
                if retired:
                    self._disconnect()
                    self._set_state("retired")
                    return
                if pending is not None:
                    self._apply(*pending)
                if wake_up:
                    self._retry(wanted)
                self._step(raw, lost, wanted, close, master_back)
            except Exception as exc:  # pylint: disable=broad-except
                # The thread must outlive anything; a bug here is counted and shown, once.
                self.failures.note("watcher", "the event watcher of %s failed: %s", self.uri, exc)
                log.debug("vmpower: watcher failure", exc_info=True)
            self._flush()
            with self._cond:
                self._rounds += 1
                self._cond.notify_all()

    def _take_queued(self) -> list[RawEvent]:
        """Everything the callbacks queued so far, oldest first, and the drops counted: the
        round's own count of what the bounded queue lost goes to ``_unreported_drops``."""
        queue, taken = self._raw, []
        for _ in range(len(queue)):
            try:
                taken.append(queue.popleft())
            except IndexError:  # a callback dropped the oldest meanwhile
                break
        drops = self._callback_drops
        if drops != self._callback_drops_taken:
            self.dropped += drops - self._callback_drops_taken
            self._unreported_drops += drops - self._callback_drops_taken
            self._callback_drops_taken = drops
        return taken

    def _wait_time(self) -> float:
        now = self._monotonic()
        dues = [due for due in (self._grace.next_due(), self._burst.next_due()) if due is not None]
        if self.state == "backoff":
            dues.append(self._next_attempt)
        elif self.state == "connected":
            dues.append(self._next_check)
        return max(0.0, min([now + CHECK_EVERY * 5, *dues]) - now)

    def _step(self, raw: list[RawEvent], lost: int, wanted: bool, close: bool,
              master_back: bool) -> None:
        # A close is carried out even when the beacon ran again since: the gap was real.
        if close and (self._conn is not None or self.state != "closed"):
            self._disconnect()
            self._resync_reason = "restarted"
            self._next_attempt = 0.0
            self._set_state("closed")
        if wanted:
            self._check_connection()
        self.queue_depth = len(raw)
        if lost:
            self._resync("overflow", lost)
        self._translate(raw)
        self._release_due(self._monotonic())
        if master_back and wanted:
            self._resync("master_reconnected", 0)

    def _retry(self, wanted: bool) -> None:
        if wanted:
            self._resync("retry", 0)
        else:  # Salt closed the beacon: the resync waits for its next run
            with self._cond:
                self._wake_up = True

    def _apply(self, settings: BeaconSettings, stop_grace: float) -> None:
        keepalive_changed = (settings.keepalive_interval, settings.keepalive_count) != (
            self.settings.keepalive_interval, self.settings.keepalive_count)
        with self._cond:
            self.settings = settings
            self._queue_size = settings.queue_size
            while len(self._raw) > settings.queue_size:  # a smaller queue: drop as on overflow
                try:
                    self._raw.popleft()
                except IndexError:
                    break
                self.dropped += 1
                self._unreported_drops += 1
        self._trim_outbox()
        self._grace.change(settings.grace(stop_grace))
        self._burst.limit = settings.burst_limit
        if keepalive_changed and self._conn is not None:
            self._keep_alive(self._conn)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state, self.state_since = state, self._clock()

    # The connection.
    def _check_connection(self) -> None:
        now = self._monotonic()
        if self._conn is not None:
            if self._lost is None and now < self._next_check:
                return
            self._next_check = now + CHECK_EVERY
            problem = self._problem()
            if problem is None:
                return
            log.warning("vmpower: lost the libvirt connection to %s (%s); reconnecting", self.uri, problem)
            self.last_error = problem
            self._disconnect()
            self._resync_reason = "reconnected"
            self._next_attempt = 0.0  # at once: back-off is only between failed attempts
        if now < self._next_attempt:
            return
        self._set_state("connecting")
        try:
            self._connect()
        except libvirt.libvirtError as exc:
            self._failed(exc)
            return
        if self._failures:
            log.info("vmpower: connected to libvirt at %s after %d failed attempt(s)",
                     self.uri, self._failures)
            self.failures.forget("connect")
        self._failures = 0
        self.last_error = None
        self.generation += 1
        self._next_check = self._monotonic() + CHECK_EVERY
        self._set_state("connected")
        if self._resync_reason == "reconnected":
            self.reconnects += 1
        self._resync(self._resync_reason, 0)

    def _problem(self) -> str | None:
        """Why the connection is unusable, or None; isAlive() is local, not a round trip."""
        if self._lost is not None:
            return _close_reason(self._lost)
        try:
            alive = self._conn.isAlive()
        except libvirt.libvirtError as exc:
            return str(exc)
        return None if alive else "the connection is no longer alive"

    def _blocking(self, what: str, call: Callable, *args):
        """Run one libvirt call that may not return for a long time, saying so meanwhile."""
        self.blocked = (what, self._clock(), self._monotonic())
        try:
            return call(*args)
        finally:
            self.blocked = None

    def _connect(self) -> None:
        native.ensure_running()  # the event implementation must exist before the connection
        # Read-only: the beacon only listens; a forged event can never make it change anything.
        conn = self._blocking("connect", libvirt.openReadOnly, self.uri)
        self._conn, self._callback_ids, self._lost = conn, [], None
        try:
            for event_id, callback in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.lifecycle_callback),
                                       (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self.reboot_callback)):
                self._callback_ids.append(self._blocking(
                    "register", conn.domainEventRegisterAny, None, event_id, callback, None))
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
            self._blocking("keepalive", conn.setKeepAlive, self.settings.keepalive_interval,
                           self.settings.keepalive_count)
        except libvirt.libvirtError as exc:  # drivers inside the client (test:///) have no peer to ping
            log.debug("vmpower: %s has no keepalive: %s", self.uri, exc)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._gap("disconnected")  # from now on events are missed, until a resync
        for callback_id in self._callback_ids:
            self._quietly("deregister", conn.domainEventDeregisterAny, callback_id)
        self._callback_ids = []
        self._quietly("unregister", conn.unregisterCloseCallback)
        self._quietly("close", conn.close)

    def _quietly(self, what: str, call: Callable, *args) -> None:
        """One step of tearing down a connection that may be dead already."""
        try:
            self._blocking(what, call, *args)
        except libvirt.libvirtError as exc:
            log.debug("vmpower: %s failed: %s", what, exc)

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        delay = min(RECONNECT_FIRST * 2 ** min(self._failures - 1, 16), RECONNECT_MAX)
        self._next_attempt = self._monotonic() + delay
        self.last_error = f"cannot connect: {exc}"
        self._set_state("backoff")
        # libvirtd not up yet, or a wrong URI: one warning per outage, not an error storm.
        self.failures.note("connect", "cannot connect to libvirt at %s: %s; retrying with back-off "
                           "(up to %gs)", self.uri, exc, RECONNECT_MAX)

    # The events.
    def _translate(self, raw: list[RawEvent]) -> None:
        """A round's callbacks, in the order libvirt made them, into what is fired and
        journaled, held (STOPPED, for its grace) or swallowed by a burst."""
        lifecycle, burst, offer = self._translator.lifecycle, self._burst, self._grace.offer_into
        pending, uri, uuids = self._pending, self.uri, self._uuids
        counted: dict[str, int] = {}  # into self.transitions once the round is translated
        untranslated = 0
        for timestamp, at, dom, event, detail in raw:
            try:
                uuid = uuids.get(dom.UUID())
                if uuid is None:
                    uuid = self._uuid_string(dom)
                translation = translate_reboot() if event is REBOOT else lifecycle(uuid, event, detail)
                transition = translation.transition
                if transition is None:
                    self._release_due(at)
                    continue  # DEFINED, UNDEFINED, SHUTDOWN: no power change of their own
                value = transition._value_  # what .value returns, without its descriptor's cost
                counted[value] = counted.get(value, 0) + 1
                if not burst.admit(at):
                    if burst.swallowed == 1:  # the burst begins: its resync covers the held stops too
                        burst.swallowed += len(self._grace.drop())
                        self._gap("burst")  # what the beacon sees from now on is not journaled one by one
                    continue
                reason = translation.reason
                event_data = _lifecycle_dict(timestamp, uuid, dom.name(), value, reason,
                                             translation.libvirt_event, translation.libvirt_detail, 0, uri)
                offer(pending, uuid, transition, (event_data, (uuid, transition, reason, at, timestamp)), at)
            except Exception as exc:  # pylint: disable=broad-except
                # One event that cannot be read (its domain gone bad, say) costs that event,
                # not the rest of the round: it is counted, and a resync stands for it.
                untranslated += 1
                self.failures.note("translate", "an event of %s could not be read: %s; a resync "
                                   "stands for it", self.uri, exc)
        if untranslated:
            self.dropped += untranslated
            self._resync("overflow", untranslated)
        self.transitions.update(counted)

    def _uuid_string(self, dom) -> str:
        """``dom``'s UUID as libvirt writes it, kept for its next events."""
        if len(self._uuids) >= UUIDS_KEPT:
            self._uuids.clear()
        uuid = self._uuids[dom.UUID()] = dom.UUIDString()
        return uuid

    def _release_due(self, now: float) -> None:
        self._pending.extend(self._grace.due(now))
        swallowed = self._burst.due(now)
        if swallowed is not None:
            self.coalesced += swallowed
            self._resync("burst", swallowed)

    def _resync(self, reason: str, lost: int) -> None:
        self.last_resync = {"reason": reason, "lost": lost, "at": self._clock()}
        self.resyncs[reason] += 1
        gap = ("", GAP, reason, self._monotonic(), self._clock()) if reason in GAP_RESYNCS else None
        self._pending.append((resync_data(reason, lost), gap))

    def _gap(self, reason: str) -> None:
        """Journal a gap in the watch (nothing is fired for it)."""
        self._pending.append((None, ("", GAP, reason, self._monotonic(), self._clock())))

    def _journal_round(self, pending: list[Pending]) -> list[dict]:
        """Journal and number the round's rows; what is to be fired, in order."""
        rows: list = [row for _data, row in pending if row is not None]
        resumed = self._journal is not None and self._journal_failed and bool(rows)
        if resumed:  # a round went unjournaled: what came before it is not the latest word
            rows.insert(0, ("", GAP, "journal", self._monotonic(), self._clock()))
        if self._journal is not None:
            boot_id, uri = self._boot_id, self.uri
            rows = [Observation(0, boot_id, uri, *row) for row in rows]
        numbers, error = _numbering.assign(rows, self._journal)
        if error is not None:
            self._journal_failed = True
            self.failures.note("journal", "cannot write the journal of observed events %s: %s; "
                               "until it can, reconciles believe none of this beacon's events "
                               "and wait out the grace", self._journal.path, error)
        elif self._journal is not None and rows:
            self._journal_failed = False
            self.failures.forget("journal")
        numbered = iter(numbers[1:] if resumed else numbers)
        out = []
        for data, row in pending:
            seq = next(numbered) if row is not None else None
            if data is None:
                continue
            if data["tag"] != "resync":
                data["seq"] = seq
            out.append(data)
        return out

    def _flush(self) -> None:
        """Journal what is pending, then deliver it: at once if possible, else through the
        next tick."""
        if not self._pending:
            return
        pending = self._journal_round(self._pending)
        self._pending = []
        if not pending:
            return
        deliver = self._deliver if self.settings.immediate else None
        with self._cond:
            queued = bool(self._outbox)
        # While older events wait for the tick, newer ones wait behind them: order is kept.
        if deliver is not None and not queued:
            try:
                sent = deliver(pending)
            except Exception as exc:  # pylint: disable=broad-except
                self.failures.note("deliver", "cannot fire events on the minion's bus: %s; "
                                   "they go through the beacon's tick", exc)
                sent = False
            if sent:
                self.delivered_immediately += sum(1 for item in pending if item["tag"] != "resync")
                return
            if sent is None:
                pass  # not now (Salt does not run the beacon): they wait for its next run
            else:
                self.failures.note("deliver", "the minion's bus did not take %d event(s); they "
                                   "go through the beacon's tick", len(pending))
        # Waiting for the tick, every overflow so far is one resync at the head of the outbox.
        lost = sum(item["lost"] for item in pending if _is_overflow(item))
        with self._cond:
            self._outbox.extend(item for item in pending if not _is_overflow(item))
        self._trim_outbox(lost)

    def _trim_outbox(self, lost: int = 0) -> None:
        """beacon() has not run for a long while: keep the newest ``queue_size`` events, and
        one ``overflow`` resync at the head that counts the others (and ``lost`` more)."""
        with self._cond:
            head = self._outbox[0] if self._outbox and _is_overflow(self._outbox[0]) else None
            body = self._outbox[1:] if head else self._outbox
            excess = max(0, len(body) - self.settings.queue_size)
            if excess + lost == 0:
                return
            del body[:excess]
            self.dropped += excess
            lost += excess + (head["lost"] if head else 0)
            self._outbox = [resync_data("overflow", lost), *body]
        self.last_resync = {"reason": "overflow", "lost": lost, "at": self._clock()}
        if not head:  # one overflow resync, however often it is trimmed again
            self.resyncs["overflow"] += 1


def _is_overflow(item: dict) -> bool:
    return item["tag"] == "resync" and item["reason"] == "overflow"
