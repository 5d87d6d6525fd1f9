"""Part 4: a fleet sweep into one PostgreSQL, and the fleet report over it.

50 hosts (minion-like processes, each with libvirt's test driver of its own, 1,000 domains
each, half running) share one real PostgreSQL fleet store (``tests/unit/pgserver.py`` starts
one of the benchmark's own, fsync off: disk flushes are not part of the figures). Each host
adopts its domains once (not measured), then before every round 1% of its running domains are
destroyed and as many shut-off ones started behind vmpower's back (not measured either), so
each sync has real work: records to write and actions to take. The hosts run with
``stop_grace: 0``, so that the destroyed ones are settled (recorded stopped) in the round that
destroyed them and every round has the same work.

A sync runs as ``salt '*' vmpower.sync`` runs it on a minion: its job opens the store (a new
connection, authenticated with a password over TCP), syncs and closes it. The host process
stays, as a minion does; Python's and Salt's start-up are not vmpower's and not measured.

Rounds, interleaved (the store's tables age alike for both):

``sweep``
    every host syncs at once (``sync_splay: 0``).
``one host alone``
    one host at a time, in the same database (the others' records present), each host in turn:
    the baseline of the database's work per host-sync.
``splay``
    every host syncs once, each at the offset Salt's scheduler gives it with the default
    ``sync_splay`` (``vmpower.core.fleet.sync_splay``: a tenth of ``sync_interval``, at most
    60 s; Salt's scheduler adds ``random.randint(1, splay)`` whole seconds to each run), from
    the same instant (the worst case: every minion's schedule started together), in real time
    (at a compressed time scale in the smoke run only), with ``pg_stat_activity`` sampled.
``report``
    ``vmpower.fleet.report_from_store`` (what ``salt-run vmpower.report`` returns, before
    Salt's outputter) over every VM of the fleet.

What is measured for each round, before and after it (once the hosts' backends have exited):

* the server's CPU time: the postmaster's own and its children's, from ``/proc``: the live
  processes' ``schedstat`` (nanoseconds) plus the children it reaped (``cutime + cstime``:
  the hosts' backends and autovacuum workers); the benchmark's own monitoring backends are
  left out;
* ``pg_stat_database``: commits, rows written (inserted + updated + deleted), deadlocks;
* the server log, with ``log_lock_waits = on`` and ``deadlock_timeout = 1s``: every lock wait
  longer than 1 s logs a "still waiting" line; and autovacuum's runs
  (``log_autovacuum_min_duration = 0``);
* each host's CPU time for its sync (``time.process_time()``, user + sys of every thread, from
  opening the store to closing it), and the machine's CPU time (``/proc/stat``), so that what
  the rest of the machine took during a round is known.

The CPU-bound limit of a sweep is the CPU it needed (the hosts' syncs and the server) spread
over every core: no schedule of that work on this machine could end sooner.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import harness

PART = 4
TITLE = "Fleet sweep into one PostgreSQL"

HOSTS, DOMAINS = 50, 1_000
SMOKE_HOSTS, SMOKE_DOMAINS = 2, 100
# Sweeps; hosts alone after each sweep (many: the CPU of the backends the server reaped is read
# in clock ticks, 10 ms, so one round alone is known to 10 ms only); reports (best of).
SWEEPS, SINGLES, REPORTS = 3, 8, 3
TARGET_PER_SYNC = 1.2   # the database's work per host-sync in a sweep, at most 1.2x one host alone
TARGET_WALL = 1.2       # a sweep's wall time at most 1.2x the CPU-bound limit
TARGET_REPORT = 2.0     # report of 50,000 VMs within 2 s
SPLAY_SEED = 4
SMOKE_SPLAY_SCALE = 0.02  # the smoke run's 60 s of splay pass in 1.2 s
SAMPLE_EVERY = 0.01       # pg_stat_activity, during the splay round
URI = "test:///default"


# In each host process ---------------------------------------------------------------------
def host_main(index: int, domains: int, dsn: str) -> None:
    """One host: define its domains and adopt them, then drift or sync when the parent says so.

    Speaks a line protocol on stdin/stdout: it prints ``ready``; a ``drift`` line drifts 1%
    of its domains each way and prints ``drifted``; a ``sync`` line runs a sync as a minion's
    job does (store opened, synced, closed) and prints its figures as JSON; anything else
    ends it.
    """
    import libvirt

    from vmpower.core.settings import parse_settings
    from vmpower.operations import HostOperations
    from vmpower.store import open_store

    conn = libvirt.open(URI)  # held open: the test driver forgets domains when the last closes
    for dom in conn.listAllDomains():
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    xml = ("<domain type='test'><name>h{i:02d}-vm-{j:05d}</name>"
           "<uuid>{i:08d}-0000-4000-8000-{j:012d}</uuid><memory>65536</memory><vcpu>1</vcpu>"
           "<os><type>hvm</type></os></domain>")
    doms = [conn.defineXML(xml.format(i=index, j=j)) for j in range(domains)]
    for dom in doms[::2]:
        dom.create()
    running, off = doms[::2], doms[1::2]
    drift = max(1, domains // 100)
    host = f"bench-host-{index:02d}"
    settings = parse_settings({"uri": URI, "stop_grace": 0})
    with open_store(dsn) as store:
        HostOperations(settings, host, store).sync()  # adopt everything: not measured
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "drift":
            # 1% of the running ones destroyed (recorded stopped), 1% of the off ones started
            # (powered off again): fresh domains each round, so every round has the same work.
            if len(running) < drift or len(off) < drift:
                raise RuntimeError("no fresh domains left for another round")
            for dom in running[:drift]:
                dom.destroy()
            for dom in off[:drift]:
                dom.create()
            running, off = running[drift:], off[drift:]
            print("drifted", flush=True)
            continue
        if command != "sync":
            break
        cpu, began = time.process_time(), time.monotonic()
        with open_store(dsn) as store:
            report = HostOperations(settings, host, store).sync()
            backend = _schedstat(store._db.info.backend_pid)  # from its fork, before its exit
        ended, cpu = time.monotonic(), time.process_time() - cpu
        print(json.dumps({"began": began, "ended": ended, "took": ended - began, "cpu": cpu,
                          "backend_cpu": backend,
                          "checked": report["checked"], "updated": report["updated"],
                          "actions": len(report["actions"])}), flush=True)
    conn.close()


# In run.py's process ----------------------------------------------------------------------
def _spawn(index: int, domains: int, dsn: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(harness.REPO), env.get("PYTHONPATH")]))
    code = ("import sys; from bench.fleet_scale import host_main; "
            "host_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])")
    return subprocess.Popen([sys.executable, "-c", code, str(index), str(domains), dsn],
                            cwd=harness.REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)


def _read(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a bench host exited early (code {proc.wait()})")
    return line.strip()


def _stat_fields(pid: int) -> list[str]:
    # The fields after the command name (which may hold spaces): state is [0], ppid [1].
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _schedstat(pid: int) -> float:
    """The CPU time of process ``pid`` so far, in seconds (to the nanosecond, unlike the clock
    ticks of /proc/<pid>/stat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _machine_cpu() -> dict[str, float]:
    """Every core's time since boot, from /proc/stat: busy (anything but idle) and idle."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return {"busy": (sum(fields[:8]) - idle) / ticks, "idle": idle / ticks}


class _Monitor:
    """The database server's load, before and after a round, read without adding to it: its
    connections go to the ``postgres`` database as the superuser, and their backends' CPU is
    left out of the server's."""

    def __init__(self, server, dbname: str):
        import psycopg

        self.server, self.dbname = server, dbname
        self.db = self.connect(psycopg)
        self.own = {self.db.execute("SELECT pg_backend_pid()").fetchone()[0]}
        self.log = Path(server.log)

    def connect(self, psycopg):
        db = psycopg.connect(host=self.server.root, port=self.server.port, user=self.server.superuser,
                             dbname="postgres", autocommit=True, application_name="vmpower-bench")
        db.execute("SET stats_fetch_consistency = none")  # every read is current
        return db

    def children(self) -> list[tuple[int, str]]:
        """The postmaster's children: (pid, process title)."""
        postmaster, found = self.server.process.pid, []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if int(_stat_fields(int(entry))[1]) == postmaster:
                        title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                        found.append((int(entry), title.decode(errors="replace").strip()))
                except (OSError, IndexError, ValueError):
                    continue  # ended meanwhile
        return found

    def hosts_connected(self) -> int:
        """Backends of the hosts' role still alive (an exited one has flushed its statistics
        and been reaped: its CPU is in the postmaster's cutime)."""
        from tests.unit.pgserver import ROLE

        return sum(1 for _, title in self.children() if title.startswith(f"postgres: {ROLE} "))

    def settle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.hosts_connected():
            if time.monotonic() > deadline:
                raise RuntimeError("the hosts' backends did not exit")
            time.sleep(0.01)

    def cpu(self) -> dict[str, float]:
        postmaster = self.server.process.pid
        fields = _stat_fields(postmaster)
        reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime
        live = 0
        for pid in [postmaster] + [pid for pid, _ in self.children() if pid not in self.own]:
            try:
                live += _schedstat(pid)
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile: counted in cutime from now on
        return {"cpu_seconds": reaped + live, "reaped_cpu_seconds": reaped}

    def snapshot(self) -> dict[str, float]:
        row = self.db.execute("SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, "
                              "tup_deleted, deadlocks, blks_hit + blks_read, tup_returned + tup_fetched "
                              "FROM pg_stat_database WHERE datname = %s", (self.dbname,)).fetchone()
        return {**self.cpu(), "commits": row[0], "rollbacks": row[1], "rows_inserted": row[2],
                "rows_updated": row[3], "rows_deleted": row[4], "deadlocks": row[5],
                "buffer_accesses": row[6], "rows_read": row[7], "log_offset": self.log.stat().st_size}

    def delta(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        db = {key: after[key] - before[key] for key in before if key != "log_offset"}
        db["rows_written"] = db["rows_inserted"] + db["rows_updated"] + db["rows_deleted"]
        with self.log.open("rb") as log:
            log.seek(before["log_offset"])
            text = log.read(after["log_offset"] - before["log_offset"]).decode(errors="replace")
        db["lock_waits_over_1s"] = text.count("still waiting for")
        db["deadlocks_logged"] = text.count("deadlock detected")
        db["autovacuum_runs"] = text.count("automatic vacuum of table") + text.count("automatic analyze of table")
        return db


class _Sampler(threading.Thread):
    """``pg_stat_activity`` every SAMPLE_EVERY seconds: the hosts' sessions, connected and
    active (running a statement)."""

    def __init__(self, monitor: _Monitor):
        import psycopg

        super().__init__(daemon=True)
        self.monitor = monitor
        self.db = monitor.connect(psycopg)
        monitor.own.add(self.db.execute("SELECT pg_backend_pid()").fetchone()[0])
        self.samples: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        from tests.unit.pgserver import ROLE

        while not self.done.is_set():
            row = self.db.execute("SELECT count(*), count(*) FILTER (WHERE state <> 'idle') "
                                  "FROM pg_stat_activity WHERE datname = %s AND usename = %s",
                                  (self.monitor.dbname, ROLE)).fetchone()
            self.samples.append((time.monotonic(), row[0], row[1]))
            self.done.wait(SAMPLE_EVERY)

    def summary(self, began: float) -> dict:
        busy = active = 0.0
        for (at, connected, running), (later, _, _) in zip(self.samples, self.samples[1:]):
            busy += (later - at) if connected else 0
            active += (later - at) if running else 0
        return {"samples": len(self.samples), "busy_seconds": busy, "active_seconds": active,
                "peak_connections": max(s[1] for s in self.samples),
                "peak_active": max(s[2] for s in self.samples),
                # Where what was sampled changed, and the last sample.
                "timeline": [(round(at - began, 3), c, a) for i, (at, c, a) in enumerate(self.samples)
                             if i in (0, len(self.samples) - 1) or self.samples[i - 1][1:] != (c, a)]}


def _round(hosts: list[subprocess.Popen], monitor: _Monitor, offsets: list[float] | None = None) -> dict:
    """Drift every host of ``hosts``, then have them sync: all at once, or each at its offset
    (seconds) with pg_stat_activity sampled. The figures of the syncs, from the moment they
    were told to go until every one has ended and its backend has exited."""
    for proc in hosts:
        proc.stdin.write("drift\n")
    for proc in hosts:
        if _read(proc) != "drifted":
            raise RuntimeError("a bench host did not drift")
    monitor.settle()
    sampler = _Sampler(monitor) if offsets is not None else None
    before, machine, own = monitor.snapshot(), _machine_cpu(), time.process_time()
    told = time.monotonic()
    if sampler is None:
        for proc in hosts:
            proc.stdin.write("sync\n")
    else:
        sampler.start()

        def tell():
            for offset, proc in sorted(zip(offsets, hosts), key=lambda pair: pair[0]):
                time.sleep(max(0.0, told + offset - time.monotonic()))
                proc.stdin.write("sync\n")

        teller = threading.Thread(target=tell, daemon=True)
        teller.start()
    results = [json.loads(_read(proc)) for proc in hosts]
    ended = max(r["ended"] for r in results)
    monitor.settle()
    if sampler is not None:
        sampler.done.set()
        sampler.join()
        teller.join()
    after, machine_after, own = monitor.snapshot(), _machine_cpu(), time.process_time() - own
    db = monitor.delta(before, after)
    host_cpu = sum(r["cpu"] for r in results)
    wall = ended - told
    machine_busy = machine_after["busy"] - machine["busy"]
    round_ = {
        "hosts": len(hosts), "wall_seconds": wall, "host_seconds": sorted(r["took"] for r in results),
        "host_cpu_seconds": host_cpu, "backend_cpu_seconds": sum(r["backend_cpu"] for r in results),
        "work": {k: sum(r[k] for r in results) for k in ("checked", "updated", "actions")},
        "db": db,
        # Over the round, until the backends had exited (a little longer than the wall time).
        "machine": {"seconds": time.monotonic() - told, "busy": machine_busy,
                    "idle": machine_after["idle"] - machine["idle"],
                    "others": machine_busy - host_cpu - db["cpu_seconds"] - own},
    }
    if sampler is not None:
        round_["activity"] = sampler.summary(told)
        sampler.db.close()
    else:
        round_["cpu_bound_seconds"] = (host_cpu + db["cpu_seconds"]) / os.cpu_count()
        round_["over_cpu_bound"] = wall / round_["cpu_bound_seconds"]
        # The same limit with the CPU the rest of the machine took meanwhile added: what no
        # schedule could beat on this machine as it was loaded.
        round_["over_machine_bound"] = wall / ((host_cpu + db["cpu_seconds"] + own
                                                + max(0.0, round_["machine"]["others"])) / os.cpu_count())
    return round_


PER_SYNC = ("cpu_seconds", "commits", "rows_written", "buffer_accesses", "rows_read",
            "backend_cpu_seconds", "host_cpu_seconds")


def per_sync(rounds: list[dict]) -> dict[str, float]:
    """The database's work per host-sync over ``rounds``."""
    syncs = sum(r["hosts"] for r in rounds)
    figures = {key: sum(r["db"][key] for r in rounds) / syncs
               for key in ("cpu_seconds", "commits", "rows_written", "buffer_accesses", "rows_read")}
    for key in ("backend_cpu_seconds", "host_cpu_seconds"):
        figures[key] = sum(r[key] for r in rounds) / syncs
    return figures


def splay_offsets(count: int, scale: float) -> tuple[int, list[float]]:
    """The default splay (seconds) and each host's offset as Salt's scheduler draws it
    (``random.randint(1, splay)``), times ``scale``."""
    from vmpower.core.fleet import sync_splay
    from vmpower.core.settings import DEFAULT_SYNC_INTERVAL

    splay = sync_splay(None, DEFAULT_SYNC_INTERVAL)
    rng = random.Random(SPLAY_SEED)
    return splay, [rng.randint(1, splay) * scale for _ in range(count)]


def run(smoke: bool, scratch: Path) -> dict:
    from tests.unit.pgserver import PostgresServer, find_bindir
    from vmpower.core.fleet import Filters, FleetSettings
    from vmpower.fleet import report_from_store
    from vmpower.store import open_store
    from vmpower.store.events import FleetStore

    count, domains = (SMOKE_HOSTS, SMOKE_DOMAINS) if smoke else (HOSTS, DOMAINS)
    singles_each = min(SINGLES, count)
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("part 4 needs PostgreSQL's server binaries (scripts/setup.sh installs them)")

    class Server(PostgresServer):
        max_connections = count + 20

    server = Server(bindir)
    server.start()
    hosts: list[subprocess.Popen] = []
    try:
        for setting in ("log_lock_waits = on", "deadlock_timeout = '1s'",
                        "log_autovacuum_min_duration = 0"):
            server.admin(f"ALTER SYSTEM SET {setting}")
        server.admin("SELECT pg_reload_conf()")
        dsn = server.database()
        with open_store(dsn):
            pass  # the schema, created once before the hosts start together
        print(f"fleet_scale: starting {count} hosts of {domains:,} domains", file=sys.stderr, flush=True)
        hosts = [_spawn(i, domains, dsn) for i in range(count)]
        for proc in hosts:
            if _read(proc) != "ready":
                raise RuntimeError("a bench host did not get ready")
        monitor = _Monitor(server, dsn.rsplit("/", 1)[1])
        sweeps, singles = [], []
        for turn in range(SWEEPS):
            sweeps.append(_round(hosts, monitor))
            for i in range(singles_each):
                singles.append(_round([hosts[(turn * singles_each + i) % count]], monitor))
        splay, offsets = splay_offsets(count, SMOKE_SPLAY_SCALE if smoke else 1.0)
        spread = _round(hosts, monitor, offsets)
        drift = max(1, domains // 100)
        for name, rounds in (("sweep", sweeps), ("one host", singles), ("splay", [spread])):
            for r in rounds:
                # Records written: at least the 2% that drifted (a VM powered off in the round
                # before gets one more write, its off bookkeeping, in the next sync).
                expect = r["hosts"]
                wanted = {"checked": expect * domains, "actions": expect * 2 * drift}
                done = {k: r["work"][k] for k in wanted}
                if done != wanted or not expect * 2 * drift <= r["work"]["updated"] <= expect * 3 * drift:
                    raise RuntimeError(f"{name} did {r['work']}, the scenario calls for {wanted}")
        reports = []
        with open_store(dsn) as store:
            fleet = FleetStore(store)
            for _ in range(REPORTS):
                began = time.perf_counter()
                report = report_from_store(fleet, Filters(), FleetSettings())
                reports.append(time.perf_counter() - began)
            vms = report["summary"]["vms"]
        if vms != count * domains:
            raise RuntimeError(f"the report shows {vms} VMs, the fleet has {count * domains}")
    finally:
        for proc in hosts:
            try:
                proc.stdin.write("quit\n")
                proc.stdin.close()
            except OSError:
                pass
        for proc in hosts:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()
    in_sweep, alone = per_sync(sweeps), per_sync(singles)
    growth = {key: in_sweep[key] / alone[key] if alone[key] else None for key in in_sweep}
    sweep = min(sweeps, key=lambda r: r["over_cpu_bound"])
    waits = sum(r["db"]["lock_waits_over_1s"] for r in sweeps + singles + [spread])
    deadlocks = sum(r["db"]["deadlocks"] + r["db"]["deadlocks_logged"] for r in sweeps + singles + [spread])
    full = count == HOSTS and domains == DOMAINS

    def target(text, unit, measured, limit):
        return {"target": text, "unit": unit, "measured": measured if full else None,
                "met": (measured is not None and measured <= limit) if full else None}

    targets = [
        target(f"server CPU per host-sync in a sweep of {HOSTS} hosts at most {TARGET_PER_SYNC:g}× "
               f"one host alone", "ratio", growth["cpu_seconds"], TARGET_PER_SYNC),
        target(f"commits per host-sync at most {TARGET_PER_SYNC:g}× one host alone", "ratio",
               growth["commits"], TARGET_PER_SYNC),
        target(f"rows written per host-sync at most {TARGET_PER_SYNC:g}× one host alone", "ratio",
               growth["rows_written"], TARGET_PER_SYNC),
        target("no deadlock and no lock wait over 1 s, in every round", "count", waits + deadlocks, 0),
        target(f"a sweep's wall time at most {TARGET_WALL:g}× its CPU-bound limit "
               f"(its CPU ÷ {os.cpu_count()} cores)", "ratio", sweep["over_cpu_bound"], TARGET_WALL),
        target(f"the report of {HOSTS * DOMAINS:,} VMs within {TARGET_REPORT:g} s", "seconds",
               min(reports), TARGET_REPORT),
    ]
    return {"hosts": count, "domains": domains, "cores": os.cpu_count(), "sweep": sweep,
            "sweeps": sweeps, "one_host": singles[0], "singles": singles,
            "per_host_sync": {"sweep": in_sweep, "one_host": alone, "growth": growth},
            "lock_waits_over_1s": waits, "deadlocks": deadlocks,
            "splay": {"splay_seconds": splay, "time_scale": 1.0 if not smoke else SMOKE_SPLAY_SCALE,
                      "offsets": offsets, **spread},
            "report_seconds": min(reports), "reports": reports, "report_vms": vms, "targets": targets}


def markdown(result: dict) -> str:
    sweep, single, splay = result["sweep"], result["one_host"], result["splay"]
    per, cores = result["per_host_sync"], result["cores"]
    verdict = {True: "**met**", False: "**not met**", None: "not measured (not the full size in this run)"}

    def db_row(name, r):
        db = r["db"]
        return [name, r["hosts"], harness.seconds(r["wall_seconds"]), f"{r['host_cpu_seconds']:.2f} s",
                f"{db['cpu_seconds']:.3f} s", f"{db['commits']:,}", f"{db['rows_written']:,}",
                f"{r['machine']['others']:.1f} s", f"{r['machine']['idle']:.1f} s",
                f"{r['work']['checked']:,}", f"{r['work']['actions']:,}"]

    def shown(t):
        if t["measured"] is None:
            return ""
        return {"ratio": harness.ratio, "seconds": harness.seconds, "count": str}[t["unit"]](t["measured"])

    hosts = sweep["host_seconds"]
    activity = splay["activity"]
    scale = ("in real time" if splay["time_scale"] == 1 else
             f"at {splay['time_scale']:g}× real time (smoke run)")
    return "\n\n".join([
        f"## Part {PART}: {TITLE.lower()}",
        (f"{result['hosts']} hosts (processes, each with libvirt's test driver of its own) of "
         f"{result['domains']:,} domains each, one real PostgreSQL fleet store (fsync off); each sync "
         f"opens the store and closes it, as a minion's job does, with 1% of its host's domains "
         f"drifted each way. Machine: {cores} cores for the {result['hosts']} hosts and the server "
         f"together, shared with whatever else runs (\"others\": their CPU time during the round). "
         f"{len(result['sweeps'])} sweeps, each followed by hosts syncing alone "
         f"({len(result['singles'])} in all), then one sweep with the default `sync_splay`. "
         f"See `bench/fleet_scale.py`."),
        harness.table(["round", "hosts", "wall time", "hosts' CPU", "server CPU", "commits", "rows written",
                       "others' CPU", "idle CPU", "domains checked", "actions"],
                      [db_row(f"sweep {i + 1} (all at once)", r) for i, r in enumerate(result["sweeps"])]
                      + [db_row(f"host alone {i + 1}", r) for i, r in enumerate(result["singles"])]
                      + [db_row("splay (default)", splay)]),
        harness.table(["per host-sync", "server CPU", "commits", "rows written", "buffers read",
                       "rows read", "its backend's CPU", "the host's CPU"],
                      [[name] + [f"{per[key][k] * 1e3:.1f} ms" if k.endswith("cpu_seconds")
                                 else f"{per[key][k]:,.1f}" for k in PER_SYNC]
                       for name, key in (("in the sweeps", "sweep"), ("alone", "one_host"))]
                      + [["sweep ÷ alone"] + ["" if per["growth"][k] is None else harness.ratio(per["growth"][k])
                                              for k in PER_SYNC]]),
        ("Server CPU: the postmaster and its children, their backends' reaped CPU read in 10 ms "
         "clock ticks (hence many rounds alone); its backend's CPU: each sync's own backend, read "
         "to the nanosecond just before the sync closes the store. Buffers read (`blks_hit + "
         "blks_read`) and rows read (`tup_returned + tup_fetched`) are the database's work in its "
         "own units, which CPU time is not on a shared machine: the host's CPU column shows what "
         "the crowded cores add to the same work."),
        (f"The sweep with the smallest ratio took {harness.seconds(sweep['wall_seconds'])}; its CPU-bound "
         f"limit, (hosts' {sweep['host_cpu_seconds']:.2f} s + server's {sweep['db']['cpu_seconds']:.2f} s) "
         f"÷ {cores} cores, is {harness.seconds(sweep['cpu_bound_seconds'])}: "
         f"{harness.ratio(sweep['over_cpu_bound'])} (every sweep: "
         f"{', '.join(harness.ratio(r['over_cpu_bound']) for r in result['sweeps'])}). During it the "
         f"rest of the machine took {sweep['machine']['others']:.1f} s of CPU and "
         f"{sweep['machine']['idle']:.1f} s were idle: with the others' CPU added to the limit, "
         f"{harness.ratio(sweep['over_machine_bound'])}. Each host's own sync during it: median "
         f"{harness.seconds(hosts[len(hosts) // 2])}, slowest {harness.seconds(hosts[-1])} (alone: "
         f"{harness.seconds(single['host_seconds'][0])}). Lock waits over 1 s: "
         f"{result['lock_waits_over_1s']}, deadlocks: {result['deadlocks']}, in every round."),
        (f"With the default `sync_splay` ({splay['splay_seconds']} s; each host's sync started at "
         f"its own offset of `random.randint(1, {splay['splay_seconds']})` s, as Salt's scheduler "
         f"draws it, from one instant, {scale}): the database was busy (a host's session open) "
         f"{harness.seconds(activity['busy_seconds'])} of {harness.seconds(splay['wall_seconds'])}, "
         f"running a statement {harness.seconds(activity['active_seconds'])}; at most "
         f"{activity['peak_connections']} hosts' sessions open and {activity['peak_active']} running "
         f"a statement at once (`pg_stat_activity` sampled {activity['samples']:,} times); the server "
         f"took {splay['db']['cpu_seconds'] / splay['hosts'] * 1e3:.1f} ms of CPU per host-sync."),
        (f"The report of {result['report_vms']:,} VMs (`vmpower.fleet.report_from_store`, before "
         f"Salt's outputter): {harness.seconds(result['report_seconds'])}."),
        "**Targets**",
        harness.table(["target", "measured", "verdict"],
                      [[t["target"], shown(t), verdict[t["met"]]] for t in result["targets"]]),
    ])


def against_floor(result: dict) -> list[harness.FloorRow]:
    """Part 4 against its floors: the database's work per host-sync in a sweep against one
    host syncing alone, and the sweep's wall time against the CPU-bound limit (the CPU the
    sweep took ÷ the cores); judged at 50 hosts of 1,000 domains."""
    hosts, per, sweep = result["hosts"], result["per_host_sync"], result["sweep"]
    judged = (hosts, result["domains"]) == (HOSTS, DOMAINS)
    note = "" if judged else f"{hosts} hosts of {result['domains']:,}; the target is at {HOSTS} of {DOMAINS:,}"
    rows = [harness.FloorRow(PART, f"server {what} per host-sync, {hosts} hosts at once",
                             per["sweep"][key], per["one_host"][key], "one host alone",
                             TARGET_PER_SYNC, unit, judged, note)
            for what, key, unit in (("CPU", "cpu_seconds", "s"), ("commits", "commits", "commits"),
                                    ("rows written", "rows_written", "rows"))]
    rows.append(harness.FloorRow(PART, f"sweep wall time, {hosts} hosts", sweep["wall_seconds"],
                                 sweep["cpu_bound_seconds"],
                                 f"CPU-bound: the sweep's CPU ÷ {result['cores']} cores",
                                 TARGET_WALL, "s", judged, note))
    rows.append(harness.FloorRow(PART, f"sweep wall time, {hosts} hosts (context)",
                                 sweep["wall_seconds"], result["one_host"]["wall_seconds"],
                                 "one host alone", None, "s"))
    return rows


def plot(result: dict, figure) -> None:
    left, middle, right = figure.subplots(1, 3)
    hosts = result["sweep"]["host_seconds"]
    left.bar(range(len(hosts)), hosts, label="each host's sync during the sweep")
    left.axhline(result["one_host"]["wall_seconds"], color="k", linestyle="--", label="one host alone")
    left.axhline(result["sweep"]["cpu_bound_seconds"], color="g", linestyle="-.",
                 label="the sweep's CPU-bound limit")
    left.set_xlabel("host (sorted)")
    left.set_ylabel("seconds")
    left.legend()
    per = result["per_host_sync"]
    keys = ("cpu_seconds", "commits", "rows_written")
    middle.bar([k.replace("_", " ") for k in keys],
               [per["growth"][k] or 0 for k in keys])
    middle.axhline(TARGET_PER_SYNC, color="r", linestyle=":", label="target")
    middle.set_ylabel("per host-sync: sweep ÷ alone")
    middle.legend()
    timeline = result["splay"]["activity"]["timeline"]
    right.step([t for t, _, _ in timeline], [c for _, c, _ in timeline], where="post", label="sessions open")
    right.step([t for t, _, _ in timeline], [a for _, _, a in timeline], where="post", label="running a statement")
    right.set_xlabel("seconds (default sync_splay)")
    right.legend()
    figure.suptitle(f"Part {PART}: {result['hosts']} hosts × {result['domains']:,} domains "
                    f"into one PostgreSQL")
