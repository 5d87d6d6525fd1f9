"""When a decision taken now must be taken again later: the host's pending wake-up.

A grace or a restart back-off still running makes a reconcile or a sync answer "again in so
many seconds". The job that decided ends; the minion process, where the beacon runs for as long
as the minion does, keeps the wake-up and, when it falls due, fires a ``retry`` resync, which
the reactor answers with a full sync. Nothing here relies on a call that Salt may refuse or a
reconnect may drop (Salt's scheduler does both: after a reconnect it refuses to update any job
the minion had, as if the pillar owned it).

One wake-up per host is enough: a full sync decides every VM again and asks for its own
wake-up for whatever is still waiting. So the earliest one is kept, and a sync that started at
or after it answers it (``answered``). The times are the host's monotonic clock with its boot
id: the job writes them, the minion process reads them. A wake-up of another boot is due at
once: its time means nothing in this boot, and the host has rebooted since, which is a gap.

``Alarm`` is the beacon's side: it fires a due wake-up once, and again (after ``answer_wait``
seconds, doubling, at most ``retries`` times) while no sync has answered it, as the master
link's resync does (``vmpower.core.reconnect``).

Pure: the callers give the clock, the boot id and the wake-up they read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

ANSWER_WAIT = 5.0  # seconds a fired wake-up waits for its sync before it is fired again (doubling)
RETRIES = 5  # times an unanswered wake-up is fired again: 5, 15, 35, 75 and 155 s after the first


@dataclasses.dataclass(frozen=True)
class WakeUp:
    """A full sync is due at ``due`` on the monotonic clock of the boot ``boot_id``;
    ``asked`` is when it was asked for (same clock), which tells two equal dues apart."""

    due: float
    boot_id: str
    asked: float = 0.0

    def is_due(self, now: float, boot_id: str) -> bool:
        """Due at ``now`` in the boot ``boot_id`` (always, if asked in another boot)."""
        return self.boot_id != boot_id or now >= self.due

    def as_dict(self) -> dict:
        return {"due": self.due, "boot_id": self.boot_id, "asked": self.asked}


def from_dict(data: object) -> WakeUp | None:
    """A wake-up as ``as_dict`` wrote it, or None for anything else (a file of an older vmpower
    that held a wall-clock time, a torn or hand-edited one): such a file asks for nothing."""
    if not isinstance(data, Mapping):
        return None
    due, boot_id, asked = data.get("due"), data.get("boot_id"), data.get("asked", 0.0)
    if not isinstance(boot_id, str) or not boot_id:
        return None
    for value in (due, asked):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
    return WakeUp(float(due), boot_id, float(asked))


def keep(pending: WakeUp | None, asked: WakeUp | None, boot_id: str,
         answered_before: float | None = None) -> WakeUp | None:
    """The one wake-up to keep when ``asked`` comes while ``pending`` is kept, in the boot
    ``boot_id``: the one that falls due first.

    ``answered_before``: a full sync that started at that time (this boot's clock) ends, so a
    ``pending`` wake-up due by then is answered: that sync decided every VM after it, and
    ``asked`` is what it still waits for. A pending wake-up of another boot is due at once and
    comes first, unless a sync of this boot answered it.
    """
    if pending is not None and answered_before is not None and pending.is_due(answered_before, boot_id):
        pending = None
    if asked is None:
        return pending
    if pending is None:
        return asked
    if pending.boot_id != boot_id:
        return pending  # due at once
    return asked if asked.due < pending.due else pending


@dataclasses.dataclass
class Alarm:
    """The beacon's side of the pending wake-up: when to fire a ``retry`` resync for it."""

    answer_wait: float = ANSWER_WAIT
    retries: int = RETRIES
    pending: WakeUp | None = None  # the wake-up last read
    fired_at: float | None = None  # when a resync was last fired for it
    tries: int = 0  # times it was fired again
    fired: int = 0  # resyncs fired, in all
    given_up: int = 0  # wake-ups no sync answered, after every retry

    def seen(self, pending: WakeUp | None) -> None:
        """The wake-up kept now (None: none). A different one is a new one: the one fired
        before was answered (a sync dropped it) or replaced by an earlier one."""
        if pending != self.pending:
            self.pending = pending
            self.fired_at = None
            self.tries = 0

    def due(self, now: float, boot_id: str) -> bool:
        """True when a ``retry`` resync is to be fired now for the pending wake-up."""
        wake = self.pending
        if wake is None or not wake.is_due(now, boot_id):
            return False
        if self.fired_at is None:
            self.fired_at = now
            self.fired += 1
            return True
        if self.tries > self.retries:
            return False  # given up: only a new wake-up (or a sync answering it) changes that
        if now - self.fired_at < self.answer_wait * 2 ** self.tries:
            return False
        if self.tries == self.retries:
            self.tries += 1
            self.given_up += 1
            return False
        self.tries += 1
        self.fired_at = now
        self.fired += 1
        return True
