"""The minion's side of the fleet, as Salt's loader loads it, on libvirt's test driver and a real
SQLite store: ``vmpower.records``, the ``vmpower`` job returner, the metrics file (parsed by
Prometheus' own parser, and scraped from a real node_exporter when Debian's
``prometheus-node-exporter`` is installed), and the periodic sync's splay."""

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from salt.exceptions import CommandExecutionError

from vmpower import fleet as vmfleet
from vmpower import minion as vmminion
from vmpower.core.settings import parse_settings
from vmpower.store import open_store
from vmpower.store.events import FleetStore

from .conftest import TEST_URI

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


@pytest.fixture
def loaded(load_minion, tmp_path):
    def load(pillar=None, **settings):
        settings.setdefault("store", str(tmp_path / "records.sqlite"))
        return load_minion(TEST_URI, pillar, **{"stop_timeout": 0, **settings})

    return load


def samples(path):
    """``{(name, labels...): value}`` of a text file, through Prometheus' own parser."""
    with open(path) as handle:
        text = handle.read()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_records_shows_each_record_beside_the_live_state(loaded, testdriver):
    web = testdriver.define("web")
    off = testdriver.define("off", start=False)
    mods = loaded().functions
    assert "CLI Example:" in mods["vmpower.records"].__doc__
    mods["vmpower.sync"]()
    web.destroy()  # behind vmpower's back: the record still says running
    rows = {r["name"]: r for r in mods["vmpower.records"]()}
    mine = rows[web.name()]
    assert mine["live"]["power_state"] == "shutdown"
    assert (mine["record"]["vm_state"], mine["record"]["power_state"]) == ("active", "running")
    assert mine["in_sync"] is False and mine["disagreement"] == "vm_state active but power_state shutdown"
    assert mine["last_change"]["reason"].startswith("first seen running")
    assert rows[off.name()]["in_sync"] is True and rows[off.name()]["record"]["vm_state"] == "stopped"
    assert [r["name"] for r in mods["vmpower.records"](off.name())] == [off.name()]
    with pytest.raises(CommandExecutionError, match="no domain and no record named 'nothing'"):
        mods["vmpower.records"]("nothing")


def test_a_new_domain_shows_without_a_record(loaded, testdriver):
    dom = testdriver.define("new")
    row = loaded().functions["vmpower.records"](dom.name())[0]
    assert row["record"] is None and "no record yet" in row["disagreement"]


def test_the_job_returner_keeps_the_sync_and_writes_the_metrics(loaded, testdriver, tmp_path):
    a = testdriver.define("a")
    b = testdriver.define("b", start=False)
    prom = str(tmp_path / "textfile" / "vmpower.prom")
    minion = loaded(metrics_file=prom)
    mods = minion.functions
    report = mods["vmpower.sync"]()
    returners = __import__("salt.loader").loader.returners(minion.opts, mods)
    done = returners["vmpower.returner"](
        {
            "id": minion.opts["id"],
            "jid": "20260101",
            "fun": "vmpower.sync",
            "return": report,
            "success": True,
            "retcode": 0,
        }
    )
    assert done["kept"] == 1 and done["metrics"]["path"] == prom
    with open_store(minion.opts["vmpower"]["store"]) as store:
        host = FleetStore(store).hosts()[minion.opts["id"]]
        assert host["last_sync_took"] == report["took"]
        assert host["loop"] == {"connected": None, "error": host["loop"]["error"]}  # no beacon here
    found = samples(prom)
    mine = {k: v for k, v in found.items() if k[0] == "vmpower_vms"}
    assert sum(mine.values()) == report["checked"]
    assert found[("vmpower_vms", (("power_state", "running"), ("vm_state", "active")))] >= 1
    assert found[("vmpower_actions_total", (("action", "adopt"),))] == report["updated"]
    assert found[("vmpower_restarts_total", ())] == 0
    assert ("vmpower_last_sync_timestamp_seconds", ()) in found
    assert found[("vmpower_last_sync_duration_seconds", ())] == pytest.approx(report["took"])
    assert not any(name.startswith("vmpower_event_loop") for name, _ in found)  # no beacon: absent
    # Labels: states and actions per host; uuid and name per VM; le for the histograms.
    assert {k for key in found for k, _ in key[1]} <= {
        "vm_state", "power_state", "action", "cause", "rule", "uuid", "name", "le", "task_state"}
    def power_of(dom):  # one 0/1 gauge per power state, 1 for the one it is in
        return {dict(labels)["power_state"]: value for (name, labels), value in found.items()
                if name == "vmpower_vm_power_state" and ("name", dom.name()) in labels}
    assert power_of(a)["running"] == 1 and power_of(b)["shutdown"] == 1
    assert sum(power_of(a).values()) == sum(power_of(b).values()) == 1 and len(power_of(a)) == 6
    assert found[("vmpower_sync_duration_seconds_count", ())] == 1  # the sync measured itself
    assert not [f for f in os.listdir(os.path.dirname(prom)) if f != "vmpower.prom"]  # no temp left


def test_other_jobs_through_the_returner_are_not_kept(loaded):
    minion = loaded()
    returners = __import__("salt.loader").loader.returners(minion.opts, minion.functions)
    assert returners["vmpower.returner"]({"id": "m", "fun": "test.ping", "return": True})["kept"] == 0


def test_metrics_on_demand_counts_actions_and_loop_health(loaded, testdriver, tmp_path):
    dom = testdriver.define("web")
    prom = str(tmp_path / "vmpower.prom")
    minion = loaded()
    mods = minion.functions
    mods["vmpower.sync"]()
    mods["vmpower.stop"](dom.name(), force=True)
    status = vmminion.event_loop_status_path(minion.opts)
    os.makedirs(os.path.dirname(status), exist_ok=True)
    with open(status, "w") as handle:
        handle.write(
            '{"pid": 1, "thread_alive": true, "updated_at": 1.0, "watchers": {"vmpower": '
            '{"connected": false, "state_since": 5.0, "events_seen": 12, "dropped": 2, '
            '"reconnects": 3, "queue_depth": 1, "transitions": {"started": 7}, '
            '"resyncs": {"connected": 1, "reconnected": 2}}}}'
        )
    result = mods["vmpower.metrics"](path=prom)
    assert result["event_loop"]["connected"] is False
    found = samples(prom)
    assert found[("vmpower_event_loop_connected", ())] == 0
    assert found[("vmpower_event_loop_events_total", ())] == 12
    assert found[("vmpower_event_loop_dropped_events_total", ())] == 2
    assert found[("vmpower_event_loop_reconnects_total", ())] == 3
    assert found[("vmpower_event_loop_queue_depth", ())] == 1
    assert found[("vmpower_actions_total", (("action", "powering-off"),))] == 1
    assert found[("vmpower_vms", (("power_state", "shutdown"), ("vm_state", "stopped")))] >= 1
    assert found[("vmpower_lifecycle_events_total", (("transition", "started"),))] == 7
    assert found[("vmpower_resyncs_total", (("reason", "reconnected"),))] == 2
    # libvirt cannot be asked since the loop lost it: the host and each of its VMs say so.
    assert found[("vmpower_unknown_since_timestamp_seconds", ())] == 5.0
    assert found[("vmpower_vm_unknown_since_timestamp_seconds",
                  (("name", dom.name()), ("uuid", dom.UUIDString())))] == 5.0
    # Every sync notes itself, with or without the returner.
    assert found[("vmpower_sync_duration_seconds_count", ())] == 1
    assert found[("vmpower_last_sync_timestamp_seconds", ())] <= time.time()


def test_metrics_without_a_file_is_a_clear_error(loaded):
    with pytest.raises(CommandExecutionError, match="set vmpower:metrics_file"):
        loaded().functions["vmpower.metrics"]()
    with pytest.raises(CommandExecutionError, match="must be an absolute path ending in .prom"):
        loaded().functions["vmpower.metrics"](path="/tmp/x.txt")


def test_the_periodic_sync_has_a_splay_and_the_returner():
    job = vmminion.sync_schedule(parse_settings({"sync_interval": 600}), 60)["schedule"][vmminion.SYNC_JOB]
    assert (job["splay"], job["returner"], job["seconds"]) == (60, "vmpower", 600)
    # The beacon's connected resync syncs the host already: no second sync at once.
    assert job["run_on_start"] is False
    fired = []
    vmminion._scheduled_interval = None
    vmminion.keep_sync_scheduled(
        {"vmpower": {"sync_interval": 300}, "pillar": {}}, lambda data, tag: fired.append(data)
    )
    vmminion.keep_sync_scheduled(
        {"vmpower": {"sync_interval": 300}, "pillar": {}}, lambda data, tag: fired.append(data)
    )
    assert len(fired) == 1 and fired[0]["schedule"][vmminion.SYNC_JOB]["splay"] == 30
    vmminion.keep_sync_scheduled(
        {"vmpower": {"sync_interval": 300, "sync_splay": 0}, "pillar": {}},
        lambda data, tag: fired.append(data),
    )
    assert len(fired) == 2 and "splay" not in fired[1]["schedule"][vmminion.SYNC_JOB]
    vmminion._scheduled_interval = None


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(
    NODE_EXPORTER is None and not os.environ.get("CI"),
    reason="Debian's prometheus-node-exporter is not installed (scripts/setup.sh installs it)",
)
def test_a_real_node_exporter_serves_the_metrics(loaded, testdriver, tmp_path):
    assert NODE_EXPORTER, "prometheus-node-exporter must be installed in CI (scripts/setup.sh)"
    testdriver.define("web")
    directory = tmp_path / "textfile"
    minion = loaded(metrics_file=str(directory / "vmpower.prom"))
    minion.functions["vmpower.sync"]()
    minion.functions["vmpower.metrics"]()
    port = _free_port()
    # Only the textfile collector, on loopback: nothing of this machine's own is read.
    proc = subprocess.Popen(
        [
            NODE_EXPORTER,
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={directory}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                    text = answer.read().decode()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    told = proc.stderr.read().decode()
                    raise AssertionError(f"node_exporter did not answer: {told}") from None
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "vmpower_vms" in families and "vmpower_actions" in families
    # node_exporter read the file without an error.
    errors = [s.value for s in families["node_textfile_scrape_error"].samples]
    assert errors == [0]
    total = sum(s.value for s in families["vmpower_vms"].samples)
    assert total == len(minion.functions["vmpower.records"]())


def test_drift_says_what_disagrees_since_when_and_what_vmpower_will_do(loaded, testdriver):
    dom = testdriver.define("web")
    minion = loaded(stop_grace=300)
    mods = minion.functions
    mods["vmpower.sync"]()  # adopted active, running
    assert not [r for r in mods["vmpower.drift"]()["drifting"] if r["name"] == dom.name()]
    dom.destroy()  # off behind vmpower's back: the record does not know yet
    [row] = [r for r in mods["vmpower.drift"]()["drifting"] if r["name"] == dom.name()]
    assert (row["vm_state"], row["recorded_power_state"], row["power_state"]) == (
        "active", "running", "shutdown")
    assert row["since"] is None and row["for"] is None  # no job has seen it: no start known
    assert row["will"].startswith("nothing yet") and "decided again at" in row["when"]
    before = time.time()
    mods["vmpower.sync"]()  # sees it off within its stop_grace: records it, acts later
    [row] = [r for r in mods["vmpower.drift"]()["drifting"] if r["name"] == dom.name()]
    assert row["recorded_power_state"] == "shutdown" and before <= row["since"] <= time.time()
    assert row["for"] >= 0 and row["will"].startswith("nothing yet") and "(in 30" in row["when"]
    # The dry runs changed nothing: the record is as the sync left it, no audit entry added.
    assert [e["cause"] for e in mods["vmpower.history"](dom.name())] == ["sync", "sync"]
    answer = mods["vmpower.drift"]()
    assert "no sync known" not in answer["problems"]  # the syncs noted themselves
    assert "no vmpower beacon runs (no event loop)" in answer["problems"]


def test_the_fleet_drift_lists_the_longest_first_and_every_host_unknown():
    rows = [{"host": "hv1", "name": "a", "for": 10.0}, {"host": "hv2", "name": "b", "for": 99.0},
            {"host": "hv2", "name": "c", "for": None}]
    found = vmfleet.drift_from_minions({
        "hv1": {"drifting": rows[:1], "problems": []},
        "hv2": {"drifting": rows[1:], "problems": ["metrics file stale"]},
        "hv3": "Minion did not return. [No response]"})
    assert [r["name"] for r in found["drifting"]] == ["b", "a", "c"]
    assert found["unknown"] == {"hv2": ["metrics file stale"], "hv3": [
        "did not answer vmpower.drift: Minion did not return. [No response]"]}
    assert found["summary"] == {"drifting": 3, "hosts": 3, "hosts_unknown": ["hv2", "hv3"]}
