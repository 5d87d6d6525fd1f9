"""Storms of lifecycle events become one full sync.

A host that boots 500 autostart VMs fires about a thousand lifecycle events in a few seconds.
Reconciling them one by one costs the master a job each (and the host as many libvirt
connections and store transactions), when one sync of the whole host answers all of them in
one listing. So: once more than ``limit`` events arrive within one second, the events stop
being fired one by one; they are counted instead, and when the storm is over (``quiet``
seconds without an event) one ``resync`` (reason ``burst``) stands for all of them. A storm
that never calms down still gets a resync every ``longest`` seconds, so nothing waits
unbounded. Pure: the monotonic clock is passed in.
"""

from __future__ import annotations

import collections

WINDOW = 1.0  # seconds over which events are counted
QUIET = 1.0  # seconds without an event that end a burst
LONGEST = 30.0  # a burst that lasts this long is answered anyway, and counting starts anew


class BurstGuard:
    """Counts events per second; says which ones to fire and when a burst's resync is due.

    ``limit`` is the most events fired one by one within ``WINDOW``; 0 turns the guard off.
    """

    def __init__(self, limit: int, quiet: float = QUIET, longest: float = LONGEST):
        if limit < 0:
            raise ValueError(f"the burst limit must be at least 0, not {limit!r}")
        self.limit = limit
        self.quiet = quiet
        self.longest = longest
        self._recent: collections.deque[float] = collections.deque()
        self._started: float | None = None  # while in a burst: when it began
        self._last = 0.0
        self.swallowed = 0  # events of the current burst
        self.bursts = 0  # bursts so far

    @property
    def in_burst(self) -> bool:
        return self._started is not None

    def admit(self, now: float) -> bool:
        """An event at ``now``: True to fire it, False if it is part of a burst (counted)."""
        if self.limit == 0:
            return True
        if self._started is not None:
            self.swallowed += 1
            self._last = now
            return False
        self._recent.append(now)
        while self._recent and self._recent[0] <= now - WINDOW:
            self._recent.popleft()
        if len(self._recent) <= self.limit:
            return True
        self._started = self._last = now
        self.swallowed = 1
        self.bursts += 1
        return False

    def due(self, now: float) -> int | None:
        """If the burst is over by ``now``: how many events it swallowed (its resync is due)."""
        if self._started is None:
            return None
        if now - self._last < self.quiet and now - self._started < self.longest:
            return None
        swallowed, self.swallowed = self.swallowed, 0
        self._started = None
        self._recent.clear()
        return swallowed

    def next_due(self) -> float | None:
        """When the current burst's resync falls due if nothing else arrives, or None."""
        if self._started is None:
            return None
        return min(self._last + self.quiet, self._started + self.longest)
