"""The simulated fleet the state machine drives: hosts, their libvirt, beacons, clocks, the bus.

What is real: ``HostOperations`` (reconcile, sync, stop, start, reset_state), the stores
(one SQLite file, or one PostgreSQL database, shared by every host, each host with a
connection of its own as each minion has), the journal (``vmpower.journal.Journal``, one
file per host, read by reconcile by ``seq``), the functional core, and ``Hypervisor`` with
every one of its libvirt calls, on libvirt's test driver.

What is simulated, and why:

- **Each host's libvirtd** is a test-driver instance of its own (``test:///<dir>/<host>.xml``).
  The test driver builds a fresh instance for every connection to a custom file, so each host
  keeps one connection open for the whole run and ``SimHypervisor`` (a ``Hypervisor`` that
  only swaps how it opens and closes) hands it to every job. Two hosts can then define one
  UUID, as the source and destination of a migration do.
- **State reasons the test driver cannot produce** (a crash, QEMU failing, a domain shut off
  ``migrated``, every shut-off domain's reason lost by a libvirtd restart or a host reboot,
  running ``migrated`` on a destination) are laid over the test driver's state by
  ``SimHypervisor`` where vmpower reads states (the bulk listing, the bulk re-read, the
  single read), until the domain is started again. A **migration job** (the test driver has
  no jobs) is reported by ``migration_job`` while the sim's migration runs.
- **A live migration** is: the destination defines the same XML and starts it while both
  report a migration job; at its end the destination runs it with reason ``migrated`` and
  the source is shut off ``migrated``, then kept or undefined.
- **A libvirtd restart** is instantaneous: shut-off reasons are lost, the beacon journals a
  gap and asks for a resync. **A host reboot** is two steps: the host stops (``stopping``
  true, its guests shut down by libvirt-guests), then boots (a new boot id, the monotonic
  clock starts again, what the bus held for it and what its beacon held back is lost, some
  guests autostart, the minion's start asks for a sync).
- **The beacon** is not the libvirt event loop: every change the sim makes, and every
  action vmpower takes through ``SimHypervisor``, is "seen" at once by the host's
  ``Beacon``, which holds a ``stopped`` back for the grace (cancelled by any later event of
  that domain, as a hard reboot's start half does), journals what it fires and puts a
  trigger (``seq``, transition, reason) on the bus.
- **The bus** is a list the state machine delivers from in any order, drops from,
  duplicates, and forges into (a made-up ``seq``, transition or reason, on any host); a
  master outage drops whatever is fired meanwhile and asks each host for a resync when it
  ends. Delivering a trigger runs ``reconcile`` or ``sync`` on its host.
- **Clocks**: each host's monotonic clock and boot id, and the wall clock
  (``vmpower.operations.now``), are the sim's, stepped by the state machine; the periodic
  sync runs every ``SYNC_INTERVAL`` of a host's clock.
- **A killed job** (SIGKILL, OOM) is an operation that dies between its task_state write and
  its finish: ``SimOperations._finish`` raises ``Killed`` (a ``BaseException``, so nothing of
  the job runs after it), before or after its libvirt call; its task_owner is then dead.

The checks (``World.violations``) are made where vmpower acts (in ``SimHypervisor``, before
the libvirt call) and after every step (``World.check``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid as uuidlib
from unittest import mock

import libvirt

from vmpower.core.journal import GAP, Observation
from vmpower.core.mapping import live_state
from vmpower.core.model import GONE, LiveState, PowerState, Transition, VmState
from vmpower.core.settings import parse_settings
from vmpower.hypervisor import Hypervisor, HypervisorError, LiveDomain
from vmpower.journal import Journal
from vmpower.operations import HostOperations
from vmpower.store import open_store

GRACE = 15.0
BACKOFF = 10.0
LIMIT = 3
SYNC_INTERVAL = 60.0
BOOT_CLOCK = 30.0  # a host's monotonic clock right after it boots
RESTART_RESET_AFTER = 600.0  # vmpower.core.rules: a VM that ran this long counts restarts afresh

# libvirt's (state, reason) pairs the test driver cannot give (vmpower.core.mapping)
SHUTOFF_UNKNOWN = (5, 0)
SHUTOFF_CRASHED = (5, 3)
SHUTOFF_MIGRATED = (5, 4)
SHUTOFF_FAILED = (5, 6)
RUNNING_MIGRATED = (1, 2)

DOMAIN_XML = """<domain type='test'>
  <name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory><vcpu>1</vcpu>
  <os><type>hvm</type></os>
</domain>"""

AUDITED = ("name", "host", "vm_state", "power_state", "task_state", "restart_count",
           "last_restart_at", "task_owner", "off_reason")


class Killed(BaseException):
    """The job's process was killed: nothing of it runs after this, not even its cleanup."""


class Clock:
    """A host's monotonic clock, stepped by the sim."""

    def __init__(self, at: float):
        self.at = at

    def __call__(self) -> float:
        return self.at


@dataclasses.dataclass
class Trigger:
    """What the bus carries to a host: a lifecycle event (``uuid`` set) or a resync."""

    host: str
    uuid: str = ""
    seq: int | None = None
    transition: Transition | None = None
    reason: str = ""
    forged: bool = False

    def __str__(self):
        if not self.uuid:
            return f"resync->{self.host}"
        what = f"{self.transition.value if self.transition else '-'}/{self.reason or '-'}"
        return f"{'forged ' if self.forged else ''}{what} seq={self.seq} {self.uuid[:8]}->{self.host}"


@dataclasses.dataclass
class Copy:
    """The sim's truth about one host's copy of a VM, beyond what libvirt holds."""

    why_off: str = ""          # guest, crash, failed, destroyed, host, migrated, vmpower, unknown
    off_at: float | None = None  # this host's clock when it went off (None: running)
    off_boot: str = ""


@dataclasses.dataclass
class Vm:
    uuid: str
    name: str
    xml: str
    copies: dict = dataclasses.field(default_factory=dict)  # host -> Copy
    attempts: list = dataclasses.field(default_factory=list)  # automatic starts: (host, boot, clock)
    failing_start: bool = False


class Beacon:
    """What a host's vmpower beacon does with what libvirt reports: hold a stop back for the
    grace, journal what it fires, put the trigger on the bus."""

    def __init__(self, world: World, host: Host):
        self.world, self.host = world, host
        self.held: dict[str, Observation] = {}

    def _observation(self, uuid, transition, reason) -> Observation:
        at = self.host.clock()
        return Observation(0, self.host.boot, self.host.uri, uuid, transition, reason, at,
                           self.world.wall + 0.0)

    def saw(self, uuid: str, transition: Transition, reason: str) -> None:
        self.held.pop(uuid, None)  # any later event cancels a stop held back
        observation = self._observation(uuid, transition, reason)
        if transition is Transition.STOPPED:
            self.held[uuid] = observation
            return
        self.fire(observation)

    def fire(self, observation: Observation) -> None:
        [seq] = self.host.journal.append([observation])
        self.world.fired(Trigger(self.host.name, observation.uuid, seq, observation.transition,
                                 observation.reason))

    def release(self) -> None:
        """Fire the stops held back for the whole grace, stamped when libvirt called back."""
        for uuid, observation in list(self.held.items()):
            if self.host.clock() - observation.monotonic >= GRACE:
                del self.held[uuid]
                self.fire(observation)

    def gap(self, reason: str) -> None:
        self.host.journal.append([Observation(0, self.host.boot, self.host.uri, "", GAP, reason,
                                              self.host.clock(), self.world.wall)])
        self.world.fired(Trigger(self.host.name))


class Host:
    def __init__(self, world: World, index: int):
        self.world = world
        self.name = f"h{index}"
        node = os.path.join(world.dir, f"{self.name}.xml")
        with open(node, "w") as out:
            out.write("<node/>\n")
        self.uri = f"test://{node}"
        self.conn = libvirt.open(self.uri)  # this host's libvirtd, for the whole run
        self.clock = Clock(1000.0 * (index + 1))
        self.boots = 0
        self.boot = f"{self.name}-boot0"
        self.stopping = False
        self.mode = "enforce"
        self.reasons: dict[str, tuple[int, int]] = {}  # uuid -> (state, reason) laid over
        self.migrating: set[str] = set()
        self.kill: str | None = None  # "before" or "after" the libvirt call of the next stop/start
        self.next_sync = self.clock() + SYNC_INTERVAL
        self.journal = Journal(os.path.join(world.dir, f"{self.name}-journal.sqlite"),
                               boot_id=lambda: self.boot)
        self.store = open_store(world.location)
        self.beacon = Beacon(world, self)
        self.ops = self.operations(self.store)

    def operations(self, store) -> SimOperations:
        ops = SimOperations(self.settings(), self.name, store,
                            hypervisor=lambda uri: SimHypervisor(self),
                            clock=self.clock, boot_id=lambda: self.boot,
                            alive=self.world.owner_alive, stopping=lambda: self.stopping,
                            journal=self.journal)
        ops.sim = self
        return ops

    def settings(self):
        return parse_settings({"uri": self.uri, "stop_timeout": 0, "stop_grace": GRACE,
                               "restart_backoff": BACKOFF, "restart_limit": LIMIT,
                               "sync_interval": int(SYNC_INTERVAL), "mode": self.mode,
                               "instances": self.world.pillar})

    def reconfigure(self) -> None:
        self.ops.settings = self.settings()

    def domain(self, uuid: str):
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return None

    def live(self, uuid: str) -> LiveState:
        dom = self.domain(uuid)
        if dom is None:
            return GONE
        return self.overlaid(uuid, live_state(*dom.state()), tuple(dom.state()))

    def overlaid(self, uuid: str, state: LiveState, pair: tuple[int, int]) -> LiveState:
        over = self.reasons.get(uuid)
        if over is not None and over[0] == pair[0]:
            return live_state(*over)
        return state

    def runs(self, uuid: str) -> bool:
        return self.live(uuid).power_state in (PowerState.RUNNING, PowerState.PAUSED)

    def close(self) -> None:
        self.store.close()
        self.journal.close()
        self.conn.close()


class SimHypervisor(Hypervisor):
    """``Hypervisor`` on its host's one test-driver connection, with the state reasons and
    migration jobs the test driver cannot give; every action is checked, then seen by the
    host's beacon."""

    def __init__(self, host: Host):
        super().__init__(host.uri)
        self.sim = host

    def _open(self) -> None:
        self._conn = self.sim.conn
        self._last_call = time.monotonic()

    def _close(self) -> None:
        self._conn = None
        self._handles = {}

    def _overlay(self, domains: dict) -> dict:
        out = {}
        for uuid, dom in domains.items():
            over = self.sim.reasons.get(uuid)
            if over is not None:
                raw = self._handles.get(uuid) or self.sim.domain(uuid)
                pair = tuple(raw.state()) if raw is not None else None
                if pair is not None and pair[0] == over[0]:
                    dom = LiveDomain(uuid, dom.name, live_state(*over))
            out[uuid] = dom
        return out

    def list_all(self):
        listed = self._overlay(super().list_all())
        self.sim.world.listed(self.sim)
        return listed

    def find_listed(self, uuids):
        return self._overlay(super().find_listed(uuids))

    def _state(self, dom) -> LiveState:
        state = super()._state(dom)
        if state is GONE:
            return state
        return self.sim.overlaid(dom.UUIDString(), state, tuple(dom.state()))

    def migration_job(self, uuid: str):
        return uuid in self.sim.migrating

    def power_off(self, uuid: str) -> bool:
        self.sim.world.acting("power_off", self.sim, uuid)
        if self.sim.kill == "before":
            raise Killed
        done = super().power_off(uuid)
        if done:
            self.sim.world.went_off(self.sim, uuid, "vmpower", Transition.STOPPED, "destroyed")
        return done

    def power_actions(self, actions):
        """One by one, through ``power_off`` and ``start`` above, on the sim's thread: what
        the beacon sees of an action is journaled in SQLite, whose connections belong to the
        thread that opened them. Each domain's outcome is its own, as in the batch."""
        done = {}
        for action, uuid in actions:
            try:
                done[uuid] = getattr(self, action)(uuid)
            except Exception as exc:  # that domain's outcome, as in Hypervisor.power_actions
                done[uuid] = exc
        return done

    def shutdown(self, uuid: str, timeout: float) -> bool:
        self.sim.world.acting("power_off", self.sim, uuid)
        if self.sim.kill == "before":
            raise Killed
        was = self.sim.runs(uuid)
        done = super().shutdown(uuid, timeout)
        if was and not self.sim.runs(uuid):  # virsh shutdown: libvirt says the host asked
            self.sim.world.went_off(self.sim, uuid, "vmpower", Transition.STOPPED, "host_shutdown")
        return done

    def start(self, uuid: str) -> bool:
        self.sim.world.acting("start", self.sim, uuid)
        if self.sim.kill == "before":
            raise Killed
        vm = self.sim.world.vms.get(uuid)
        if vm is not None and vm.failing_start and not self.sim.runs(uuid):
            raise HypervisorError(f"cannot start {vm.name} at {self.uri}: the sim refuses it")
        done = super().start(uuid)
        if done:
            self.sim.world.came_on(self.sim, uuid, Transition.STARTED, "booted")
        return done


class SimOperations(HostOperations):
    """``HostOperations`` whose process can be killed between its task_state write and its
    finish (``Host.kill``)."""

    sim: Host

    def _finish(self, busy, fields, cause, reason):
        host = self.sim
        if host.kill is not None:
            host.kill = None
            host.world.dead_owners.add(busy.task_owner)
            raise Killed
        return super()._finish(busy, fields, cause, reason)


class World:
    """Every host, the shared store, the bus, the wall clock and the checks."""

    def __init__(self, location_factory, hosts: int = 2):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fsync on tmpfs costs nothing
        self.dir = tempfile.mkdtemp(prefix="vmpower-sim-", dir=base)
        self.location = location_factory(self.dir)
        self.wall = 1_800_000_000.0
        self.patch = mock.patch("vmpower.operations.now", lambda: self.wall)
        self.patch.start()
        self.pillar: dict = {}
        self.bus: list[Trigger] = []
        self.outage = False
        self.vms: dict[str, Vm] = {}
        self.dead_owners: set[str] = set()
        self.violations: list[str] = []
        self.interleave: tuple[Host, str] | None = None
        self.in_op: tuple[str, Host] | None = None
        self.counter = 0
        self.hosts = [Host(self, i) for i in range(hosts)]
        self.audit_seen = 0
        self.replayed: dict[str, dict] = {}
        self.hand_edits: dict[str, dict] = {}
        self.observer = open_store(self.location)

    def close(self) -> None:
        self.patch.stop()
        for host in self.hosts:
            host.close()
        self.observer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    # The bus
    def fired(self, trigger: Trigger) -> None:
        if not self.outage:
            self.bus.append(trigger)

    def deliver(self, trigger: Trigger) -> dict:
        host = self.host(trigger.host)
        if not trigger.uuid:
            return self.run(host, "sync", host.ops.sync)
        return self.run(host, "reconcile", host.ops.reconcile, trigger.uuid, trigger.transition,
                        reason=trigger.reason, seq=trigger.seq)

    def run(self, host: Host, kind: str, call, *args, **kwargs):
        """Run one vmpower job on ``host``; what vmpower does meanwhile is checked."""
        self.in_op = (kind, host)
        try:
            return call(*args, **kwargs)
        finally:
            self.in_op = None
            self._check_audit(host)

    # Clocks
    def step(self, seconds: float) -> None:
        """Time passes on every host; held stops fire; periodic syncs run."""
        self.wall += seconds
        for host in self.hosts:
            host.clock.at += seconds
            host.beacon.release()
        self.running_long()
        for host in self.hosts:
            if host.clock() >= host.next_sync and not host.stopping:
                host.next_sync = host.clock() + SYNC_INTERVAL
                self.run(host, "sync", host.ops.sync)

    def owner_alive(self, task_owner: str) -> bool | None:
        try:
            owner = json.loads(task_owner)
        except ValueError:
            return None
        host = next((h for h in self.hosts if h.name == owner.get("host")), None)
        if host is None:
            return None
        return task_owner not in self.dead_owners and owner.get("boot_id") == host.boot

    # VMs
    def new_vm(self, host: Host, running: bool) -> str:
        self.counter += 1
        uuid = str(uuidlib.UUID(int=self.counter * 0x1000_0001_0000_0001))
        name = f"vm{self.counter}"
        xml = DOMAIN_XML.format(name=name, uuid=uuid)
        self.vms[uuid] = Vm(uuid, name, xml)
        host.conn.defineXML(xml)
        self.vms[uuid].copies[host.name] = Copy(why_off="defined", off_at=host.clock(), off_boot=host.boot)
        if running:
            host.domain(uuid).create()
            self.came_on(host, uuid, Transition.STARTED, "booted")
        return uuid

    def runner(self, uuid: str) -> Host | None:
        return next((h for h in self.hosts if h.runs(uuid)), None)

    def went_off(self, host: Host, uuid: str, why: str, transition: Transition | None,
                 reason: str) -> None:
        copy = self.vms[uuid].copies.setdefault(host.name, Copy())
        copy.why_off, copy.off_at, copy.off_boot = why, host.clock(), host.boot
        if transition is not None:
            host.beacon.saw(uuid, transition, reason)

    def came_on(self, host: Host, uuid: str, transition: Transition | None, reason: str) -> None:
        host.reasons.pop(uuid, None)
        copy = self.vms[uuid].copies.setdefault(host.name, Copy())
        copy.why_off, copy.off_at = "", None
        if transition is not None:
            host.beacon.saw(uuid, transition, reason)

    def off_for(self, host: Host, uuid: str) -> float:
        copy = self.vms[uuid].copies.get(host.name)
        if copy is None or copy.off_at is None:
            return 0.0
        if copy.off_boot != host.boot:
            return host.clock() - BOOT_CLOCK
        return host.clock() - copy.off_at

    def policy(self, host: Host, uuid: str):
        dom = host.domain(uuid)
        name = dom.name() if dom is not None else self.vms[uuid].name
        return host.ops.settings.policy_for(uuid, name)

    def listed(self, host: Host) -> None:
        """A sync on ``host`` has its listing: a concurrent event-path job may run now."""
        if self.interleave is None or self.interleave[0] is not host:
            return
        _, uuid = self.interleave
        self.interleave = None
        dom = host.domain(uuid)
        if dom is None:
            return
        if dom.isActive():
            dom.shutdown()
            self.went_off(host, uuid, "guest", Transition.STOPPED, "guest_shutdown")
        elif uuid not in host.reasons and not any(h.runs(uuid) for h in self.hosts):
            dom.create()
            self.came_on(host, uuid, Transition.STARTED, "booted")
        else:
            return
        # another job process of this host: its own store connection, the same journal
        with open_store(self.location) as store:
            other = host.operations(store)
            other.reconcile(uuid)

    # The checks
    def violation(self, text: str) -> None:
        self.violations.append(text)

    def acting(self, action: str, host: Host, uuid: str) -> None:
        """vmpower is about to power ``uuid`` off or on at ``host``: is it allowed to?"""
        if self.in_op is None:
            return
        kind, _ = self.in_op
        vm = self.vms.get(uuid)
        if vm is None:
            return
        automatic = kind in ("reconcile", "sync")
        live = host.live(uuid)
        record = self.observer.get(uuid)
        policy, error = self.policy(host, uuid)
        what = f"{action} of {vm.name} on {host.name} by {kind}"
        if error:
            self.violation(f"{what}: its pillar is in conflict ({error})")
        if policy.task_state:
            self.violation(f"{what} under the pillar lock task_state={policy.task_state}")
        if not automatic:
            return
        if record is not None and record.task_state and self.owner_alive(record.task_owner) is not False:
            self.violation(f"{what} under the record's task_state={record.task_state}")
        if host.mode == "observe":
            self.violation(f"{what} in observe mode")
        if not policy.managed:
            self.violation(f"{what} of a VM managed: false")
        running_here = live.power_state in (PowerState.RUNNING, PowerState.PAUSED)
        if record is not None and record.host not in (host.name, "") and not running_here:
            self.violation(f"{what}: the record says {record.host} owns it")
        if action == "power_off" and running_here:
            intended_off = policy.vm_state is VmState.STOPPED or (
                record is not None and record.vm_state in (VmState.STOPPED,))
            if not intended_off:
                self.violation(f"{what}: it runs, and neither pillar nor the record says stopped "
                               f"(record: {record})")
        if action == "start" and not running_here:
            self._check_start(what, host, vm, record, policy)

    def _check_start(self, what, host: Host, vm: Vm, record, policy) -> None:
        uuid = vm.uuid
        elsewhere = [h.name for h in self.hosts if h is not host and h.runs(uuid)]
        if elsewhere:
            self.violation(f"{what}: it runs on {elsewhere[0]}")
        if record is None or record.host != host.name:
            self.violation(f"{what}: the record's owner is {record.host if record else None!r}")
        copy = vm.copies.get(host.name, Copy())
        if copy.why_off in ("host", "migrated"):
            self.violation(f"{what}: it went off because of {copy.why_off}")
        if self.off_for(host, uuid) < GRACE:
            self.violation(f"{what}: off for {self.off_for(host, uuid):g}s, less than the grace")
        wants = (policy.vm_state is VmState.ACTIVE or policy.on_guest_shutdown.value == "restart"
                 or policy.on_crash.value == "restart")
        if not wants:
            self.violation(f"{what}: neither pinned active nor a restart policy")
        attempts = [a for a in vm.attempts]
        if len(attempts) >= LIMIT:
            self.violation(f"{what}: start attempt {len(attempts) + 1}, the limit is {LIMIT}")
        if attempts:
            last_host, last_boot, last_at = attempts[-1]
            wait = min(BACKOFF * 2 ** (len(attempts) - 1), 600.0)
            if (last_host, last_boot) == (host.name, host.boot) and host.clock() - last_at < wait:
                self.violation(f"{what}: {host.clock() - last_at:g}s after the last automatic "
                               f"start, the back-off is {wait:g}s")
        vm.attempts.append((host.name, host.boot, host.clock()))

    def operator_started(self, uuid: str) -> None:
        self.vms[uuid].attempts.clear()

    def running_long(self) -> None:
        """vmpower counts restarts afresh for a VM that ran 10 minutes since its last one."""
        for vm in self.vms.values():
            if vm.attempts:
                host_name, boot, at = vm.attempts[-1]
                host = self.host(host_name)
                if host.boot == boot and host.runs(vm.uuid) and host.clock() - at >= RESTART_RESET_AFTER:
                    vm.attempts.clear()

    def check(self) -> None:
        """After every step: nothing ran twice, the audit log explains every record, each
        write of the step is the live truth, and no violation was seen during the step."""
        for uuid, vm in self.vms.items():
            running = [h.name for h in self.hosts if h.runs(uuid)]
            migrating = any(uuid in h.migrating for h in self.hosts)
            if len(running) > 1 and not migrating:
                self.violation(f"{vm.name} runs on {' and '.join(running)}")
        self._check_audit(None)
        if self.violations:
            found, self.violations = self.violations, []
            raise AssertionError("; ".join(found))

    def _check_audit(self, step_host: Host | None) -> None:
        rows = self.observer._query(
            "SELECT id, uuid, cause, action, old, new FROM audit WHERE id > ? ORDER BY id",
            (self.audit_seen,))
        written: dict[str, list] = {}
        for row_id, uuid, cause, action, old, new in rows:
            self.audit_seen = row_id
            new, old = json.loads(new), json.loads(old)
            if new:
                state = self.replayed.setdefault(uuid, {})
                before = dict(state)
                state.update(new)
                written.setdefault(uuid, []).append((cause, action, before, new))
        records = {r[0]: r for r in self.observer._query("SELECT uuid FROM instances")}
        for uuid in records:
            record = self.observer.get(uuid)
            state = self.replayed.get(uuid)
            name = self.vms[uuid].name if uuid in self.vms else uuid
            if state is None:
                self.violation(f"{name} has a record and no audit entry")
                continue
            for field in AUDITED:
                value = getattr(record, field)
                value = getattr(value, "value", value)
                if field in self.hand_edits.get(uuid, {}):
                    continue
                if state.get(field, _default(field)) != value:
                    self.violation(f"{name}: the record's {field}={value!r} has no audit entry "
                                   f"(the audit log says {state.get(field)!r})")
        if step_host is None:
            return
        for uuid, writes in written.items():
            vm = self.vms.get(uuid)
            if vm is None:
                continue
            for cause, action, before, new in writes:
                if cause in ("event", "sync") and before.get("host") not in (None, "", step_host.name) \
                        and new.get("host") != step_host.name:
                    self.violation(f"{vm.name}: {step_host.name} wrote ({action}, {cause}) a record "
                                   f"{before.get('host')} owns: {new}")
                if cause == "api" and action == "reset" and before.get("host") not in (
                        "", step_host.name):
                    self.violation(f"{vm.name}: reset_state on {step_host.name} wrote a record "
                                   f"{before.get('host')} owns: {new}")
                if (cause in ("event", "sync") and new.get("vm_state") == "stopped"
                        and before.get("vm_state") in ("active", "paused")):
                    policy, _ = self.policy(step_host, uuid)
                    off = self.off_for(step_host, uuid)
                    if policy.vm_state is not VmState.STOPPED and off < GRACE:
                        self.violation(f"{vm.name}: {step_host.name} recorded it stopped ({cause}) "
                                       f"after {off:g}s off, less than the grace")
            last = [w for w in writes if "power_state" in w[3] and w[0] in ("event", "sync")]
            if last:
                record = self.observer.get(uuid)
                live = step_host.live(uuid).power_state
                if record is not None and getattr(record.power_state, "value", None) != live.value \
                        and uuid not in self.hand_edits:
                    self.violation(f"{vm.name}: {step_host.name} wrote power_state="
                                   f"{record.power_state.value} ({last[-1][0]}), the domain there "
                                   f"is {live.value}")


def _default(field: str):
    return 0 if field in ("restart_count", "last_restart_at") else ""
