"""What vmpower does on one host: reconcile, sync, stop, start and reset_state, over the rules
and the store.

This is the shell around the pure core: it reads live state and the facts the rules need
(``rules.Facts``: this host's boot and monotonic clock, a migration job, ``<on_crash>``,
whether a task's owner still runs) through ``Hypervisor`` and ``hostinfo``, asks the core,
carries the answer out and records it. It knows nothing of Salt, so the execution module, the
states, the tests and the benchmarks all drive the same code.

Concurrency: every write to an existing record is made under that instance's lock, from the
record re-read under it, and is compare-and-set on its version: an action can never lose its
compare-and-set to a sync. (A first record is an insert-if-absent, which cannot break anyone's
compare-and-set; a sync batches those without locks.) A sync takes the lock of only the records
that change, without waiting: one held by another job is reported under ``busy`` and the rest
go on. A decision that writes nothing takes no lock at all, which keeps a sync of thousands of
VMs cheap.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from vmpower import hostinfo
from vmpower.core.conduct import ENFORCE, OBSERVED, conduct, observed_reason
from vmpower.core.journal import Belief, Observation, believe, seen_at, seen_off
from vmpower.core.mapping import is_stale
from vmpower.core.model import (
    GONE,
    TASK_POWERING_OFF,
    TASK_POWERING_ON,
    Cause,
    LiveState,
    PowerState,
    Record,
    Transition,
    VmState,
    now,
)
from vmpower.core.rules import (
    REASON_LOST,
    Action,
    Decision,
    Facts,
    adopt,
    adoption_reason,
    autostart_warning,
    decide,
    not_to_record,
    refuse_power,
    reset,
)
from vmpower.core.settings import DEFAULT_POLICY, InstancePolicy, Settings
from vmpower.eventloop import read_status
from vmpower.hypervisor import Hypervisor, HypervisorError, LibvirtTimeout, LiveDomain
from vmpower.journal import Journal, JournalError
from vmpower.measurements import Measurements
from vmpower.store import Change, Note, Store, describe_holder, record_of
from vmpower.wakeup import WakeUps

log = logging.getLogger(__name__)

# How long a sync asked while another runs waits for it to end. Every libvirt call of a sync is
# bounded, so a sync ends; the wait is bounded too, in case one is wedged.
SYNC_QUEUE_WAIT = 900.0

# A sync locks the records that change in chunks of this many: each chunk is one transaction,
# and a host of thousands of new or changed VMs never holds thousands of lock files open.
LOCK_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One decision carried out: what to report, and what to record (changes or a note)."""

    report: dict
    changes: tuple[Change, ...] = ()
    note: Note | None = None
    retry_in: float | None = None


@dataclasses.dataclass(frozen=True)
class Acted:
    """A power action carried out, whose outcome waits for the domain's state read after it."""

    uuid: str
    finish: Callable[[PowerState | Exception], Outcome]


@dataclasses.dataclass(frozen=True)
class ToAct:
    """A power action decided, to be carried out with others in one hand-off to libvirt's
    thread; ``then`` gives what came of it from its result (or the exception it raised)."""

    uuid: str
    action: str
    then: Callable[[bool | Exception], Outcome | Acted]


@dataclasses.dataclass(frozen=True)
class Recheck:
    """A sync's domain to decide again on every fact, once the migration jobs of all such
    domains of its chunk have been read in one hand-off."""

    uuid: str
    record: Record
    state: LiveState
    base: Facts
    policy: InstancePolicy
    error: str | None
    preface: str
    cause: Cause
    at: float
    test: bool


# Not read yet: a migration job is read only for a domain that runs or is paused.
_UNREAD = object()


class OperationError(RuntimeError):
    """An operation that cannot be carried out as asked; the message says why."""


class HostOperations:
    """vmpower's operations for the minion ``host``, with its settings and store.

    ``clock`` is the host's monotonic clock and ``boot_id`` a function giving the host's boot
    id, injected so tests can step them; ``alive`` tells whether a ``task_owner`` runs.
    ``journal`` is what this host's beacon observed (None: nothing, so a reconcile believes
    no event's claims and decides as a sync would). ``wakeups`` is where a decision due again
    later is handed to the beacon, which asks for a sync then (None: nowhere).
    ``measurements`` is where reconciles and syncs note how long they took, for the metrics
    (None: nowhere).
    """

    def __init__(self, settings: Settings, host: str, store: Store,
                 hypervisor: Callable[[str], Hypervisor] = Hypervisor,
                 clock: Callable[[], float] = time.monotonic,
                 boot_id: Callable[[], str] = hostinfo.boot_id,
                 alive: Callable[[str], bool | None] | None = None,
                 stopping: Callable[[], bool | None] = hostinfo.host_stopping,
                 journal: Journal | None = None, wakeups: WakeUps | None = None,
                 measurements: Measurements | None = None):
        self.settings = settings
        self.host = host
        self.store = store
        self.journal = journal
        self.wakeups = wakeups
        self.measurements = measurements
        self._hypervisor = hypervisor
        self._clock = clock
        self._boot_id = boot_id
        self._alive = alive
        self._stopping = stopping
        self._stopping_seen: tuple[float, bool | None] | None = None
        self._stopping_ahead: tuple[float, threading.Thread, list] | None = None

    def connect(self) -> Hypervisor:
        return self._hypervisor(self.settings.uri)

    # Reading
    def get_info(self, target: str) -> dict:
        with self.connect() as hv:
            return hv.info(target)

    def list_instances(self) -> list[str]:
        with self.connect() as hv:
            return sorted(dom.name for dom in hv.list_all().values())

    def overview(self) -> list[dict]:
        """Every domain of this host with its live power state and its record, if any."""
        with self.connect() as hv:
            live = hv.list_all()
        records = self.store.get_many(list(live))
        rows = []
        for uuid, dom in sorted(live.items(), key=lambda item: item[1].name):
            record = records.get(uuid)
            rows.append({"uuid": uuid, "name": dom.name, "power_state": dom.state.power_state.value,
                         "vm_state": record.vm_state.value if record else None,
                         "task_state": record.task_state if record else ""})
        return rows

    def history(self, target: str, limit: int | None = None) -> list[dict]:
        record = self.store.find(target, self.host)
        if record is None:
            with self.connect() as hv:
                uuid = hv.lookup(target).UUIDString()  # UnknownDomain names it if it is not there
            return self.store.history(uuid, limit)
        return self.store.history(record.uuid, limit)

    # The facts the rules read
    def _policy(self, uuid: str, name: str):
        """Pillar for one VM, by UUID and by its live name (a renamed VM keeps its pillar)."""
        return self.settings.policy_for(uuid, name)

    def _base_facts(self, boot_id: str, name: str = "", event: Transition | None = None,
                    event_reason: str = "", event_at: float | None = None) -> Facts:
        return Facts(clock=self._clock(), boot_id=boot_id, name=name, event=event,
                     event_reason=event_reason, event_at=event_at)

    def _believe(self, uuid: str, seq: int | None, boot_id: str) -> Belief:
        """What this host's beacon observed of the event ``seq`` that it may be believed in."""
        entry = later = None
        if seq is not None and self.journal is not None:
            try:
                entry, later = self.journal.read(seq, uuid)
            except JournalError as exc:  # nothing believed: the live state and the grace decide
                log.warning("vmpower: cannot read the journal %s: %s", self.journal.path, exc)
                return Belief(None, f"this host's journal cannot be read ({exc})")
        return believe(seq, uuid, entry, later, boot_id, self.settings.uri, self._clock())

    def _last_observed(self, uuid: str, boot_id: str, live: LiveState) -> Observation | None:
        """What this host's beacon last observed of ``uuid``, for a sync: believed as a
        reconcile of that event would believe it, and only while the live state still agrees.
        A sync then dates an off spell from when libvirt called back, not from when the sync
        first saw it (events Salt dropped while the master was away, say)."""
        if self.journal is None:
            return None
        try:
            latest, _ = self.journal.latest(uuid, self.settings.uri)
        except JournalError as exc:
            log.warning("vmpower: cannot read the journal %s: %s", self.journal.path, exc)
            return None
        if latest is None:
            return None
        observation = self._believe(uuid, latest.seq, boot_id).observation
        if observation is None or is_stale(observation.transition, live):
            return None
        return observation

    def _owner_alive(self, task_owner: str, boot_id: str) -> bool | None:
        if not task_owner:
            return None
        if self._alive is not None:
            return self._alive(task_owner)
        return hostinfo.owner_alive(task_owner, self.host)

    def _host_stopping_soon(self) -> None:
        """Start asking ``stopping()`` on a thread of its own, for the decisions about to need
        it: the read (systemctl, a process) then runs while a sync locks and reads its VMs
        again. ``_host_stopping`` waits for it, and takes it as it takes any answer less than
        a second old."""
        if self._stopping_ahead is not None or (
                self._stopping_seen is not None and self._clock() - self._stopping_seen[0] < 1.0):
            return
        answer: list = []

        def ask() -> None:
            try:
                answer.append((True, self._stopping()))
            except BaseException as exc:  # raised where the answer is waited for
                answer.append((False, exc))
        thread = threading.Thread(target=ask, name="vmpower-host-state", daemon=True)
        self._stopping_ahead = (self._clock(), thread, answer)
        thread.start()

    def _host_stopping(self) -> bool | None:
        """``stopping()``, asked again at most once a second (a sync may ask for many VMs)."""
        clock = self._clock()
        ahead, self._stopping_ahead = self._stopping_ahead, None
        if ahead is not None:
            asked, thread, answer = ahead
            thread.join()  # bounded by the read itself (systemctl is given 2 s)
            ok, value = answer[0]
            if not ok:
                raise value
            if clock - asked < 1.0:
                self._stopping_seen = (asked, value)
        if self._stopping_seen is None or clock - self._stopping_seen[0] >= 1.0:
            self._stopping_seen = (clock, self._stopping())
        return self._stopping_seen[1]

    def _cheap_facts(self, record: Record | None, live: LiveState, base: Facts) -> Facts:
        """``base`` with the facts that need no libvirt call (a task's owner, the host's state)."""
        alive = self._owner_alive(record.task_owner, base.boot_id) if record and record.task_state else None
        stopping = self._host_stopping() if live.power_state.is_off else None
        return dataclasses.replace(base, owner_alive=alive, host_stopping=stopping)

    def _full_facts(self, hv: Hypervisor, uuid: str, record: Record | None, live: LiveState,
                    base: Facts, migrating=_UNREAD) -> Facts:
        """``base`` with what is read per domain: only what this decision can need.
        ``migrating``: the domain's migration job, if it was read already (in a batch)."""
        if not _may_migrate(live):
            migrating = False
        elif migrating is _UNREAD:
            migrating = hv.migration_job(uuid)
        on_crash = hv.on_crash(uuid) if live.is_crash else None
        alive = self._owner_alive(record.task_owner, base.boot_id) if record and record.task_state else None
        stopping = self._host_stopping() if live.power_state.is_off else None
        gone, at = self._journaled(uuid, base.boot_id) if live.power_state.is_off else ("", 0.0)
        return dataclasses.replace(base, migrating=migrating, migration_unknown=migrating is None,
                                   on_crash=on_crash, owner_alive=alive,
                                   host_stopping=stopping, seen_at=at,
                                   seen_off=gone if live.reason == REASON_LOST else None)

    def _journaled(self, uuid: str, boot_id: str) -> tuple[str, float]:
        """What this host's beacon last saw of the domain: how it went off ("" when it did not
        see it go off, or cannot say), and when it last saw anything of it (0.0: nothing)."""
        if self.journal is None:
            return "", 0.0
        try:
            latest, gap_after = self.journal.latest(uuid, self.settings.uri)
        except JournalError as exc:  # nothing seen: the rules then do not act on it
            log.warning("vmpower: cannot read the journal %s: %s", self.journal.path, exc)
            return "", 0.0
        return (seen_off(latest, gap_after, boot_id, self.settings.uri),
                seen_at(latest, boot_id, self.settings.uri))

    # Deciding and carrying out, under the instance lock
    def _adoption(self, dom: LiveDomain, policy: InstancePolicy, cause: Cause, at: float,
                  facts: Facts) -> Change:
        """The first record of a domain, as a change to commit."""
        record = adopt(dom.uuid, dom.name, self.host, dom.state, policy, at, facts)
        return Change(None, record, cause, "adopt", adoption_reason(record, dom.state, policy))

    def _adopt(self, dom: LiveDomain, policy: InstancePolicy, cause: Cause, at: float,
               facts: Facts) -> Record:
        """Record a domain seen for the first time, at once (``not_to_record`` said it may be);
        the caller holds its lock. A sync may have inserted it meanwhile (inserts take no
        lock): then that record is the one."""
        adoption = self._adoption(dom, policy, cause, at, facts)
        if self.store.commit([adoption], at):
            return self.store.get(dom.uuid)
        return adoption.after

    def _carry_out(self, hv: Hypervisor, record: Record, decision: Decision, cause: Cause,
                   at: float, facts: Facts, test: bool = False) -> Outcome | ToAct:
        """Act on one decision; the caller holds the instance lock and records the outcome.

        ``conduct`` (the core) says whether to: a dry run (``test``) writes and does
        nothing and reports what would be done; observe mode records what was observed,
        audits what it would have done, and never acts. A power action gives a ``ToAct``,
        carried out with the others of its batch (``_act``), then an ``Acted``: its outcome is
        known once the domain's power state is read after it (``_settle``)."""
        fields = dict(decision.observed)
        how = conduct(decision.action.value, self.settings.mode, test)
        if not how.act:
            return self._not_carried_out(record, decision, cause, at, fields, how.result, how.write, test)
        if decision.action is Action.NONE:
            fields.update(decision.outcome)
            return self._outcome(record, decision, cause, at, fields, "recorded" if fields else "nothing to do")
        fields.update(decision.attempted)  # tried: it counts, whatever comes of it

        def acted(done: bool | Exception) -> Outcome | Acted:
            if isinstance(done, Exception):  # recorded and reported; the next sync tries again
                return self._failed(record, decision, cause, at, fields, done)
            if decision.action is Action.POWER_OFF:
                result = "powered off" if done else "already off"
            else:
                result = "started" if done else "already running"
            fields.update(decision.outcome)

            def finish(power: PowerState | Exception) -> Outcome:
                if isinstance(power, Exception):
                    return self._failed(record, decision, cause, at, fields, power)
                # From the record as decided: an off spell the decision dated (from what the
                # beacon observed) is kept when the domain was already off.
                books = _off_books(record.replace(**fields), power, facts)
                fields["power_state"] = power
                fields.update(books)
                return self._outcome(record, decision, cause, at, fields, result)
            return Acted(record.uuid, finish)
        return ToAct(record.uuid, decision.action.value, acted)

    def _failed(self, record: Record, decision: Decision, cause: Cause, at: float, fields: dict,
                exc: Exception) -> Outcome:
        log.error("vmpower: %s of %s failed: %s", decision.action.value, record.name, exc)
        return self._outcome(record, decision, cause, at, fields, f"failed: {exc}")

    def _outcome(self, record: Record, decision: Decision, cause: Cause, at: float, fields: dict,
                 result: str) -> Outcome:
        """What a decision carried out reports and records: the ``fields`` it changes, if any."""
        action = decision.action.value
        reason = f"{decision.reason} ({result})" if decision.action is not Action.NONE else decision.reason
        if not fields:
            return Outcome(self._report(record, decision, result),
                           note=Note(record, cause, action, reason), retry_in=decision.retry_in)
        after = record.updated(at, **fields)
        return Outcome(self._report(after, decision, result),
                       (Change(record, after, cause, _audit_action(decision), reason),),
                       retry_in=decision.retry_in)

    @staticmethod
    def _act(hv: Hypervisor, decided: Sequence[Outcome | ToAct]) -> list[Outcome | Acted]:
        """Carry out the power actions of ``decided`` in one hand-off to libvirt's thread;
        each domain's outcome is its own result (an action that failed or timed out fails
        that domain's outcome, and no other)."""
        to_act = [(item.action, item.uuid) for item in decided if isinstance(item, ToAct)]
        done = hv.power_actions(to_act) if to_act else {}
        return [item.then(done[item.uuid]) if isinstance(item, ToAct) else item for item in decided]

    @staticmethod
    def _settle(hv: Hypervisor, carried: Sequence[Outcome | Acted]) -> list[Outcome]:
        """The outcomes of ``carried``: the domains acted on have their power state read
        again, after the actions, in one bulk call (one by one for those it cannot read)."""
        acted = [item.uuid for item in carried if isinstance(item, Acted)]
        try:
            after = hv.find_listed(acted) if acted else {}
        except HypervisorError as exc:  # a connection left busy: each read below says so
            log.debug("vmpower: no bulk state read after the actions: %s", exc)
            after = {}
        outcomes = []
        for item in carried:
            if isinstance(item, Acted):
                found = after.get(item.uuid)
                try:
                    power = found.state.power_state if found else hv.state(item.uuid).power_state
                except Exception as exc:  # pylint: disable=broad-except
                    power = exc
                item = item.finish(power)
            outcomes.append(item)
        return outcomes

    def _not_carried_out(self, record: Record, decision: Decision, cause: Cause, at: float,
                         fields: dict, result: str, write: bool, test: bool) -> Outcome:
        """A decision not carried out: a dry run's report of what it would write and do, or
        observe mode's record of the truth and audit entry of what it would have done."""
        if decision.action is Action.NONE:
            fields.update(decision.outcome)
        report = self._report(record.replace(**fields), decision, result)
        # a dry run shows it all
        shown = {**fields, **decision.attempted, **decision.outcome} if test else fields
        if shown:
            report["would_write"] = {key: getattr(value, "value", value) for key, value in shown.items()}
        if not write:
            return Outcome(report)
        reason = observed_reason(decision.action.value, decision.reason)
        if not fields:
            return Outcome(report, note=Note(record, cause, OBSERVED, reason), retry_in=decision.retry_in)
        after = record.updated(at, **fields)
        return Outcome(report, (Change(record, after, cause, OBSERVED, reason),), retry_in=decision.retry_in)

    @staticmethod
    def _report(record: Record, decision: Decision, result: str = "nothing to do") -> dict:
        report = {"uuid": record.uuid, "name": record.name, "action": decision.action.value,
                  "reason": decision.reason, "rule": decision.rule, "result": result,
                  "vm_state": record.vm_state.value, "power_state": record.power_state.value}
        if decision.retry_in is not None:
            report["retry_in"] = round(decision.retry_in, 3)
        return report

    def _decide_held(self, hv: Hypervisor, uuid: str, cause: Cause, record: Record | None,
                     dom: LiveDomain | None, boot_id: str,
                     observation: Observation | None = None, preface: str = "",
                     fresh: bool = True, test: bool = False,
                     reread: dict[str, LiveDomain | None] | None = None) -> Outcome | ToAct | Recheck:
        """Decide about one domain and act; the caller holds its instance lock.

        ``record`` was read under that lock; ``dom`` is the domain as read just now (``fresh``)
        or, for a sync, as read in bulk after that record under the lock (``reread``; the
        listing's only where the bulk read could not name it), decided first on the facts that
        cost no libvirt call and read again with every fact before any action: a ``Recheck``,
        which ``_rechecked`` decides once the sync has read the migration jobs in a batch.
        ``observation`` is what this host's beacon observed of the event being reconciled;
        ``preface`` goes before the decision's reason (what was made of the event's claims).
        """
        at = now()
        live = dom.state if dom else GONE
        transition = observation.transition if observation is not None else None
        stale = transition is not None and is_stale(transition, live)
        # The observed reason is kept even when the event is stale: the rules read it only to
        # hold back (a migration arriving, a host shutdown), never to act.
        base = self._base_facts(boot_id, dom.name if dom else "",
                                None if stale else transition,
                                observation.reason if observation is not None else "",
                                None if stale or observation is None else observation.monotonic)
        # A sync's listing is decided on the facts that cost no libvirt call; what acts, takes
        # a domain over or needs more is read again, uncached, with every fact, below.
        facts = (self._full_facts(hv, uuid, record, live, base) if fresh
                 else self._cheap_facts(record, live, base))
        if record is None:
            if dom is None:
                return Outcome({"uuid": uuid, "action": "none", "skipped": True,
                                "reason": f"no domain and no record with UUID {uuid} on {self.host}"})
            policy, error = self._policy(uuid, dom.name)
            why = not_to_record(live, policy, error, facts)
            if why:
                return Outcome({"uuid": uuid, "name": dom.name, "action": "none", "skipped": True,
                                "reason": why})
            record = (self._adoption(dom, policy, cause, at, facts).after if test  # not written
                      else self._adopt(dom, policy, cause, at, facts))
        policy, error = self._policy(uuid, dom.name if dom else record.name)
        decision = _prefaced(decide(record, live, self.host, policy, self.settings, at, error, facts),
                             preface)
        if decision.skipped:
            if decision.warning:
                log.warning("vmpower: %s: %s", record.name, decision.reason)
            return Outcome({**self._report(record, decision), "skipped": True})
        if stale:
            reason = (f"{preface}; " if preface else "") + (
                f"event {transition.value} (as this host observed it) is stale: the domain is "
                f"{live.power_state.value} now; nothing done")
            return Outcome({**self._report(record, decision), "action": "dropped", "reason": reason},
                           note=None if test else Note(record, cause, "dropped", reason))
        if decision.recheck or (not fresh and (decision.action is not Action.NONE
                                               or "host" in decision.observed)):
            # uncached, before acting on what may have changed
            found = reread[uuid] if reread is not None and uuid in reread else hv.find(uuid)
            state = found.state if found else GONE
            if state != live or not fresh:
                recheck = Recheck(uuid, record, state, base, policy, error, preface, cause, at, test)
                return recheck if not fresh else self._rechecked(hv, recheck)
        return self._carry_out(hv, record, decision, cause, at, base, test)

    def _rechecked(self, hv: Hypervisor, recheck: Recheck, migrating=_UNREAD) -> Outcome | ToAct:
        """Decide ``recheck`` on every fact (its migration job as read in a batch, if it was)."""
        r = recheck
        facts = self._full_facts(hv, r.uuid, r.record, r.state, r.base, migrating)
        decision = _prefaced(decide(r.record, r.state, self.host, r.policy, self.settings, now(),
                                    r.error, facts), r.preface)
        return self._carry_out(hv, r.record, decision, r.cause, r.at, r.base, r.test)

    def _rechecked_all(self, hv: Hypervisor,
                       decided: Sequence[Outcome | ToAct | Recheck]) -> list[Outcome | ToAct]:
        """Every ``Recheck`` of ``decided`` decided on every fact, the migration jobs of those
        that run read in one batch (a call that times out raises: no domain is acted on)."""
        rechecks = [item for item in decided if isinstance(item, Recheck)]
        jobs = hv.migration_jobs([r.uuid for r in rechecks if _may_migrate(r.state)])
        return [self._rechecked(hv, item, jobs.get(item.uuid, False))
                if isinstance(item, Recheck) else item for item in decided]

    def _record(self, outcomes: Sequence[Outcome]) -> None:
        """Commit the outcomes decided under their instance locks, in one transaction."""
        changes = [change for o in outcomes for change in o.changes]
        notes = [o.note for o in outcomes if o.note]
        if changes or notes:
            self._commit_locked(changes, now(), notes)

    def _commit_locked(self, changes: Sequence[Change], at: float, notes: Sequence[Note] = ()) -> None:
        """Commit changes made under their instance locks: losing a race there is a bug."""
        lost = self.store.commit(changes, at, notes)
        if lost:
            names = ", ".join(change.after.name for change in lost)
            raise OperationError(f"the record of {names} changed under its instance lock")

    # The operations
    def reconcile(self, uuid: str, transition: Transition | None = None,
                  cause: Cause = Cause.EVENT, reason: str = "", test: bool = False,
                  seq: int | None = None) -> dict:
        """Decide about one domain on its live state now, as the event ``seq`` asks.

        An event is a trigger, never a fact: ``transition`` and ``reason`` are what it claims,
        and are reported, never believed. What this host's beacon journaled as the event
        ``seq`` (its transition, reason, and when libvirt called back) is believed, if it is
        the beacon's latest word on the domain; otherwise the domain is re-checked on its live
        state and its record, with the grace, as a sync would. ``test``: say what would be
        done, and change nothing (no record, no audit entry)."""
        boot_id = self._boot_id()
        with self.connect() as hv:
            asked = self._clock()
            with self.store.lock(uuid):
                lock_wait = self._clock() - asked
                belief = self._believe(uuid, seq, boot_id)
                preface = _claims_text(transition, reason, seq, belief)
                decision = self._decide_held(hv, uuid, cause, self.store.get(uuid),
                                             hv.find(uuid), boot_id, belief.observation,
                                             preface, test=test)
                decided = self._clock()  # before the action is carried out
                [outcome] = self._settle(hv, self._act(hv, [decision]))
                if not test:
                    self._record([outcome])
        result = outcome.report
        observation = belief.observation
        if self.measurements is not None and not test:
            # From libvirt's callback, as this host's beacon journaled it, on the same clock;
            # not for a STOPPED, which the beacon holds back stop_grace on purpose.
            latency = (decided - observation.monotonic
                       if observation is not None and observation.boot_id == boot_id
                       and observation.transition is not Transition.STOPPED else None)
            self.measurements.decision(cause.value, str(result.get("rule", "")),
                                       str(result.get("action", "none")),
                                       bool(result.get("skipped")), latency, lock_wait)
        if observation is not None:
            result["observed"] = {"seq": observation.seq, "transition": observation.transition.value,
                                  "reason": observation.reason}
        if test:
            result["test"] = True
        if self.settings.mode != ENFORCE:
            result["mode"] = self.settings.mode
        if transition is not None:
            result["transition"] = transition.value
        if outcome.retry_in is not None:
            result["retry_at"] = round(now() + outcome.retry_in, 3)
            if not test:
                self._wake_up(boot_id, outcome.retry_in)
        return result

    def sync(self, test: bool = False) -> dict:
        """Check every domain and record of this host against the rules, in bulk.

        Decides first without locks; only the VMs whose record must change (or that need an
        action, or facts read one by one) are locked, without waiting, re-read and decided
        again: a VM whose lock another job holds is listed under ``busy``.

        ``test``: a dry run: what would be written is under ``would_write`` (first
        records) and in each entry of ``actions``, with why; nothing changes.
        """
        started = time.monotonic()
        report: dict[str, object] = {"host": self.host, "checked": 0, "updated": 0,
                                     "actions": [], "skipped": [], "warnings": [], "busy": []}
        if test:
            report.update(test=True, would_write=[])
        if self.settings.mode != ENFORCE:
            report["mode"] = self.settings.mode
        retries: list[float] = []
        boot_id = self._boot_id()
        with self._sync_turn(test) as covered_by:
            if covered_by:
                report["queued"] = covered_by
                return report
            began = self._clock()  # a wake-up due by then is answered by this sync
            with _collector_paused():
                self._sync_held(report, retries, boot_id, test)
        if retries:
            report["retry_at"] = round(now() + min(retries), 3)
        if not test:
            self._wake_up(boot_id, min(retries) if retries else None, answered_before=began)
        report["took"] = round(time.monotonic() - started, 6)
        if self.measurements is not None and not test:
            # What the sync did and refused, by rule (in-sync VMs are not listed, nor counted).
            decided = collections.Counter((str(entry.get("rule", "")), str(entry.get("action", "none")))
                                          for entry in report["actions"])
            refused = collections.Counter(str(entry.get("rule", "")) for entry in report["skipped"])
            refused["locked"] += len(report["busy"])
            self.measurements.sync(report["took"], report["checked"], decided, refused)
        return report

    @contextlib.contextmanager
    def _sync_turn(self, test: bool) -> Iterator[str]:
        """This host's turn to sync: yields "" holding the host's sync lock, or, when the ask
        is already covered, why (and holds nothing).

        A sync asked while another runs must not fail on the busy lock, nor be answered by a
        sync that listed before it was asked: it queues behind the running one. At most one
        sync waits: it takes the host's queue lock, waits for the sync lock, and gives the
        queue lock up only once it holds the sync lock, before it lists. So an ask that finds
        the queue lock held is covered by the waiting sync, which will list after it: the
        asks that arrive while one sync runs are merged into one sync run after it. A dry run
        changes nothing, and only waits as any lock does.
        """
        host_lock = f"host-{self.host}"
        if test:
            with self.store.lock(host_lock):
                yield ""
            return
        with contextlib.ExitStack() as holding:
            held, busy = holding.enter_context(self.store.try_locks([host_lock]))
            if held:
                yield ""
                return
            running = describe_holder(busy[host_lock])
            with contextlib.ExitStack() as queue:
                queued, waiting = queue.enter_context(self.store.try_locks([f"sync-queue-{self.host}"]))
                if not queued:
                    [holder] = waiting.values()
                    log.info("vmpower: a sync of %s is running and another waits to run after "
                             "it: this ask is merged into the waiting one", self.host)
                    yield (f"merged: a sync of {self.host} is running ({running}) and the one "
                           f"waiting to run after it ({describe_holder(holder)}) lists after this ask")
                    return
                log.info("vmpower: a sync of %s is running (%s): this one runs after it",
                         self.host, running)
                holding.enter_context(self.store.lock(host_lock, SYNC_QUEUE_WAIT))
            yield ""

    def _sync_held(self, report: dict, retries: list[float], boot_id: str, test: bool) -> None:
        """The sync itself; the caller holds the host's sync lock."""
        with self.connect() as hv:
            at = now()
            live = hv.list_all()
            # Rows, not records: a Record is built only for the few distinct situations decided.
            records = self.store.rows_for_host(self.host)
            missing = [uuid for uuid in live if uuid not in records]
            elsewhere = self.store.get_many(missing) if missing else {}
            for uuid, row in records.items():
                if uuid not in live:
                    live[uuid] = LiveDomain(uuid, row[1], GONE)
            autostart = hv.autostart_set() if self.settings.instances else None

            adoptions: list[Change] = []
            to_lock: list[str] = []
            decide_once = _SyncDecisions(self, at, boot_id)
            answers = decide_once.answers
            # Without pillar entries every VM has the default policy: not asked 10,000 times.
            uniform = None if self.settings.instances or self.settings.instance_errors else (
                DEFAULT_POLICY, None)
            for uuid, dom in live.items():
                policy, error = uniform or self._policy(uuid, dom.name)
                if autostart is not None and dom.state is not GONE:
                    warning = autostart_warning(policy, uuid in autostart)
                    if warning:
                        report["warnings"].append({"uuid": uuid, "name": dom.name, "reason": warning})
                record = records.get(uuid) or elsewhere.get(uuid)
                if record is None:
                    facts = decide_once.facts
                    if dom.state.power_state is PowerState.PAUSED:  # an incoming migration?
                        job = hv.migration_job(uuid)
                        facts = dataclasses.replace(facts, migrating=job, migration_unknown=job is None)
                    why = not_to_record(dom.state, policy, error, facts)
                    if why:
                        report["skipped"].append({"uuid": uuid, "name": dom.name, "reason": why,
                                                  "rule": "not_recorded"})
                        continue
                    adoption = self._adoption(dom, policy, Cause.SYNC, at, facts)
                    adoptions.append(adoption)
                    record = adoption.after
                # Each distinct situation decided once (_SyncDecisions): by identity, live
                # states and policies are shared objects (live_state is memoised), and an equal
                # but distinct one costs a second decision, never a wrong one. The key holds
                # every field decide reads: all but uuid, name, updated_at and version.
                state = dom.state
                renamed = dom.name != record[1] and state is not GONE
                key = (record[2:6] + record[8:], id(state), id(policy), error, renamed)
                answer = answers.get(key)
                decision, quiet = answer if answer is not None else decide_once(
                    key, record, dom, policy, error, renamed)
                if quiet:  # most VMs of a sync: in sync, nothing to write, report or retry
                    continue
                if decision.skipped:
                    report["skipped"].append({"uuid": uuid, "name": dom.name,
                                              "reason": decision.reason, "rule": decision.rule})
                    if decision.warning:  # a person must look (a record it cannot read)
                        log.warning("vmpower: %s: %s", dom.name, decision.reason)
                elif (decision.action is not Action.NONE or decision.observed or decision.outcome
                      or decision.recheck):
                    to_lock.append(uuid)
                    continue
                elif decision.warning:
                    self._warn(report, uuid, dom.name, decision.reason)
                if decision.retry_in is not None:
                    retries.append(decision.retry_in)
            report["checked"] = len(live)
            # First records are inserts: one that lost (someone adopted it first) is decided
            # again under its lock with the record that won.
            if test:
                report["would_write"] = [{"uuid": c.after.uuid, "name": c.after.name, "action": c.action,
                                          "reason": c.reason} for c in adoptions]
                lost = []
            else:
                lost = self.store.commit(adoptions, at) if adoptions else []
                report["updated"] = len(adoptions) - len(lost)
            to_lock.extend(change.after.uuid for change in lost if change.after.uuid not in to_lock)

            if any(live[uuid].state.power_state.is_off for uuid in to_lock):
                self._host_stopping_soon()  # a VM seen off is decided on it, under its lock
            for start in range(0, len(to_lock), LOCK_CHUNK):
                chunk = to_lock[start:start + LOCK_CHUNK]
                with self.store.try_locks(chunk) as (held, busy):
                    for uuid, holder in busy.items():
                        by = f" ({describe_holder(holder)})" if holder else ""
                        report["busy"].append({"uuid": uuid, "name": live[uuid].name,
                                               "reason": f"another vmpower job holds its instance "
                                                         f"lock{by}: left for the next sync"})
                    fresh = self.store.get_many(held) if held else {}
                    # Read again under the locks, in one round trip rather than one per domain.
                    reread = hv.find_listed(held) if held else {}
                    # Decided on the domain as read after its record, never on the listing:
                    # the event path may have written a newer record since the listing.
                    now_live = {uuid: reread[uuid] if uuid in reread else (
                        None if live[uuid].state is GONE else live[uuid]) for uuid in held}
                    decided = self._rechecked_all(hv, [
                        self._decide_held(hv, uuid, Cause.SYNC, fresh.get(uuid),
                                          now_live[uuid], boot_id,
                                          self._last_observed(
                                              uuid, boot_id,
                                              now_live[uuid].state if now_live[uuid] else GONE),
                                          fresh=False, test=test, reread=reread)
                        for uuid in held])
                    outcomes = self._settle(hv, self._act(hv, decided))
                    if not test:
                        self._record(outcomes)
                if hv.stuck is not None:  # each outcome is recorded; the sync still fails
                    raise LibvirtTimeout(f"libvirt at {hv.uri} did not answer (to {hv.stuck}): "
                                         f"the sync ends here")
                for outcome in outcomes:
                    self._report_outcome(report, outcome, counted=not test)
                    if outcome.retry_in is not None:
                        retries.append(outcome.retry_in)

    def _wake_up(self, boot_id: str, retry_in: float | None,
                 answered_before: float | None = None) -> None:
        """Hand the beacon a sync due ``retry_in`` seconds from now (and say that a sync that
        began at ``answered_before`` is over). Logged, never raised: the decision is made and
        recorded, and the periodic sync is the safety net."""
        if self.wakeups is None:
            return
        # From the clock read now, after the decisions: a retry is late by the job's length
        # at most, never early.
        clock = self._clock()
        due = None if retry_in is None else clock + retry_in
        try:
            self.wakeups.update(boot_id, due, clock, answered_before)
        except OSError as exc:
            log.warning("vmpower: cannot hand the sync due in %ss to the beacon (%s): %s",
                        retry_in, self.wakeups.path, exc)

    @staticmethod
    def _warn(report: dict, uuid: str, name: str, reason: str) -> None:
        log.warning("vmpower: %s: %s", name, reason)
        report["warnings"].append({"uuid": uuid, "name": name, "reason": reason})

    def _report_outcome(self, report: dict, outcome: Outcome, counted: bool = True) -> None:
        entry = outcome.report
        if entry.get("skipped"):
            report["skipped"].append({"uuid": entry["uuid"], "name": entry.get("name", ""),
                                      "reason": entry["reason"], "rule": entry.get("rule", "")})
        elif entry.get("action", "none") != "none":
            report["actions"].append(entry)
        if counted:  # a dry run's outcome wrote nothing
            report["updated"] += sum(1 for change in outcome.changes if change.before is not None)

    def stop(self, target: str, timeout: float | None = None, force: bool = False,
             cause: Cause = Cause.API) -> dict:
        """Shut the domain down gracefully, power it off after ``timeout``; vm_state=stopped."""
        timeout = self.settings.stop_timeout if timeout is None else timeout
        return self._power(target, cause, TASK_POWERING_OFF, VmState.STOPPED,
                           lambda hv, uuid: self._shut_down(hv, uuid, timeout, force))

    def start(self, target: str, cause: Cause = Cause.API) -> dict:
        """Start the domain; vm_state=active, and its restart count starts afresh."""
        def boot(hv, uuid):
            return "started" if hv.start(uuid) else "already running"
        return self._power(target, cause, TASK_POWERING_ON, VmState.ACTIVE, boot)

    @staticmethod
    def _shut_down(hv: Hypervisor, uuid: str, timeout: float, force: bool) -> str:
        if force:
            return "powered off (force)" if hv.power_off(uuid) else "already off"
        if hv.state(uuid).power_state.is_off:
            return "already off"
        begun = time.monotonic()
        if hv.shutdown(uuid, timeout):
            return f"shut down gracefully in {time.monotonic() - begun:.1f}s"
        hv.power_off(uuid)
        return f"still running after {timeout:g}s: powered off"

    def _refusal(self, name: str, record: Record | None, policy: InstancePolicy,
                 error: str | None, vm_state: VmState, live: LiveState, facts: Facts) -> str | None:
        """Why a power operation making ``name`` ``vm_state`` must not be done now, or None."""
        refusal = refuse_power(name, record, policy, error, vm_state, facts.owner_alive, live, self.host)
        if refusal is None and facts.migrating:
            refusal = f"{name} is in the middle of a migration: vmpower leaves it alone until it ends"
        if refusal is None and facts.migration_unknown:
            refusal = (f"libvirt could not say whether {name} is in the middle of a migration: "
                       f"vmpower leaves it alone until it can")
        return refusal

    def power_refusal(self, target: str, vm_state: VmState) -> str | None:
        """Why ``stop`` (``vm_state`` stopped) or ``start`` (active) of ``target`` would be
        refused if asked now, or None: the same reads and checks, nothing locked or written.
        For a dry run (the states' test=True)."""
        with self.connect() as hv:
            dom = hv.lookup(target)
            uuid, name = dom.UUIDString(), dom.name()
            policy, error = self._policy(uuid, name)
            live = hv.state(uuid)
            record = self.store.get(uuid)
            facts = self._full_facts(hv, uuid, record, live, self._base_facts(self._boot_id(), name))
            return self._refusal(name, record, policy, error, vm_state, live, facts)

    def _power(self, target: str, cause: Cause, task: str, vm_state: VmState,
               operate: Callable[[Hypervisor, str], str]) -> dict:
        """Run one power operation under the instance lock with ``task_state`` set meanwhile.

        The task_state names this process as its owner, so that if the process dies (killed,
        OOM, host crash) the next reconcile or sync clears it. Any way out of the operation,
        SystemExit from ``saltutil.term_job`` included, clears it here.
        """
        boot_id = self._boot_id()
        with self.connect() as hv:
            dom = hv.lookup(target)
            uuid, name = dom.UUIDString(), dom.name()
            policy, error = self._policy(uuid, name)
            refusal = refuse_power(name, None, policy, error, vm_state)
            if refusal:
                raise OperationError(refusal)
            with self.store.lock(uuid):
                at = now()
                live = hv.state(uuid)
                record = self.store.get(uuid)
                facts = self._full_facts(hv, uuid, record, live, self._base_facts(boot_id, name))
                refusal = self._refusal(name, record, policy, error, vm_state, live, facts)
                if refusal:
                    raise OperationError(refusal)
                if record is None:
                    record = self._adopt(LiveDomain(uuid, name, live), policy, cause, at, facts)
                why = f"{task} requested ({cause.value})"
                if record.task_state:
                    why += (f"; task_state={record.task_state} of a process that is gone "
                            f"replaced")
                owner = hostinfo.process_owner(self.host, boot=boot_id)
                busy = record.updated(at, task_state=task, task_owner=owner)
                self._commit_locked([Change(record, busy, cause, task, why)], at)
                begun = time.monotonic()
                try:
                    how = operate(hv, uuid)
                except BaseException as exc:  # SystemExit (saltutil.term_job) too
                    self._finish(busy, {}, cause, f"{task} failed: {exc!r}")
                    raise
                live = hv.state(uuid)
                fields = {"vm_state": vm_state, "power_state": live.power_state, "name": name,
                          "host": self.host, **_off_books(busy, live.power_state, facts)}
                if vm_state is VmState.ACTIVE:
                    fields.update(restart_count=0, last_restart_at=0.0)
                done = self._finish(busy, fields, cause, f"{task.replace('powering', 'power')}: {how}")
        return {"uuid": uuid, "name": name, "result": how, "vm_state": done.vm_state.value,
                "power_state": done.power_state.value,
                "took": round(time.monotonic() - begun, 3)}

    def _finish(self, busy: Record, fields: dict, cause: Cause, reason: str) -> Record:
        at = now()
        done = busy.updated(at, **fields, task_state="", task_owner="")
        self._commit_locked([Change(busy, done, cause, "done", reason)], at)
        return done

    def reset_state(self, target: str, vm_state: VmState | None = None,
                    cause: Cause = Cause.API, force: bool = False) -> dict:
        """The operator's way out: clear a task_state vmpower set, and leave ``error``.

        ``vm_state`` sets it (default: a VM in error takes the vm_state its power state means).
        A pillar task_state is the operator's own: it is never cleared. Only the VM's owner
        resets it; ``force`` (with ``vm_state``) does it from another host, audited as forced.
        """
        with self.connect() as hv:
            record = self.store.find(target, self.host)
            if record is None:
                dom = hv.lookup(target)  # UnknownDomain names it if it is not there
                record = self.store.get(dom.UUIDString())
                if record is None:
                    raise OperationError(f"{dom.name()} has no record yet: nothing to reset")
            uuid = record.uuid
            with self.store.lock(uuid):
                record = self.store.get(uuid)
                found = hv.find(uuid)
                live = found.state if found else GONE
                policy, error = self._policy(uuid, found.name if found else record.name)
                if error:
                    raise OperationError(f"{record.name}: {error}")
                answer = reset(record, live, policy, vm_state, self.host, force)
                if answer.refused:
                    raise OperationError(f"{record.name}: {answer.reason}")
                if answer.fields:
                    at = now()
                    after = record.updated(at, **answer.fields)
                    self._commit_locked([Change(record, after, cause, "reset", answer.reason)], at)
                    record = after
        return {"uuid": record.uuid, "name": record.name, "reason": answer.reason,
                "changed": bool(answer.fields), "vm_state": record.vm_state.value,
                "power_state": record.power_state.value, "task_state": record.task_state}

    def status(self, event_loop_status: str | None = None) -> dict:
        """Whether libvirt answers at the configured URI, and what the store holds.

        ``event_loop_status`` is the path of the beacon's status file; its content (written by
        the minion process, which runs the event loop) is reported under ``event_loop``, and the
        live metrics file's writer (where, how often, its error) under ``metrics``.
        """
        result = {"host": self.host, "uri": self.settings.uri, "store": self.store.path,
                  "records": self.store.count(self.host)}
        try:
            with self.connect() as hv:
                result["domains"] = len(hv.list_all())
            result["connected"] = True
        except Exception as exc:  # status reports a broken connection, it does not fail on it
            result.update(connected=False, error=str(exc))
        if event_loop_status is not None:
            result["event_loop"] = read_status(event_loop_status)
            # The live metrics file, which the beacon's process writes: its error, if any.
            if isinstance(result["event_loop"].get("metrics"), dict):
                result["metrics"] = result["event_loop"]["metrics"]
        return result


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block (left off where it was off).

    A sync of thousands of domains holds tens of thousands of objects at once (the listing, a
    libvirt handle per domain, the records), which reference counting frees when the sync
    ends. Their number alone makes the collector run meanwhile, move them to its oldest
    generation and then traverse the whole heap of the process: at 10,000 domains, about a
    tenth of the sync. Paused, it collects whatever cycles the block made once it resumes.
    The collector is the process's: in a process that runs jobs on threads, the others'
    cycles wait for the end of the sync too (each libvirt call of a sync is bounded, so the
    sync ends)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _may_migrate(live: LiveState) -> bool:
    """Whether a domain in this state can have a migration job worth reading."""
    return live.power_state in (PowerState.RUNNING, PowerState.PAUSED)


def _off_books(record: Record, power: PowerState, facts: Facts) -> dict:
    """The off-spell bookkeeping after vmpower itself changed a domain's power."""
    if power in (PowerState.SHUTDOWN, PowerState.CRASHED):
        if record.power_state.is_off and record.off_since and record.boot_id == facts.boot_id:
            return {}
        books = {"off_since": facts.clock, "boot_id": facts.boot_id, "off_reason": ""}
    elif power is PowerState.NOSTATE:
        return {}
    else:
        books = {"off_since": 0.0, "off_reason": "", "boot_id": facts.boot_id}
    if record.last_restart_at and record.boot_id != facts.boot_id:
        # A monotonic time of another boot means nothing in this one: the back-off starts now.
        books["last_restart_at"] = facts.clock
    return books


def _claims_text(transition: Transition | None, reason: str, seq: int | None,
                 belief: Belief) -> str:
    """What a reconcile made of its event's claims, in words ("" when there were none, or they
    are what this host observed)."""
    claimed = ", ".join(part for part in (transition.value if transition else "",
                                          f"reason {reason}" if reason else "") if part)
    observation = belief.observation
    if observation is None:
        if not claimed:
            return ""
        log.info("vmpower: an event claims %s: not believed (%s); re-checking the live state",
                 claimed, belief.why)
        return (f"the event's claims ({claimed}) are not what this host observed ({belief.why}): "
                f"re-checked on the live state")
    if claimed and (transition not in (None, observation.transition)
                    or reason not in ("", observation.reason)):
        log.warning("vmpower: event seq %s claims %s, but this host's beacon observed %s (%s)",
                    seq, claimed, observation.transition.value, observation.reason)
        return (f"the event claims {claimed}; this host observed {observation.transition.value} "
                f"({observation.reason}), which is what counts")
    return ""


def _prefaced(decision: Decision, preface: str) -> Decision:
    return dataclasses.replace(decision, reason=f"{preface}; {decision.reason}") if preface else decision


def _audit_action(decision: Decision) -> str:
    """The audit entry's action word: what was done, or ``update`` for a write only."""
    return decision.action.value if decision.action is not Action.NONE else "update"


class _SyncDecisions:
    """``decide`` for every VM of one sync, each distinct situation decided once.

    ``decide`` is pure, and its answer does not depend on a VM's name or UUID, only on its
    record's states, its live state and its pillar: a host of thousands of VMs has a handful of
    distinct situations, so a sync need not decide thousands of times. (A renamed domain, and
    the off-spell bookkeeping, are in the key, so they are decided on their own.) The sync's
    loop makes each VM's key and looks it up in ``answers``; a miss is decided here.
    """

    def __init__(self, ops: HostOperations, at: float, boot_id: str):
        self._ops = ops
        self._at = at
        self.facts = ops._base_facts(boot_id)
        self.answers: dict[tuple, tuple[Decision, bool]] = {}

    def __call__(self, key: tuple, row: Sequence, dom: LiveDomain, policy: InstancePolicy,
                 error: str | None, renamed: bool) -> tuple[Decision, bool]:
        """The decision for a record (a ``Record``, or a row of ``Store.rows_for_host``: the
        same fields in the same order, its states as text) and its listed domain, and whether
        it is quiet: nothing to lock, write, report or retry. ``key`` is its situation, which
        the caller found no answer for in ``answers`` (a state as text and as a member may key
        apart: a second decision, never a wrong one); ``renamed``: the domain's name is not
        the record's."""
        record = row if isinstance(row, Record) else record_of(row)
        facts = self.facts
        if renamed:
            facts = dataclasses.replace(facts, name=dom.name)
        if record.task_state and record.task_owner:  # rare: read whether its owner runs
            facts = dataclasses.replace(facts, owner_alive=self._ops._owner_alive(
                record.task_owner, facts.boot_id))
        unowned_lost = not record.host and dom.state.reason == REASON_LOST
        if unowned_lost:
            # Rare: a copy no host owns, whose reason a libvirtd restart lost. Whether it
            # lives elsewhere is what this host's beacon saw; without it, every sync would
            # take the copy over under its lock, then let it go again.
            gone, _ = self._ops._journaled(record.uuid, facts.boot_id)
            facts = dataclasses.replace(facts, seen_off=gone)
        decision = decide(record, dom.state, self._ops.host, policy, self._ops.settings,
                          self._at, error, facts)
        answer = (decision, not (decision.skipped or decision.action is not Action.NONE
                                 or decision.observed or decision.outcome or decision.recheck
                                 or decision.warning or decision.retry_in is not None))
        if not renamed and not record.task_owner and not unowned_lost:
            self.answers[key] = answer
        return answer
