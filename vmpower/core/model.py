"""The vocabulary: power, VM and task states, lifecycle transitions, events and records."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import NamedTuple


class PowerState(str, enum.Enum):
    """What the hypervisor says a domain is doing (Nova's power_state)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    SUSPENDED = "suspended"

    @property
    def is_off(self) -> bool:
        return self in OFF


# The one spelling of "off": a domain that exists but does not run (shut off, or crashed)...
OFF = frozenset({PowerState.SHUTDOWN, PowerState.CRASHED})
# ...and "off or gone": also a domain libvirt no longer knows, or has no state for.
OFF_OR_GONE = OFF | {PowerState.NOSTATE}


class VmState(str, enum.Enum):
    """What the VM is meant to be doing (Nova's vm_state)."""

    ACTIVE = "active"
    STOPPED = "stopped"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    BUILDING = "building"
    RESCUED = "rescued"
    RESIZED = "resized"
    ERROR = "error"
    SHELVED = "shelved"
    DELETED = "deleted"


class Transition(str, enum.Enum):
    """A lifecycle change as published on the Salt bus."""

    STARTED = "started"
    STOPPED = "stopped"
    PAUSED = "paused"
    RESUMED = "resumed"
    SUSPENDED = "suspended"
    CRASHED = "crashed"


class Cause(str, enum.Enum):
    """What made vmpower look at a VM; every audit entry names one."""

    EVENT = "event"
    SYNC = "sync"
    API = "api"
    STATE = "state"


# Task states vmpower sets itself while one of its own operations runs.
TASK_POWERING_OFF = "powering-off"
TASK_POWERING_ON = "powering-on"


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened at ``timestamp`` (epoch seconds)."""

    timestamp: float


@dataclasses.dataclass(frozen=True)
class InstanceEvent(Event):
    """Something that happened to one domain."""

    uuid: str
    name: str


@dataclasses.dataclass(frozen=True)
class LifecycleEvent(InstanceEvent):
    """A libvirt lifecycle callback, translated.

    ``libvirt_event`` and ``libvirt_detail`` keep libvirt's own names (``STOPPED``,
    ``SHUTDOWN``...) so an operator can match them against libvirt's documentation.
    """

    transition: Transition
    reason: str
    libvirt_event: str
    libvirt_detail: str


@dataclasses.dataclass(frozen=True)
class LiveState:
    """A domain's state as read from libvirt just now.

    ``reason`` is libvirt's state reason in words (``shutdown``, ``crashed``, ``destroyed``...):
    it tells a guest shutdown from a crash when both read as power ``shutdown``.
    """

    power_state: PowerState
    reason: str = "unknown"

    @property
    def is_crash(self) -> bool:
        return self.power_state is PowerState.CRASHED or self.reason in ("crashed", "failed")


class UnknownValue(str):
    """A stored ``vm_state`` or ``power_state`` that this version of vmpower does not know: a
    newer version wrote it into a store they share, or someone edited the record by hand.

    Kept as it was read, so it is shown as it is (``.value``, as the enums have) and never
    mistaken for a state this version knows; a record holding one is left alone
    (``rules.unknown_values``).
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str(self)


def stored_state(states: dict, value):
    """The member of ``states`` (a map from value to enum member) stored as ``value``, or an
    ``UnknownValue``."""
    member = states.get(value)
    return member if member is not None else UnknownValue(value)


# What each vm_state expects of the hypervisor (by value): a record whose power_state is not
# among them disagrees with it. A vm_state missing here (building, error...) expects nothing.
EXPECTED_POWER = {
    "active": {"running"},
    "stopped": {"shutdown", "crashed", "nostate"},
    "paused": {"paused"},
    "suspended": {"suspended", "shutdown"},
    "deleted": {"nostate", "shutdown"},
}


def drifting(vm_state, power_state) -> bool:
    """Whether a recorded intent (``vm_state``) and power state disagree (enums or values)."""
    expected = EXPECTED_POWER.get(getattr(vm_state, "value", vm_state))
    return expected is not None and getattr(power_state, "value", power_state) not in expected


# The live state of a domain libvirt no longer knows (undefined, or gone with its host).
GONE = LiveState(PowerState.NOSTATE, "undefined")


class Record(NamedTuple):
    """What vmpower has recorded about one domain.

    ``restart_count`` and ``last_restart_at`` carry the restart back-off of a VM pinned
    ``active``; they are reset when the VM is started on purpose. ``last_restart_at`` is the
    host's ``time.monotonic()`` at the last automatic restart (a wall clock stepped back would
    stretch the back-off).

    ``off_since`` is the host's ``time.monotonic()`` when vmpower first saw the domain off
    (0.0 while it runs, or when unknown); ``boot_id`` is the host's boot id
    (``/proc/sys/kernel/random/boot_id``) when ``power_state``/``off_since`` (and
    ``last_restart_at``) were last written, so a monotonic value from another boot or host is
    never trusted. ``task_owner`` says who
    set a vmpower ``task_state``: a JSON text ``{"host", "boot_id", "pid", "start_time",
    "since"}`` (``vmpower.hostinfo``), "" for none. ``off_reason`` is why vmpower believes the
    domain went off, when libvirt's state cannot say it later: ``host_shutdown`` (the host
    asked: libvirt-guests, ``virsh shutdown``, a reboot), ``not_seen`` (it went off while
    nothing watched, and libvirt no longer says why: it may run elsewhere), "" otherwise.
    ``drift_since`` is when (wall clock, for people and metrics only: no rule reads it) the
    record began to disagree with its power state (``drifting``), 0.0 while they agree; kept
    by ``updated``, the one place a record changes. Read from a store, a
    ``vm_state`` or ``power_state`` this version does not know is an ``UnknownValue``, and a
    record with any unknown value is left alone (``rules.unknown_values``). A tuple, because a sync
    reads one per domain of the host, and a tuple is several times cheaper to build than a
    frozen dataclass.
    """

    uuid: str
    name: str
    host: str
    vm_state: VmState
    power_state: PowerState
    task_state: str = ""
    updated_at: float = 0.0
    version: int = 0
    restart_count: int = 0
    last_restart_at: float = 0.0
    off_since: float = 0.0
    boot_id: str = ""
    task_owner: str = ""
    off_reason: str = ""
    drift_since: float = 0.0

    def replace(self, **changes) -> Record:
        return self._replace(**changes)

    def updated(self, at: float, **changes) -> Record:
        """The next version of this record, written at ``at``: the one place a version is
        bumped, and where ``drift_since`` is kept (a drift goes on from when it began)."""
        after = self._replace(**changes, version=self.version + 1, updated_at=at)
        if not drifting(after.vm_state, after.power_state):
            since = 0.0
        elif drifting(self.vm_state, self.power_state) and self.drift_since:
            since = self.drift_since
        else:
            since = at
        return after._replace(drift_since=since)


def now() -> float:
    """Wall-clock epoch seconds; the one clock records and events use."""
    return time.time()


def parse_enum(enum_type, value, what: str):
    """``enum_type(value)`` with an error that names ``what`` and the allowed values."""
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise ValueError(f"{what} must be one of {allowed}, not {value!r}") from None
