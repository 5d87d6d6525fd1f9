"""libvirt's event loop in a Salt minion: one native thread per process, one watcher per beacon.

The ``vmpower`` beacon is a thin shell over this package. Salt re-imports the beacon's file on
every beacons refresh, closes and rebuilds the beacon around state runs, and never closes a
beacon configured in pillar. This package is imported the ordinary way, so its globals (the
event thread, the watchers, the sequence counter) live as long as the process, and every
rebuild of the beacon finds them again.

The parts, each readable alone:

- ``native``: libvirt's default event implementation and its one thread;
- ``watcher``: one connection's state machine on a thread of its own (connect, register,
  keepalive, reconnect with back-off, deregister, close: everything that can block), the
  translation of its events, the STOPPED grace (``vmpower.core.grace``), storms
  (``vmpower.core.burst``) and the journal of what it observed (``vmpower.journal``);
- ``delivery``: the immediate path through the minion's bus, and the master link's news;
- ``status``: the status file that ``vmpower.status`` reads in job processes;
- ``vmpower.wakeup``: the wake-up a job hands over (a decision due again later), which the
  status thread reads and, once due, has the watchers fire as a ``retry`` resync;
- ``config``: Salt's beacon configuration into the core's settings;
- ``vmpower.metrics.LiveWriter``: the live metrics file, when ``vmpower:metrics_file`` is set;
- this module: the process's watchers, one per beacon, and the thread that writes the status
  file and the metrics file, fires due wake-ups and closes the watchers of beacons Salt no
  longer runs.

``drain()`` and ``close()`` run on the minion's loop and only look up, swap and flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping

from vmpower import forksafe, hostinfo, wakeup
from vmpower.core.settings import DEFAULT_STOP_GRACE, BeaconSettings
from vmpower.core.wakeup import Alarm
from vmpower.eventloop import native
from vmpower.eventloop.delivery import MasterLink, MinionBus, beacon_live, masterless
from vmpower.eventloop.failures import Failures
from vmpower.eventloop.native import HAS_LIBVIRT, THREAD_NAME, ensure_running  # noqa: F401
from vmpower.eventloop.status import read_status, write_json
from vmpower.eventloop.watcher import Watcher, lifecycle_data, resync_data  # noqa: F401
from vmpower.journal import Journal, journal_path

log = logging.getLogger(__name__)

SUPERVISOR_EVERY = 1.0  # seconds between two status writes / idle checks
# Seconds a beacon run may be late before its watcher counts as dropped. Salt's loop stalls
# for seconds while the minion re-initialises after its master came back; closing the watcher
# then would be a gap in the watch, and no sync would believe a stop the beacon saw before it.
MIN_IDLE_SLACK = 30.0


class EventLoop:
    """The process's watchers, one per configured beacon, and the status file they share."""

    def __init__(self, monotonic=time.monotonic, boot_id=hostinfo.boot_id, clock=time.time):
        """``monotonic`` runs the idle checks and the wake-ups, in the boot ``boot_id()``;
        ``clock`` (the wall clock) only says to people when a wake-up is due."""
        self._monotonic = monotonic
        self._boot_id = boot_id()
        self._clock = clock
        self._wakeup_path: str | None = None
        self._wakeup_file: tuple | None = None  # what the file was when last read (stat)
        self._wakeup_due_at: float | None = None  # the pending wake-up on the wall clock
        self.alarm = Alarm()
        self._wakeup_lock = threading.Lock()
        self._lock = threading.Lock()
        self._watchers: dict[str, Watcher] = {}
        self._ticks: dict[str, float] = {}  # beacon name -> seconds between two of its runs
        self._opts_by_name: dict[str, Mapping] = {}  # beacon name -> its latest __opts__
        self._status_path: str | None = None
        self._opts: Mapping | None = None
        self._supervisor: threading.Thread | None = None
        self._master_link: MasterLink | None = None
        self._written: dict | None = None
        self.failures = Failures()
        self.metrics = None  # the LiveWriter, once a minion's beacon runs here (not in jobs)

    def watcher(self, settings: BeaconSettings, stop_grace: float = DEFAULT_STOP_GRACE,
                opts: Mapping | None = None) -> Watcher:
        """The watcher of the beacon ``settings.name``, created or reconfigured as needed."""
        with self._lock:
            current = self._watchers.get(settings.name)
            if current is not None and current.uri != settings.uri:
                current.retire()  # the beacon now watches another host: its queue belongs to the old one
                current = None
            if current is None:
                current = self._watchers[settings.name] = Watcher(
                    settings, stop_grace, deliver=self._delivery(settings, opts),
                    journal=self._journal(opts))
            else:
                current.configure(settings, stop_grace)
            return current

    @staticmethod
    def _journal(opts: Mapping | None) -> Journal | None:
        """The journal of the minion's observations, which its reconcile jobs read."""
        if opts is None or not opts.get("cachedir"):
            return None  # no minion around it (tests): nothing is journaled
        return Journal(journal_path(opts["cachedir"]))

    def _delivery(self, settings: BeaconSettings, opts: Mapping | None):
        if opts is None or masterless(opts) or "id" not in opts or "sock_dir" not in opts:
            return None  # no master to deliver to: the tick is the only path (tests, salt-call --local)
        self._ensure_master_link(opts)
        return MinionBus(opts, settings.name, beacons=self._beacons_announced)

    def _beacons_announced(self) -> Mapping | None:
        """The minion's beacons setting as Salt last announced a change to it, if it did."""
        link = self._master_link
        return link.beacons if link is not None else None

    def drain(self, settings: BeaconSettings, status_path: str, opts: Mapping | None = None,
              stop_grace: float = DEFAULT_STOP_GRACE) -> list[dict]:
        """What the beacon fires now (only what the immediate path could not deliver)."""
        watcher = self.watcher(settings, stop_grace, opts)
        if opts is not None:
            self._opts_by_name[settings.name] = opts
            if isinstance(watcher.deliver, MinionBus):
                watcher.deliver.opts = opts  # a beacons or pillar refresh gives the beacon new opts
        loop_interval = float((opts or {}).get("loop_interval") or 1)
        self._ticks[settings.name] = max(loop_interval, settings.interval)
        self._status_path = status_path
        if opts is not None and opts.get("cachedir"):
            self._wakeup_path = wakeup.wakeup_path(opts["cachedir"])
            if self.metrics is None and "id" in opts:
                # Imported here, on the thread that forks the jobs, never on the status thread:
                # a job forked while another thread imports a module hangs importing it.
                from vmpower.metrics import LiveWriter  # not imported by the jobs that import this

                self.metrics = LiveWriter(self._monotonic)
        self._ensure_supervisor()
        return watcher.drain()

    def generation(self, name: str) -> int:
        """How many times the watcher of the beacon ``name`` has connected (0 without one)."""
        watcher = self._watchers.get(name)
        return watcher.generation if watcher is not None else 0

    def close(self, name: str, status_path: str) -> None:
        """Salt closes the beacon ``name``: its watcher disconnects until the next drain."""
        self._status_path = status_path
        watcher = self._watchers.get(name)
        if watcher is not None:
            watcher.close()

    # vmpower's threads besides the watchers'.
    def _ensure_supervisor(self) -> None:
        with self._lock:
            if self._supervisor is None or not self._supervisor.is_alive():
                self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                    name="vmpower-status")
                self._supervisor.start()

    def _ensure_master_link(self, opts: Mapping) -> None:
        if self._master_link is None or not self._master_link.is_alive():
            self._master_link = MasterLink(opts, self._master_reconnected, self.failures)
            self._master_link.start()

    def _master_reconnected(self) -> None:
        for watcher in list(self._watchers.values()):
            watcher.master_reconnected()

    def _supervise(self) -> None:
        while True:
            time.sleep(SUPERVISOR_EVERY)
            try:
                self.close_idle()
                self.wake_up_if_due()
                if self._status_path:
                    self.write_status(self._status_path)
                self.write_metrics()
            except Exception as exc:  # pylint: disable=broad-except
                self.failures.note("status", "the event loop's status thread failed: %s", exc)

    def close_idle(self) -> None:
        """Close the watchers whose beacon Salt stopped running (removed from config or pillar,
        or disabled): a beacon runs every tick, so one missed tick and some slack says so."""
        now = self._monotonic()
        for name, watcher in list(self._watchers.items()):
            if watcher.state == "closed":
                continue
            tick = self._ticks.get(name, 1.0)
            opts = self._opts_by_name.get(name)
            # Disabled or deleted through Salt: seen at once in the minion's own settings.
            gone = opts is not None and not beacon_live(opts, name, self._beacons_announced())
            idle = now - watcher.last_drain
            if gone or idle > tick + max(tick, MIN_IDLE_SLACK):
                log.info("vmpower: the beacon %s no longer runs (%s); closing its libvirt "
                         "connection", name, "disabled or deleted" if gone else
                         f"not run for {idle:.1f} s, every {tick:g} s before")
                watcher.close()

    def wake_up_if_due(self) -> bool:
        """Read the wake-up jobs handed over (once it changed) and, when it is due, have every
        watcher fire a ``retry`` resync; True when they were told to. While the minion knows
        its master is away, a due wake-up waits: Salt would drop the resync, and the master's
        return brings a resync of its own."""
        path = self._wakeup_path
        if path is None:
            return False
        with self._wakeup_lock:
            self.alarm.seen(self._read_wakeup(path))
            link = self._master_link
            if link is not None and link.connected is False:
                return False
            watchers = [w for w in list(self._watchers.values()) if w.state != "retired"]
            if not watchers or not self.alarm.due(self._monotonic(), self._boot_id):
                return False
        log.info("vmpower: a decision taken earlier is due again: firing a retry resync%s",
                 f" (again, {self.alarm.tries} of {self.alarm.retries}: no sync answered)"
                 if self.alarm.tries else "")
        for watcher in watchers:
            watcher.wake_up()
        return True

    def _read_wakeup(self, path: str):
        """The pending wake-up at ``path``, read again only when the file changed."""
        try:
            stat = os.stat(path)
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        except OSError as exc:
            self.failures.note("wakeup", "cannot read the wake-up at %s: %s", path, exc)
            return self.alarm.pending
        if seen == self._wakeup_file:
            return self.alarm.pending
        self._wakeup_file = seen
        pending = wakeup.read(path) if seen is not None else None
        if pending != self.alarm.pending:
            self._wakeup_due_at = None if pending is None else (
                self._clock() + max(0.0, pending.due - self._monotonic())
                if pending.boot_id == self._boot_id else self._clock())
        return pending

    def write_metrics(self) -> bool:
        """Write the live metrics file if it is due (``LiveWriter``); True when it was."""
        opts = next(iter(self._opts_by_name.values()), None)
        if opts is None or self.metrics is None:
            return False  # no minion around the beacon (tests): nothing to write for
        status = self.status()
        with (forksafe.no_fork_inside() if self.metrics.reads_sqlite else contextlib.nullcontext()):
            return self.metrics.tick(opts, status)

    # Health.
    def status(self) -> dict:
        """The health of the event thread, of every watcher and of the master link."""
        link = self._master_link
        return {"pid": os.getpid(), "thread_alive": native.thread_alive(),
                "loop_errors": native.loop_errors, "failures": self.failures.counts(),
                "master": link.health() if link is not None else None,
                "wakeup": {"pending": self.alarm.pending is not None, "due_at": self._wakeup_due_at,
                           "fired": self.alarm.fired, "unanswered": self.alarm.given_up},
                "stuck": any(w.health()["stuck"] for w in self._watchers.values()),
                "metrics": self.metrics.health() if self.metrics is not None else None,
                "watchers": {name: watcher.health() for name, watcher in self._watchers.items()}}

    def write_status(self, path: str) -> None:
        """Write ``status()`` to ``path`` (atomically) if it changed since the last write."""
        snapshot = self.status()
        if snapshot == self._written:
            return
        try:
            write_json(path, {**snapshot, "updated_at": time.time()})
        except OSError as exc:  # health reporting must not stop the events
            self.failures.note("status", "cannot write the event loop status to %s: %s", path, exc)
            return
        self.failures.forget("status")
        self._written = snapshot


__all__ = ["HAS_LIBVIRT", "EventLoop", "Watcher", "ensure_running", "event_loop", "read_status"]

_event_loop = EventLoop()


def event_loop() -> EventLoop:
    """This process's EventLoop (a module global, so it outlives re-imports of the beacon)."""
    return _event_loop
