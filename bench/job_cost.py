"""What one ``vmpower.reconcile`` job costs inside its own process: CPU time per phase.

A Salt minion forks a process for every job; the reactor's ``vmpower.reconcile`` pays, in that
process, for loading the execution module, reading its settings, opening the store, the
journal and libvirt, deciding, recording and sealing its result. Part 3 measures the whole path
in wall-clock time, which a loaded machine makes noisy; this measures the job's own share as
CPU time (``time.process_time``: every thread of the job's process, not the time it waited for
a core), so a change to that share shows whatever else runs.

The parent plays the minion: Salt's loader with vmpower's entry point, the beacon loaded and
run once (its imports, libvirt's event loop and watcher threads, the minion's key loaded), as
in a salt-minion process. Each job is a ``fork()`` of it, as Salt makes one, that looks up
``vmpower.reconcile`` through the loader and calls it on an event its beacon journaled; the
phases are the methods that do each part, timed exclusively (a timed call inside another
counts in its own phase). What the job imports that the minion had not is listed.

    .venv/bin/python bench/job_cost.py [--uri URI] [--jobs N] [--profile]

With ``--uri qemu:///system`` it needs a libvirtd (run it in a lane: ``scripts/lane.sh``, and
``--libvirtd`` starts one there) and defines a guest of its own, never started.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.breakdown import Phases  # after the path above: this runs as a script

TEST_DOMAIN = "test"  # the test driver's own running domain


def _lock_phase(_store, keys, *_args, **_kwargs) -> str:
    """The phase of a store lock call: the schema lock, which a store takes while it opens
    an incomplete schema, counts as opening it."""
    from vmpower.store.base import SCHEMA_LOCK

    named = (keys,) if isinstance(keys, str) else keys if isinstance(keys, (list, tuple)) else ()
    return "store open" if SCHEMA_LOCK in named else "instance lock"


def _instrument(clocks: dict[str, Phases]) -> None:
    """Time the methods of each phase of a reconcile (in the job's process only), once for
    each of ``clocks``."""
    from vmpower import fleet, hostinfo, hypervisor, journal, measurements, minion, operations, wakeup
    from vmpower.store import base, sqlite

    wraps = [
        (minion, "settings", "settings (minion config, pillar)"),
        (sqlite.SqliteStore, "__init__", "store open"),
        (base.Store, "close", "store open"),
        (minion, "carry_over", "store open"),
        (journal.Journal, "_open", "journal open"),
        (journal.Journal, "close", "journal open"),
        (journal.Journal, "read", "journal read"),
        (journal.Journal, "latest", "journal read"),
        (hypervisor.Hypervisor, "__enter__", "libvirt open, close"),
        (hypervisor.Hypervisor, "__exit__", "libvirt open, close"),
        (hypervisor.Hypervisor, "find", "libvirt reads"),
        (hypervisor.Hypervisor, "migration_job", "libvirt reads"),
        (hypervisor.Hypervisor, "on_crash", "libvirt reads"),
        (base.Store, "locks", _lock_phase),
        (base.Store, "_wait_for", _lock_phase),
        (base.Store, "_release_all", _lock_phase),
        (base.Store, "get", "record read"),
        (operations, "decide", "decision (rules)"),
        (operations.HostOperations, "_settle", "action"),
        (operations.HostOperations, "_act", "action"),
        (base.Store, "commit", "record write (commit)"),
        (hostinfo, "boot_id", "host facts"),
        (hostinfo, "host_stopping", "host facts"),
        (hostinfo, "owner_alive", "host facts"),
        (measurements.Measurements, "_append", "measurements append"),
        (wakeup.WakeUps, "update", "wake-up"),
        (fleet, "seal", "seal"),
    ]
    for phases in clocks.values():
        for owner, attribute, phase in wraps:
            phases.wrap(owner, attribute, phase)
    # HostOperations took these as defaults when its class was made: time them there too.
    timed = (hostinfo.boot_id, hostinfo.host_stopping)
    operations.HostOperations.__init__.__defaults__ = tuple(
        next((function for function in timed if inspect.unwrap(function) is default), default)
        for default in operations.HostOperations.__init__.__defaults__)


def _opts(root: Path, uri: str) -> dict:
    import salt.config

    opts = salt.config.minion_config(None)
    opts.update(id="job-cost-minion", file_client="local", cachedir=str(root / "cache"),
                pki_dir=str(root / "pki"), extension_modules=str(root / "extmods"),
                sock_dir=str(root / "sock"),
                vmpower={"uri": uri, "store": str(root / "records.sqlite"), "stop_grace": 0},
                pillar={"vmpower": {"instances": {f"vm{i}": {"vm_state": "active"} for i in range(20)}}})
    return opts


def _setup(root: Path, uri: str, libvirtd: bool) -> str:
    """The domain to reconcile (its UUID): recorded by a first sync, in a process of its own."""
    import libvirt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    (root / "pki").mkdir(parents=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (root / "pki" / "minion.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    if uri.startswith("test:"):
        return libvirt.open(uri).lookupByName(TEST_DOMAIN).UUIDString()
    from vmpower_lab import lab

    if libvirtd:
        lab.LibvirtDaemon().start()
    conn = libvirt.open(uri)
    lab.remove_guests(uri, "vmpower-jobcost-")
    guest = lab.define_guest(conn, "vmpower-jobcost-0", "acpi", root / "guests", start=False)
    return guest.uuid


def _minion(root: Path, uri: str):
    """This process as a salt-minion's: the loader, the beacon loaded and run once."""
    import salt._logging
    import salt.loader

    salt._logging.shutdown_temp_handler()
    opts = _opts(root, uri)
    utils = salt.loader.utils(opts)
    functions = salt.loader.minion_mods(opts, utils=utils)
    beacons = salt.loader.beacons(opts, functions)
    beacons["vmpower.beacon"]([{"uri": uri}, {"stop_grace": 0}])
    from vmpower import fleet

    fleet.seal_key(opts)  # as the beacon loads it when it connects
    return opts, functions


def _journaled(opts: dict, uuid: str, uri: str) -> int:
    """An event of ``uuid`` journaled as the beacon journals it: its ``seq``."""
    from vmpower import hostinfo
    from vmpower.core.journal import Observation
    from vmpower.core.model import Transition
    from vmpower.journal import Journal, journal_path

    with Journal(journal_path(opts["cachedir"])) as journal:
        [seq] = journal.append([Observation(0, hostinfo.boot_id(), uri, uuid, Transition.STARTED,
                                            "booted", time.monotonic(), time.time())])
    return seq


def _job(functions, uuid: str, seq: int, profile: str | None) -> dict:
    """In the forked job: the reconcile as Salt runs it, phase by phase."""
    import gc

    before = set(sys.modules)
    cpu, wall_phases = Phases(time.process_time), Phases()
    collected = {"seconds": 0.0, "by_generation": [0, 0, 0]}
    gc_started = []

    def on_gc(phase, info):  # the collector's own time, in whichever phase it ran
        if phase == "start":
            gc_started.append(time.process_time())
        elif gc_started:
            collected["seconds"] += time.process_time() - gc_started.pop()
            collected["by_generation"][info["generation"]] += 1

    gc.callbacks.append(on_gc)
    started = time.process_time()
    wall = time.perf_counter()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    reconcile = functions["vmpower.reconcile"]  # the loader loads the module here
    loaded = time.process_time()
    wall_loaded = time.perf_counter()
    _instrument({"cpu": cpu, "wall": wall_phases})
    instrumented = time.process_time()
    result = reconcile(uuid, transition="started", seq=seq)
    done = time.process_time()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    cpu.seconds["loader (module, __virtual__, imports)"] = loaded - started
    call = done - instrumented
    cpu.seconds["the rest of the call"] = call - sum(
        v for k, v in cpu.seconds.items() if not k.startswith("loader"))
    wall_phases.seconds["loader (module, __virtual__, imports)"] = wall_loaded - wall
    gc.callbacks.remove(on_gc)
    return {"gc": collected, "objects": len(gc.get_objects()), "phases": cpu.seconds, "wall_phases": wall_phases.seconds, "total": (loaded - started) + call,
            "wall": time.perf_counter() - wall - (instrumented - loaded),
            "imported": sorted(set(sys.modules) - before),
            "result": {k: result.get(k) for k in ("action", "rule", "result", "reason")}}


def _fork_job(functions, uuid: str, seq: int, profile: str | None) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the job
        os.close(read)
        try:
            out = json.dumps(_job(functions, uuid, seq, profile)).encode()
        except BaseException as exc:  # reported by the parent
            out = json.dumps({"error": repr(exc)}).encode()
        with os.fdopen(write, "wb") as pipe:
            pipe.write(out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    found = json.loads(data)
    if "error" in found:
        raise RuntimeError(found["error"])
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="test:///default")
    parser.add_argument("--jobs", type=int, default=15)
    parser.add_argument("--libvirtd", action="store_true", help="start a libvirtd (in a lane)")
    parser.add_argument("--profile", metavar="FILE", help="cProfile one more job into FILE")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmpower-jobcost-") as tmp:
        root = Path(tmp)
        uuid = _setup(root, args.uri, args.libvirtd)
        opts, functions = _minion(root, args.uri)
        jobs = []
        for _ in range(args.jobs + 1):  # the first one adopts the domain: not counted
            jobs.append(_fork_job(functions, uuid, _journaled(opts, uuid, args.uri), None))
        jobs = jobs[1:]
        if args.profile:
            _fork_job(functions, uuid, _journaled(opts, uuid, args.uri), args.profile)
    names = sorted({name for job in jobs for name in job["phases"]},
                   key=lambda n: -statistics.median(j["phases"].get(n, 0.0) for j in jobs))
    medians = {name: statistics.median(j["phases"].get(name, 0.0) for j in jobs) for name in names}
    walls = {name: statistics.median(j["wall_phases"].get(name, 0.0) for j in jobs) for name in names}
    total = statistics.median(j["total"] for j in jobs)
    print(f"{args.jobs} reconcile jobs, {args.uri}; ms per job (median): CPU, wall")
    for name in names:
        print(f"  {name:42s} {medians[name] * 1000:8.2f} {walls.get(name, 0.0) * 1000:8.2f}")
    print(f"  {'total':42s} {total * 1000:8.2f}   (wall {statistics.median(j['wall'] for j in jobs) * 1000:.1f} ms)")
    print(f"garbage collection: {statistics.median(j['gc']['seconds'] for j in jobs) * 1000:.2f} ms "
          f"(counted in the phases above), collections by generation {jobs[-1]['gc']['by_generation']}, "
          f"{jobs[-1]['objects']} objects tracked")
    print("result:", jobs[-1]["result"])
    print("imported by the job:", ", ".join(jobs[-1]["imported"]) or "nothing")
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": medians, "total": total,
                                               "imported": jobs[-1]["imported"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
