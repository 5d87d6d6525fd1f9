"""The table of every part against its floor: each module's rows from a hand-made result,
the markdown and the plot ``bench/run.py`` makes of them, and a smoke run that writes both.
Ratios of made-up figures, never timings."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench import (
    boot_storm,
    e2e_latency,
    event_throughput,
    fleet_scale,
    harness,
    real_socket,
    run,
    sync_scale,
)

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu": "a CPU", "cores": 2, "ram_gib": 4.0, "os": "Linux", "python": "3.11",
           "libvirt": "9.0.0", "libvirt_python": "12.8.0", "scratch_filesystem": "ext4",
           "commit": "abc1234", "date": "2026-12-03T10:00:00+00:00"}


def by_measured(rows):
    return {row.measured: row for row in rows}


def sync_result(n, vmpower=0.12, floor=0.10, nova=3.0):
    def point(seconds, peak):
        return [{"n": n, "seconds": seconds, "peak_bytes": peak}]
    return {"sizes": [n], "series": {"vmpower": point(vmpower, 3e6), "floor": point(floor, 2e6),
                                     "nova-style": point(nova, 9e6)}}


def test_sync_scale_rows_at_the_target_size():
    rows = by_measured(sync_scale.against_floor(sync_result(10_000)))
    sync = rows["sync of 10,000 domains (test driver)"]
    assert (sync.vmpower, sync.floor, sync.target, sync.unit) == (0.12, 0.10, 1.3, "s")
    assert sync.ratio == pytest.approx(1.2) and sync.met is True
    heap = rows["peak heap of a 10,000-domain sync"]
    assert heap.ratio == pytest.approx(1.5) and heap.target == 2.0 and heap.met is True
    nova = rows["Nova-style sync of 10,000 domains (context)"]
    assert nova.ratio == pytest.approx(30) and nova.target is None and nova.met is None


def test_a_ratio_over_its_target_is_not_met():
    [sync, *_] = sync_scale.against_floor(sync_result(10_000, vmpower=0.2))
    assert sync.ratio == pytest.approx(2.0) and sync.met is False


def test_a_smaller_run_is_shown_but_not_judged():
    [sync, heap, *_context] = sync_scale.against_floor(sync_result(100))
    assert sync.measured == "sync of 100 domains (test driver)"
    assert sync.ratio == pytest.approx(1.2) and not sync.judged and sync.met is None
    assert "10,000" in sync.note and heap.met is None


def test_real_socket_rows():
    result = sync_result(10_000, vmpower=0.5, floor=0.25, nova=12.5)
    result["sizes"] = [1_000, 10_000]
    rows = by_measured(real_socket.against_floor(result))
    sync = rows["sync of 10,000 domains through libvirtd's socket"]
    assert sync.ratio == pytest.approx(2.0) and sync.target == 1.3 and sync.met is False
    assert rows["Nova-style sync of 10,000 through the socket (context)"].ratio == pytest.approx(50)


def event_result(events):
    def point(kind, seconds, stop_grace=0.0, **extra):
        return {"kind": kind, "stop_grace": stop_grace, "seconds": seconds, **extra}
    return {"events": events, "series": [
        point("operations", 0.5), point("floor", 1.0), point("vmpower", 1.1),
        point("vmpower", 1.3, 15.0), point("replay", 0.4, callback_us=2.0),
        point("replay", 0.4, 15.0, callback_us=3.0)]}


def test_event_throughput_rows():
    end_to_end, grace, callback = event_throughput.against_floor(event_result(100_000))
    assert end_to_end.ratio == pytest.approx(1.1) and end_to_end.target == 1.2
    assert end_to_end.met is True
    assert grace.ratio == pytest.approx(1.3) and grace.met is None  # context
    # The callback's floor is its budget, 5 µs of CPU: 2 µs is 0.4 of it.
    assert callback.floor == pytest.approx(5e-6) and callback.floor_is == "a stated budget"
    assert callback.ratio == pytest.approx(0.4) and callback.target == 1.0 and callback.met is True
    assert {row.met for row in event_throughput.against_floor(event_result(2_000))} == {None}


def test_event_throughput_shows_the_hand_off_as_context():
    result = event_result(100_000)
    result["series"].insert(2, {"kind": "handoff", "stop_grace": 0.0, "seconds": 1.25})
    end_to_end, _grace, handoff, callback = event_throughput.against_floor(result)
    assert handoff.measured.startswith("the same events handed to a second thread")
    assert handoff.ratio == pytest.approx(1.25) and handoff.target is None and handoff.met is None
    assert end_to_end.met is True and callback.met is True


def e2e_result(floor: bool, cycles: int = 4):
    def path(p50, p99):
        return {"immediate": {"decision": {"n": 48, "p50": p50, "p99": p99}}}
    paths = {"immediate": path(0.3, 0.6), **({"floor: no-op job": path(0.25, 0.4)} if floor else {})}
    return {"guests": 4, "cycles": cycles, "vmpower": paths["immediate"], "paths": paths}


def test_e2e_latency_rows_are_vmpowers_decision_over_a_no_op_jobs_return():
    p50, p99 = e2e_latency.against_floor(e2e_result(floor=True))
    assert (p50.vmpower, p50.floor, p99.vmpower, p99.floor) == (0.3, 0.25, 0.6, 0.4)
    assert p50.ratio == pytest.approx(1.2) and p50.met is True
    assert p99.ratio == pytest.approx(1.5) and p99.met is False
    assert "test.arg" in p50.floor_is
    smoke = e2e_latency.against_floor(e2e_result(floor=True, cycles=1))
    assert {row.met for row in smoke} == {None} and "judged at 4" in smoke[0].note


def test_e2e_latency_rows_without_the_no_op_run_say_the_floor_is_not_measured():
    rows = e2e_latency.against_floor(e2e_result(floor=False))
    assert [row.vmpower for row in rows] == [0.3, 0.6]
    for row in rows:
        assert row.floor is None and row.ratio is None and row.met is None
        assert row.target == 1.2 and "not measured" in row.note


def fleet_result(hosts=50, domains=1_000):
    def per(cpu, commits, rows):
        return {"cpu_seconds": cpu, "commits": commits, "rows_written": rows}
    return {"hosts": hosts, "domains": domains, "cores": 2,
            "sweep": {"wall_seconds": 6.0, "cpu_bound_seconds": 2.5},
            "one_host": {"wall_seconds": 0.1},
            "per_host_sync": {"sweep": per(0.02, 14, 82), "one_host": per(0.01, 14, 82)}}


def test_fleet_rows_per_host_sync():
    rows = by_measured(fleet_scale.against_floor(fleet_result()))
    cpu = rows["server CPU per host-sync, 50 hosts at once"]
    assert cpu.vmpower == pytest.approx(0.02) and cpu.ratio == pytest.approx(2.0) and cpu.met is False
    commits = rows["server commits per host-sync, 50 hosts at once"]
    assert commits.ratio == pytest.approx(1.0) and commits.met is True
    written = rows["server rows written per host-sync, 50 hosts at once"]
    assert written.vmpower == pytest.approx(82) and written.ratio == pytest.approx(1.0)
    assert rows["sweep wall time, 50 hosts (context)"].ratio == pytest.approx(60)


def test_fleet_wall_time_against_the_cpu_bound_limit():
    wall = by_measured(fleet_scale.against_floor(fleet_result()))["sweep wall time, 50 hosts"]
    assert wall.floor == pytest.approx(2.5) and wall.ratio == pytest.approx(2.4) and wall.met is False
    small = fleet_scale.against_floor(fleet_result(hosts=2, domains=100))
    assert {row.met for row in small} == {None}


def storm_result(domains=200, jobs=41, converged=1.1, floor=0.1):
    def convergence(burst_limit, seconds):
        return {"burst_limit": burst_limit, "converged_seconds": seconds, "floor_seconds": floor,
                "storm_seconds": 0.05, "floor_sync_seconds": floor - 0.05, "jobs": [
                    {"kind": "reconcile", "fired": 0.05, "started": 0.05, "ended": 0.06, "actions": 0},
                    {"kind": "sync", "fired": 1.05, "started": 1.05, "ended": seconds, "actions": 0}]}
    return {"domains": domains, "bound": 41, "guard_quiet": 1.0,
            "guard_on": {"burst_limit": 40, "callbacks": domains, "reconcile_jobs": jobs - 1,
                         "sync_jobs": 1, "jobs": jobs},
            "guard_off": {"burst_limit": 0, "callbacks": domains, "reconcile_jobs": domains,
                          "sync_jobs": 0, "jobs": domains},
            "met": jobs <= 41,
            "convergence": {"guard_on": convergence(40, converged), "guard_off": convergence(0, 0.6)}}


def test_boot_storm_rows():
    converged, context, jobs = boot_storm.against_floor(storm_result())
    assert converged.ratio == pytest.approx(11) and converged.target == 1.5 and converged.met is False
    assert context.ratio == pytest.approx(6) and context.met is None
    assert (jobs.vmpower, jobs.floor, jobs.target) == (41, 41, 1.0) and jobs.met is True
    assert boot_storm.against_floor(storm_result(jobs=42))[2].met is False
    assert boot_storm.against_floor(storm_result(converged=0.14))[0].met is True


def test_boot_storm_markdown_says_where_the_time_went():
    text = boot_storm.markdown(storm_result())
    assert "**Convergence**" in text and "quiet period: 1 s" in text
    assert "**not met**" in text.split("**Convergence**")[1]


def test_the_markdown_table():
    rows = [harness.FloorRow(1, "a sync", 0.12, 0.10, "a listing", 1.3, "s"),
            harness.FloorRow(1, "a heap", 5 * 2**20, 2 * 2**20, "the floor's", 2.0, "B"),
            harness.FloorRow(2, "a context row", 3.0, 0.1, "a listing", None, "s"),
            harness.FloorRow(3, "a latency", 0.3, None, "a no-op job", 1.2, "s", note="not measured"),
            harness.FloorRow(6, "jobs", 41, 41, "a bound", 1.0, "jobs")]
    text = run.floor_table(MACHINE, rows)
    assert text.startswith("## Against the floor")
    assert "2026-12-03" in text and "a CPU, 2 cores" in text
    assert "Targets met: 2 of 3 judged" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| part | measured | vmpower | floor | ratio | target | verdict |"
    assert len(lines) == 2 + len(rows) and all(line.count("|") == 8 for line in lines)
    assert lines[2] == "| 1 | a sync | 120 ms | 100 ms (a listing) | 1.2× | ≤ 1.3× | met |"
    assert lines[3].endswith("| 2.5× | ≤ 2× | **not met** |")
    assert lines[4].endswith("| 30× |  | context, no target |")
    assert "| not measured (a no-op job) |  | ≤ 1.2× | not measured |" in lines[5]


def test_the_table_comes_first_in_latest_md_and_in_latest_json(tmp_path):
    part = types.ModuleType("bench.fake")
    part.markdown = lambda result: "## Part 1: fake"
    rows = [harness.FloorRow(1, "a sync", 0.12, 0.10, "a listing", 1.3, "s")]
    run.write_markdown(tmp_path / "latest.md", MACHINE, "bench/run.py", False, [part],
                       {"fake": {}}, rows)
    text = (tmp_path / "latest.md").read_text()
    assert text.index("# vmpower benchmarks") < text.index("## Against the floor") < text.index(
        "## Part 1: fake")
    run.write_json(tmp_path / "latest.json", MACHINE, False, {"fake": {}}, rows)
    [row] = json.loads((tmp_path / "latest.json").read_text())["against_floor"]
    assert row["measured"] == "a sync" and row["ratio"] == pytest.approx(1.2) and row["met"] is True


def test_the_plot_is_a_png_even_with_rows_not_measured(tmp_path):
    rows = [harness.FloorRow(1, "a sync", 0.12, 0.10, "a listing", 1.3, "s"),
            harness.FloorRow(3, "a latency", 0.3, None, "a no-op job", 1.2, "s")]
    run.write_floor_plot(tmp_path / "against_floor.png", MACHINE, rows)
    assert (tmp_path / "against_floor.png").read_bytes().startswith(PNG_SIGNATURE)


def test_every_benchmark_module_answers_against_floor():
    assert all(callable(module.against_floor) for module in run.discover())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke run of part 6 alone (libvirt's test driver in its own processes)."""
    out = tmp_path_factory.mktemp("bench-table")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--only",
                           "boot_storm", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_smoke_run_writes_the_table_and_its_plot(smoke):
    data = json.loads((smoke / "latest.json").read_text())
    rows = data["against_floor"]
    assert [row["part"] for row in rows] == [6, 6, 6]
    for row in rows:
        assert row["vmpower"] > 0 and row["floor"] > 0 and row["ratio"] > 0
        assert row["met"] is None  # the smoke run's 60 domains: the targets are at 200
    convergence = data["benchmarks"]["boot_storm"]["convergence"]
    for point in convergence.values():
        assert point["domains"] == 60 and point["converged_seconds"] > point["storm_seconds"] > 0
        assert sum(job["actions"] for job in point["jobs"]) == 0  # recorded, never acted on
    assert {job["kind"] for job in convergence["guard_on"]["jobs"]} == {"reconcile", "sync"}
    assert {job["kind"] for job in convergence["guard_off"]["jobs"]} == {"reconcile"}
    text = (smoke / "latest.md").read_text()
    assert text.index("## Against the floor") < text.index("## Part 6: boot storm")
    assert "60 domains; the target is at 200" in text  # why the rows are not judged
    assert (smoke / "against_floor.png").read_bytes().startswith(PNG_SIGNATURE)
