"""The STOPPED grace: a stop is believed only once the domain has stayed stopped ``stop_grace`` s.

Nova waits 15 s before it acts on a STOPPED event, because a hard reboot is a STOPPED followed
at once by a STARTED, and acting on the first half would power off a machine that is coming
back. Here the wait is a pure piece: events go in with the time they happened on a monotonic
clock, and come out when their grace is over or never (a later event of the same domain
cancels it). The clock is injected, so the same object runs on the event thread with
``time.monotonic`` and in tests with a clock moved by hand.

The same ``stop_grace`` is applied by the decision rules to every other path (a sync that
finds a VM off for less than it waits too), see ``vmpower.core.rules``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from vmpower.core.model import Transition

E = TypeVar("E")


class StopGrace(Generic[E]):
    """Holds STOPPED events back; hands everything else through at once.

    ``seconds`` is the grace (0: no holding). ``clock`` is a monotonic clock in seconds.
    Events are opaque to it: ``offer`` is told the domain and the transition.
    """

    def __init__(self, seconds: float, clock: Callable[[], float]):
        if seconds < 0:
            raise ValueError(f"stop_grace must be at least 0, not {seconds!r}")
        self.seconds = float(seconds)
        self._clock = clock
        # uuid -> (when the grace ends, event), in the order the stops happened. The grace is
        # the same for every event, so that order is also the order in which they fall due.
        self._held: dict[str, tuple[float, E]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, uuid: str, transition: Transition, event: E,
              at: float | None = None) -> list[E]:
        """An event of domain ``uuid`` that happened at ``at`` (default: now).

        Returns what may be fired now, in order: the held stops that fell due before ``at``,
        then ``event`` itself unless it is a STOPPED to hold. Any transition of a domain
        cancels that domain's held STOPPED (a hard reboot is only its start).
        """
        out: list[E] = []
        self.offer_into(out, uuid, transition, event, self._clock() if at is None else at)
        return out

    def offer_into(self, out: list[E], uuid: str, transition: Transition, event: E, at: float) -> None:
        """``offer``, appending what may be fired now to ``out``: the caller that offers every
        event of a stream keeps one list for all of them."""
        held = self._held
        if held:  # else nothing to release or cancel: the path of most events
            out.extend(self.due(at))
            held.pop(uuid, None)
        if transition is Transition.STOPPED and self.seconds > 0:
            held[uuid] = (at + self.seconds, event)
        else:
            out.append(event)

    def due(self, now: float | None = None) -> list[E]:
        """The held stops whose grace is over by ``now`` (default: the clock), oldest first."""
        now = self._clock() if now is None else now
        out: list[E] = []
        while self._held:
            uuid, (ends, event) = next(iter(self._held.items()))
            if ends > now:
                break
            del self._held[uuid]
            out.append(event)
        return out

    def next_due(self) -> float | None:
        """When the next held stop falls due (on the clock), or None if nothing is held."""
        for ends, _event in self._held.values():
            return ends
        return None

    def drop(self) -> list[E]:
        """Forget every held stop (a full sync replaces them); returns what was held."""
        dropped = [event for _ends, event in self._held.values()]
        self._held.clear()
        return dropped

    def change(self, seconds: float) -> None:
        """A new grace, for the stops held from now on (held ones keep their end)."""
        if seconds < 0:
            raise ValueError(f"stop_grace must be at least 0, not {seconds!r}")
        self.seconds = float(seconds)

    def __iter__(self) -> Iterator[E]:
        return (event for _ends, event in self._held.values())
