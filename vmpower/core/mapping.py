"""libvirt's numbers in vmpower's words: lifecycle events to transitions, domain states to power states.

libvirt's enum values are part of its stable public API, so they are written here as numbers
and this module needs no libvirt import; a test checks them against the real bindings.
"""

from __future__ import annotations

import dataclasses
import functools

from vmpower.core.model import OFF_OR_GONE, LiveState, PowerState, Transition

# virDomainEventType -> (libvirt's name, transition or None, {detail: (detail name, reason)}).
# A None transition is an event that changes no power state (DEFINED, UNDEFINED) or only
# announces one (SHUTDOWN comes before STOPPED and only colours its reason).
LIFECYCLE_EVENTS: dict[int, tuple[str, Transition | None, dict[int, tuple[str, str]]]] = {
    0: ("DEFINED", None, {0: ("ADDED", "added"), 1: ("UPDATED", "updated"),
                          2: ("RENAMED", "renamed"), 3: ("FROM_SNAPSHOT", "from_snapshot")}),
    1: ("UNDEFINED", None, {0: ("REMOVED", "removed"), 1: ("RENAMED", "renamed")}),
    2: ("STARTED", Transition.STARTED, {
        0: ("BOOTED", "booted"), 1: ("MIGRATED", "migrated"), 2: ("RESTORED", "restored"),
        3: ("FROM_SNAPSHOT", "from_snapshot"), 4: ("WAKEUP", "wakeup")}),
    3: ("SUSPENDED", Transition.PAUSED, {
        0: ("PAUSED", "paused"), 1: ("MIGRATED", "migrated"), 2: ("IOERROR", "ioerror"),
        3: ("WATCHDOG", "watchdog"), 4: ("RESTORED", "restored"),
        5: ("FROM_SNAPSHOT", "from_snapshot"), 6: ("API_ERROR", "api_error"),
        7: ("POSTCOPY", "postcopy"), 8: ("POSTCOPY_FAILED", "postcopy_failed")}),
    4: ("RESUMED", Transition.RESUMED, {
        0: ("UNPAUSED", "unpaused"), 1: ("MIGRATED", "migrated"),
        2: ("FROM_SNAPSHOT", "from_snapshot"), 3: ("POSTCOPY", "postcopy"),
        4: ("POSTCOPY_FAILED", "postcopy_failed")}),
    5: ("STOPPED", Transition.STOPPED, {
        0: ("SHUTDOWN", "guest_shutdown"), 1: ("DESTROYED", "destroyed"),
        2: ("CRASHED", "crashed"), 3: ("MIGRATED", "migrated"), 4: ("SAVED", "saved"),
        5: ("FAILED", "failed"), 6: ("FROM_SNAPSHOT", "from_snapshot")}),
    6: ("SHUTDOWN", None, {0: ("FINISHED", "finished"), 1: ("GUEST", "guest_shutdown"),
                           2: ("HOST", "host_shutdown")}),
    7: ("PMSUSPENDED", Transition.SUSPENDED, {0: ("MEMORY", "memory"), 1: ("DISK", "disk")}),
    8: ("CRASHED", Transition.CRASHED, {0: ("PANICKED", "panicked"),
                                        1: ("CRASHLOADED", "crashloaded")}),
}
EVENT_STARTED = 2
EVENT_SHUTDOWN = 6
EVENT_STOPPED = 5
DETAIL_STOPPED_SHUTDOWN = 0
DETAIL_SHUTDOWN_HOST = 2

# virDomainState -> (power state, {state reason: reason word}).
DOMAIN_STATES: dict[int, tuple[PowerState, dict[int, str]]] = {
    0: (PowerState.NOSTATE, {0: "unknown"}),
    1: (PowerState.RUNNING, {
        0: "unknown", 1: "booted", 2: "migrated", 3: "restored", 4: "from_snapshot",
        5: "unpaused", 6: "migration_canceled", 7: "save_canceled", 8: "wakeup",
        9: "crashed", 10: "postcopy", 11: "postcopy_failed"}),
    2: (PowerState.RUNNING, {0: "blocked"}),
    3: (PowerState.PAUSED, {
        0: "unknown", 1: "user", 2: "migration", 3: "save", 4: "dump", 5: "ioerror",
        6: "watchdog", 7: "from_snapshot", 8: "shutting_down", 9: "snapshot", 10: "crashed",
        11: "starting_up", 12: "postcopy", 13: "postcopy_failed"}),
    4: (PowerState.SHUTDOWN, {0: "unknown", 1: "user"}),
    5: (PowerState.SHUTDOWN, {
        0: "unknown", 1: "shutdown", 2: "destroyed", 3: "crashed", 4: "migrated", 5: "saved",
        6: "failed", 7: "from_snapshot", 8: "daemon"}),
    6: (PowerState.CRASHED, {0: "unknown", 1: "panicked"}),
    7: (PowerState.SUSPENDED, {0: "unknown"}),
}

# The power states a domain may be in right after each transition; an event whose domain is
# no longer in one of them is stale.
EXPECTED_POWER: dict[Transition, frozenset] = {
    Transition.STARTED: frozenset({PowerState.RUNNING}),
    Transition.RESUMED: frozenset({PowerState.RUNNING}),
    Transition.PAUSED: frozenset({PowerState.PAUSED}),
    Transition.SUSPENDED: frozenset({PowerState.SUSPENDED}),
    Transition.STOPPED: OFF_OR_GONE,
    Transition.CRASHED: OFF_OR_GONE,
}


@dataclasses.dataclass(frozen=True)
class Translation:
    """One libvirt callback in vmpower's words; ``transition`` is None when it is not one."""

    transition: Transition | None
    reason: str
    libvirt_event: str
    libvirt_detail: str


@functools.cache
def live_state(state: int, reason: int) -> LiveState:
    """Map libvirt's ``(state, reason)`` pair, as ``virDomainGetState`` gives it.

    Memoised (the pairs are few and LiveState is immutable): a sync maps every domain.
    """
    power, reasons = DOMAIN_STATES.get(state, (PowerState.NOSTATE, {}))
    return LiveState(power, reasons.get(reason, "unknown"))


def translate_lifecycle(event: int, detail: int, shutdown_detail: int | None = None) -> Translation:
    """Translate one ``VIR_DOMAIN_EVENT_ID_LIFECYCLE`` callback.

    ``shutdown_detail`` is the detail of the SHUTDOWN event libvirt sent just before a
    STOPPED/SHUTDOWN one, if any: it tells a host-requested shutdown from the guest's own.
    Values libvirt may add later come through as ``UNKNOWN_<n>`` rather than failing.
    """
    name, transition, details = LIFECYCLE_EVENTS.get(event, (f"UNKNOWN_{event}", None, {}))
    detail_name, reason = details.get(detail, (f"UNKNOWN_{detail}", "unknown"))
    if (event, detail) == (EVENT_STOPPED, DETAIL_STOPPED_SHUTDOWN) and shutdown_detail == DETAIL_SHUTDOWN_HOST:
        reason = "host_shutdown"
    return Translation(transition, reason, name, detail_name)


@functools.cache
def translate_reboot() -> Translation:
    """A ``VIR_DOMAIN_EVENT_ID_REBOOT`` callback: the guest reset and is running again.

    Memoised: a Translation is immutable, and the beacon translates every callback."""
    return Translation(Transition.STARTED, "rebooted", "REBOOT", "")


# Every (event, detail) pair libvirt documents, translated once: the beacon translates every
# callback, and a Translation is immutable. Pairs missing here (values libvirt may add later)
# are translated each time, so the table stays bounded whatever libvirt sends.
TRANSLATIONS: dict[tuple[int, int], Translation] = {
    (event, detail): translate_lifecycle(event, detail)
    for event, (_name, _transition, details) in LIFECYCLE_EVENTS.items() for detail in details}


class LifecycleTranslator:
    """Translates a stream of callbacks, remembering each domain's last SHUTDOWN detail.

    libvirt reports a shutdown as SHUTDOWN/<who asked> then STOPPED/SHUTDOWN; only the first
    says whether the guest or the host asked, so it is kept until the STOPPED arrives.
    """

    def __init__(self) -> None:
        self._shutdown_detail: dict[str, int] = {}

    def lifecycle(self, uuid: str, event: int, detail: int) -> Translation:
        """The translation of ``uuid``'s callback ``(event, detail)``, in the order libvirt
        called back."""
        if event == EVENT_SHUTDOWN:
            self._shutdown_detail[uuid] = detail
        elif event == EVENT_STOPPED:
            shutdown_detail = self._shutdown_detail.pop(uuid, None)
            if shutdown_detail is not None:  # announced: who asked may change the reason
                return translate_lifecycle(event, detail, shutdown_detail)
        elif event == EVENT_STARTED:
            self._shutdown_detail.pop(uuid, None)  # a new run: an old announcement is void
        # Other events (DEFINED/UPDATED...) may come between SHUTDOWN and STOPPED.
        known = TRANSLATIONS.get((event, detail))
        return known if known is not None else translate_lifecycle(event, detail)


def is_stale(transition: Transition, live: LiveState) -> bool:
    """True when the domain is no longer in a state the event's transition could leave it in."""
    return live.power_state not in EXPECTED_POWER[transition]
