"""The fleet simulation as a Hypothesis state machine: every rule is one thing that happens to
the fleet (an operator's command, a guest, a host, the bus, time passing), and the invariant
checks everything after every step. A failure shrinks to the shortest story that still
breaks a rule of SPEC.md. ``world.py`` says what is real and what is simulated.
"""

from __future__ import annotations

import contextlib

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from vmpower.core.model import PowerState, Transition, VmState
from vmpower.hypervisor import HypervisorError
from vmpower.operations import OperationError
from vmpower.store import StoreError

from .world import (
    BACKOFF,
    BOOT_CLOCK,
    GRACE,
    LIMIT,
    RUNNING_MIGRATED,
    SHUTOFF_CRASHED,
    SHUTOFF_FAILED,
    SHUTOFF_MIGRATED,
    SHUTOFF_UNKNOWN,
    Killed,
    Trigger,
    World,
)

# Operators' commands refused for a reason they name: an expected answer, not a crash.
REFUSALS = (OperationError, HypervisorError, StoreError)
REASONS = ["booted", "guest_shutdown", "host_shutdown", "destroyed", "crashed", "failed",
           "migrated", "saved", ""]
UNKNOWN_VM_STATE = "hibernated"  # a vm_state a newer vmpower might write into a shared store

hosts_ix = st.integers(min_value=0, max_value=2)
picks = st.integers(min_value=0, max_value=1_000)


class FleetSim(RuleBasedStateMachine):
    """2-3 hosts, one store, a bus with faults, clocks that step; see the module docstring."""

    store_factory = None  # dir -> store location; set by the test (SQLite or PostgreSQL)

    vms = Bundle("vms")

    def __init__(self):
        super().__init__()
        self.world: World | None = None
        self.rebooting: set[str] = set()  # VMs between a hard reboot's halves
        self.migration: tuple[str, str, str] | None = None  # (uuid, source, destination)
        self.stopping: set[str] = set()  # hosts between their stop and their boot

    def teardown(self):
        if self.world is not None:
            self.world.close()

    # Helpers
    def h(self, index: int):
        return self.world.hosts[index % len(self.world.hosts)]

    def copies(self, uuid: str):
        """The hosts that define ``uuid``, in host order."""
        return [h for h in self.world.hosts if h.domain(uuid) is not None]

    def where(self, uuid: str):
        """The host where the VM is (running, else its first copy), or None."""
        return self.world.runner(uuid) or next(iter(self.copies(uuid)), None)

    def busy(self, uuid: str) -> bool:
        return uuid in self.rebooting or (self.migration is not None and self.migration[0] == uuid)

    def operator(self, host, call, *args, **kwargs):
        """An operator's command: refusals are answers; Killed ends the job."""
        try:
            return self.world.run(host, "api", call, *args, **kwargs)
        except REFUSALS as exc:
            return {"refused": str(exc)}

    # Setting up
    @initialize(target=vms, hosts=st.integers(min_value=2, max_value=3),
                running=st.lists(st.booleans(), min_size=1, max_size=3))
    def fleet(self, hosts, running):
        self.world = World(type(self).store_factory, hosts)
        uuids = [self.world.new_vm(self.h(i), up) for i, up in enumerate(running)]
        return multiple(*uuids)

    @rule(target=vms, host=hosts_ix, running=st.booleans())
    def create_vm(self, host, running):
        return self.world.new_vm(self.h(host), running)

    # Time
    @rule(seconds=st.sampled_from([1.0, 5.0, 14.0, 16.0, 30.0, 61.0, 300.0]))
    def time_passes(self, seconds):
        self.world.step(seconds)

    @rule(delta=st.sampled_from([-7200.0, -30.0, 30.0, 7200.0]))
    def wall_clock_stepped(self, delta):
        self.world.wall += delta  # NTP, or an operator: the monotonic clocks do not move

    # The bus
    @precondition(lambda self: self.world is not None and self.world.bus)
    @rule(pick=picks)
    def deliver(self, pick):
        self.world.deliver(self.world.bus.pop(pick % len(self.world.bus)))

    @precondition(lambda self: self.world is not None and self.world.bus)
    @rule(pick=picks)
    def bus_drops(self, pick):
        self.world.bus.pop(pick % len(self.world.bus))

    @precondition(lambda self: self.world is not None and self.world.bus)
    @rule(pick=picks)
    def bus_duplicates(self, pick):
        self.world.bus.append(self.world.bus[pick % len(self.world.bus)])

    @rule(vm=vms, host=hosts_ix, transition=st.sampled_from([None, *Transition]),
          reason=st.sampled_from(REASONS), seq=st.sampled_from(["none", "latest", "stale", "made-up"]))
    def bus_forges(self, vm, host, transition, reason, seq):
        """Any minion can fire another's beacon tag; anyone can type a reconcile by hand."""
        target = self.h(host)
        last = target.journal.last_seq()
        number = {"none": None, "latest": last or None, "stale": max(last - 1, 1),
                  "made-up": last + 1000}[seq]
        self.world.bus.append(Trigger(target.name, vm, number, transition, reason, forged=True))

    @precondition(lambda self: self.world is not None and not self.world.outage)
    @rule()
    def master_goes_away(self):
        self.world.outage = True  # events fired meanwhile are lost

    @precondition(lambda self: self.world is not None and self.world.outage)
    @rule()
    def master_comes_back(self):
        self.world.outage = False
        for host in self.world.hosts:  # resync master_reconnected
            self.world.fired(Trigger(host.name))

    # Operators
    @rule(vm=vms, spelling=st.sampled_from(["name", "uuid", "UUID", "hex", "both", "both-conflict"]),
          vm_state=st.sampled_from([None, "active", "stopped"]),
          lock=st.booleans(), policy=st.sampled_from([None, "restart", "ignore", "crash-restart"]),
          unmanaged=st.booleans())
    def pillar_edit(self, vm, spelling, vm_state, lock, policy, unmanaged):
        """Keys in any spelling; two entries (UUID and name) for one VM, agreeing or not."""
        world = self.world
        name = self.vm_name(vm)
        entry: dict = {}
        if vm_state:
            entry["vm_state"] = vm_state
        if lock:
            entry["task_state"] = "maintenance"
        if policy and vm_state != "active":
            entry.update({"crash-restart": {"on_crash": "restart"}}.get(policy, {"on_guest_shutdown": policy}))
        if unmanaged and not lock:
            entry["managed"] = False
        self.pillar_drop(vm)
        keys = {"name": [name], "uuid": [vm], "UUID": [vm.upper()], "hex": [vm.replace("-", "")],
                "both": [vm.upper(), name], "both-conflict": [vm, name]}[spelling]
        for i, key in enumerate(keys):
            world.pillar[key] = dict(entry)
            if spelling == "both" and i == 1:
                world.pillar[key].pop("task_state", None)  # a lock in either holds
            if spelling == "both-conflict" and i == 1:
                world.pillar[key]["vm_state"] = "stopped" if vm_state == "active" else "active"
        for host in world.hosts:
            host.reconfigure()

    @rule(vm=vms)
    def pillar_removed(self, vm):
        self.pillar_drop(vm)
        for host in self.world.hosts:
            host.reconfigure()

    def pillar_drop(self, uuid):
        names = {self.world.vms[uuid].name, uuid, uuid.upper(), uuid.replace("-", "")}
        names |= {h.domain(uuid).name() for h in self.copies(uuid)}
        for key in list(self.world.pillar):
            if key in names:
                del self.world.pillar[key]

    def vm_name(self, uuid):
        host = self.where(uuid)
        return host.domain(uuid).name() if host else self.world.vms[uuid].name

    @rule(host=hosts_ix, observe=st.booleans())
    def observe_mode(self, host, observe):
        target = self.h(host)
        target.mode = "observe" if observe else "enforce"
        target.reconfigure()

    @rule(vm=vms, host=hosts_ix, vm_state=st.sampled_from([None, VmState.ACTIVE, VmState.STOPPED]))
    def reset_state(self, vm, host, vm_state):
        target = self.h(host)
        result = self.operator(target, target.ops.reset_state, vm, vm_state)
        if result.get("changed"):
            if vm_state is not None:
                self.world.operator_started(vm)
            self.world.hand_edits.pop(vm, None)  # set right: the audit entry says what it is now

    @rule(vm=vms, host=hosts_ix, kill=st.sampled_from([None, None, "before", "after"]))
    def operator_stop(self, vm, host, kill):
        target = self.pick_copy(vm, host)
        if target is None or self.busy(vm):
            return
        with _killed_if_asked(target, kill):
            self.operator(target, target.ops.stop, vm)

    @rule(vm=vms, host=hosts_ix, kill=st.sampled_from([None, None, "before", "after"]))
    def operator_start(self, vm, host, kill):
        target = self.pick_copy(vm, host)
        if target is None or self.busy(vm):
            return
        elsewhere = self.world.runner(vm)
        if elsewhere is not None and elsewhere is not target:
            return  # an operator does not start a second copy by hand
        with _killed_if_asked(target, kill):
            result = self.operator(target, target.ops.start, vm)
            if "refused" not in result:
                self.world.operator_started(vm)

    def pick_copy(self, uuid, index):
        copies = self.copies(uuid)
        return copies[index % len(copies)] if copies else None

    @rule(vm=vms)
    def rename(self, vm):
        """virsh domrename, on a shut-off copy; pillar by the old name stays as it was."""
        for host in self.copies(vm):
            dom = host.domain(vm)
            if not dom.isActive():
                dom.rename(f"{self.world.vms[vm].name}-r{self.world.counter}")
                self.world.counter += 1

    @precondition(lambda self: self.world is not None and self.world.vms)
    @rule(vm=vms)
    def hand_edit_unknown_vm_state(self, vm):
        """A newer vmpower sharing the store wrote a vm_state this one does not know."""
        record = self.world.observer.get(vm)
        if record is None:
            return
        self.world.observer._run(self.world.observer.BEGIN)
        self.world.observer._run("UPDATE instances SET vm_state = ?, version = version + 1 "
                                 "WHERE uuid = ?", (UNKNOWN_VM_STATE, vm))
        self.world.observer._run("COMMIT")
        self.world.hand_edits.setdefault(vm, {})["vm_state"] = UNKNOWN_VM_STATE

    # Guests and people at virsh
    @rule(vm=vms)
    def guest_shuts_down(self, vm):
        host = self.world.runner(vm)
        if host is None or self.busy(vm):
            return
        host.domain(vm).shutdown()
        self.world.went_off(host, vm, "guest", Transition.STOPPED, "guest_shutdown")

    @rule(vm=vms, failed=st.booleans())
    def guest_crashes(self, vm, failed):
        """A guest crash (<on_crash>destroy</on_crash>) or QEMU killed: the test driver
        cannot crash a guest, so its state reason is laid over a destroy."""
        host = self.world.runner(vm)
        if host is None or self.busy(vm):
            return
        host.domain(vm).destroy()
        host.reasons[vm] = SHUTOFF_FAILED if failed else SHUTOFF_CRASHED
        reason = "failed" if failed else "crashed"
        self.world.went_off(host, vm, "failed" if failed else "crash", Transition.STOPPED, reason)

    @rule(vm=vms)
    def hard_reboot_begins(self, vm):
        host = self.world.runner(vm)
        if host is None or self.busy(vm):
            return
        host.domain(vm).destroy()
        self.rebooting.add(vm)
        self.world.went_off(host, vm, "reboot", Transition.STOPPED, "destroyed")

    @precondition(lambda self: self.rebooting)
    @rule(pick=picks)
    def hard_reboot_ends(self, pick):
        vm = sorted(self.rebooting)[pick % len(self.rebooting)]
        self.rebooting.discard(vm)
        host = next((h for h in self.copies(vm) if not h.domain(vm).isActive()), None)
        if host is None or self.world.runner(vm) is not None or host.name in self.stopping:
            return
        host.domain(vm).create()
        self.world.came_on(host, vm, Transition.STARTED, "booted")

    @rule(vm=vms, host=hosts_ix)
    def virsh_start(self, vm, host):
        """Someone starts a copy behind vmpower's back (never a second running copy)."""
        target = self.pick_copy(vm, host)
        if target is None or self.world.runner(vm) is not None or self.busy(vm) \
                or target.name in self.stopping:
            return
        if target.reasons.get(vm) == SHUTOFF_MIGRATED:
            return  # a person does not start what they migrated away
        target.domain(vm).create()
        self.world.came_on(target, vm, Transition.STARTED, "booted")

    @rule(vm=vms)
    def virsh_destroy(self, vm):
        host = self.world.runner(vm)
        if host is None or self.busy(vm):
            return
        host.domain(vm).destroy()
        self.world.went_off(host, vm, "destroyed", Transition.STOPPED, "destroyed")

    # Hosts and links
    @rule(host=hosts_ix)
    def libvirtd_restarts(self, host):
        """Shut-off reasons are lost; the beacon reconnects, journals a gap, asks for a resync."""
        target = self.h(host)
        for dom in target.conn.listAllDomains():
            if not dom.isActive():
                target.reasons[dom.UUIDString()] = SHUTOFF_UNKNOWN
        target.beacon.gap("reconnected")

    @precondition(lambda self: self.world is not None and self.migration is None)
    @rule(vm=vms, dst=hosts_ix)
    def migration_begins(self, vm, dst):
        src = self.world.runner(vm)
        target = self.h(dst)
        if src is None or src is target or self.busy(vm) or src.name in self.stopping \
                or target.name in self.stopping:
            return
        if target.domain(vm) is None:
            target.conn.defineXML(src.domain(vm).XMLDesc(0))
        elif target.domain(vm).isActive():
            return
        target.domain(vm).create()
        target.reasons.pop(vm, None)
        src.migrating.add(vm)
        target.migrating.add(vm)
        self.migration = (vm, src.name, target.name)

    @precondition(lambda self: self.migration is not None)
    @rule(keep=st.booleans())
    def migration_ends(self, keep):
        vm, src_name, dst_name = self.migration
        src, dst = self.world.host(src_name), self.world.host(dst_name)
        self.migration = None
        src.migrating.discard(vm)
        dst.migrating.discard(vm)
        dst.reasons[vm] = RUNNING_MIGRATED
        self.world.came_on(dst, vm, None, "")
        dst.reasons[vm] = RUNNING_MIGRATED
        dst.beacon.saw(vm, Transition.RESUMED, "migrated")
        src.domain(vm).destroy()
        src.reasons[vm] = SHUTOFF_MIGRATED
        self.world.went_off(src, vm, "migrated", Transition.STOPPED, "migrated")
        if not keep:
            src.domain(vm).undefine()

    @precondition(lambda self: self.migration is not None)
    @rule()
    def migration_fails(self):
        vm, src_name, dst_name = self.migration
        src, dst = self.world.host(src_name), self.world.host(dst_name)
        self.migration = None
        src.migrating.discard(vm)
        dst.migrating.discard(vm)
        dom = dst.domain(vm)
        dom.destroy()
        dom.undefine()

    @precondition(lambda self: self.world is not None)
    @rule(vm=vms, dst=hosts_ix, paused=st.booleans())
    def moved_by_hand(self, vm, dst, paused):
        """virsh dumpxml | virsh define elsewhere, then undefine here: no migration at all."""
        src = self.where(vm)
        target = self.h(dst)
        if src is None or src is target or target.domain(vm) is not None or self.busy(vm) \
                or src.name in self.stopping:
            return
        xml = src.domain(vm).XMLDesc(0)
        dom = src.domain(vm)
        if dom.isActive():
            dom.destroy()
            self.world.went_off(src, vm, "moved", Transition.STOPPED, "destroyed")
        dom.undefine()
        target.conn.defineXML(xml)
        self.world.went_off(target, vm, "moved", None, "")
        if paused:
            target.domain(vm).create()
            target.domain(vm).suspend()
            self.world.came_on(target, vm, Transition.PAUSED, "paused")

    @precondition(lambda self: self.world is not None and not self.stopping)
    @rule(host=hosts_ix)
    def host_stops(self, host):
        """systemd stopping: libvirt-guests shuts every guest down (it looks like the guest's
        own shutdown to libvirt); the minion runs on until the host goes down."""
        target = self.h(host)
        if self.migration is not None and target.name in self.migration[1:]:
            return
        target.stopping = True
        self.stopping.add(target.name)
        for dom in target.conn.listAllDomains():
            if dom.isActive():
                dom.shutdown()
                self.world.went_off(target, dom.UUIDString(), "host", Transition.STOPPED,
                                    "guest_shutdown")

    @precondition(lambda self: self.stopping)
    @rule(autostart=st.booleans())
    def host_boots(self, autostart):
        target = self.world.host(min(self.stopping))
        self.boot(target, autostart)

    def boot(self, target, autostart):
        self.stopping.discard(target.name)
        world = self.world
        world.bus = [t for t in world.bus if t.host != target.name]  # the minion was down
        target.beacon.held.clear()
        for dom in target.conn.listAllDomains():
            uuid = dom.UUIDString()
            if dom.isActive():  # still running when the host went down: off with the host
                dom.destroy()
                if dom.isPersistent():
                    world.went_off(target, uuid, "host", None, "")
            if dom.isPersistent():
                target.reasons[uuid] = SHUTOFF_UNKNOWN  # a shut-off copy that was off before keeps why
        for dom in target.conn.listAllDomains():
            self.rebooting.discard(dom.UUIDString())
        target.boots += 1
        target.boot = f"{target.name}-boot{target.boots}"
        target.clock.at = BOOT_CLOCK
        target.next_sync = BOOT_CLOCK + 60.0
        target.stopping = False
        target.beacon.gap("connected")  # and the minion's start event: a sync
        if autostart:  # libvirt-guests or autostart brings the first shut-off copy back
            for dom in target.conn.listAllDomains():
                uuid = dom.UUIDString()
                if target.reasons.get(uuid) == SHUTOFF_UNKNOWN and world.runner(uuid) is None \
                        and world.vms[uuid].copies[target.name].why_off == "host":
                    dom.create()
                    world.came_on(target, uuid, Transition.STARTED, "booted")
                    break

    @precondition(lambda self: self.world is not None)
    @rule(vm=vms, failing=st.booleans())
    def start_fails(self, vm, failing):
        """libvirt refuses to start the domain (a missing disk, no memory left)."""
        self.world.vms[vm].failing_start = failing

    @precondition(lambda self: self.world is not None)
    @rule(vm=vms)
    def sync_meets_an_event(self, vm):
        """A sync has listed the domains when the guest changes and the event path's
        reconcile (another job process) records it; then the sync goes on."""
        host = self.where(vm)
        if host is None or self.busy(vm) or host.name in self.stopping:
            return
        self.world.interleave = (host, vm)
        self.world.run(host, "sync", host.ops.sync)
        self.world.interleave = None

    # The end of the faults
    @rule()
    def faults_stop(self):
        """Once the faults stop, every record equals the live state within the grace plus one
        sync, and a VM pinned active that is off for a reason vmpower restarts runs."""
        world = self.world
        world.outage = False
        for name in sorted(self.stopping):
            self.boot(world.host(name), autostart=False)
        for vm in world.vms.values():
            vm.failing_start = False
        # What the bus still holds arrives, and a resync: vmpower sees every VM (the grace
        # runs from when vmpower first saw a VM off, which may be now)...
        self.settle()
        # ...then the grace and any back-off pass, and one more sync runs.
        world.step(max(GRACE, BACKOFF * 2 ** (LIMIT - 1)) + 1.0)
        self.settle()
        self.check_settled()

    def settle(self):
        world = self.world
        while world.bus:
            world.deliver(world.bus.pop(0))
        for host in world.hosts:
            host.next_sync = host.clock() + 60.0
            world.run(host, "sync", host.ops.sync)

    def check_settled(self):
        world = self.world
        problems = []
        for uuid, vm in world.vms.items():
            if any(uuid in h.migrating for h in world.hosts):
                continue
            record = world.observer.get(uuid)
            running = [h for h in world.hosts if h.runs(uuid)]
            copies = self.copies(uuid)
            if not copies and record is None:
                continue
            policy, error = world.policy(copies[0], uuid) if copies else (None, None)
            if error or (policy is not None and (policy.task_state or not policy.managed)):
                continue  # out of vmpower's hands: it may not even be recorded
            if record is None:
                problems.append(f"{vm.name} has no record")
                continue
            if world.hand_edits.get(uuid):
                continue  # out of vmpower's hands until reset_state
            if record.task_state and world.owner_alive(record.task_owner) is not False:
                continue
            where = running[0] if running else next((h for h in copies if h.name == record.host), None)
            if where is None and len(copies) == 1:
                where = copies[0]
            if where is None:
                continue
            policy, error = world.policy(where, uuid)
            if error or policy.task_state:
                continue
            live = where.live(uuid).power_state
            if record.host != where.name or record.power_state is not live:
                problems.append(f"{vm.name}: the record says {record.power_state.value} on "
                                f"{record.host or 'no host'}, it is {live.value} on {where.name}")
                continue
            copy = vm.copies.get(where.name)
            if (policy.vm_state is VmState.ACTIVE and live is not PowerState.RUNNING
                    and where.mode == "enforce" and record.vm_state is VmState.ACTIVE
                    and policy.managed and copy is not None
                    and copy.why_off not in ("host", "migrated", "moved")
                    and record.off_reason != "host_shutdown"):
                problems.append(f"{vm.name} is pinned active and {live.value} on {where.name} "
                                f"(off: {copy.why_off}), not restarted (record: {record})")
        if problems:
            raise AssertionError("; ".join(problems))

    steps = 0  # steps run, over every example (the CI run reports it)

    @invariant()
    def safety(self):
        type(self).steps += 1
        if self.world is not None:
            self.world.check()


@contextlib.contextmanager
def _killed_if_asked(target, kill):
    """Run an operator's job on ``target`` that is killed ``kill`` ("before" or "after" its
    libvirt call; None: not killed): the kill ends the job there, as SIGKILL would."""
    target.kill = kill
    try:
        with contextlib.suppress(Killed):
            yield
    finally:
        target.kill = None
