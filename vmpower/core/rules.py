"""The decision table: what to do when the record and the hypervisor disagree.

This is Nova's ``_sync_instance_power_state`` as one pure function, plus the operator's pillar
(pins, locks, ``managed: false``, shutdown and crash policies, restart back-off) and what a
fleet does every day (live migration, host shutdown and boot, interrupted operations, renames,
libvirt's own crash handling, the grace before believing a VM went off). It reads nothing and
changes nothing: the caller reads the live state and the ``Facts``, asks, and carries the
answer out.

Order of the checks, the safest first: bad pillar, a pillar lock, a migration in progress and a
task_state leave the VM alone entirely (no write); then ownership (another host's VM is left
alone, unless it runs here and its owner does not run it); then a domain that lives elsewhere
(shut off ``migrated``/``saved``) is recorded only; then the table of rules 4-8, where every
action on a VM that went off waits for ``stop_grace`` and a host's shutdown or libvirt's own
crash handling is recorded, not acted on.

An event's claims are never among the facts: ``Facts.event*`` is what this host's own beacon
observed and journaled (``vmpower.core.journal``), and a reconcile with nothing observed decides
on the live state and the record alone, like a sync.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping

from vmpower.core.model import (
    OFF,
    OFF_OR_GONE,
    LiveState,
    PowerState,
    Record,
    Transition,
    VmState,
    drifting,
)
from vmpower.core.settings import (
    InstancePolicy,
    OnCrash,
    OnGuestShutdown,
    OnHostShutdown,
    Settings,
)

# Power states of a domain that is alive on its host: ownership follows it.
ALIVE = frozenset({PowerState.RUNNING, PowerState.PAUSED})

# vm_states whose VM is in someone else's hands (rule 4): record the truth, do nothing more.
HANDS_OFF = frozenset({VmState.BUILDING, VmState.RESCUED, VmState.RESIZED, VmState.SUSPENDED,
                       VmState.ERROR, VmState.SHELVED})

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

# libvirt's state reasons (``mapping.DOMAIN_STATES``) and event reasons that the rules read.
# libvirt starts every domain paused (QEMU runs with -S) and resumes it once it is set up; a
# domain seen in that moment, paused with this reason, is being started, not paused by anyone.
STARTING_UP = "starting_up"
MIGRATION = "migration"    # paused: an outgoing (or the end of an incoming) migration
MIGRATED = "migrated"      # shut off: it was migrated away; started/resumed: it came by migration
SAVED = "saved"            # shut off: it lives in a save file (virsh save, managedsave)
LIVES_ELSEWHERE = frozenset({MIGRATED, SAVED})
HOST_SHUTDOWN = "host_shutdown"  # the event reason of a shutdown the host asked for
REASON_LOST = "unknown"    # shut off: libvirt cannot say why (a libvirtd restart forgets it)
NOT_SEEN = "not_seen"      # off_reason: it went off unseen, for a reason no one can tell
FAILED = "failed"          # shut off: QEMU was killed or failed; not a guest crash
UNDEFINED = "undefined"    # the reason of model.GONE: libvirt no longer knows the domain

# libvirt's ``<on_crash>`` actions with which libvirt handles a guest crash itself; ``destroy``
# (libvirt's default) leaves the domain off and the decision to vmpower.
LIBVIRT_HANDLES_CRASH = frozenset({"preserve", "restart", "rename-restart", "coredump-destroy",
                                   "coredump-restart"})
LIBVIRT_DEFAULT_ON_CRASH = "destroy"


class Action(str, enum.Enum):
    """What to do to the domain itself."""

    NONE = "none"
    POWER_OFF = "power_off"  # make sure the domain is fully off (destroy it if it still runs)
    START = "start"          # start it again (pinned active, or policy restart)


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the shell read about the host and the domain besides the record and live state.

    ``clock`` and ``boot_id`` are this host's monotonic clock and boot id now: the grace is
    measured on them, and a record written in another boot is known to be. ``name`` is the
    domain's live name ("" when it is gone or unknown). ``event``, ``event_reason`` and
    ``event_at`` are what this host's own beacon observed of the lifecycle event being
    reconciled, as its journal says (``vmpower.core.journal``), never what the event claims:
    the transition (already checked not stale), libvirt's reason, and when libvirt called back
    on ``clock``. The last four are read only when a decision needs them (a sync reads them
    under the instance lock of the few VMs that change); ``None`` means "not read", and a
    decision that needs one asks for a ``recheck``:

    ``migrating``
        libvirt reports an active migration job for the domain.
    ``migration_unknown``
        the domain's migration job was asked for and libvirt could not say (an error, or a
        job it does not name): whether it migrates cannot be told, so it is left alone.
    ``on_crash``
        the domain's ``<on_crash>`` action; "" when it could not be read.
    ``owner_alive``
        whether the process named in the record's ``task_owner`` still runs (False: it is
        dead, or its host rebooted).
    ``host_stopping``
        this host is shutting down (systemd says ``stopping``): a VM that goes off now goes
        off with the host (libvirt-guests), whatever the event said.
    ``seen_off``
        libvirt's reason for the domain's going off, as this host's beacon journaled it in
        this boot with nothing missed since ("" when it saw none). Read only for a domain
        shut off for a reason libvirt has lost (``unknown``) that the record says was alive:
        libvirt's state reason is volatile, and a domain migrated away whose source libvirtd
        then restarted looks the same as one that went off here.
    ``seen_at``
        when this host's beacon last journaled anything of the domain in this boot (libvirt's
        callback, on ``clock``; 0.0 when nothing, or not read): a domain seen then was not
        off all along since an earlier recorded off spell, whatever the record says (a start
        whose event was lost or dropped as stale). Read for a domain that is off.
    """

    clock: float = 0.0
    boot_id: str = ""
    name: str = ""
    event: Transition | None = None
    event_reason: str = ""
    event_at: float | None = None
    migrating: bool | None = None
    migration_unknown: bool = False
    on_crash: str | None = None
    owner_alive: bool | None = None
    host_stopping: bool | None = None
    seen_off: str | None = None
    seen_at: float = 0.0


NO_FACTS = Facts()


@dataclasses.dataclass(frozen=True)
class Decision:
    """The answer for one VM.

    ``observed`` is written whatever happens next (it is the truth just read); ``attempted``
    is written once ``action`` has been tried, whether it succeeded or failed (a restart that
    fails still counts toward the restart limit); ``outcome`` is written only once ``action``
    has succeeded. ``recheck`` asks the caller to read the live
    state (and any ``Facts`` not read yet) again, uncached, under the instance lock, and decide
    again before acting or writing. ``skipped`` marks a VM vmpower must not touch at all
    (locks, another host, bad pillar, a migration in progress). ``retry_in`` says the decision
    must be taken again that many seconds from now (a grace or a restart back-off running).
    ``rule`` names the rule that gave the answer (``in_sync``, ``stop_grace``, ``restart``,
    ``another_host``...: the table in docs/rules.md), for metrics and reports.
    """

    action: Action
    reason: str
    observed: Mapping[str, object] = dataclasses.field(default_factory=dict)
    outcome: Mapping[str, object] = dataclasses.field(default_factory=dict)
    recheck: bool = False
    skipped: bool = False
    warning: bool = False
    retry_in: float | None = None
    attempted: Mapping[str, object] = dataclasses.field(default_factory=dict)
    rule: str = ""


def _skip(reason: str, rule: str, warning: bool = False) -> Decision:
    return Decision(Action.NONE, reason, skipped=True, warning=warning, rule=rule)


# The off reasons vmpower writes (``Record.off_reason``).
OFF_REASONS = frozenset({"", HOST_SHUTDOWN, NOT_SEEN})
# What each field of a record must hold for this version to read it; ``updated_at`` is only
# shown to people, and written afresh with every change.
_TEXT_FIELDS = ("uuid", "name", "host", "task_state", "boot_id", "task_owner")
_WHOLE_FIELDS = ("version", "restart_count")
_NUMBER_FIELDS = ("last_restart_at", "off_since")
# Those that reset_state cannot set right: the record's identity and its compare-and-set.
_NOT_RESETTABLE = ("uuid", "name", "host", "version")


def _unknown_fields(record: Record) -> dict[str, object]:
    """The fields of ``record`` whose value this version does not know, with those values."""
    unknown: dict[str, object] = {}
    if not isinstance(record.vm_state, VmState):
        unknown["vm_state"] = record.vm_state
    if not isinstance(record.power_state, PowerState):
        unknown["power_state"] = record.power_state
    for field in _TEXT_FIELDS:
        if not isinstance(getattr(record, field), str):
            unknown[field] = getattr(record, field)
    for field in _WHOLE_FIELDS + _NUMBER_FIELDS:
        value = getattr(record, field)
        if isinstance(value, bool) or not isinstance(value, int if field in _WHOLE_FIELDS
                                                     else (int, float)):
            unknown[field] = value
    if record.off_reason not in OFF_REASONS and "off_reason" not in unknown:
        unknown["off_reason"] = record.off_reason
    return unknown


def unknown_values(record: Record) -> str | None:
    """The values of ``record`` that this version of vmpower does not know, in words
    (``vm_state='hibernated'``), or None when it knows them all.

    A newer vmpower sharing the store, or a hand edit, can leave one. What vmpower would do
    with it cannot be told, so the VM is left alone (nothing done, nothing written over it)
    until a person sets it right (``reset``) or vmpower is upgraded.
    """
    unknown = _unknown_fields(record)
    if not unknown:
        return None
    return ", ".join(f"{field}={value!r}" for field, value in unknown.items())


def _unknown_reason(unknown: str) -> str:
    return (f"the record holds what this version of vmpower does not know ({unknown}; written "
            f"by a newer vmpower sharing the store, or by hand): hands off, nothing written, "
            f"until it is set right (vmpower.reset_state with vm_state=, or an upgrade)")


def owner_text(task_owner: str) -> str:
    """A ``task_owner`` JSON text in words: "pid 123 on host-a", or "an unknown process"."""
    try:
        owner = json.loads(task_owner) if task_owner else {}
    except ValueError:
        owner = {}
    if not isinstance(owner, dict) or not owner:
        return "an unknown process"
    return f"pid {owner.get('pid', '?')} on {owner.get('host') or 'an unknown host'}"


def mid_migration(live: LiveState, facts: Facts) -> str | None:
    """Why the domain is in the middle of a migration, incoming or outgoing, or None."""
    if facts.migrating:
        return "libvirt reports a migration job running"
    if live.power_state is PowerState.PAUSED and live.reason == MIGRATION:
        return "paused by a migration"
    if (live.power_state is PowerState.PAUSED and live.reason == STARTING_UP
            and facts.event_reason == MIGRATED):
        return "arriving by migration"
    return None


def migration_unknown(live: LiveState, facts: Facts) -> str | None:
    """Why a domain that may be migrating cannot be told not to be, or None."""
    if facts.migration_unknown and live.power_state in ALIVE:
        return "libvirt could not say whether a migration job runs"
    return None


def lives_elsewhere(live: LiveState) -> bool:
    """A domain shut off because it was migrated away or saved to a file: it lives elsewhere."""
    return live.power_state in OFF and live.reason in LIVES_ELSEWHERE


def _gone_to(live: LiveState, facts: Facts) -> str:
    """Why a domain shut off here lives elsewhere (``migrated``, ``saved``), or "": libvirt's
    state reason, or, once a libvirtd restart has lost it, what this host's beacon saw go
    (a durable fact; the state reason alone is not)."""
    if lives_elsewhere(live):
        return live.reason
    if (live.power_state is PowerState.SHUTDOWN and live.reason == REASON_LOST
            and facts.seen_off in LIVES_ELSEWHERE):
        return facts.seen_off
    return ""


def not_to_record(live: LiveState, policy: InstancePolicy, pillar_error: str | None,
                  facts: Facts = NO_FACTS) -> str | None:
    """Why a domain seen for the first time must not even be recorded, or None.

    Bad pillar; a pillar lock (rule 1: nothing at all); a migration in progress (the domain
    is not ours yet, and may never be).
    """
    if pillar_error:
        return f"bad pillar, nothing done: {pillar_error}"
    if policy.task_state:
        return f"task_state={policy.task_state} is set in pillar: not even recorded"
    migrating = mid_migration(live, facts)
    if migrating:
        return f"in the middle of a migration ({migrating}): not recorded until it ends"
    unknown = migration_unknown(live, facts)
    if unknown:
        return f"{unknown}: not recorded until it can"
    return None


def adopt(uuid: str, name: str, host: str, live: LiveState, policy: InstancePolicy,
          at: float, facts: Facts = NO_FACTS) -> Record:
    """The record of a domain seen for the first time: its vm_state follows what it does,
    unless pillar pins it.

    A domain shut off because it migrated away or was saved lives elsewhere: it is recorded
    ``active`` (it runs there, so it is not powered off when it returns), and one migrated
    away is owned by no host (``host`` ""). Its off-spell bookkeeping starts now.
    """
    if live.power_state is PowerState.PAUSED and live.reason == STARTING_UP or lives_elsewhere(live):
        adopted = VmState.ACTIVE
    else:
        adopted = ADOPTED_VM_STATE[live.power_state]
    if lives_elsewhere(live) and live.reason == MIGRATED:
        host = ""
    off = live.power_state in OFF
    return Record(uuid=uuid, name=name, host=host, vm_state=policy.vm_state or adopted,
                  power_state=live.power_state, updated_at=at, version=1,
                  off_since=facts.clock if off else 0.0, boot_id=facts.boot_id,
                  drift_since=at if drifting(policy.vm_state or adopted, live.power_state) else 0.0)


def adoption_reason(record: Record, live: LiveState, policy: InstancePolicy) -> str:
    """The audit reason of ``adopt``'s record, for people."""
    reason = (f"first seen {live.power_state.value}: vm_state={record.vm_state.value}"
              + (" (pinned by pillar)" if policy.vm_state else " (adopted)"))
    if lives_elsewhere(live):
        reason += f"; shut off here because it was {live.reason}: it lives elsewhere"
    return reason


def refuse_power(name: str, record: Record | None, policy: InstancePolicy,
                 pillar_error: str | None, wanted: VmState,
                 owner_alive: bool | None = None, live: LiveState | None = None,
                 host: str = "") -> str | None:
    """Why a stop (``wanted`` stopped) or a start (active) must not be done, or None.

    A task_state whose owner is known to be gone does not refuse: the operation takes over,
    and its own task_state replaces the stale one (audited). Nothing is started that lives
    elsewhere (migrated away from here, or owned by a host that runs it). A record holding a
    value this version does not know refuses both.
    """
    unknown = unknown_values(record) if record is not None else None
    if unknown:
        return (f"{name}: its record holds what this version of vmpower does not know "
                f"({unknown}): vmpower does not act on it until it is set right "
                f"(vmpower.reset_state {name} vm_state=<state>)")
    if pillar_error:
        return f"{name}: {pillar_error}"
    if not policy.managed:
        return f"{name} is managed: false in pillar: vmpower does not act on it"
    if policy.vm_state not in (None, wanted):
        # The next sync would undo it: refuse rather than fight the operator's pin.
        return (f"{name}: pillar pins vm_state={policy.vm_state.value}, "
                f"so it cannot be made {wanted.value}")
    if policy.task_state:
        return (f"{name} has task_state={policy.task_state} (pillar): vmpower leaves it alone "
                f"until that is cleared")
    if record is not None and record.task_state and not (record.task_owner and owner_alive is False):
        return (f"{name} has task_state={record.task_state}: vmpower leaves it alone until that "
                f"is cleared (vmpower.reset_state clears one vmpower set)")
    if live is not None and wanted is VmState.ACTIVE and live.power_state in OFF \
            and live.reason == MIGRATED:
        return (f"{name} was migrated away from here (shut off, reason migrated): it runs "
                f"elsewhere; start it there, or migrate it back")
    if (record is not None and host and record.host not in ("", host)
            and record.power_state is PowerState.RUNNING):
        return (f"{name}: the record says it runs on {record.host}, not {host}: vmpower does "
                f"not act on it here")
    return None


@dataclasses.dataclass(frozen=True)
class Reset:
    """What ``vmpower.reset_state`` writes (``fields``) and why, or why it refuses."""

    fields: Mapping[str, object]
    reason: str
    refused: bool = False


def reset(record: Record, live: LiveState, policy: InstancePolicy,
          vm_state: VmState | None = None, host: str = "", force: bool = False) -> Reset:
    """The operator's way out, as Nova's reset-state: clear a task_state vmpower set (whether
    its owner is gone or not: the operator says so), and leave ``error``.

    ``vm_state`` sets it; without it a VM in ``error`` takes the vm_state its power state
    means (running -> active, shut off -> stopped) and any other vm_state is kept. Leaving
    ``error`` (or setting a vm_state) starts the restart count afresh. A pillar task_state is
    the operator's own lock: vmpower never clears it. A record holding values this version
    does not know has them replaced (``_reset_unknown``).

    It runs on ``host``, the VM's owner: anywhere else the live state read is not the VM's (it
    is not defined there, or is a copy left behind), and a vm_state taken from it would have
    the owner power the VM off. ``force`` overrides that, with the vm_state given.
    """
    elsewhere = _reset_elsewhere(record, live, host, vm_state, force)
    if elsewhere is not None:
        return elsewhere
    answer = _reset_here(record, live, policy, vm_state)
    if force and not answer.refused and answer.fields and record.host not in ("", host):
        return Reset(answer.fields, f"{answer.reason} (forced on {host}, over the owner "
                                    f"{record.host})")
    return answer


def _reset_elsewhere(record: Record, live: LiveState, host: str, vm_state: VmState | None,
                     force: bool) -> Reset | None:
    """Why ``reset`` refuses on a host that does not own the VM, or None."""
    if not host:
        return None
    if record.host not in ("", host):
        where = f"the record says {record.name} lives on {record.host}, not {host}"
    elif not record.host and live.power_state is PowerState.NOSTATE:
        where = f"{record.name} is owned by no host and is not defined on {host}"
    else:
        return None
    if not force:
        return Reset({}, f"{where}: reset it where it lives ({record.host or 'the host that runs it'}),"
                         f" or give force=True if that host is gone", refused=True)
    if vm_state is None:
        return Reset({}, f"{where}, so its state cannot be read here: with force=True, give the "
                         f"vm_state it is to have", refused=True)
    return None


def _reset_here(record: Record, live: LiveState, policy: InstancePolicy,
                vm_state: VmState | None) -> Reset:
    """``reset`` on the VM's owner (or forced, with the vm_state given)."""
    if policy.task_state:
        return Reset({}, f"task_state={policy.task_state} is set in pillar: vmpower never clears "
                         f"it; remove it from pillar", refused=True)
    if vm_state is not None and policy.vm_state not in (None, vm_state):
        return Reset({}, f"pillar pins vm_state={policy.vm_state.value}: it cannot be reset to "
                         f"{vm_state.value}", refused=True)
    if _unknown_fields(record):
        return _reset_unknown(record, live, policy, vm_state)
    fields: dict = {}
    notes = []
    if record.task_state:
        fields.update(task_state="", task_owner="")
        notes.append(f"task_state={record.task_state} (set by {owner_text(record.task_owner)}) "
                     f"cleared")
    target = vm_state
    if target is None and record.vm_state is VmState.ERROR:
        target = policy.vm_state or ADOPTED_VM_STATE[live.power_state]
    if target is not None and target is not record.vm_state:
        fields["vm_state"] = target
        notes.append(f"vm_state {record.vm_state.value} -> {target.value}")
    if target is not None and (record.restart_count or record.last_restart_at):
        fields.update(restart_count=0, last_restart_at=0.0)
        notes.append("restart count reset")
    if not fields:
        return Reset({}, "nothing to reset: no task_state, and vm_state is not error")
    return Reset(fields, "reset by the operator: " + "; ".join(notes))


def _reset_unknown(record: Record, live: LiveState, policy: InstancePolicy,
                   vm_state: VmState | None) -> Reset:
    """``reset`` of a record holding values this version does not know: each is replaced by
    what is known (the vm_state the operator gives, or pillar pins; the live power state; no
    off reason, restart count, off spell or task), and the VM is vmpower's again."""
    unknown = _unknown_fields(record)
    described = unknown_values(record)
    stuck = [field for field in _NOT_RESETTABLE if field in unknown]
    if stuck:
        return Reset({}, f"the record holds what this version of vmpower does not know "
                         f"({described}); reset_state cannot set {', '.join(stuck)} right: "
                         f"repair or remove the record in the store", refused=True)
    target = vm_state or policy.vm_state or (None if "vm_state" in unknown else record.vm_state)
    if target is None:
        return Reset({}, f"the record holds vm_state={record.vm_state!r}, which this version of "
                         f"vmpower does not know: give the vm_state it is to have "
                         f"(vmpower.reset_state <name> vm_state=<state>)", refused=True)
    fields: dict = {}
    if target is not record.vm_state:
        fields["vm_state"] = target
    if "power_state" in unknown:
        fields["power_state"] = live.power_state
    if "off_reason" in unknown:
        fields["off_reason"] = ""
    if "restart_count" in unknown or "last_restart_at" in unknown:
        fields.update(restart_count=0, last_restart_at=0.0)
    if "off_since" in unknown or "boot_id" in unknown:
        fields.update(off_since=0.0, boot_id="")
    if "task_state" in unknown or "task_owner" in unknown:
        fields.update(task_state="", task_owner="")
    now_known = ", ".join(f"{field}={getattr(value, 'value', value)!r}"
                          for field, value in fields.items())
    return Reset(fields, f"reset by the operator: {described} replaced ({now_known})")


def autostart_warning(policy: InstancePolicy, autostart: bool | None) -> str | None:
    """A warning when libvirt's autostart contradicts the pinned vm_state, or None."""
    if autostart is None or policy.vm_state is None:
        return None
    if policy.vm_state is VmState.ACTIVE and not autostart:
        return ("pillar pins vm_state=active but libvirt's autostart is off: after a host "
                "reboot nothing starts it (vmpower does not restart a VM the host shut down)")
    if policy.vm_state is VmState.STOPPED and autostart:
        return ("pillar pins vm_state=stopped but libvirt's autostart is on: libvirt starts it "
                "at every boot and vmpower powers it off again")
    return None


def decide(record: Record, live: LiveState, host: str, policy: InstancePolicy,
           settings: Settings, at: float, pillar_error: str | None = None,
           facts: Facts = NO_FACTS) -> Decision:
    """Decide what to do about one VM, given its record and its live state read just now.

    ``at`` is the wall clock, for what people read; every duration (the grace, the restart
    back-off) runs on ``facts.clock``, this host's monotonic clock in the boot ``facts.boot_id``.
    """
    unknown = unknown_values(record)
    if unknown:
        return _skip(_unknown_reason(unknown), "unknown_value", warning=True)
    if pillar_error:
        return _skip(f"bad pillar, nothing done: {pillar_error}", "bad_pillar")
    if policy.task_state:
        return _skip(f"task_state={policy.task_state} (pillar) is set: hands off until it clears",
                     "task_state_pillar")
    migrating = mid_migration(live, facts)
    if migrating:
        return _skip(f"in the middle of a migration ({migrating}): hands off until it ends",
                     "migrating")
    unknown = migration_unknown(live, facts)
    if unknown:  # it may be migrating: nothing done, nothing written, asked again next time
        return _skip(f"{unknown}: hands off until it can", "migrating")

    observed: dict = {}
    notes = []
    if record.task_state:
        if not (record.task_owner and facts.owner_alive is False):
            return _skip(f"task_state={record.task_state} (record) is set: hands off until it "
                         f"clears", "task_state_record")
        # vmpower's own operation died (process killed, host rebooted): nothing will clear it.
        observed.update(task_state="", task_owner="")
        notes.append(f"task_state={record.task_state} was set by "
                     f"{owner_text(record.task_owner)}, which is gone: cleared")

    power = live.power_state
    owner = record.host
    gone_to = _gone_to(live, facts)
    if owner != host:
        if power in ALIVE and (not owner or record.power_state is not PowerState.RUNNING
                               or live.reason == MIGRATED):
            # Ownership follows the live domain (running, or paused on arrival;
            # one paused by a migration was left alone above): its recorded owner does not run
            # it, or libvirt says it runs here because it was migrated here (state reason, not
            # an event's claim: the record may not know yet that the source let go).
            observed["host"] = host
            notes.append(f"migrated from {owner or 'no host'}: it runs on {host}"
                         if power is PowerState.RUNNING else
                         f"moved from {owner or 'no host'}: it is {power.value} on {host}")
            taken = ADOPTED_VM_STATE[power]
            if policy.vm_state is None and record.vm_state not in (VmState.ACTIVE, taken):
                # Taken over as at a first sight: a VM alive here is not powered off because
                # another host last recorded it stopped.
                observed["vm_state"] = taken
                notes.append(f"vm_state {record.vm_state.value} -> {taken.value}: it is "
                             f"{power.value} here")
        elif not owner and power in OFF and not gone_to:
            # Defined here, off, and no host owns it (its last owner let go when it was
            # undefined there): this host has the only copy anyone knows of. An owner that
            # kept a copy keeps the record: which copy counts cannot be told from here.
            observed["host"] = host
            notes.append(f"owned by no host and defined on {host} ({power.value}): taken over")
        elif gone_to:
            return Decision(Action.NONE, f"shut off here because it was {gone_to}; the record "
                            f"says it lives on {owner or 'no host'}: nothing to do",
                            rule="lives_elsewhere")
        else:
            return _skip(f"the record says the VM lives on {owner or 'no host'}, not {host}: "
                         f"hands off", "another_host")

    if facts.name and facts.name != record.name:
        observed["name"] = facts.name
        notes.append(f"renamed {record.name} -> {facts.name}")
    if power is not record.power_state:
        observed["power_state"] = power
        notes.append(f"power_state {record.power_state.value} -> {power.value}")
    vm_state = observed.get("vm_state", record.vm_state)
    if policy.vm_state is not None and policy.vm_state is not vm_state:
        observed["vm_state"] = policy.vm_state
        notes.append(f"pillar pins vm_state={policy.vm_state.value}")
        vm_state = policy.vm_state
    since_restart = _since_restart(record, live, facts, observed)
    if (power is PowerState.RUNNING and record.restart_count
            and since_restart >= RESTART_RESET_AFTER):
        observed["restart_count"] = 0
        notes.append(f"ran {RESTART_RESET_AFTER:.0f}s since its last restart: restart count reset")

    unseen = _off_unseen(record, live, facts)
    if unseen is None:
        return Decision(Action.NONE, "shut off for a reason libvirt no longer knows: this host's "
                        "journal not read yet", observed, recheck=True, rule="journal_unread")
    elsewhere = bool(gone_to)
    off = power in OFF and not elsewhere
    off_for = _off_spell(record, live, facts, observed, off)
    host_shutdown = off and _host_shut_down(record, facts)
    if host_shutdown and record.off_reason != HOST_SHUTDOWN:
        observed["off_reason"] = HOST_SHUTDOWN
    elif off and unseen and record.off_reason != NOT_SEEN:
        observed["off_reason"] = NOT_SEEN

    if elsewhere:
        if gone_to == MIGRATED and observed.get("host", owner) == host:
            observed["host"] = ""  # the source lets go: the host where it runs takes it
            notes.append(f"migrated away from {host}")
        if record.off_reason:  # it is not off here: where it went is known now
            observed["off_reason"] = ""
        seen = "; ".join(notes) + ": " if notes else ""
        where = "elsewhere" if gone_to == MIGRATED else "in a save file"
        how = "" if gone_to == live.reason else " (as this host's beacon saw; libvirt has lost it)"
        return Decision(Action.NONE, f"{seen}shut off here because it was {gone_to}{how}: it "
                        f"lives {where}; never restarted, never recorded stopped", observed,
                        rule="lives_elsewhere")
    if live.reason == UNDEFINED and owner == host and "host" not in observed:
        observed["host"] = ""  # no longer defined here: whoever runs it may take it
        notes.append(f"no longer defined on {host}: let go")

    seen = "; ".join(notes) + ": " if notes else ""

    def result(action=Action.NONE, why="", outcome=None, **flags) -> Decision:
        return Decision(action, seen + why, observed, outcome or {}, **flags)

    if not policy.managed:
        return result(why=f"managed: false, recorded only (vm_state={vm_state.value}, "
                          f"power_state={power.value})", rule="unmanaged")
    if vm_state in HANDS_OFF:
        return result(why=f"vm_state={vm_state.value}: nothing more to do", rule="hands_off_state")

    if vm_state is VmState.ACTIVE:
        if off:
            return _active_but_off(record, live, policy, settings, facts, off_for,
                                   since_restart, host_shutdown, result, bool(unseen))
        if power is PowerState.SUSPENDED:
            return result(Action.POWER_OFF, "vm_state=active but the guest is suspended: "
                          "stopping it", {"vm_state": VmState.STOPPED}, rule="active_suspended")
        if power in (PowerState.PAUSED, PowerState.NOSTATE):
            return result(why=f"vm_state=active but power_state={power.value}: logged only",
                          warning=True, rule="active_not_running")
        return result(why="vm_state=active and running: in sync", rule="in_sync")

    if vm_state is VmState.STOPPED:
        if power not in OFF_OR_GONE:
            return result(Action.POWER_OFF, f"vm_state=stopped but the domain is "
                          f"{power.value}: powering it off", rule="stopped_but_running")
        return result(why=f"vm_state=stopped and power_state={power.value}: in sync",
                      rule="in_sync")

    if vm_state is VmState.PAUSED:
        if off:
            what = f"vm_state=paused but the domain is {power.value} ({live.reason})"
            held = _held(what, live, facts, host_shutdown, policy, off_for, settings, result,
                         bool(unseen))
            if held:
                return held
            return result(Action.POWER_OFF, f"{what}: stopping it", {"vm_state": VmState.STOPPED},
                          rule="paused_but_off")
        return result(why=f"vm_state=paused and power_state={power.value}: nothing to do",
                      rule="in_sync")

    # VmState.DELETED
    if power not in (PowerState.NOSTATE, PowerState.SHUTDOWN):
        return result(why=f"vm_state=deleted but the domain is {power.value}: "
                          f"warning only, a person should look", warning=True,
                      rule="deleted_but_alive")
    return result(why=f"vm_state=deleted and power_state={power.value}: in sync", rule="in_sync")


def _off_spell(record: Record, live: LiveState, facts: Facts, observed: dict, off: bool) -> float:
    """How long the domain has been known off (seconds on this host's monotonic clock), and
    the bookkeeping of its off spell into ``observed``.

    The record's ``off_since`` is trusted only from this boot of this host (``boot_id``) and
    for a record that says off: anything else starts the spell now. A ``stopped``/``crashed``
    event this host's beacon observed (``facts.event_at``, on this boot's monotonic clock)
    dates the spell from when libvirt called back, if that was earlier. While the domain runs
    (or is paused, suspended) the spell is over, and the record learns it was seen alive in
    this boot.
    """
    if off:
        trusted = (record.off_since > 0 and facts.boot_id and record.boot_id == facts.boot_id
                   and record.power_state in OFF and record.off_since <= facts.clock)
        since = record.off_since if trusted else facts.clock
        if trusted and since < facts.seen_at <= facts.clock:
            since = facts.seen_at  # seen after the recorded spell began: a new spell since
        if (facts.event in (Transition.STOPPED, Transition.CRASHED) and facts.event_at is not None
                and 0 < facts.event_at < since):
            since = facts.event_at
        if not trusted or since != record.off_since:
            observed.update(off_since=since, boot_id=facts.boot_id)
        return facts.clock - since
    if live.power_state is not PowerState.NOSTATE and live.power_state not in OFF:
        if record.off_since or record.off_reason:
            observed.update(off_since=0.0, off_reason="")
        if facts.boot_id and record.boot_id != facts.boot_id:
            observed["boot_id"] = facts.boot_id
    return 0.0


def _since_restart(record: Record, live: LiveState, facts: Facts, observed: dict) -> float:
    """Seconds since vmpower last restarted the domain, on this host's monotonic clock.

    ``last_restart_at`` is trusted only from this boot of this host (``boot_id``) and when it
    is not ahead of the clock (a value of another boot or host, or a wall-clock time written by
    an older vmpower). Otherwise the back-off starts again from now, and ``observed`` writes
    that down: a restart is never let through early, and never waits longer than one back-off.
    """
    if not record.restart_count and not record.last_restart_at:
        return math.inf
    if (facts.boot_id and record.boot_id == facts.boot_id
            and 0 < record.last_restart_at <= facts.clock):
        return facts.clock - record.last_restart_at
    if live.power_state is PowerState.NOSTATE:
        return 0.0  # nothing to restart or reset; written down once the domain is back
    observed.update(last_restart_at=facts.clock, boot_id=facts.boot_id)
    return 0.0


def _host_shut_down(record: Record, facts: Facts) -> bool:
    """Whether the host, not the guest, shut the domain down: this host's beacon observed the
    host ask (``facts.event_reason``, from its journal, never an event's claim), an earlier
    decision said so, the host is shutting down now, or the record was last written in an
    earlier boot of this host (the host went down with it)."""
    return (facts.event_reason == HOST_SHUTDOWN or record.off_reason == HOST_SHUTDOWN
            or facts.host_stopping is True
            or bool(facts.boot_id and record.boot_id and record.boot_id != facts.boot_id))


def _off_unseen(record: Record, live: LiveState, facts: Facts) -> bool | None:
    """Whether the domain went off for a reason no one can tell: libvirt has lost its state
    reason, and this host's beacon did not see it go off. None: the journal is to be read.

    Such a domain may have been migrated away (its source's libvirtd restarted before this host
    recorded it, and the kept copy reads "shut off (unknown)"): starting it could run it on
    two hosts. Once known, it stays known (``off_reason``) until the domain runs again.
    """
    if live.power_state is not PowerState.SHUTDOWN or live.reason != REASON_LOST:
        return False
    if record.off_reason == NOT_SEEN:
        return True
    if record.power_state not in ALIVE:
        return False  # recorded off already, for a reason the rules knew then
    if facts.event in (Transition.STOPPED, Transition.CRASHED):
        return False  # the event being reconciled is this host's beacon seeing it go off
    if facts.seen_off is None:
        return None
    return facts.seen_off == ""


def _held(what: str, live: LiveState, facts: Facts, host_shutdown: bool,
          policy: InstancePolicy, off_for: float, settings: Settings, result,
          unseen: bool = False) -> Decision | None:
    """The reasons not to act (yet) on a VM that went off, in order, or None to go on."""
    if host_shutdown and policy.on_host_shutdown is OnHostShutdown.IGNORE:
        return result(why=f"{what}, shut down by the host (a host shutdown or reboot, "
                          f"libvirt-guests, virsh shutdown): recorded only, vm_state kept "
                          f"(on_host_shutdown=ignore); it is in sync when the host starts it",
                      rule="host_shutdown_ignored")
    if unseen and not host_shutdown:
        return result(why=f"{what}: it went off while nothing watched, and libvirt no longer "
                          f"says why; it may have been migrated away and run elsewhere. vmpower "
                          f"does not act on it: if it runs nowhere else, start it "
                          f"(vmpower.start) or record it stopped (vmpower.stop)", warning=True,
                      rule="off_unseen")
    if live.is_crash and live.reason != FAILED:
        if facts.on_crash is None:
            return result(why=f"{what}: libvirt's <on_crash> not read yet", recheck=True,
                          rule="on_crash_unread")
        if facts.on_crash in LIBVIRT_HANDLES_CRASH:
            return result(why=f"{what}: libvirt handles the crash itself "
                              f"(<on_crash>{facts.on_crash}</on_crash>): recorded, nothing done",
                          rule="libvirt_handles_crash")
        if facts.on_crash != LIBVIRT_DEFAULT_ON_CRASH:
            return result(why=f"{what}: libvirt's <on_crash> could not be read "
                              f"({facts.on_crash or 'unknown'}): recorded, nothing done",
                          warning=True, rule="on_crash_unknown")
    if off_for < settings.stop_grace:
        left = settings.stop_grace - off_for
        return result(why=f"{what}, off for {off_for:.0f}s: waiting {left:.0f}s more before "
                          f"acting (stop_grace={settings.stop_grace:g}s; a hard reboot "
                          f"comes back meanwhile)", retry_in=left, rule="stop_grace")
    return None


def _active_but_off(record: Record, live: LiveState, policy: InstancePolicy,
                    settings: Settings, facts: Facts, off_for: float, since_restart: float,
                    host_shutdown: bool, result, unseen: bool = False) -> Decision:
    """Rule 5 for a VM meant to run whose guest is off: stop, restart or ignore, per pillar.

    The restart back-off counts ``since_restart`` seconds on the monotonic clock."""
    what = "crashed" if live.is_crash else "shut down"
    off = f"vm_state=active but the guest {what} (libvirt reason: {live.reason})"
    if host_shutdown and policy.on_host_shutdown is OnHostShutdown.STOP:
        off = f"vm_state=active but the host shut the guest down (libvirt reason: {live.reason})"
    if not live.is_crash and not host_shutdown and policy.on_guest_shutdown is OnGuestShutdown.IGNORE:
        return result(why=f"{off}: left as it is (on_guest_shutdown=ignore)",
                      rule="guest_shutdown_ignored")
    held = _held(off, live, facts, host_shutdown, policy, off_for, settings, result, unseen)
    if held:
        return held
    if host_shutdown:  # on_host_shutdown=stop: the host's shutdown is the operator's intent
        return result(Action.POWER_OFF, f"{off}: recording it as stopped (on_host_shutdown=stop)",
                      {"vm_state": VmState.STOPPED}, recheck=True, rule="host_shutdown_stop")
    if live.is_crash:
        wants_restart = policy.on_crash is OnCrash.RESTART
        policy_text = f"on_crash={policy.on_crash.value}"
        if live.reason == FAILED:
            policy_text += ("; QEMU was killed or failed, not a guest crash libvirt's "
                            "<on_crash> handles")
    else:
        wants_restart = policy.on_guest_shutdown is OnGuestShutdown.RESTART
        policy_text = f"on_guest_shutdown={policy.on_guest_shutdown.value}"
    if policy.vm_state is VmState.ACTIVE:
        policy_text = "pillar pins vm_state=active"

    if not wants_restart:
        return result(Action.POWER_OFF, f"{off}: recording it as stopped ({policy_text})",
                      {"vm_state": VmState.STOPPED}, recheck=True, rule="went_off_stop")

    restarts = record.restart_count
    if restarts >= settings.restart_limit:
        return result(Action.NONE, f"{off}: restarted {restarts} times already, the limit is "
                      f"{settings.restart_limit}: vm_state=error, a person should look",
                      {"vm_state": VmState.ERROR}, recheck=True, warning=True,
                      rule="restart_limit")
    wait = settings.restart_delay(restarts) - since_restart
    if wait > 0:
        return result(Action.NONE, f"{off}: restart {restarts + 1} of {settings.restart_limit} "
                      f"backs off for {wait:.0f}s more; retried then", retry_in=wait,
                      rule="restart_backoff")
    # The attempt counts whether the start succeeds or not: a start that keeps failing (a
    # disk another host holds, a missing bridge) reaches the limit like a guest that keeps
    # crashing, instead of being retried for ever as the same restart.
    return result(Action.START, f"{off}: starting it again, restart {restarts + 1} of "
                  f"{settings.restart_limit} ({policy_text})", recheck=True,
                  attempted={"restart_count": restarts + 1, "last_restart_at": facts.clock,
                             "boot_id": facts.boot_id}, rule="restart")
