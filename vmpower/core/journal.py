"""What this host's own beacon observed, and which of an event's claims to believe.

A lifecycle event on the Salt bus is only a trigger: Salt does not authenticate the minion id in
a beacon's tag, so any minion can fire one in another's name, and anyone can type
``vmpower.reconcile <uuid> transition=stopped reason=host_shutdown``. What a reconcile decides
on is what this host's beacon wrote in its journal when it fired the event (the transition,
libvirt's reason, and when libvirt called back on the host's monotonic clock), found by the
event's ``seq``. An event whose ``seq`` the journal does not hold as this host's latest
observation of that domain, in this boot, on this libvirt URI, with no gap in the beacon's
watch since, is believed in nothing: vmpower re-checks the live state, with the grace.

The beacon also journals every gap in its watch (a connection made or lost, the beacon closed
by Salt, events dropped or coalesced): an observation from before a gap may have been followed
by changes the beacon missed, so it is not believed either.
"""

from __future__ import annotations

import dataclasses

from vmpower.core.model import Transition

# The transition of a journal row that marks a gap in the beacon's watch (its reason says
# which: connected, reconnected, restarted, overflow, burst); such a row names no domain.
GAP = "gap"


@dataclasses.dataclass(frozen=True)
class Observation:
    """One row of the journal: a lifecycle event the beacon fired, or a gap (``uuid`` "").

    ``monotonic`` is when libvirt called back (a STOPPED is fired ``stop_grace`` later, with
    this time), on the host's monotonic clock in the boot ``boot_id``; ``timestamp`` is the
    same moment on the wall clock, for people.
    """

    seq: int
    boot_id: str
    uri: str
    uuid: str
    transition: Transition | str
    reason: str
    monotonic: float
    timestamp: float

    @property
    def is_gap(self) -> bool:
        return self.transition == GAP


@dataclasses.dataclass(frozen=True)
class Belief:
    """What a reconcile may take from an event: the ``observation`` it believes (None: none),
    and ``why`` not, in words, when it believes nothing."""

    observation: Observation | None
    why: str = ""


def believe(seq: int | None, uuid: str, entry: Observation | None, later: Observation | None,
            boot_id: str, uri: str, clock: float) -> Belief:
    """Which observation of this host a reconcile of ``uuid`` for the event ``seq`` decides on.

    ``entry`` is the journal's row ``seq`` (None: there is none); ``later`` is its first row
    after ``seq`` for that domain, or a gap, on the same URI in the same boot (None: there is
    none). ``boot_id``, ``uri`` and ``clock`` are this host's boot id, the libvirt URI the
    reconcile reads and its monotonic clock now.
    """
    if seq is None:
        return Belief(None, "no seq: not an event this host's beacon fired")
    if entry is None:
        return Belief(None, f"seq {seq} is not in this host's journal of observed events")
    if entry.is_gap or entry.uuid != uuid:
        return Belief(None, f"seq {seq} was not observed for this domain")
    if not boot_id or entry.boot_id != boot_id:
        return Belief(None, f"seq {seq} was observed in another boot of this host")
    if entry.uri != uri:
        return Belief(None, f"seq {seq} was observed on {entry.uri}, not {uri}")
    if entry.monotonic > clock:
        return Belief(None, f"seq {seq} is stamped later than this host's clock now")
    if later is not None:
        what = (f"a gap in the beacon's watch ({later.reason})" if later.is_gap
                else f"a later event of this domain ({_word(later.transition)}, seq {later.seq})")
        return Belief(None, f"seq {seq} is not this host's latest word on it: {what} came after")
    return Belief(entry)


def _word(transition: Transition | str) -> str:
    return transition.value if isinstance(transition, Transition) else transition


def seen_at(latest: Observation | None, boot_id: str, uri: str) -> float:
    """When this host's beacon last saw anything of the domain (``latest``, its last journal
    row) in this boot, on this URI, on the monotonic clock; 0.0 when it saw nothing."""
    if latest is None or latest.boot_id != boot_id or latest.uri != uri:
        return 0.0
    return latest.monotonic


def seen_off(latest: Observation | None, gap_after: bool, boot_id: str, uri: str) -> str:
    """libvirt's reason for the domain's going off as this host's beacon saw it, or "".

    ``latest`` is the journal's last row for the domain and ``gap_after`` whether a gap in the
    beacon's watch came after it. Only a stop or crash seen in this boot, on this URI, with
    nothing missed since, counts: anything else may have been followed by what no one saw.
    """
    if latest is None or gap_after or latest.boot_id != boot_id or latest.uri != uri:
        return ""
    if latest.transition not in (Transition.STOPPED, Transition.CRASHED):
        return ""
    return latest.reason
