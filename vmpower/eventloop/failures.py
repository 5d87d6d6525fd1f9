"""Failures of vmpower's threads: counted by kind, logged once per kind.

The event thread and the watchers' threads fail in a few ways that repeat (libvirtd not up,
the minion's bus not reachable, a status file that cannot be written). Each kind is logged at
WARNING the first time and at DEBUG afterwards, so a long outage is one line in the minion's
log, and every occurrence is counted for ``vmpower.status``.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("vmpower.eventloop")


class Failures:
    """Counts per kind; ``note(kind, message, ...)`` logs the first of each kind as a warning."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._logged: set = set()
        self.last: str | None = None

    def note(self, kind: str, message: str, *args) -> None:
        with self._lock:
            first = kind not in self._logged
            self._logged.add(kind)
            self._counts[kind] = self._counts.get(kind, 0) + 1
            self.last = f"{kind}: {message % args if args else message}"
        log.log(logging.WARNING if first else logging.DEBUG, "vmpower: " + message, *args)

    def forget(self, kind: str) -> None:
        """The trouble of ``kind`` is over: its next occurrence is logged again."""
        with self._lock:
            self._logged.discard(kind)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
