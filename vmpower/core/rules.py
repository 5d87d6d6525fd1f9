"""The decision table: what to do when the record and the hypervisor disagree.

This is Nova's ``_sync_instance_power_state`` as one pure function, plus the operator's pillar
(pins, locks, ``managed: false``, shutdown and crash policies, restart back-off). It reads
nothing and changes nothing: the caller reads the live state, asks, and carries the answer out.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Mapping, Optional

from vmpower.core.model import LiveState, PowerState, Record, VmState
from vmpower.core.settings import InstancePolicy, OnCrash, OnGuestShutdown, Settings

# vm_states whose VM is in someone else's hands (rule 4): record the truth, do nothing more.
HANDS_OFF = frozenset({VmState.BUILDING, VmState.RESCUED, VmState.RESIZED, VmState.SUSPENDED,
                       VmState.ERROR, VmState.SHELVED})
OFF_OR_GONE = frozenset({PowerState.NOSTATE, PowerState.SHUTDOWN, PowerState.CRASHED})

# A VM pinned active that has run this long since its last automatic restart starts its
# restart count afresh.
RESTART_RESET_AFTER = 600.0

# How a newly seen domain's vm_state follows from what it is doing.
ADOPTED_VM_STATE = {
    PowerState.RUNNING: VmState.ACTIVE,
    PowerState.PAUSED: VmState.PAUSED,
    PowerState.SUSPENDED: VmState.SUSPENDED,
    PowerState.SHUTDOWN: VmState.STOPPED,
    PowerState.CRASHED: VmState.STOPPED,
    PowerState.NOSTATE: VmState.STOPPED,
}


class Action(str, enum.Enum):
    """What to do to the domain itself."""

    NONE = "none"
    POWER_OFF = "power_off"  # make sure the domain is fully off (destroy it if it still runs)
    START = "start"          # start it again (pinned active, or policy restart)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The answer for one VM.

    ``observed`` is written whatever happens next (it is the truth just read); ``outcome`` is
    written only once ``action`` has succeeded. ``recheck`` asks the caller to read the live
    state again, uncached, and decide again if it changed, before acting (rule 5).
    ``skipped`` marks a VM vmpower must not touch at all (locks, another host, bad pillar).
    """

    action: Action
    reason: str
    observed: Mapping[str, object] = dataclasses.field(default_factory=dict)
    outcome: Mapping[str, object] = dataclasses.field(default_factory=dict)
    recheck: bool = False
    skipped: bool = False
    warning: bool = False

    @property
    def changes_anything(self) -> bool:
        return self.action is not Action.NONE or bool(self.observed) or bool(self.outcome)


# libvirt starts every domain paused (QEMU runs with -S) and resumes it once it is set up; a
# domain seen in that moment, paused with this reason, is being started, not paused by anyone.
STARTING_UP = "starting_up"


def adopt(uuid: str, name: str, host: str, live: LiveState, policy: InstancePolicy,
          at: float) -> Record:
    """The record of a domain seen for the first time: its vm_state follows what it does,
    unless pillar pins it."""
    if live.power_state is PowerState.PAUSED and live.reason == STARTING_UP:
        adopted = VmState.ACTIVE
    else:
        adopted = ADOPTED_VM_STATE[live.power_state]
    vm_state = policy.vm_state or adopted
    return Record(uuid=uuid, name=name, host=host, vm_state=vm_state,
                  power_state=live.power_state, updated_at=at)


def _skip(reason: str) -> Decision:
    return Decision(Action.NONE, reason, skipped=True)


def decide(record: Record, live: LiveState, host: str, policy: InstancePolicy,
           settings: Settings, at: float, pillar_error: Optional[str] = None) -> Decision:
    """Decide what to do about one VM, given its record and its live state read just now."""
    if pillar_error:
        return _skip(f"bad pillar, nothing done: {pillar_error}")
    task_state = policy.task_state or record.task_state
    if task_state:
        source = "pillar" if policy.task_state else "record"
        return _skip(f"task_state={task_state} ({source}) is set: hands off until it clears")
    if record.host != host:
        return _skip(f"the record says the VM lives on {record.host}, not {host}: hands off")

    power = live.power_state
    observed: dict = {}
    notes = []
    if power is not record.power_state:
        observed["power_state"] = power
        notes.append(f"power_state {record.power_state.value} -> {power.value}")
    vm_state = record.vm_state
    if policy.vm_state is not None and policy.vm_state is not vm_state:
        observed["vm_state"] = policy.vm_state
        notes.append(f"pillar pins vm_state={policy.vm_state.value}")
        vm_state = policy.vm_state
    if (power is PowerState.RUNNING and record.restart_count
            and at - record.last_restart_at >= RESTART_RESET_AFTER):
        observed["restart_count"] = 0
        notes.append(f"ran {RESTART_RESET_AFTER:.0f}s since its last restart: restart count reset")
    seen = "; ".join(notes) + ": " if notes else ""

    def result(action=Action.NONE, why="", outcome=None, **flags) -> Decision:
        return Decision(action, seen + why, observed, outcome or {}, **flags)

    if not policy.managed:
        return result(why=f"managed: false, recorded only (vm_state={vm_state.value}, "
                          f"power_state={power.value})")
    if vm_state in HANDS_OFF:
        return result(why=f"vm_state={vm_state.value}: nothing more to do")

    if vm_state is VmState.ACTIVE:
        if power.is_off:
            return _active_but_off(record, live, policy, settings, at, result)
        if power is PowerState.SUSPENDED:
            return result(Action.POWER_OFF, "vm_state=active but the guest is suspended: "
                          "stopping it", {"vm_state": VmState.STOPPED})
        if power in (PowerState.PAUSED, PowerState.NOSTATE):
            return result(why=f"vm_state=active but power_state={power.value}: logged only",
                          warning=True)
        return result(why="vm_state=active and running: in sync")

    if vm_state is VmState.STOPPED:
        if power not in OFF_OR_GONE:
            return result(Action.POWER_OFF, f"vm_state=stopped but the domain is "
                          f"{power.value}: powering it off")
        return result(why=f"vm_state=stopped and power_state={power.value}: in sync")

    if vm_state is VmState.PAUSED:
        if power.is_off:
            return result(Action.POWER_OFF, f"vm_state=paused but the domain is {power.value} "
                          f"({live.reason}): stopping it", {"vm_state": VmState.STOPPED})
        return result(why=f"vm_state=paused and power_state={power.value}: nothing to do")

    # VmState.DELETED
    if power not in (PowerState.NOSTATE, PowerState.SHUTDOWN):
        return result(why=f"vm_state=deleted but the domain is {power.value}: "
                          f"warning only, a person should look", warning=True)
    return result(why=f"vm_state=deleted and power_state={power.value}: in sync")


def _active_but_off(record: Record, live: LiveState, policy: InstancePolicy,
                    settings: Settings, at: float, result) -> Decision:
    """Rule 5 for a VM meant to run whose guest is off: stop, restart or ignore, per pillar."""
    what = "crashed" if live.is_crash else "shut down"
    off = f"vm_state=active but the guest {what} (libvirt reason: {live.reason})"
    if live.is_crash:
        wants_restart = policy.on_crash is OnCrash.RESTART
        policy_text = f"on_crash={policy.on_crash.value}"
    else:
        if policy.on_guest_shutdown is OnGuestShutdown.IGNORE:
            return result(why=f"{off}: left as it is (on_guest_shutdown=ignore)")
        wants_restart = policy.on_guest_shutdown is OnGuestShutdown.RESTART
        policy_text = f"on_guest_shutdown={policy.on_guest_shutdown.value}"
    if policy.vm_state is VmState.ACTIVE:
        policy_text = "pillar pins vm_state=active"

    if not wants_restart:
        return result(Action.POWER_OFF, f"{off}: recording it as stopped ({policy_text})",
                      {"vm_state": VmState.STOPPED}, recheck=True)

    restarts = record.restart_count
    if restarts >= settings.restart_limit:
        return result(Action.NONE, f"{off}: restarted {restarts} times already, the limit is "
                      f"{settings.restart_limit}: vm_state=error, a person should look",
                      {"vm_state": VmState.ERROR}, recheck=True, warning=True)
    wait = settings.restart_delay(restarts) - (at - record.last_restart_at)
    if wait > 0:
        return result(Action.NONE, f"{off}: restart {restarts + 1} of {settings.restart_limit} "
                      f"backs off for {wait:.0f}s more; a later sync restarts it")
    return result(Action.START, f"{off}: starting it again, restart {restarts + 1} of "
                  f"{settings.restart_limit} ({policy_text})",
                  {"restart_count": restarts + 1, "last_restart_at": at}, recheck=True)
