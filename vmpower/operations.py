"""What vmpower does on one host: reconcile, sync, stop and start, over the rules and the store.

This is the shell around the pure core: it reads live state through ``Hypervisor``, asks
``rules.decide``, carries the answer out and records it. It knows nothing of Salt, so the
execution module, the states, the tests and the benchmarks all drive the same code.

Concurrency: every write to one record is compare-and-set on its version, and anything that
acts on a domain holds that instance's lock, re-reads and decides again first. A decision
that writes nothing takes no lock at all, which keeps a sync of thousands of VMs cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence

from vmpower.core.mapping import is_stale
from vmpower.core.model import (
    TASK_POWERING_OFF,
    TASK_POWERING_ON,
    GONE,
    Cause,
    LiveState,
    Record,
    Transition,
    VmState,
    now,
)
from vmpower.core.rules import Action, Decision, adopt, decide
from vmpower.core.settings import InstancePolicy, Settings
from vmpower.eventloop import read_status
from vmpower.hypervisor import Hypervisor, LiveDomain
from vmpower.store import Change, Note, Store

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One decision carried out: what to report, and what to record (a change or a note)."""

    report: dict
    change: Optional[Change] = None
    note: Optional[Note] = None


class OperationError(RuntimeError):
    """An operation that cannot be carried out as asked; the message says why."""


class HostOperations:
    """vmpower's operations for the minion ``host``, with its settings and store."""

    def __init__(self, settings: Settings, host: str, store: Store,
                 hypervisor: Callable[[str], Hypervisor] = Hypervisor):
        self.settings = settings
        self.host = host
        self.store = store
        self._hypervisor = hypervisor

    def connect(self) -> Hypervisor:
        return self._hypervisor(self.settings.uri)

    # Reading
    def get_info(self, target: str) -> dict:
        with self.connect() as hv:
            return hv.info(target)

    def list_instances(self) -> List[str]:
        with self.connect() as hv:
            return sorted(dom.name for dom in hv.list_all().values())

    def overview(self) -> List[dict]:
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

    def history(self, target: str, limit: Optional[int] = None) -> List[dict]:
        record = self.store.find(target, self.host)
        if record is None:
            with self.connect() as hv:
                uuid = hv.lookup(target).UUIDString()  # UnknownDomain names it if it is not there
            return self.store.history(uuid, limit)
        return self.store.history(record.uuid, limit)

    # Deciding
    def _policy(self, uuid: str, name: str):
        return self.settings.policy_for(uuid, name)

    def _decide(self, record: Record, live: LiveState, at: float) -> Decision:
        policy, error = self._policy(record.uuid, record.name)
        return decide(record, live, self.host, policy, self.settings, at, error)

    @staticmethod
    def _not_to_record(policy: InstancePolicy, error: Optional[str]) -> Optional[str]:
        """Why a domain seen for the first time must not even be recorded (bad pillar, or a
        pillar lock: rule 1), or None."""
        if error:
            return error
        if policy.task_state:
            return f"task_state={policy.task_state} is set in pillar: not even recorded"
        return None

    def _adopt(self, dom: LiveDomain, policy: InstancePolicy, cause: Cause, at: float) -> Record:
        """Record a domain seen for the first time (``_not_to_record`` said it may be)."""
        adoption = self._adoption(dom, policy, cause, at)
        if self.store.commit([adoption], at):
            return self.store.get(dom.uuid)  # someone else adopted it first
        return adoption.after

    def _adoption(self, dom: LiveDomain, policy: InstancePolicy, cause: Cause, at: float) -> Change:
        """The first record of a domain, as a change to commit."""
        record = adopt(dom.uuid, dom.name, self.host, dom.state, policy, at).replace(version=1)
        reason = (f"first seen {dom.state.power_state.value}: vm_state={record.vm_state.value}"
                  + (" (pinned by pillar)" if policy.vm_state else " (adopted)"))
        return Change(None, record, cause, "adopt", reason)

    def _carry_out(self, hv: Hypervisor, record: Record, decision: Decision, cause: Cause,
                   at: float) -> Outcome:
        """Act on one decision; the caller holds the instance lock and records the outcome."""
        fields = dict(decision.observed)
        if decision.action is Action.NONE:
            fields.update(decision.outcome)
            result = "recorded" if fields else "nothing to do"
        else:
            try:
                if decision.action is Action.POWER_OFF:
                    result = "powered off" if hv.power_off(record.uuid) else "already off"
                else:
                    result = "started" if hv.start(record.uuid) else "already running"
                fields.update(decision.outcome)
                fields["power_state"] = hv.state(record.uuid).power_state
            except Exception as exc:  # recorded and reported; the next sync tries again
                result = f"failed: {exc}"
                log.error("vmpower: %s of %s failed: %s", decision.action.value, record.name, exc)
        action = decision.action.value
        reason = f"{decision.reason} ({result})" if decision.action is not Action.NONE else decision.reason
        if not fields:
            return Outcome(self._report(record, decision, result), note=Note(record, cause, action, reason))
        after = record.replace(**fields, version=record.version + 1, updated_at=at)
        return Outcome(self._report(after, decision, result), Change(record, after, cause, action, reason))

    @staticmethod
    def _report(record: Record, decision: Decision, result: str = "nothing to do") -> dict:
        return {"uuid": record.uuid, "name": record.name, "action": decision.action.value,
                "reason": decision.reason, "result": result, "vm_state": record.vm_state.value,
                "power_state": record.power_state.value}

    def _reconcile_held(self, hv: Hypervisor, uuid: str, cause: Cause,
                        transition: Optional[Transition] = None) -> Outcome:
        """Re-read everything, decide and act; the caller holds the instance lock."""
        at = now()
        dom = hv.find(uuid)
        live = dom.state if dom else GONE
        record = self.store.get(uuid)
        if record is None:
            if dom is None:
                return Outcome({"uuid": uuid, "action": "none", "skipped": True,
                                "reason": f"no domain and no record with UUID {uuid} on {self.host}"})
            policy, error = self._policy(dom.uuid, dom.name)
            why = self._not_to_record(policy, error)
            if why:
                return Outcome({"uuid": uuid, "name": dom.name, "action": "none", "skipped": True,
                                "reason": why})
            record = self._adopt(dom, policy, cause, at)
        decision = self._decide(record, live, at)
        if decision.skipped:
            return Outcome({**self._report(record, decision), "skipped": True})
        if transition is not None and is_stale(transition, live):
            reason = (f"event {transition.value} is stale: the domain is "
                      f"{live.power_state.value} now; nothing done")
            return Outcome({**self._report(record, decision), "action": "dropped", "reason": reason},
                           note=Note(record, cause, "dropped", reason))
        if decision.recheck:
            fresh = hv.state(uuid)
            if fresh != live:
                decision = self._decide(record, fresh, now())
        return self._carry_out(hv, record, decision, cause, at)

    def _record(self, outcomes: List[Outcome]) -> None:
        """Commit the outcomes decided under their instance locks, in one transaction."""
        changes = [o.change for o in outcomes if o.change]
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
    def reconcile(self, uuid: str, transition: Optional[Transition] = None,
                  cause: Cause = Cause.EVENT) -> dict:
        """Decide about one domain on its live state now; ``transition`` is what an event claimed."""
        with self.connect() as hv, self.store.lock(uuid):
            outcome = self._reconcile_held(hv, uuid, cause, transition)
            self._record([outcome])
        result = outcome.report
        if transition is not None:
            result["transition"] = transition.value
        return result

    def sync(self) -> dict:
        """Check every domain and record of this host against the rules, in bulk."""
        started = time.monotonic()
        report: Dict[str, object] = {"host": self.host, "checked": 0, "updated": 0,
                                     "actions": [], "skipped": [], "warnings": []}
        with self.store.lock(f"host-{self.host}"), self.connect() as hv:
            at = now()
            live = hv.list_all()
            records = self.store.for_host(self.host)
            missing = [uuid for uuid in live if uuid not in records]
            elsewhere = self.store.get_many(missing) if missing else {}
            for uuid in records:
                if uuid not in live:
                    live[uuid] = LiveDomain(uuid, records[uuid].name, GONE)

            writes: List[Change] = []
            to_act: List[str] = []
            decide_once = _SyncDecisions(self, at)
            for uuid, dom in live.items():
                record = records.get(uuid) or elsewhere.get(uuid)
                if record is None:
                    policy, error = self._policy(uuid, dom.name)
                    why = self._not_to_record(policy, error)
                    if why:
                        report["skipped"].append({"uuid": uuid, "name": dom.name, "reason": why})
                        continue
                    adoption = self._adoption(dom, policy, Cause.SYNC, at)
                    writes.append(adoption)
                    record = adoption.after
                    decision = decide_once(record, dom.state)
                else:
                    decision = decide_once(record, dom.state)
                if decision.skipped:
                    report["skipped"].append({"uuid": uuid, "name": dom.name,
                                              "reason": decision.reason})
                elif decision.warning:
                    log.warning("vmpower: %s: %s", dom.name, decision.reason)
                    report["warnings"].append({"uuid": uuid, "name": dom.name,
                                               "reason": decision.reason})
                if decision.action is not Action.NONE:
                    to_act.append(uuid)
                elif (decision.observed or decision.outcome) and uuid in records:
                    fields = {**decision.observed, **decision.outcome}
                    writes.append(Change(record, record.replace(
                        **fields, version=record.version + 1, updated_at=at),
                        Cause.SYNC, "update", decision.reason))
            report["checked"] = len(live)
            conflicts = self.store.commit(writes, at) if writes else []
            report["updated"] = len(writes) - len(conflicts)
            # Actions, and writes that lost a race, are decided again under their locks and
            # recorded together in one transaction.
            again = to_act + [change.after.uuid for change in conflicts]
            with self.store.locks(again):
                outcomes = [self._reconcile_held(hv, uuid, Cause.SYNC) for uuid in again]
                self._record(outcomes)
            for outcome in outcomes:
                if outcome.report.get("action", "none") != "none":
                    report["actions"].append(outcome.report)
                if outcome.change:
                    report["updated"] += 1
        report["took"] = round(time.monotonic() - started, 6)
        return report

    def stop(self, target: str, timeout: Optional[float] = None, force: bool = False,
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

    def _power(self, target: str, cause: Cause, task: str, vm_state: VmState,
               operate: Callable[[Hypervisor, str], str]) -> dict:
        """Run one power operation under the instance lock with ``task_state`` set meanwhile."""
        with self.connect() as hv:
            dom = hv.lookup(target)
            uuid, name = dom.UUIDString(), dom.name()
            policy, error = self._policy(uuid, name)
            if error:
                raise OperationError(f"{name}: {error}")
            if not policy.managed:
                raise OperationError(f"{name} is managed: false in pillar: vmpower does not act on it")
            if policy.vm_state not in (None, vm_state):
                # The next sync would undo it: refuse rather than fight the operator's pin.
                raise OperationError(f"{name}: pillar pins vm_state={policy.vm_state.value}, "
                                     f"so it cannot be made {vm_state.value}")
            with self.store.lock(uuid):
                at = now()
                record = self.store.get(uuid)
                if record is None and not policy.task_state:
                    record = self._adopt(LiveDomain(uuid, name, hv.state(uuid)), policy, cause, at)
                lock = policy.task_state or record.task_state
                if lock:
                    raise OperationError(f"{name} has task_state={lock}: vmpower leaves it "
                                         f"alone until that is cleared")
                busy = record.replace(task_state=task, version=record.version + 1, updated_at=at)
                self._commit_locked([Change(record, busy, cause, task,
                                            f"{task} requested ({cause.value})")], at)
                begun = time.monotonic()
                try:
                    how = operate(hv, uuid)
                except Exception as exc:
                    self._finish(busy, {}, cause, f"{task} failed: {exc}")
                    raise
                live = hv.state(uuid)
                fields = {"vm_state": vm_state, "power_state": live.power_state}
                if vm_state is VmState.ACTIVE:
                    fields.update(restart_count=0, last_restart_at=0.0)
                done = self._finish(busy, fields, cause, f"{task.replace('powering', 'power')}: {how}")
        return {"uuid": uuid, "name": name, "result": how, "vm_state": done.vm_state.value,
                "power_state": done.power_state.value,
                "took": round(time.monotonic() - begun, 3)}

    def _finish(self, busy: Record, fields: dict, cause: Cause, reason: str) -> Record:
        at = now()
        done = busy.replace(**fields, task_state="", version=busy.version + 1, updated_at=at)
        self._commit_locked([Change(busy, done, cause, "done", reason)], at)
        return done

    def status(self, event_loop_status: Optional[str] = None) -> dict:
        """Whether libvirt answers at the configured URI, and what the store holds.

        ``event_loop_status`` is the path of the beacon's status file; its content (written by
        the minion process, which runs the event loop) is reported under ``event_loop``.
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
        return result



class _SyncDecisions:
    """``decide`` for every VM of one sync, each distinct situation decided once.

    ``decide`` is pure, and its answer does not depend on a VM's name or UUID, only on its
    record's states, its live state and its pillar: a host of thousands of VMs has a handful of
    distinct situations, so a sync need not decide thousands of times.
    """

    def __init__(self, ops: HostOperations, at: float):
        self._ops = ops
        self._at = at
        self._answers: Dict[tuple, Decision] = {}

    def __call__(self, record: Record, live: LiveState) -> Decision:
        policy, error = self._ops._policy(record.uuid, record.name)
        # By identity: live states and policies are shared objects (live_state is memoised),
        # and an equal but distinct one costs a second decision, never a wrong one.
        key = (record.vm_state, record.power_state, record.task_state, record.host,
               record.restart_count, record.last_restart_at, id(live), id(policy), error)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = decide(record, live, self._ops.host, policy,
                                                 self._ops.settings, self._at, error)
        return answer
