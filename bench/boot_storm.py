"""Part 6: a boot storm, and what it costs the master in jobs.

A host boots 200 domains at once (libvirt's test driver, in this process: the watcher, its
thread, the translation and the storm guard are the real ones). Every lifecycle event the
beacon fires makes the shipped reactor run one ``vmpower.reconcile`` job on the master, every
``resync`` one ``vmpower.sync`` (``_reactor/lifecycle.sls``, ``_reactor/resync.sls``), so the
master's jobs are counted from what the watcher fires. Two runs: the storm guard off
(``burst_limit: 0``, one job per event) and at its default (40).
"""

from __future__ import annotations

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


def run(smoke: bool, scratch: Path) -> dict:
    from vmpower.core.settings import DEFAULT_BURST_LIMIT

    domains = SMOKE_DOMAINS if smoke else DOMAINS
    off = harness.in_subprocess(measure, domains=domains, burst_limit=0)
    on = harness.in_subprocess(measure, domains=domains, burst_limit=DEFAULT_BURST_LIMIT)
    return {"domains": domains, "guard_off": off, "guard_on": on,
            "bound": DEFAULT_BURST_LIMIT + 1, "met": on["jobs"] <= DEFAULT_BURST_LIMIT + 1}


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
    ])


def plot(result: dict, figure) -> None:
    axes = figure.subplots()
    points = (result["guard_off"], result["guard_on"])
    labels = [f"burst_limit {point['burst_limit']}" for point in points]
    axes.bar(labels, [point["jobs"] for point in points])
    axes.set_ylabel("jobs on the master")
    axes.set_title(f"Part {PART}: boot storm of {result['domains']} domains")
