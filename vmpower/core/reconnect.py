"""When a minion whose master came back asks for a resync: the master link's rules.

While the minion has no master, Salt drops every event it would forward. So once the link is
back, the beacon fires a ``master_reconnected`` resync, and the reactor answers it with a sync.
That resync, or the sync job answering it, can still be lost: the master may not be listening
yet, or the minion may not have re-authenticated with the master's new key, and it drops a job
it cannot read. Nothing in Salt retries either. So the resync counts as answered only once a
sync has started on this minion after it was asked; until then it is asked again,
``answer_wait`` seconds later, then twice that, at most ``retries`` times.

A link that flaps (a wrong ``publish_port`` makes ``status.master`` report the master gone every
``master_alive_interval``) would otherwise cost a full sync each time: at most one return is
announced per ``spacing`` seconds.

Pure: the caller gives the time and fires the resync when ``due`` says so. The time is the
host's monotonic clock, the same for every call: on the wall clock, a step back would hold the
next return's resync back for as long as the step.
"""

from __future__ import annotations

import dataclasses

SPACING = 10.0  # seconds between two announced returns of the master
# A resync fired the moment the minion has its master back is often lost (the minion is still
# signing in): asked again soon, so that the sync comes within stop_grace + 5 s of the return.
ANSWER_WAIT = 5.0  # seconds a resync waits for its sync before it is asked again (doubling)
RETRIES = 5  # times an unanswered resync is asked again: 5, 15, 35, 75 and 155 s after the first


@dataclasses.dataclass
class Reconnect:
    """The master link's resyncs: one per return (spaced), asked again until answered."""

    spacing: float = SPACING
    answer_wait: float = ANSWER_WAIT
    retries: int = RETRIES
    returned: bool = False  # the master came back, and no resync was asked for it yet
    asked_at: float | None = None  # when the unanswered resync was last asked
    since: float | None = None  # when it was first asked: a sync started since answers it
    tries: int = 0  # times the unanswered resync was asked again
    last_return: float | None = None  # when the last return was announced
    given_up: int = 0  # resyncs never answered, after every retry

    def back(self) -> None:
        """The minion has its master again."""
        self.returned = True

    def answered(self, sync_started: float) -> None:
        """A sync started on this minion at ``sync_started``: it answers a resync asked before."""
        if self.since is not None and sync_started >= self.since:
            self.asked_at = self.since = None
            self.tries = 0

    def due(self, now: float) -> bool:
        """True when a ``master_reconnected`` resync is to be fired now (the link is up)."""
        if self.returned:
            if self.last_return is not None and now - self.last_return < self.spacing:
                return False
            self.returned = False
            self.last_return = self.asked_at = self.since = now
            self.tries = 0
            return True
        if self.asked_at is None:
            return False
        if now - self.asked_at < self.answer_wait * 2 ** self.tries:
            return False
        if self.tries >= self.retries:
            self.asked_at = self.since = None
            self.tries = 0
            self.given_up += 1
            return False
        self.tries += 1
        self.asked_at = now
        return True
