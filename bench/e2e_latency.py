"""Part 3: end-to-end latency with a real salt-master, salt-minion, libvirtd and QEMU guests.

For every lifecycle transition the guests go through (started, paused, resumed, stopped), two
latencies are measured from the moment libvirt called the beacon back (the event's own
``timestamp``):

- to the event on the master's bus (read by a listener on the master's event socket);
- to the reconcile decision applied (the reactor's ``vmpower.reconcile`` job returning to the
  master, which it does after the decision is committed to the records).

Two paths are measured in the same run, one after the other on the same machine: the beacon's
tick (``immediate: false``: events wait for ``beacon()``, run every ``loop_interval``; the
fallback when the immediate path is off or the minion's bus refuses), and the immediate path
(events fired through the minion's bus as libvirt calls back). STOPPED is reported apart: the
beacon holds it back ``stop_grace`` seconds, by design, and then fires it on its own timer. The
baseline is Nova with events off: a periodic sync every 600 s notices a change after half the
interval on average (uniform phase), i.e. p50 300 s and p99 594 s; it is computed, not waited
for. All daemons run at Salt's default ``loop_interval`` (1 s), on one machine, so the
minion's and the master's clocks are the same clock.

The floor of the decision's latency is what Salt itself costs: the same reactor, with the same
targeting, running a job that does nothing (``test.arg``, which returns its arguments, so each
return names the event it answers) for the same events, in the same run. vmpower's own cost is
its callback → decision over that floor's callback → return.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench import harness

PART = 3
TITLE = "End-to-end latency"
STOP_GRACE = 5.0  # seconds; Nova hard-codes 15, vmpower's default is 15 too
NOVA_INTERVAL = 600.0
GUESTS = 4
CYCLES = 4  # per guest: started, paused, resumed, stopped -> 4 x 4 x 4 = 64 transitions
SMOKE_CYCLES = 1
PREFIX = "vmpower-bench-"
MINION_ID = "vmpower-bench-minion"
PORTS = (14515, 14516)  # not the demo's, so both can exist on one machine
RECONCILE = "vmpower.reconcile"
NO_OP = "test.arg"  # Salt's own job that does nothing but return its arguments


class Recorder:
    """Collects, from the master's bus, each lifecycle event and the reconcile it caused."""

    def __init__(self):
        self.lock = threading.Condition()
        self.events: list[dict] = []   # {uuid, transition, callback, on_bus}
        self.returns: list[dict] = []  # {uuid, transition, at}

    def __call__(self, tag: str, data: dict, arrived: float) -> None:
        with self.lock:
            if "/vmpower/lifecycle/" in tag:
                self.events.append({"uuid": data["uuid"], "transition": data["transition"],
                                    "callback": data["timestamp"], "on_bus": arrived})
            elif "/ret/" in tag and data.get("fun") in (RECONCILE, NO_OP):
                ret = data.get("return")
                if data["fun"] == NO_OP and isinstance(ret, dict):
                    ret = ret.get("kwargs")
                if isinstance(ret, dict) and "transition" in ret:
                    self.returns.append({"uuid": ret["uuid"], "transition": ret["transition"],
                                         "at": arrived})
            self.lock.notify_all()

    def wait_for(self, uuid: str, transition: str, since: float, timeout: float = 60) -> None:
        def arrived():
            return any(e["uuid"] == uuid and e["transition"] == transition and e["on_bus"] >= since
                       for e in self.events)
        with self.lock:
            if not self.lock.wait_for(arrived, timeout):
                raise TimeoutError(f"no {transition} of {uuid} on the master's bus in {timeout} s")

    def wait_for_return(self, uuid: str, transition: str, since: float, timeout: float = 60) -> None:
        def returned():
            return any(r["uuid"] == uuid and r["transition"] == transition and r["at"] >= since
                       for r in self.returns)
        with self.lock:
            if not self.lock.wait_for(returned, timeout):
                raise TimeoutError(f"no reconcile of {transition} of {uuid} returned in {timeout} s")

    def wait_for_every_return(self, timeout: float = 60) -> None:
        """Until every event on the bus has had its job's return (one job per event)."""
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.returns) >= len(self.events), timeout):
                raise TimeoutError(f"{len(self.events) - len(self.returns)} of {len(self.events)} "
                                   f"events had no return in {timeout} s")

    def latencies(self) -> dict[str, dict[str, list[float]]]:
        """Per kind (``immediate``, ``stopped``): callback -> bus and callback -> decision."""
        out = {kind: {"bus": [], "decision": []} for kind in ("immediate", "stopped")}
        with self.lock:
            used = set()
            for event in self.events:
                kind = "stopped" if event["transition"] == "stopped" else "immediate"
                out[kind]["bus"].append(event["on_bus"] - event["callback"])
                for index, ret in enumerate(self.returns):
                    if (index not in used and ret["uuid"] == event["uuid"]
                            and ret["transition"] == event["transition"]
                            and ret["at"] >= event["on_bus"]):
                        used.add(index)
                        out[kind]["decision"].append(ret["at"] - event["callback"])
                        break
        return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": _percentile(values, 50), "p99": _percentile(values, 99),
            "max": max(values)} if values else {"n": 0}


# (name, the beacon's ``immediate``, guests, one transition at a time, the reactor's job): the
# tick and the immediate path with GUESTS guests changing at once; the immediate path with one
# guest whose every transition waits for its decision (latency with nothing else in flight);
# and the floor, the immediate path with the reactor running a job that does nothing.
PATHS = (("tick", False, GUESTS, False, RECONCILE), ("immediate", True, GUESTS, False, RECONCILE),
         ("immediate, one at a time", True, 1, True, RECONCILE),
         ("floor: no-op job", True, GUESTS, False, NO_OP))
FLOOR = "floor: no-op job"


def reactor_running(job: str, work: Path) -> list[dict]:
    """The shipped reactor, with its lifecycle reaction running ``job`` instead of
    ``vmpower.reconcile``: the same tags, the same targeting, the same arguments."""
    from vmpower_lab.saltlab import REACTOR

    if job == RECONCILE:
        return REACTOR
    shipped = (harness.REPO / "_reactor" / "lifecycle.sls").read_text()
    if shipped.count(f"local.{RECONCILE}:") != 1:
        raise RuntimeError(f"_reactor/lifecycle.sls no longer runs local.{RECONCILE} once")
    copy = work / "lifecycle-no-op.sls"
    copy.write_text(shipped.replace(f"local.{RECONCILE}:", f"local.{job}:"))
    lifecycle = "salt/beacon/*/vmpower/lifecycle/*"
    return [{lifecycle: [str(copy)]} if lifecycle in reaction else reaction
            for reaction in REACTOR]


def measure(cycles: int, immediate: bool = True, count: int = GUESTS, serial: bool = False,
            job: str = RECONCILE) -> dict:
    """Run ``count`` guests through ``cycles`` start/suspend/resume/destroy cycles, all at
    once (or, ``serial``, each transition after the previous one's decision), with the reactor
    running ``job`` for each event; return latencies."""
    import libvirt

    from vmpower_lab import lab
    from vmpower_lab.saltlab import MasterBus, SaltLab

    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="vmpower-bench-") as workdir:
        work = Path(workdir)
        daemon = lab.LibvirtDaemon().start()
        salt = bus = None
        try:
            lab.remove_guests(lab.DEFAULT_URI, PREFIX)
            conn = libvirt.open(lab.DEFAULT_URI)
            guests = [conn.lookupByUUIDString(lab.define_guest(conn, f"{PREFIX}{i}", "acpi",
                                                               work / "guests", start=False).uuid)
                      for i in range(count)]
            # managed: false: every event is reconciled and recorded, but vmpower never acts,
            # so the guests go through exactly the transitions the benchmark drives.
            unmanaged = {dom.name(): {"managed": False} for dom in guests}
            salt = SaltLab(work / "salt", MINION_ID, ports=PORTS,
                           master={"reactor": reactor_running(job, work)},
                           minion={"vmpower": {"uri": lab.DEFAULT_URI, "instances": unmanaged,
                                               "store": str(work / "records.sqlite")},
                                   "beacons": {"vmpower": [{"uri": lab.DEFAULT_URI},
                                                           {"stop_grace": STOP_GRACE},
                                                           {"immediate": immediate}]}})
            salt.start()
            bus = MasterBus(salt, recorder)
            bus.start()
            salt.returned("vmpower.sync")  # adopt the guests before their first transition
            steps = [("started", lambda d: d.create()), ("paused", lambda d: d.suspend()),
                     ("resumed", lambda d: d.resume()), ("stopped", lambda d: d.destroy())]
            for _ in range(cycles):
                for transition, act in steps:
                    since = time.time()
                    for dom in guests:
                        act(dom)
                    for dom in guests:
                        recorder.wait_for(dom.UUIDString(), transition, since,
                                          timeout=60 + STOP_GRACE)
                        if serial:
                            recorder.wait_for_return(dom.UUIDString(), transition, since)
            recorder.wait_for_every_return()
            conn.close()
        finally:
            if bus is not None:
                bus.stop()
            if salt is not None:
                salt.stop()
            lab.remove_guests(lab.DEFAULT_URI, PREFIX)
            daemon.stop()
    latencies = recorder.latencies()
    return {kind: {what: _summary(values) for what, values in measured.items()}
            for kind, measured in latencies.items()}


def run(smoke: bool, scratch: Path) -> dict:
    # The smoke run (shapes only) measures the immediate path and its floor.
    paths = {name: harness.in_subprocess(measure, cycles=SMOKE_CYCLES if smoke else CYCLES,
                                         immediate=immediate, count=count, serial=serial, job=job)
             for name, immediate, count, serial, job in PATHS
             if (immediate and not serial) or not smoke}
    # Nova without events: a change at a uniformly random moment between two syncs.
    nova = {"p50": NOVA_INTERVAL * 0.50, "p99": NOVA_INTERVAL * 0.99, "max": NOVA_INTERVAL}
    return {"stop_grace": STOP_GRACE, "guests": GUESTS, "cycles": SMOKE_CYCLES if smoke else CYCLES,
            "vmpower": paths["immediate"],
            "paths": paths, "nova_periodic": nova, "loop_interval": 1.0}


BUS_TARGET = 0.100  # p99 callback -> master bus, seconds
DECISION_TARGET = 1.0  # p99 callback -> decision applied, seconds
FLOOR_TARGET = 1.2  # vmpower's callback -> decision over the no-op job's callback -> return


def against_no_op(result: dict) -> dict[str, dict]:
    """Per percentile (p50, p99): vmpower's callback → decision (the immediate path, 4 guests
    at once), the no-op job's callback → return for the same events, and their ratio."""
    paths = result.get("paths", {})
    if FLOOR not in paths or "immediate" not in paths:
        return {}
    vmpower, floor = paths["immediate"]["immediate"]["decision"], paths[FLOOR]["immediate"]["decision"]
    if not vmpower["n"] or not floor["n"]:
        return {}
    return {q: {"vmpower": vmpower[q], "floor": floor[q], "ratio": vmpower[q] / floor[q]}
            for q in ("p50", "p99")}


def markdown(result: dict) -> str:
    vm, nova = result["vmpower"], result["nova_periodic"]
    paths = result.get("paths") or {"immediate": vm}
    rows = []
    for name, measured in paths.items():
        for kind, label in (("immediate", "started, paused, resumed"),
                            ("stopped", f"stopped (held {result['stop_grace']:g} s by stop_grace)")):
            decided = "callback → return" if name == FLOOR else "callback → decision applied"
            for what, path in (("bus", "callback → master bus"), ("decision", decided)):
                point = measured[kind][what]
                if not point["n"]:
                    continue
                rows.append([name, label, path, point["n"], harness.seconds(point["p50"]),
                             harness.seconds(point["p99"]), harness.seconds(nova["p50"]),
                             harness.ratio(nova["p50"] / point["p50"])])
    bus_p99 = vm["immediate"]["bus"].get("p99")
    decision_p99 = vm["immediate"]["decision"].get("p99")
    alone = paths.get("immediate, one at a time", {}).get("immediate", {})

    def verdict(value, target):
        return "met" if value is not None and value <= target else "**not met**"

    def shown(value):
        return harness.seconds(value) if value is not None else "n/a"

    tick = paths.get("tick", {}).get("immediate", {})
    ratios = []
    for what in ("bus", "decision"):
        old, new = tick.get(what, {}).get("p99"), vm["immediate"][what].get("p99")
        if old and new:
            ratios.append(f"p99 callback → {'master bus' if what == 'bus' else 'decision'}: "
                          f"tick path ÷ immediate path = {harness.ratio(old / new)}")
    floor_rows = [[f"{q} callback → decision", harness.seconds(point["vmpower"]),
                   harness.seconds(point["floor"]), harness.ratio(point["ratio"]),
                   f"≤ {FLOOR_TARGET:g}×", verdict(point["ratio"], FLOOR_TARGET)]
                  for q, point in against_no_op(result).items()]
    transitions = sum(vm[kind]["bus"]["n"] for kind in ("immediate", "stopped"))
    return "\n".join([
        f"## Part {PART}: {TITLE.lower()}",
        "",
        (f"{transitions} transitions of {result['guests']} real QEMU guests (TCG) on a real "
        f"libvirtd, a real salt-minion with the vmpower beacon and a real salt-master with the "
        f"shipped reactor, at Salt's default loop_interval ({result['loop_interval']:g} s). "
        f"Latency runs from libvirt's callback in the minion (the event's timestamp). The "
        f"baseline is a periodic sync every {NOVA_INTERVAL:g} s (Nova's default with events "
        f"off), whose time to notice is uniform over the interval. See `bench/e2e_latency.py`."),
        "",
        harness.table(["beacon path", "transitions", "latency", "n", "p50", "p99",
                       "periodic sync p50", "sync p50 ÷ vmpower p50"], rows),
        "",
        "; ".join(ratios) + ("." if ratios else ""),
        "",
        harness.table(["target (immediate path, non-delayed transitions)", "measured", "verdict"],
                      [[f"p99 callback → master bus ≤ {BUS_TARGET * 1000:g} ms", shown(bus_p99),
                        verdict(bus_p99, BUS_TARGET)],
                       [f"p99 callback → decision applied ≤ {DECISION_TARGET:g} s",
                        shown(decision_p99), verdict(decision_p99, DECISION_TARGET)]]),
        "",
        (f"The targets are judged on the {result['guests']} guests changing at once. With one "
         f"transition at a time (nothing else in flight), the same path measured "
         f"p99 {shown(alone.get('bus', {}).get('p99'))} to the master bus and "
         f"p99 {shown(alone.get('decision', {}).get('p99'))} to the decision applied."
         if alone else ""),
        "",
        (f"Against Salt's own cost: the same reactor, targeting and events, with a job that does "
         f"nothing (`{NO_OP}`) instead of `{RECONCILE}`; {result['guests']} guests at once, "
         f"the immediate path."),
        "",
        harness.table(["latency", "vmpower", "no-op job (floor)", "ratio", "target", "verdict"],
                      floor_rows) if floor_rows else "The floor was not measured in this run.",
    ])


def against_floor(result: dict) -> list[harness.FloorRow]:
    """Part 3 against its floor: Salt's own cost, the same reactor running a job that does
    nothing for the same events, from the callback to its return."""
    measured = against_no_op(result)
    decision = result["vmpower"]["immediate"]["decision"]
    judged = result.get("cycles") == CYCLES
    note = "" if judged else f"{result.get('cycles')} cycle; the target is judged at {CYCLES}"
    return [harness.FloorRow(PART, f"{q} callback → decision applied (immediate path, "
                                   f"{result['guests']} guests at once)",
                             measured[q]["vmpower"] if measured else decision.get(q),
                             measured[q]["floor"] if measured else None,
                             f"the same events' no-op job ({NO_OP}), callback → return",
                             FLOOR_TARGET, "s", judged,
                             note if measured else "floor not measured in this run")
            for q in ("p50", "p99")]


def plot(result: dict, figure) -> None:
    axes = figure.subplots()
    vm = result["vmpower"]
    labels, p50, p99 = [], [], []
    for kind in ("immediate", "stopped"):
        for what in ("bus", "decision"):
            point = vm[kind][what]
            if point["n"]:
                labels.append(f"{kind}\n{what}")
                p50.append(point["p50"])
                p99.append(point["p99"])
    positions = range(len(labels))
    axes.bar([p - 0.2 for p in positions], p50, width=0.4, label="vmpower p50")
    axes.bar([p + 0.2 for p in positions], p99, width=0.4, label="vmpower p99")
    axes.axhline(result["nova_periodic"]["p50"], color="grey", linestyle="--",
                 label=f"periodic sync p50 ({NOVA_INTERVAL:g} s interval)")
    axes.set_yscale("log")
    axes.set_xticks(list(positions), labels)
    axes.set_ylabel("seconds from libvirt's callback")
    axes.set_title("Part 3: end-to-end latency")
    axes.legend(fontsize="small")
