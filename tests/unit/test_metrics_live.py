"""The live metrics file: per-VM series and their bound, label escaping, the jobs'
measurements folded into histograms, and the beacon process's writer (coalescing, heartbeat,
a path it cannot write). On real SQLite stores; the text is read back through Prometheus'
own parser."""

import json
import os
import uuid as uuidlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmpower import measurements, metrics
from vmpower.core.model import Cause, PowerState, Record, VmState
from vmpower.store import Change, open_store

HOST = "hv1"


def samples(path):
    """``{(name, labels...): value}`` of a text file, through Prometheus' own parser."""
    with open(path) as handle:
        text = handle.read()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture
def store(tmp_path):
    with open_store(str(tmp_path / "records.sqlite")) as opened:
        yield opened


def add(store, *records, at=1000.0):
    store.commit([Change(None, r, Cause.SYNC, "adopt", "test") for r in records], at)


def record(name, vm_state=VmState.ACTIVE, power=PowerState.RUNNING, **fields):
    return Record(str(uuidlib.uuid4()), name, HOST, vm_state, power, version=1, **fields)


def write(tmp_path, store, loop_status=None, **kwargs):
    path = str(tmp_path / "vmpower.prom")
    metrics.write(path, metrics.gather(store, HOST, loop_status, None, now=5000.0, **kwargs))
    return samples(path)


def test_each_vm_has_its_states_as_0_1_gauges_and_its_drift_since(tmp_path, store):
    web = record("web", power=PowerState.RUNNING)
    off = record("db", power=PowerState.RUNNING).updated(2000.0, power_state=PowerState.SHUTDOWN)
    add(store, web, off)
    found = write(tmp_path, store)
    ids = (("name", "db"), ("uuid", off.uuid))

    def of(name, label):
        return {dict(labels)[label]: value for (n, labels), value in found.items()
                if n == name and ("uuid", off.uuid) in labels}
    assert of("vmpower_vm_power_state", "power_state") == {
        "nostate": 0, "running": 0, "paused": 0, "shutdown": 1, "crashed": 0, "suspended": 0}
    assert of("vmpower_vm_state", "vm_state")["active"] == 1
    assert sum(of("vmpower_vm_state", "vm_state").values()) == 1 and len(of("vmpower_vm_state", "vm_state")) == 10
    assert found[("vmpower_vm_drifting", ids)] == 1
    assert found[("vmpower_vm_drift_since_timestamp_seconds", ids)] == 2000.0
    web_ids = (("name", "web"), ("uuid", web.uuid))
    assert found[("vmpower_vm_drifting", web_ids)] == 0
    assert ("vmpower_vm_drift_since_timestamp_seconds", web_ids) not in found  # agrees: absent
    assert found[("vmpower_vm_series_limited", ())] == 0
    assert found[("vmpower_metrics_written_timestamp_seconds", ())] == 5000.0


def test_a_held_task_state_says_since_when(tmp_path, store):
    owner = json.dumps({"host": HOST, "boot_id": "b", "pid": 1, "start_time": 1, "since": 1234.5})
    busy = record("busy", task_state="powering-off", task_owner=owner)
    add(store, busy)
    found = write(tmp_path, store)
    assert found[("vmpower_vm_task_since_timestamp_seconds", (
        ("name", "busy"), ("task_state", "powering-off"), ("uuid", busy.uuid)))] == 1234.5


def test_a_host_over_the_limit_gives_per_host_counts_not_ten_thousand_series(tmp_path, store):
    add(store, *(record(f"vm{i}") for i in range(10_000)))
    found = write(tmp_path, store)
    assert found[("vmpower_vm_series_limited", ())] == 1
    assert found[("vmpower_vm_series_limit", ())] == 1000
    assert found[("vmpower_vms", (("power_state", "running"), ("vm_state", "active")))] == 10_000
    assert not [name for name, _ in found if name.startswith("vmpower_vm_")
                and name not in ("vmpower_vm_series_limited", "vmpower_vm_series_limit")]
    assert len(found) < 100


def test_the_limit_is_how_many_vms_may_have_series_of_their_own(tmp_path, store):
    add(store, record("a"), record("b"))
    assert write(tmp_path, store, vm_limit=2)[("vmpower_vm_series_limited", ())] == 0
    assert write(tmp_path, store, vm_limit=1)[("vmpower_vm_series_limited", ())] == 1


def test_names_are_escaped_as_label_values(tmp_path, store):
    odd = 'we"b\\1\nnew line'
    add(store, record(odd))
    found = write(tmp_path, store)
    names = {dict(labels).get("name") for (name, labels) in found if name == "vmpower_vm_drifting"}
    assert names == {odd}


def test_the_jobs_measurements_become_histograms_and_counters(tmp_path, store):
    log = str(tmp_path / "vmpower" / "measurements.log")
    jobs = measurements.Measurements(log)
    jobs.decision("event", "restart", "start", False, 0.2, 0.001)
    jobs.decision("event", "another_host", "none", True, None, 0.5)
    jobs.sync(1.5, 3, {("stop_grace", "none"): 2, ("stopped_but_running", "power_off"): 1},
              {"migrating": 1})
    with open(log, "a") as handle:
        handle.write("not json\n[1]\n")  # skipped and logged, the rest is kept
    jobs.decision("sync", "in_sync", "none", False, -1.0, "x")  # no time measured in it
    tally = metrics.Tally(log)
    assert tally.fold() is True and tally.fold() is False  # read once
    found = write(tmp_path, store, tally=tally)
    assert found[("vmpower_decision_latency_seconds_count", ())] == 1
    assert found[("vmpower_decision_latency_seconds_bucket", (("le", "0.25"),))] == 1
    assert found[("vmpower_decision_latency_seconds_bucket", (("le", "0.1"),))] == 0
    assert found[("vmpower_lock_wait_seconds_count", ())] == 2
    assert found[("vmpower_lock_wait_seconds_sum", ())] == pytest.approx(0.501)
    assert found[("vmpower_sync_duration_seconds_sum", ())] == 1.5
    def decisions(cause, rule, action):
        return found[("vmpower_decisions_total", (("action", action), ("cause", cause), ("rule", rule)))]
    assert decisions("event", "restart", "start") == 1
    assert decisions("sync", "stopped_but_running", "power_off") == 1
    assert decisions("sync", "stop_grace", "none") == 2 and decisions("sync", "in_sync", "none") == 1
    assert found[("vmpower_refusals_total", (("cause", "event"), ("rule", "another_host")))] == 1
    assert found[("vmpower_refusals_total", (("cause", "sync"), ("rule", "migrating")))] == 1
    assert found[("vmpower_last_sync_duration_seconds", ())] == 1.5


def test_a_large_log_is_rotated_and_nothing_appended_meanwhile_is_lost(tmp_path, monkeypatch):
    log = str(tmp_path / "measurements.log")
    jobs = measurements.Measurements(log)
    monkeypatch.setattr(measurements, "ROTATE_AT", 200)
    tally = metrics.Tally(log)
    for _ in range(5):
        jobs.decision("event", "in_sync", "none", False, 0.1, 0.0)
    tally.fold()
    assert os.path.exists(log + ".1") and not os.path.exists(log)
    jobs.decision("event", "in_sync", "none", False, 0.1, 0.0)
    tally.fold()
    assert tally.decisions[("event", "in_sync", "none")] == 6


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def minion_opts(tmp_path, **vmpower):
    return {"id": HOST, "cachedir": str(tmp_path / "cache"),
            "vmpower": {"store": str(tmp_path / "records.sqlite"), **vmpower}}


LOOP = {"watchers": {"vmpower": {"connected": True, "events_seen": 1}}, "thread_alive": True}


def test_the_live_file_is_written_once_per_interval_however_much_changes(tmp_path, store):
    prom = str(tmp_path / "textfile" / "vmpower.prom")
    clock = Clock()
    writer = metrics.LiveWriter(clock)
    opts = minion_opts(tmp_path, metrics_file=prom)
    assert writer.tick(opts, LOOP) is True  # the first tick writes
    add(store, record("web"))
    clock.now += 1.0
    assert writer.tick(opts, {**LOOP, "watchers": {"vmpower": {"connected": True, "events_seen": 2}}}) is False
    clock.now += 1.0  # MIN_INTERVAL after the last write: the changes so far, in one write
    assert writer.tick(opts, LOOP) is True
    assert ("vmpower_vm_drifting", (("name", "web"), ("uuid", store.for_host(HOST).popitem()[0]))) \
        in samples(prom)
    for _ in range(int(metrics.HEARTBEAT) - 1):  # nothing changes: no write until the heartbeat
        clock.now += 1.0
        assert writer.tick(opts, LOOP) is False
    clock.now += 1.0
    assert writer.tick(opts, LOOP) is True
    assert writer.health()["writes"] == 3 and writer.health()["error"] is None


def test_a_measurement_is_a_change(tmp_path, store):
    prom = str(tmp_path / "vmpower.prom")
    clock = Clock()
    writer = metrics.LiveWriter(clock)
    opts = minion_opts(tmp_path, metrics_file=prom)
    writer.tick(opts, LOOP)
    measurements.Measurements(measurements.measurements_path(opts["cachedir"])).sync(0.3, 0, {}, {})
    clock.now += 2.0
    assert writer.tick(opts, LOOP) is True
    assert samples(prom)[("vmpower_sync_duration_seconds_count", ())] == 1


def test_an_unwritable_path_is_a_clear_error_and_nothing_stops(tmp_path, store):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    prom = str(blocker / "vmpower.prom")
    clock = Clock()
    writer = metrics.LiveWriter(clock)
    assert writer.tick(minion_opts(tmp_path, metrics_file=prom), LOOP) is False
    health = writer.health()
    assert health["path"] == prom and "cannot write the vmpower metrics to" in health["error"]
    assert health["writes"] == 0
    # Put right, the next tick due writes, and the error is gone.
    clock.now += metrics.SETTINGS_EVERY
    good = str(tmp_path / "vmpower.prom")
    assert writer.tick(minion_opts(tmp_path, metrics_file=good), LOOP) is True
    assert writer.health()["error"] is None


def test_a_bad_limit_is_a_clear_error(tmp_path, store):
    writer = metrics.LiveWriter(Clock())
    opts = minion_opts(tmp_path, metrics_file=str(tmp_path / "v.prom"), metrics_vm_limit="many")
    assert writer.tick(opts, LOOP) is False
    assert "vmpower:metrics_vm_limit must be a whole number" in writer.health()["error"]


def test_no_metrics_file_no_writer_error(tmp_path, store):
    writer = metrics.LiveWriter(Clock())
    assert writer.tick(minion_opts(tmp_path), LOOP) is False
    assert writer.health() == {"path": None, "writes": 0, "last_write": None, "error": None}


def test_vmpower_status_shows_the_writers_error(load_minion, tmp_path):
    from vmpower import minion as vmminion
    from vmpower.eventloop.status import write_json

    from .conftest import TEST_URI

    loaded = load_minion(TEST_URI, None, store=str(tmp_path / "records.sqlite"))
    error = "cannot write the vmpower metrics to /nope/vmpower.prom: [Errno 2] No such file"
    write_json(vmminion.event_loop_status_path(loaded.opts), {
        "watchers": {}, "metrics": {"path": "/nope/vmpower.prom", "writes": 0,
                                    "last_write": None, "error": error}})
    assert loaded.functions["vmpower.status"]()["metrics"]["error"] == error


def test_the_writer_says_whether_its_reads_keep_a_fork_waiting(tmp_path):
    # SQLite's lock state must not be copied into a job forked mid-read; PostgreSQL keeps none
    # in this process, and a fork must not wait for a slow server.
    writer = metrics.LiveWriter(Clock())
    assert writer.reads_sqlite  # where the records are is not known yet: the safe side
    writer.tick(minion_opts(tmp_path, metrics_file=str(tmp_path / "vmpower.prom"),
                            store=str(tmp_path / "records.sqlite")), LOOP)
    assert writer.reads_sqlite and writer.writes == 1
    writer = metrics.LiveWriter(Clock())
    writer.tick(minion_opts(tmp_path, metrics_file=str(tmp_path / "vmpower.prom"),
                            store="postgresql://vmpower@127.0.0.1:1/vmpower"), LOOP)
    assert not writer.reads_sqlite and writer.error
