"""Part 4: a fleet sweep into one PostgreSQL, and the fleet report over it.

50 hosts (minion-like processes, each with libvirt's test driver of its own, 1,000 domains
each, half running) share one real PostgreSQL fleet store (``tests/unit/pgserver.py`` starts
one of the benchmark's own). Each host adopts its domains once (not timed), then every round
1% of its running domains are destroyed and as many shut-off ones started behind vmpower's
back, so each sync has real work: records to write and actions to take. The hosts run with
``stop_grace: 0``, so that the destroyed ones are settled (recorded stopped) in the round that
destroyed them and every round has the same work.

``sweep``
    every host syncs at once (``salt '*' vmpower.sync`` with no splay): the wall time from the
    moment they are told to go until the last one has finished.
``one host``
    the same host alone, in the same database (the other 49 hosts' records present): the
    baseline of the target "a sweep takes at most 3x one host's sync".
``report``
    ``vmpower.fleet.report_from_store`` (what ``salt-run vmpower.report`` returns, before
    Salt's outputter) over every VM of the fleet.

The database's load, for a sweep and for one host alone: the server's CPU time (the
postmaster's processes, from /proc), transactions committed and rows written
(``pg_stat_database``). The server runs with fsync off (it is the benchmark's own, not a
durable store): disk flushes are not part of the figures.

The machine matters more here than anywhere else: 50 processes on the cores there are. On 2
cores the sweep is CPU-bound (50 hosts' Python work shares 2 cores with PostgreSQL), which
the report says next to the ratio.
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import harness

PART = 4
TITLE = "Fleet sweep into one PostgreSQL"

HOSTS, DOMAINS = 50, 1_000
SMOKE_HOSTS, SMOKE_DOMAINS = 2, 100
SWEEPS, SINGLES, REPORTS = 2, 3, 3  # best of this many
TARGET_SWEEP = 3.0   # sweep at most 3x one host's sync
TARGET_REPORT = 2.0  # report of 50,000 VMs within 2 s
TARGET_PER_HOST = 1.2  # the server's work per host-sync in a sweep, at most this times one host's
TARGET_CPU_BOUND = 1.2  # the sweep's wall time, at most this times the CPU-bound limit
URI = "test:///default"


# In each host process ---------------------------------------------------------------------
def host_main(index: int, domains: int, dsn: str) -> None:
    """One host: define its domains, adopt them, then sync each time the parent says so.

    Speaks a line protocol on stdin/stdout: it prints ``ready``; for each ``sync`` line it
    drifts and syncs, and prints the sync's figures as JSON; ``quit`` ends it.
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
    store = open_store(dsn)
    ops = HostOperations(parse_settings({"uri": URI, "stop_grace": 0}), host, store)
    ops.sync()  # adopt everything: a new minion's first sync, not timed
    flush_statistics(store)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "sync":
            break
        # 1% of the running ones destroyed (recorded stopped), 1% of the off ones started
        # (powered off again): fresh domains each round, so every round has the same work.
        if len(running) < drift or len(off) < drift:
            raise RuntimeError("no fresh domains left for another round")
        for dom in running[:drift]:
            dom.destroy()
        for dom in off[:drift]:
            dom.create()
        running, off = running[drift:], off[drift:]
        began = time.monotonic()
        report = ops.sync()
        ended = time.monotonic()
        flush_statistics(store)
        print(json.dumps({"began": began, "ended": ended, "took": ended - began,
                          "checked": report["checked"], "updated": report["updated"],
                          "actions": len(report["actions"])}), flush=True)
    store.close()
    conn.close()


def flush_statistics(store) -> None:
    """Have this host's backend report its statistics now (PostgreSQL reports them lazily,
    up to seconds later, which would put one round's work into the next round's figures)."""
    store._db.execute("SELECT pg_stat_force_next_flush()")


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


class _ServerLoad:
    """The database server's CPU time and counters, before and after a round."""

    def __init__(self, server, dsn: str):
        import psycopg

        self.server = server
        self.db = psycopg.connect(dsn, autocommit=True)
        self.dbname = self.db.info.dbname

    def _cpu(self) -> float:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        postmaster = self.server.process.pid
        for pid in [postmaster] + _children(postmaster):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # a backend that ended meanwhile
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def snapshot(self) -> dict[str, float]:
        row = self.db.execute("SELECT xact_commit, tup_inserted, tup_updated, tup_fetched "
                              "FROM pg_stat_database WHERE datname = %s", (self.dbname,)).fetchone()
        self.db.execute("SELECT pg_stat_clear_snapshot()")
        return {"cpu_seconds": self._cpu(), "commits": row[0], "rows_inserted": row[1],
                "rows_updated": row[2], "rows_fetched": row[3]}

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {key: after[key] - before[key] for key in before}


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _round(hosts: list[subprocess.Popen], load: _ServerLoad) -> dict:
    time.sleep(0.2)  # every backend has gone idle and flushed its statistics
    before = load.snapshot()
    told = time.monotonic()
    for proc in hosts:
        proc.stdin.write("sync\n")
    results = [json.loads(_read(proc)) for proc in hosts]
    wall = max(r["ended"] for r in results) - told
    time.sleep(0.2)
    after = load.snapshot()
    return {"wall_seconds": wall, "host_seconds": sorted(r["took"] for r in results),
            "work": {k: sum(r[k] for r in results) for k in ("checked", "updated", "actions")},
            "db": _ServerLoad.delta(before, after)}


def run(smoke: bool, scratch: Path) -> dict:
    from tests.unit.pgserver import PostgresServer, find_bindir
    from vmpower.core.fleet import Filters, FleetSettings
    from vmpower.fleet import report_from_store
    from vmpower.store import open_store
    from vmpower.store.events import FleetStore

    count, domains = (SMOKE_HOSTS, SMOKE_DOMAINS) if smoke else (HOSTS, DOMAINS)
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("part 4 needs PostgreSQL's server binaries (scripts/setup.sh installs them)")

    class Server(PostgresServer):
        max_connections = count + 20

    server = Server(bindir)
    server.start()
    hosts: list[subprocess.Popen] = []
    try:
        dsn = server.database()
        with open_store(dsn):
            pass  # the schema, created once before the hosts start together
        print(f"fleet_scale: starting {count} hosts of {domains:,} domains", file=sys.stderr, flush=True)
        hosts = [_spawn(i, domains, dsn) for i in range(count)]
        for proc in hosts:
            if _read(proc) != "ready":
                raise RuntimeError("a bench host did not get ready")
        load = _ServerLoad(server, dsn)
        sweeps = [_round(hosts, load) for _ in range(SWEEPS)]
        singles = [_round(hosts[:1], load) for _ in range(SINGLES)]
        for name, rounds, expect in (("sweep", sweeps, count), ("one host", singles, 1)):
            for r in rounds:
                drift = max(1, domains // 100)
                # Records written: at least the 2% that drifted (a VM powered off in the round
                # before gets one more write, its off bookkeeping, in the next sync).
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
    sweep = min(sweeps, key=lambda r: r["wall_seconds"])
    single = min(singles, key=lambda r: r["wall_seconds"])
    ratio = sweep["wall_seconds"] / single["wall_seconds"]
    full = count == HOSTS and domains == DOMAINS
    targets = [
        {"target": f"a sweep of {HOSTS} hosts at most {TARGET_SWEEP:g}× one host's sync",
         "measured": ratio if full else None,
         "met": operator.le(ratio, TARGET_SWEEP) if full else None},
        {"target": f"the report of {HOSTS * DOMAINS:,} VMs within {TARGET_REPORT:g} s",
         "measured": min(reports) if full else None,
         "met": operator.le(min(reports), TARGET_REPORT) if full else None},
    ]
    return {"hosts": count, "domains": domains, "cores": os.cpu_count(), "sweep": sweep,
            "sweeps": [r["wall_seconds"] for r in sweeps], "one_host": single,
            "singles": [r["wall_seconds"] for r in singles], "sweep_over_one_host": ratio,
            "report_seconds": min(reports), "reports": reports, "report_vms": vms, "targets": targets}


def markdown(result: dict) -> str:
    sweep, single = result["sweep"], result["one_host"]
    verdict = {True: "**met**", False: "**not met**", None: "not measured (not the full size in this run)"}

    def db_row(name, r):
        db = r["db"]
        return [name, harness.seconds(r["wall_seconds"]), f"{db['cpu_seconds']:.2f} s",
                f"{db['commits']:,}", f"{db['rows_inserted']:,}", f"{db['rows_updated']:,}",
                f"{r['work']['checked']:,}", f"{r['work']['actions']:,}"]

    hosts = sweep["host_seconds"]
    return "\n\n".join([
        f"## Part {PART}: {TITLE.lower()}",
        (f"{result['hosts']} hosts (processes, each with libvirt's test driver of its own) of "
        f"{result['domains']:,} domains each, one real PostgreSQL fleet store (fsync off); every "
        f"host syncs at once with 1% of its domains drifted each way. Machine: "
        f"{result['cores']} cores for the {result['hosts']} hosts and the server together. "
        f"Best of {len(result['sweeps'])} sweeps and {len(result['singles'])} single-host syncs. "
        f"See `bench/fleet_scale.py`."),
        harness.table(["round", "wall time", "server CPU", "commits", "rows inserted", "rows updated",
                       "domains checked", "actions"],
                      [db_row("sweep (all hosts at once)", sweep), db_row("one host alone", single)]),
        (f"Sweep ÷ one host: {harness.ratio(result['sweep_over_one_host'])}. Each host's own sync "
        f"during the sweep: median {harness.seconds(hosts[len(hosts) // 2])}, slowest "
        f"{harness.seconds(hosts[-1])} (alone: {harness.seconds(single['host_seconds'][0])}). "
        f"The report of {result['report_vms']:,} VMs (`vmpower.fleet.report_from_store`, before "
        f"Salt's outputter): {harness.seconds(result['report_seconds'])}."),
        "**Targets**",
        harness.table(["target", "measured", "verdict"],
                      [[t["target"], "" if t["measured"] is None else
                        (harness.ratio(t["measured"]) if "×" in t["target"]
                         else harness.seconds(t["measured"])),
                        verdict[t["met"]]] for t in result["targets"]]),
    ])


def against_floor(result: dict) -> list[harness.FloorRow]:
    """Part 4 against its floors: the server's work per host-sync against one host syncing
    alone, and the sweep's wall time against the CPU-bound limit (the hosts' CPU time ÷ the
    cores), when the result holds the hosts' CPU time; judged at 50 hosts of 1,000 domains."""
    sweep, single, hosts = result["sweep"], result["one_host"], result["hosts"]
    judged = (hosts, result["domains"]) == (HOSTS, DOMAINS)
    note = "" if judged else f"{hosts} hosts of {result['domains']:,}; the target is at {HOSTS} of {DOMAINS:,}"

    def written(db: dict) -> float:
        return db["rows_inserted"] + db["rows_updated"]

    rows = [harness.FloorRow(PART, f"server {what} per host-sync, {hosts} hosts at once",
                             of(sweep["db"]) / hosts, of(single["db"]), "one host alone",
                             TARGET_PER_HOST, unit, judged, note)
            for what, of, unit in (("CPU", lambda db: db["cpu_seconds"], "s"),
                                       ("commits", lambda db: db["commits"], "commits"),
                                       ("rows written", written, "rows"))]
    cpu = sweep.get("host_cpu_seconds")  # each host's sync's CPU time, where measured
    limit = sum(cpu) / result["cores"] if cpu else None
    rows.append(harness.FloorRow(PART, f"sweep wall time, {hosts} hosts", sweep["wall_seconds"],
                                 limit, f"CPU-bound: the syncs' CPU ÷ {result['cores']} cores",
                                 TARGET_CPU_BOUND, "s", judged,
                                 note if cpu else "floor not measured (the hosts' CPU time)"))
    rows.append(harness.FloorRow(PART, f"sweep wall time, {hosts} hosts (context)",
                                 sweep["wall_seconds"], single["wall_seconds"], "one host alone",
                                 None, "s"))
    return rows


def plot(result: dict, figure) -> None:
    left, right = figure.subplots(1, 2)
    hosts = result["sweep"]["host_seconds"]
    left.bar(range(len(hosts)), hosts, label="each host's sync during the sweep")
    left.axhline(result["one_host"]["wall_seconds"], color="k", linestyle="--", label="one host alone")
    left.axhline(result["sweep"]["wall_seconds"], color="r", linestyle=":", label="the sweep's wall time")
    left.set_xlabel("host (sorted)")
    left.set_ylabel("seconds")
    left.legend()
    right.bar(["sweep", "one host"], [result["sweep"]["db"]["cpu_seconds"],
                                      result["one_host"]["db"]["cpu_seconds"]])
    right.set_ylabel("PostgreSQL CPU seconds")
    figure.suptitle(f"Part {PART}: {result['hosts']} hosts × {result['domains']:,} domains "
                    f"into one PostgreSQL")
