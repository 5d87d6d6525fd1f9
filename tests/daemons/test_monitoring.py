"""What an operator's Prometheus sees, end to end, on real parts: a real salt-minion whose
vmpower beacon watches a real libvirtd writes the live metrics file; a real node_exporter
(Debian's ``prometheus-node-exporter``) serves it; a real Prometheus (Debian's
``prometheus``) scrapes it every second and evaluates the shipped alerting rules, with
VMPowerDrift's threshold and ``for`` cut to seconds so that it fires within the test.

The host runs in observe mode (as when vmpower is rolled out: it records and reports, and
acts on nothing), so what drifts stays drifted. The scenario: a guest shuts itself down, one is
started behind vmpower's back, then libvirtd is stopped. Then every query of the shipped
dashboard and every shipped alert's expression runs through Prometheus's HTTP API: each
parses and returns the series the scenario makes; VMPowerDrift goes pending, then firing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vmpower_lab import lab

from ..unit.test_dashboard import dashboard_queries, load_dashboard
from .helpers import (
    DEFAULT_URI,
    beacon_config,
    beacon_status,
    salt_call,
    start_and_settle,
    vm_record,
    wait_for_start_syncs,
    wait_until,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "monitoring" / "vmpower-alerts.yml"
PROMETHEUS = shutil.which("prometheus")
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
GRACE = 2
DRIFT_AFTER = 5  # seconds: VMPowerDrift's threshold, and its ``for``, in this test's copy
#: Dashboard queries that the scenario leaves empty, and why.
EMPTY_HERE = {
    "Stuck tasks": "no task_state is held",
    "VMs in error": "no VM is in vm_state error",
    "Top restarting VMs (1 h)": "observe mode restarts nothing",
}
#: The shipped alerts whose expression has a result once libvirtd is stopped: the others wait
#: for minutes this test does not take (a drift of 5 min, libvirt unknown for 2 min...).
SHIPPED_FIRING_HERE = {"VMPowerLoopDown"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read().decode())


@contextlib.contextmanager
def _daemon(argv: list[str], ready_url: str, what: str):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    return True
            except OSError:
                return False
        wait_until(ready, 60, f"{what} to answer at {ready_url}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def monitoring(tmp_path):
    """node_exporter on the textfile directory and Prometheus scraping it every second, with
    the shipped rules (VMPowerDrift cut to seconds); yields ``(textfile directory, query)``,
    where ``query(expr)`` is the HTTP API's instant answer."""
    assert PROMETHEUS and NODE_EXPORTER, \
        "Debian's prometheus and prometheus-node-exporter must be installed (scripts/setup.sh)"
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    exporter, server = _free_port(), _free_port()
    rules = yaml.safe_load(ALERTS.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "VMPowerDrift":
            assert "> 300" in rule["expr"], rule
            rule["expr"] = rule["expr"].replace("> 300", f"> {DRIFT_AFTER}")
            rule["for"] = f"{DRIFT_AFTER}s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [{"job_name": "node",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter}"]}]}]}))
    with _daemon([NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
                  f"--collector.textfile.directory={textfiles}",
                  f"--web.listen-address=127.0.0.1:{exporter}"],
                 f"http://127.0.0.1:{exporter}/metrics", "node_exporter"), \
            _daemon([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                     f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--log.level=warn",
                     f"--web.listen-address=127.0.0.1:{server}"],
                    f"http://127.0.0.1:{server}/-/ready", "prometheus"):
        def query(expr: str) -> dict:
            return _get(f"http://127.0.0.1:{server}/api/v1/query?"
                        + urllib.parse.urlencode({"query": expr}))

        query.alerts = lambda: _get(f"http://127.0.0.1:{server}/api/v1/alerts")["data"]["alerts"]
        yield textfiles, query


def _file(path: Path) -> dict:
    """``{(name, labels...): value}`` of the metrics file, through Prometheus' own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(path.read_text()) for s in f.samples}


def _series(query, expr: str) -> list:
    answer = query(expr)
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def _labels(metric: dict) -> str:
    """A series' labels as a panel would show them (the VM's name, not its UUID), or ""."""
    shown = {k: v for k, v in metric.items() if k not in ("__name__", "job", "uuid", "instance")}
    return (" ".join(f"{k}={v.rsplit('-', 1)[-1] if k == 'name' else v}"
                     for k, v in sorted(shown.items())) + " = ") if shown else ""


def _drift_alert(query, uuid: str) -> str | None:
    """VMPowerDrift's state for the VM ``uuid`` (pending, firing), or None."""
    for alert in query.alerts():
        if alert["labels"].get("alertname") == "VMPowerDrift" and alert["labels"].get("uuid") == uuid:
            return alert["state"]
    return None


def test_prometheus_sees_the_drift_the_unknown_and_every_panel_and_alert_answers(
        salt_master, minion_factory, libvirtd_may_die, event_listener, make_guest, monitoring):
    textfiles, query = monitoring
    prom = textfiles / "vmpower.prom"
    down, _ = make_guest("acpi", start=False)
    behind, behind_dom = make_guest("acpi", "-behind", start=False)
    since = time.time()
    vmpower = {"sync_interval": 3600, "stop_timeout": 30, "stop_grace": GRACE, "mode": "observe",
               "metrics_file": str(prom)}
    with minion_factory.started("vmpower-minion-p", uri=DEFAULT_URI, vmpower=vmpower,
                                beacons={"vmpower": beacon_config(uri=DEFAULT_URI,
                                                                  stop_grace=GRACE)}) as minion:
        wait_for_start_syncs(event_listener, salt_master.id, minion.id, since)
        down_dom = libvirt.open(DEFAULT_URI).lookupByUUIDString(down.uuid)
        start_and_settle(salt_master, minion, event_listener, down, down_dom)

        # A guest shuts itself down: observe mode records it and acts on nothing.
        down_dom.shutdown()
        assert lab.wait_for_state(down_dom, libvirt.VIR_DOMAIN_SHUTOFF) == \
            libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
        # One is started behind vmpower's back (its record: adopted stopped at the start sync).
        assert vm_record(minion, behind.uuid)["vm_state"] == "stopped"
        behind_dom.create()

        def drifting(guest, power):
            record = vm_record(minion, guest.uuid)
            return record if record and record["power_state"] == power and record["drift_since"] else None
        records = {g.uuid: wait_until(lambda g=g, p=p: drifting(g, p), 60,
                                      f"the record of {g.name} to drift")
                   for g, p in ((down, "shutdown"), (behind, "running"))}

        # The file says so, to the second the record does, soon after the record changed.
        def in_file():
            found = _file(prom) if prom.exists() else {}
            values = {uuid: found.get(("vmpower_vm_drift_since_timestamp_seconds",
                                       (("name", name), ("uuid", uuid))))
                      for uuid, name in ((down.uuid, down.name), (behind.uuid, behind.name))}
            return (found, values) if all(values.values()) else None
        found, values = wait_until(in_file, 30, "the metrics file to show both drifts")
        for uuid, record in records.items():
            assert values[uuid] == record["drift_since"], (values, record)
        written = found[("vmpower_metrics_written_timestamp_seconds", ())]
        changed = max(r["updated_at"] for r in records.values())
        assert written >= changed
        print(f"the metrics file showed the last drift {written - changed:.2f} s after its record "
              f"was written (at most; it coalesces changes over 2 s, on a 1 s tick)")

        # Prometheus scrapes it; the drift alert goes pending, then firing, for each VM.
        seen = {down.uuid: [], behind.uuid: []}

        def both_firing():
            for uuid, states in seen.items():
                state = _drift_alert(query, uuid)
                if state and (not states or states[-1] != state):
                    states.append(state)
            return all(states[-1:] == ["firing"] for states in seen.values())
        wait_until(both_firing, 90, lambda: f"VMPowerDrift to fire for both VMs: {seen}")
        assert all(states == ["pending", "firing"] for states in seen.values()), seen

        # libvirtd stops: the loop says so, every VM's state is unknown since then.
        stopped_at = time.time()
        libvirtd_may_die.kill()
        try:
            _while_libvirtd_is_stopped(query, minion, prom, stopped_at, (down, behind))
        finally:
            libvirtd_may_die.start()  # before the guests are removed


def _while_libvirtd_is_stopped(query, minion, prom, stopped_at, guests):
    """Prometheus sees that libvirt cannot be asked; then every dashboard query and every
    shipped alert's expression answers as the scenario says."""
    wait_until(lambda: beacon_status(minion).get("connected") is False, 30,
               "the beacon to notice that libvirtd is gone")
    unknown = wait_until(lambda: _series(query, "vmpower_unknown_since_timestamp_seconds"), 60,
                         "Prometheus to see that libvirt cannot be asked")
    assert float(unknown[0]["value"][1]) >= stopped_at
    per_vm = _series(query, "vmpower_vm_unknown_since_timestamp_seconds")
    assert {g.uuid for g in guests} <= {s["metric"]["uuid"] for s in per_vm}
    wait_until(lambda: _series(query, "vmpower_event_loop_connected == 0"), 30,
               "Prometheus to see the loop disconnected")

    # Every dashboard query parses and returns the series the scenario makes; what each panel
    # shows is printed, as text (the README's rendering of the dashboard comes from here).
    empty, shown = [], []
    for title, expr in dashboard_queries(load_dashboard()):
        result = _series(query, expr)
        if not result:
            empty.append(title)
        shown.append(f"{title}: " + ("(none)" if not result else "; ".join(
            f"{_labels(s['metric'])}{float(s['value'][1]):.6g}" for s in result[:4])))
    print("\n".join(shown))
    assert set(empty) <= set(EMPTY_HERE), [t for t in empty if t not in EMPTY_HERE]
    # Every shipped alert's expression parses; those the scenario reaches have a result.
    for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]:
        result = _series(query, rule["expr"])
        assert bool(result) == (rule["alert"] in SHIPPED_FIRING_HERE), (rule["alert"], result)
    status = salt_call(minion, "vmpower.status")
    assert status["metrics"]["path"] == str(prom) and status["metrics"]["error"] is None, status
