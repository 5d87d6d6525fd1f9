"""The minion's own event bus: the immediate path to the master, and news of the master link.

Immediate path: an event is fired on the minion's local bus with the tag ``fire_master``, the
way ``event.send`` does it; the minion forwards it to its master at once, as it forwards the
events ``beacon()`` returns, under the same tags (``salt/beacon/<id>/<beacon>/<tail>``) and
with the same data (``id`` added), so that nothing on the master can tell the two paths apart.

Master link: the minion announces on its own bus when it loses its master and when it has it
back (``__master_disconnected`` / ``__master_connected``, fired by ``status.master`` every
``master_alive_interval`` seconds; Salt 3006 and 3008 alike; or, after a loss, the minion
signing in again: ``salt/auth/creds``). While the link is down the
minion drops every event it would forward, beacon events included; so when it comes back every
watcher fires a ``master_reconnected`` resync, and the reactor's sync catches up. Each sync
announces on the minion's bus that it started (``SYNC_STARTED``); a resync no sync answered is
fired again (``vmpower.core.reconnect`` says when). Those times run on the host's monotonic
clock (a sync's start comes from another process: with the boot id, so a time of another boot
is never compared), never on the wall clock, which NTP or a person may step back.

Beacon management: ``beacons.disable_beacon`` and its kin change the minion's ``beacons``
setting, which a beacon's ``__opts__`` may not share (Salt 3006's loader works on a deep copy),
and announce the new setting on the minion's bus. The same listener keeps the latest one, so a
disabled beacon's events stop at once on every release.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from vmpower import hostinfo
from vmpower.core.reconnect import Reconnect
from vmpower.eventloop.failures import Failures

log = logging.getLogger("vmpower.eventloop")

MASTER_CONNECTED = "__master_connected"
MASTER_DISCONNECTED = "__master_disconnected"
# The minion signed in to its master (``auth_events``, on by default). Salt 3006.29 reconnects a
# minion that lost its master by signing in again, and fires no __master_connected then.
AUTHENTICATED = "salt/auth/creds"
LISTEN_WAIT = 1.0  # seconds a read of the bus waits
# What Salt fires on the minion's bus once it changed the minion's ``beacons`` setting; each
# carries the whole new setting as ``beacons`` (salt/beacons/__init__.py, 3006 and 3008).
BEACONS_CHANGED = tuple(f"/salt/minion/minion_{what}_complete" for what in (
    "beacon_add", "beacon_modify", "beacon_delete", "beacon_enabled", "beacon_disabled",
    "beacons_enabled", "beacons_disabled", "beacon_reset"))
# What ``vmpower.sync`` fires on the minion's own bus (never forwarded to the master) as it
# starts (``sync_started()``): it answers a master_reconnected resync.
SYNC_STARTED = "vmpower/sync/started"


def sync_started(boot_id: str, monotonic: float, wall: float) -> dict:
    """The data of ``SYNC_STARTED``: when the sync started on the host's monotonic clock, in
    the boot ``boot_id``, and on the wall clock (``started``, for people)."""
    return {"monotonic": monotonic, "boot_id": boot_id, "started": wall}


def masterless(opts: Mapping) -> bool:
    """True when this minion has no master to fire events to (as ``event.fire_master`` says)."""
    return bool((opts.get("local") or opts.get("file_client") == "local")
                and not opts.get("use_master_when_local"))


def beacon_events(opts: Mapping, beacon_name: str, items: list[dict]) -> list[dict]:
    """Beacon data as Salt's beacon runner makes it: the full tag, and the minion's id added."""
    out = []
    for item in items:
        data = dict(item)
        tag = f"salt/beacon/{opts['id']}/{beacon_name}/{data.pop('tag', '')}"
        data.setdefault("id", opts["id"])
        out.append({"tag": tag, "data": data})
    return out


def beacon_live(opts: Mapping, name: str, beacons: Mapping | None = None) -> bool:
    """False once Salt was told to stop running the beacon ``name`` (``beacons.disable``,
    ``beacons.disable_beacon``, ``beacons.delete``), as the minion's ``beacons`` setting says:
    ``beacons`` when given (the latest one Salt announced), else the one in ``opts``. A beacon
    configured in pillar is not in that setting at all; for it (and for a pillar that no
    longer names it) the idle check is what notices."""
    beacons = opts.get("beacons") if beacons is None else beacons
    if not isinstance(beacons, Mapping):
        return True
    if beacons.get("enabled") is False:
        return False
    config = beacons.get(name)
    if config is None:
        pillar = (opts.get("pillar") or {}).get("beacons") or {}
        return name in pillar  # neither in config nor in pillar: deleted
    items = config if isinstance(config, (list, tuple)) else [config]
    return not any(isinstance(item, Mapping) and item.get("enabled") is False for item in items)


class MinionBus:
    """Fires one beacon's events at the master through the minion's bus (one per thread)."""

    def __init__(self, opts: Mapping, beacon_name: str,
                 beacons: Callable[[], Mapping | None] = lambda: None):
        self.opts = opts  # the beacon's latest __opts__ (EventLoop.drain keeps it current)
        self._beacon_name = beacon_name
        self._beacons = beacons  # the latest beacons setting Salt announced, if any
        self._event = None

    def __call__(self, items: list[dict]) -> bool | None:
        """True: fired; False: the bus refused; None: not now (the beacon is disabled)."""
        import salt.utils.event

        if not beacon_live(self.opts, self._beacon_name, self._beacons()):
            return None  # Salt no longer runs the beacon: its events wait for its next run
        if self._event is None:
            self._event = salt.utils.event.get_event("minion", opts=dict(self.opts), listen=False)
        events = beacon_events(self.opts, self._beacon_name, items)
        sent = self._event.fire_event({"data": None, "tag": None, "events": events, "pretag": None},
                                      "fire_master")
        if not sent:
            self.close()  # connect again next time
        return bool(sent)

    def close(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            try:
                event.destroy()
            except Exception:  # noqa: S110 (pylint: disable=broad-except)
                pass


class MasterLink(threading.Thread):
    """Listens on the minion's bus for the master link's news (``on_back()`` when it is back,
    and again while no sync answered), and for the minion's beacons setting as Salt changes
    it (``beacons``)."""

    def __init__(self, opts: Mapping, on_back: Callable[[], None], failures: Failures,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 boot_id: Callable[[], str] = hostinfo.boot_id):
        """``clock`` (the wall clock) only stamps what people read (``changed_at``); the
        resyncs' spacing and retries run on ``monotonic``, in the boot ``boot_id``."""
        super().__init__(name="vmpower-master-link", daemon=True)
        self._opts = dict(opts)
        self._on_back = on_back
        self._failures = failures
        self.connected: bool | None = None  # None: nothing heard yet (the minion says nothing
        self.changed_at: float | None = None  # while all is well)
        self.reconnections = 0
        self._clock = clock
        self._monotonic = monotonic
        self._boot_id = boot_id()
        self.resyncs = Reconnect()
        self.beacons: Mapping | None = None  # None: Salt has not changed the setting since

    def run(self) -> None:
        import salt.utils.event

        while True:
            try:
                with salt.utils.event.get_event("minion", opts=self._opts, listen=True) as bus:
                    while True:
                        event = bus.get_event(wait=LISTEN_WAIT, full=True)
                        if event:
                            self._heard(event.get("tag", ""), event.get("data"))
                        self._announce()
            except Exception as exc:  # pylint: disable=broad-except
                self._failures.note("master_link", "cannot listen on the minion's bus for the "
                                    "master's comings and goings: %s", exc)
                time.sleep(5)

    def _heard(self, tag: str, data=None) -> None:
        """One event of the minion's bus, heard now."""
        at = self._clock()
        if tag in BEACONS_CHANGED:
            if isinstance(data, Mapping) and isinstance(data.get("beacons"), Mapping):
                self.beacons = data["beacons"]
        elif tag == SYNC_STARTED:
            started = self._sync_started(data)
            if started is not None:
                self.resyncs.answered(started)
        elif tag.startswith(MASTER_DISCONNECTED):
            if self.connected is not False:
                log.info("vmpower: the minion lost its master; events fired meanwhile are "
                         "dropped by Salt, a resync follows its return")
                self.connected, self.changed_at = False, at
        elif tag.startswith(MASTER_CONNECTED) or (tag == AUTHENTICATED and self.connected is False):
            if self.connected is False:
                self.connected, self.changed_at = True, at
                self.reconnections += 1
                self.resyncs.back()
            else:
                self.connected = True

    def _sync_started(self, data) -> float | None:
        """When a sync started, on this host's monotonic clock; None when it cannot be told (a
        time of another boot, or an announcement without one, as an older vmpower makes it):
        such a sync answers nothing, and the resync is asked again."""
        if not isinstance(data, Mapping) or data.get("boot_id") != self._boot_id:
            return None
        started = data.get("monotonic")
        if isinstance(started, bool) or not isinstance(started, (int, float)):
            return None
        return float(started)

    def _announce(self) -> None:
        if self.connected is True and self.resyncs.due(self._monotonic()):
            if self.resyncs.tries:
                log.info("vmpower: no sync answered the master_reconnected resync yet; asking "
                         "again (%d of %d)", self.resyncs.tries, self.resyncs.retries)
            self._on_back()

    def health(self) -> dict:
        return {"connected": self.connected, "since": self.changed_at,
                "reconnections": self.reconnections, "listening": self.is_alive(),
                "resyncs_unanswered": self.resyncs.given_up}
