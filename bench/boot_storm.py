"""Part 6: a boot storm: what it costs the master in jobs, and how soon every record is right.

A host boots 200 domains at once (libvirt's test driver, in this process: the watcher, its
thread, the translation and the storm guard are the real ones). Every lifecycle event the
beacon fires makes the shipped reactor run one ``vmpower.reconcile`` job on the master, every
``resync`` one ``vmpower.sync`` (``_reactor/lifecycle.sls``, ``_reactor/resync.sls``), so the
master's jobs are counted from what the watcher fires. Two runs: the storm guard off
(``burst_limit: 0``, one job per event) and at its default (40).

Convergence: the host comes back from a shutdown. Its 200 domains are recorded active and
shut down by the host (``off_reason: host_shutdown``, which vmpower leaves alone under the
default ``on_host_shutdown: ignore``), in a real SQLite store; then they all start at once.
A watcher with a journal delivers what it fires at once (the beacon's immediate path), and
each event becomes the job the reactor would run, on a pool of as many threads as the
machine has cores: ``HostOperations.reconcile`` with the event's seq, or ``.sync`` for a
resync, each job opening the store and the journal as a minion's job does
(``vmpower.minion.operations``). Measured: the time from the first start until every record
says running. The floor, in the same process: the storm's own duration plus one sync of the
200 domains on the records as they were before the storm. The storm guard waits for its quiet
period (``vmpower.core.burst.QUIET``) before it fires the burst's resync: the report says
where the time went.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from bench import harness

PART = 6
TITLE = "Boot storm"
DOMAINS = 200
SMOKE_DOMAINS = 60
URI = "test:///default"
DOMAIN_XML = ("<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>8192</memory>"
              "<os><type>hvm</type></os></domain>")
QUIET = 3.0  # seconds without anything fired: the storm and its resync are over
HOST = "bench-storm-host"
TARGET_CONVERGENCE = 1.5  # time until every record is right, at most this many times the floor
WAIT_LIMIT = 120.0  # seconds: a storm that never converges fails the measurement, never hangs it


def measure(domains: int, burst_limit: int) -> dict:
    """Boot ``domains`` at once under a watcher with ``burst_limit``; count the master's jobs."""
    import libvirt

    from vmpower import eventloop
    from vmpower.core.settings import BeaconSettings

    eventloop.ensure_running()
    conn = libvirt.open(URI)
    doms = [conn.defineXML(DOMAIN_XML.format(name=f"storm-{i:03d}",
                                             uuid=f"00000000-0000-4000-9000-{i:012d}"))
            for i in range(domains)]
    watcher = eventloop.Watcher(BeaconSettings(uri=URI, stop_grace=0, burst_limit=burst_limit))
    fired = []
    deadline = time.monotonic() + 30
    while not fired and time.monotonic() < deadline:  # the connected resync: not the storm's
        watcher.settle()
        fired.extend(watcher.drain())
    fired.clear()
    started = time.perf_counter()
    for dom in doms:
        dom.create()
    booted = time.perf_counter()
    last = time.monotonic()
    while time.monotonic() - last < QUIET:
        watcher.settle()
        new = watcher.drain()
        if new:
            fired.extend(new)
            last = time.monotonic()
        time.sleep(0.05)
    watcher.retire()
    for dom in doms:
        dom.destroy()
        dom.undefine()
    conn.close()
    lifecycle = [event for event in fired if event["tag"] != "resync"]
    resyncs = [[event["reason"], event["lost"]] for event in fired if event["tag"] == "resync"]
    return {"domains": domains, "burst_limit": burst_limit, "callbacks": watcher.events_seen,
            "lifecycle_fired": len(lifecycle), "resyncs": resyncs,
            "reconcile_jobs": len(lifecycle), "sync_jobs": len(resyncs),
            "jobs": len(lifecycle) + len(resyncs), "boot_seconds": booted - started}


def _prepare(settings, path: str, doms: list) -> None:
    """Records of a host that went down with its domains running: adopted while they ran,
    then recorded off by a sync while the host was stopping (active, shut down by the host)."""
    from vmpower.operations import HostOperations
    from vmpower.store import open_store

    for dom in doms:
        dom.create()
    with open_store(path) as store:
        HostOperations(settings, HOST, store).sync()
        for dom in doms:
            dom.destroy()
        HostOperations(settings, HOST, store, stopping=lambda: True).sync()


def _wrong(path: str) -> int:
    """How many of the host's records do not say active and running (one query, read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM instances WHERE host = ? AND "
                          "(power_state != 'running' OR vm_state != 'active')", (HOST,)).fetchone()[0]
    finally:
        db.close()


def _job(settings, store_path: str, journal_path: str, event: dict, began: float) -> dict:
    """What the reactor runs for ``event``, as a minion's job runs it: the store and journal
    opened for the job; its timings (seconds since ``began``) and what it decided."""
    from vmpower.core.model import Transition
    from vmpower.journal import Journal
    from vmpower.operations import HostOperations
    from vmpower.store import open_store

    started = time.perf_counter() - began
    with open_store(store_path) as store, Journal(journal_path) as journal:
        ops = HostOperations(settings, HOST, store, journal=journal)
        if event["tag"] == "resync":
            report = ops.sync()
            kind, actions = "sync", len(report["actions"])
        else:
            report = ops.reconcile(event["uuid"], Transition(event["transition"]),
                                   reason=event["reason"], seq=event["seq"])
            kind, actions = "reconcile", int(report.get("action", "none") != "none")
    return {"kind": kind, "started": started, "ended": time.perf_counter() - began,
            "actions": actions}


def converge(domains: int, burst_limit: int, scratch: str) -> dict:
    """Start ``domains`` recorded domains at once under a watcher with ``burst_limit``; run
    what it fires as the reactor would, and time until every record is right; then the floor.

    Raises if the records never all come right, or if any job acted on a domain: a
    benchmark of the wrong job is worse than none.
    """
    import libvirt

    from vmpower import eventloop
    from vmpower.core.settings import BeaconSettings, parse_settings
    from vmpower.journal import Journal
    from vmpower.operations import HostOperations
    from vmpower.store import open_store

    eventloop.ensure_running()
    conn = libvirt.open(URI)  # held open: the test driver forgets domains when the last closes
    for dom in conn.listAllDomains():  # the driver's own sample domain: N means N
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    doms = [conn.defineXML(DOMAIN_XML.format(name=f"boot-{i:03d}",
                                             uuid=f"00000000-0000-4000-a000-{i:012d}"))
            for i in range(domains)]
    settings = parse_settings({"uri": URI})
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        prepared, store_path = f"{work}/prepared.sqlite", f"{work}/records.sqlite"
        journal_path = f"{work}/journal.sqlite"
        _prepare(settings, prepared, doms)
        shutil.copyfile(prepared, store_path)
        fired: queue.Queue = queue.Queue()

        def deliver(batch: list[dict]) -> bool:  # the immediate path: on the bus at once
            for event in batch:
                fired.put(event)
            return True

        watcher = eventloop.Watcher(BeaconSettings(uri=URI, burst_limit=burst_limit),
                                    deliver=deliver, journal=Journal(journal_path))
        try:
            connected = fired.get(timeout=30)  # the connected resync: a sync before the storm
            _job(settings, store_path, journal_path, connected, time.perf_counter())
            if _wrong(store_path) != domains:
                raise RuntimeError("the records changed before the storm: not the scenario")
            jobs, converged, storm = _storm(doms, fired, settings, store_path, journal_path)
        finally:
            watcher.retire()
        if _wrong(store_path) or not all(dom.isActive() for dom in doms):
            raise RuntimeError("after the storm a record is wrong or a domain is off")
        if sum(job["actions"] for job in jobs):
            raise RuntimeError(f"a job acted on a domain: {jobs}")
        # The floor: the same records, the same domains started, one sync.
        for dom in doms:
            dom.destroy()
        floor_path = f"{work}/floor.sqlite"
        shutil.copyfile(prepared, floor_path)
        for dom in doms:
            dom.create()
        with open_store(floor_path) as store, Journal(journal_path) as journal:
            began = time.perf_counter()
            report = HostOperations(settings, HOST, store, journal=journal).sync()
            sync_seconds = time.perf_counter() - began
        if report["updated"] != domains or report["actions"] or _wrong(floor_path):
            raise RuntimeError(f"the floor's sync did {report}, the scenario calls for "
                               f"{domains} records written and nothing done")
    for dom in doms:
        dom.destroy()
        dom.undefine()
    conn.close()
    return {"domains": domains, "burst_limit": burst_limit, "storm_seconds": storm,
            "converged_seconds": converged, "floor_sync_seconds": sync_seconds,
            "floor_seconds": storm + sync_seconds, "jobs": jobs}


def _storm(doms: list, fired: queue.Queue, settings, store_path: str,
           journal_path: str) -> tuple[list[dict], float, float]:
    """Start every domain, run each fired event's job on a pool until the records are right
    and nothing was fired for ``QUIET`` seconds; the jobs, the convergence and the storm's
    duration (seconds since the first start)."""
    jobs: list[dict] = []
    running: dict[concurrent.futures.Future, float] = {}
    converged = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        began = time.perf_counter()
        for dom in doms:
            dom.create()
        storm = time.perf_counter() - began
        last = time.perf_counter()
        while converged is None or running or time.perf_counter() - last < QUIET:
            if time.perf_counter() - began > WAIT_LIMIT:
                raise RuntimeError(f"the records were not right {WAIT_LIMIT:g} s after the storm")
            while not fired.empty():
                event, last = fired.get(), time.perf_counter()
                running[pool.submit(_job, settings, store_path, journal_path, event, began)] = \
                    last - began
            if not running:
                time.sleep(0.005)
                continue
            done, _ = concurrent.futures.wait(running, timeout=0.005,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                jobs.append({**future.result(), "fired": running.pop(future)})
            if done and converged is None and not _wrong(store_path):
                converged = max(job["ended"] for job in jobs)
    return sorted(jobs, key=lambda job: job["fired"]), converged, storm


def run(smoke: bool, scratch: Path) -> dict:
    from vmpower.core.burst import QUIET as GUARD_QUIET
    from vmpower.core.settings import DEFAULT_BURST_LIMIT

    domains = SMOKE_DOMAINS if smoke else DOMAINS
    off = harness.in_subprocess(measure, domains=domains, burst_limit=0)
    on = harness.in_subprocess(measure, domains=domains, burst_limit=DEFAULT_BURST_LIMIT)
    convergence = {name: harness.in_subprocess(converge, domains=domains, burst_limit=limit,
                                               scratch=str(scratch))
                   for name, limit in (("guard_on", DEFAULT_BURST_LIMIT), ("guard_off", 0))}
    return {"domains": domains, "guard_off": off, "guard_on": on,
            "bound": DEFAULT_BURST_LIMIT + 1, "met": on["jobs"] <= DEFAULT_BURST_LIMIT + 1,
            "convergence": convergence, "guard_quiet": GUARD_QUIET}


def markdown(result: dict) -> str:
    off, on = result["guard_off"], result["guard_on"]
    rows = [[f"burst_limit {point['burst_limit']}" + (" (off)" if not point["burst_limit"] else ""),
             point["callbacks"], point["reconcile_jobs"], point["sync_jobs"], point["jobs"]]
            for point in (off, on)]
    return "\n".join([
        f"## Part {PART}: {TITLE.lower()}",
        "",
        (f"{result['domains']} domains of libvirt's test driver started at once; the master's jobs "
        f"are what the shipped reactor runs for what the beacon fires (one reconcile per "
        f"lifecycle event, one sync per resync). See `bench/boot_storm.py`."),
        "",
        harness.table(["storm guard", "libvirt callbacks", "reconcile jobs", "sync jobs",
                       "jobs on the master"], rows),
        "",
        (f"Jobs with the guard ÷ without: {on['jobs']} / {off['jobs']} = "
        f"{harness.ratio(on['jobs'] / off['jobs']) if off['jobs'] else 'n/a'}; target: at most "
        f"burst_limit + 1 = {result['bound']} jobs for the whole storm: "
        f"{'met' if result['met'] else '**not met**'}."),
        "",
        _convergence_markdown(result),
    ])


def timeline(point: dict) -> dict:
    """Where a convergence run's time went, in seconds since the first start."""
    jobs = point["jobs"]
    reconciles = [job for job in jobs if job["kind"] == "reconcile"]
    syncs = [job for job in jobs if job["kind"] == "sync"]
    return {"storm": point["storm_seconds"],
            "last_event": max((job["fired"] for job in reconciles), default=None),
            "resync_fired": min((job["fired"] for job in syncs), default=None),
            "sync_took": max((job["ended"] - job["started"] for job in syncs), default=None),
            "reconciles": len(reconciles), "syncs": len(syncs),
            "converged": point["converged_seconds"]}


def _convergence_markdown(result: dict) -> str:
    def shown(value):
        return "" if value is None else harness.seconds(value)

    rows = []
    for name, label in (("guard_on", "on"), ("guard_off", "off")):
        point = result["convergence"][name]
        line = timeline(point)
        rows.append([f"{label} (burst_limit {point['burst_limit']})", line["reconciles"],
                     line["syncs"], shown(line["storm"]), shown(line["last_event"]),
                     shown(line["resync_fired"]), shown(line["sync_took"]),
                     shown(line["converged"]),
                     (f"{shown(point['floor_seconds'])} ({shown(point['storm_seconds'])} + "
                      f"{shown(point['floor_sync_seconds'])})"),
                     harness.ratio(point["converged_seconds"] / point["floor_seconds"])])
    on = timeline(result["convergence"]["guard_on"])
    where = ""
    if on["resync_fired"] is not None:
        where = (f" With the guard on, the storm took {shown(on['storm'])}; the guard fired "
                 f"{on['reconciles']} events one by one, counted the rest, and fired the burst's "
                 f"resync at {shown(on['resync_fired'])}, "
                 f"{shown(on['resync_fired'] - on['storm'])} after the storm's last start (its "
                 f"quiet period: {result['guard_quiet']:g} s without an event); "
                 f"the sync then took {shown(on['sync_took'])}. The quiet period is what stands "
                 f"between the storm and the sync: it is how the guard knows the storm is over, "
                 f"and it is not shortened here.")
    return "\n".join([
        (f"**Convergence**: the host comes back from a shutdown; its {result['domains']} domains, "
         f"recorded active and shut down by the host, start at once. Each event fired is run as "
         f"the reactor's job would be (reconcile with its seq, or sync), on a pool of threads, "
         f"records in SQLite; converged: every record says running. The floor, measured in the "
         f"same process: the storm's own duration plus one sync of the records as they were "
         f"before it. Times are seconds since the first start."),
        "",
        harness.table(["storm guard", "reconcile jobs", "sync jobs", "storm", "last event fired",
                       "resync fired", "the sync took", "every record right",
                       "floor (storm + one sync)", "ratio"], rows),
        "",
        (f"Target: every record right within {TARGET_CONVERGENCE:g}× the floor, storm guard on: "
         f"{_verdict(result)}.{where}"),
    ])


def _verdict(result: dict) -> str:
    point = result["convergence"]["guard_on"]
    met = point["converged_seconds"] / point["floor_seconds"] <= TARGET_CONVERGENCE
    judged = result["domains"] == DOMAINS
    return ("met" if met else "**not met**") if judged else f"not judged (the target is at {DOMAINS})"


def against_floor(result: dict) -> list[harness.FloorRow]:
    """Part 6 against its floor: convergence after the storm, and the master's jobs against
    the guard's stated bound."""
    judged = result["domains"] == DOMAINS
    note = "" if judged else f"{result['domains']} domains; the target is at {DOMAINS}"
    n = result["domains"]
    on, off = result["convergence"]["guard_on"], result["convergence"]["guard_off"]
    return [
        harness.FloorRow(PART, f"storm of {n}: every record right (storm guard on)",
                         on["converged_seconds"], on["floor_seconds"],
                         "the storm + one sync", TARGET_CONVERGENCE, "s", judged, note),
        harness.FloorRow(PART, f"storm of {n}: every record right (guard off, context)",
                         off["converged_seconds"], off["floor_seconds"],
                         "the storm + one sync", None, "s"),
        harness.FloorRow(PART, f"storm of {n}: jobs on the master", result["guard_on"]["jobs"],
                         result["bound"], "burst_limit + 1, a stated bound", 1.0, "jobs", judged,
                         note),
    ]


def plot(result: dict, figure) -> None:
    jobs_ax, time_ax = figure.subplots(1, 2)
    points = (result["guard_off"], result["guard_on"])
    labels = [f"burst_limit {point['burst_limit']}" for point in points]
    jobs_ax.bar(labels, [point["jobs"] for point in points])
    jobs_ax.set_ylabel("jobs on the master")
    runs = [result["convergence"][name] for name in ("guard_off", "guard_on")]
    positions = range(len(runs))
    time_ax.bar([p - 0.2 for p in positions], [run["converged_seconds"] for run in runs],
                width=0.4, label="every record right")
    time_ax.bar([p + 0.2 for p in positions], [run["floor_seconds"] for run in runs],
                width=0.4, label="floor: the storm + one sync")
    time_ax.set_xticks(list(positions), [f"burst_limit {run['burst_limit']}" for run in runs])
    time_ax.set_ylabel("seconds since the first start")
    time_ax.legend(fontsize="small")
    figure.suptitle(f"Part {PART}: boot storm of {result['domains']} domains")
