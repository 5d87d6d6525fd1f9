"""The smoke run of the fleet benchmark (part 4): a fleet of hosts syncing into one
real PostgreSQL and the report over it, at its smallest size. Shapes and the work done, never
timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-fleet")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--only",
                           "fleet_scale", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "latest.json").read_text())["benchmarks"], (out / "latest.md").read_text()


def test_the_fleet_sweep_and_the_report(results):
    fleet = results[0]["fleet_scale"]
    assert (fleet["hosts"], fleet["domains"]) == (2, 100)
    assert (fleet["sweep"]["work"]["checked"], fleet["sweep"]["work"]["actions"]) == (200, 4)
    assert (fleet["one_host"]["work"]["checked"], fleet["one_host"]["work"]["actions"]) == (100, 2)
    assert 4 <= fleet["sweep"]["work"]["updated"] <= 6 and 2 <= fleet["one_host"]["work"]["updated"] <= 3
    assert fleet["sweep"]["wall_seconds"] > 0 and fleet["one_host"]["wall_seconds"] > 0
    assert fleet["sweep"]["db"]["commits"] > fleet["one_host"]["db"]["commits"] > 0
    # The database's work per host-sync, in its own units, is the same in a sweep as alone.
    per = fleet["per_host_sync"]
    assert per["sweep"]["commits"] == per["one_host"]["commits"] > 0
    assert 0.9 <= per["sweep"]["rows_written"] / per["one_host"]["rows_written"] <= 1.1
    assert per["growth"]["cpu_seconds"] > 0 and fleet["sweep"]["over_cpu_bound"] > 0
    assert fleet["lock_waits_over_1s"] == 0 and fleet["deadlocks"] == 0
    splay = fleet["splay"]
    assert (splay["work"]["checked"], splay["work"]["actions"]) == (200, 4)
    assert 1 <= splay["activity"]["peak_connections"] <= 2 and splay["activity"]["busy_seconds"] > 0
    assert fleet["report_vms"] == 200 and fleet["report_seconds"] > 0
    assert {t["met"] for t in fleet["targets"]} == {None}  # targets are at 50 x 1,000


def test_the_markdown_has_the_part(results):
    assert "## Part 4: fleet sweep into one postgresql" in results[1]
