"""The fleet from the master, with real daemons: a salt-master of this module's own
with ``event_return: vmpower`` and the shipped reactor, and two real salt-minions writing their
records to the same fleet store as the master (one SQLite file, as a small fleet would share a
PostgreSQL database):

- ``vmp-fleet-a``: the vmpower beacon on the real libvirtd (``qemu:///system``) with real QEMU
  guests, and a metrics file;
- ``vmp-fleet-b``: libvirt's test driver (``test:///default``), no beacon: a second host with
  VMs of its own;
- ``vmp-fleet-c``: the test driver, no beacon, a store of its own: the master learns of its
  syncs only from their returns, and ``vmp-fleet-b`` forges one in its name.

A guest that shuts itself down and a stopped guest started behind vmpower's back go through
the whole loop (beacon -> master bus -> reactor -> reconcile); then ``salt-run vmpower.report``
shows both with their reasons, from the store and from the minions, the hosts, and the
metrics file counts what happened. Every wait is bounded; nothing asserts how long it took.
"""

import json
import os
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmpower import fleet
from vmpower_lab import lab

from .conftest import _check_socket_room, master_config, minion_config
from .helpers import (
    DEFAULT_URI,
    REACTOR,
    TEST_URI,
    beacon_config,
    fire_beacon_event,
    minion_return,
    read_only,
    salt_call,
    salt_cmd,
    wait_for_event,
    wait_for_job_return,
    wait_for_lifecycle,
    wait_for_start_syncs,
    wait_until,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

MASTER = "vmp-fleet-master"
HOST_A, HOST_B, HOST_C = "vmp-fleet-a", "vmp-fleet-b", "vmp-fleet-c"
STOP_GRACE = 3


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fleet")


@pytest.fixture(scope="module")
def fleet_store(fleet_dir) -> str:
    return str(fleet_dir / "fleet.sqlite")


@pytest.fixture(scope="module")
def metrics_file(fleet_dir) -> str:
    return str(fleet_dir / "textfile" / "vmpower.prom")


@pytest.fixture(scope="module")
def fleet_master(salt_factories, vmpower_file_root, fleet_store):
    factory = salt_factories.salt_master_daemon(MASTER, overrides=master_config({
        "event_return": "vmpower",
        "vmpower": {"store": fleet_store, "sync_interval": 3600},
        "reactor": REACTOR,
    }, vmpower_file_root))
    with factory.started():
        yield factory


def _minion(fleet_master, salt_factories, minion_id, config):
    _check_socket_room(Path(salt_factories.root_dir), minion_id)
    factory = fleet_master.salt_minion_daemon(minion_id, overrides=config)
    return factory


@pytest.fixture(scope="module")
def host_a(fleet_master, salt_factories, libvirt_daemon, event_listener, fleet_store, metrics_file):
    before = time.time()
    config = minion_config(DEFAULT_URI, {"store": fleet_store, "sync_interval": 3600, "stop_timeout": 30,
                                         "metrics_file": metrics_file, "stop_grace": STOP_GRACE},
                           {"vmpower": beacon_config(uri=DEFAULT_URI, stop_grace=STOP_GRACE)})
    factory = _minion(fleet_master, salt_factories, HOST_A, config)
    try:
        with factory.started():
            wait_for_start_syncs(event_listener, MASTER, HOST_A, before)
            yield factory
    finally:
        fleet_master.salt_key_cli().run("--yes", "--delete", HOST_A)


@pytest.fixture(scope="module")
def host_b(fleet_master, salt_factories, fleet_store):
    factory = _minion(fleet_master, salt_factories, HOST_B,
                      minion_config(TEST_URI, {"store": fleet_store, "sync_interval": 3600}))
    try:
        with factory.started():
            yield factory
    finally:
        fleet_master.salt_key_cli().run("--yes", "--delete", HOST_B)


@pytest.fixture(scope="module")
def host_c(fleet_master, salt_factories):
    factory = _minion(fleet_master, salt_factories, HOST_C, minion_config(TEST_URI, {"sync_interval": 3600}))
    try:
        with factory.started():
            yield factory
    finally:
        fleet_master.salt_key_cli().run("--yes", "--delete", HOST_C)


def run(fleet_master, fun, *args, **kwargs):
    """``salt-run fun args`` on the fleet master, as JSON."""
    result = fleet_master.salt_run_cli(timeout=120).run(fun, *args, "--out=json", **kwargs)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.data


def stored_events(fleet_store, **where):
    with read_only(fleet_store) as db:
        rows = [dict(r) for r in db.execute("SELECT * FROM fleet_events ORDER BY id")]
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def _file_stamp(path):
    """(inode, mtime) of ``path``, or None while it does not exist."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _powered_off(job_return: dict, uuid: str) -> bool:
    """Whether a job's return event says vmpower powered ``uuid`` off: a reconcile of it, or
    a sync that did it among others."""
    ret = job_return.get("return")
    if not isinstance(ret, dict):
        return False
    if job_return.get("fun") == "vmpower.reconcile":
        return ret.get("uuid") == uuid and ret.get("action") == "power_off"
    if job_return.get("fun") == "vmpower.sync":
        return any(entry.get("uuid") == uuid and entry.get("action") == "power_off"
                   for entry in ret.get("actions") or ())
    return False


def test_the_report_shows_a_guest_shutdown_and_an_out_of_band_start_with_their_reasons(
        fleet_master, host_a, host_b, event_listener, make_guest, fleet_store, metrics_file):
    selfstop, selfstop_dom = make_guest("selfstop", start=False)
    acpi, acpi_dom = make_guest("acpi", start=False)
    since = time.time()
    salt_call(host_b, "vmpower.sync")  # host B's VMs, from the test driver
    salt_call(host_a, "vmpower.sync")  # the acpi guest: first seen shut off, adopted stopped
    assert salt_call(host_a, "vmpower.start", selfstop.name)["vm_state"] == "active"
    # The boot sector powers the guest off about two seconds after boot, unasked.
    assert lab.wait_for_state(selfstop_dom, libvirt.VIR_DOMAIN_SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
    wait_for_lifecycle(event_listener, MASTER, HOST_A, "stopped", selfstop.uuid, since)
    wait_for_job_return(event_listener, MASTER, HOST_A, "vmpower.reconcile", since,
                        match=lambda ret: isinstance(ret, dict) and ret.get("uuid") == selfstop.uuid
                        and ret.get("action") == "power_off")
    acpi_dom.create()  # virsh start, behind vmpower's back
    # Powered off by the reconcile of its start, or by a sync that listed it first: the grace
    # the acpi guest's first sight asked for makes the beacon fire a retry resync about now.
    wait_for_event(event_listener, f"salt/job/*/ret/{HOST_A}", since, 60, daemon_id=MASTER,
                   match=lambda data: _powered_off(data, acpi.uuid))
    # The master's event_return has kept both reconcile results (and the events before them).
    wait_until(lambda: len(stored_events(fleet_store, kind="reconcile", minion=HOST_A)) >= 2, 60,
               "the reactor's reconcile results in the fleet store")

    report = run(fleet_master, "vmpower.report", "source=store")
    rows = {r["uuid"]: r for r in report["vms"]}
    shut = rows[selfstop.uuid]
    assert (shut["host"], shut["vm_state"], shut["power_state"]) == (HOST_A, "stopped", "shutdown"), shut
    assert shut["last_change"]["cause"] == "event" and shut["last_change"]["action"] == "power_off", shut
    assert "the guest shut down" in shut["last_change"]["reason"], shut
    assert (shut["last_event"]["transition"], shut["last_event"]["reason"]) == ("stopped", "guest_shutdown")
    started = rows[acpi.uuid]
    assert (started["vm_state"], started["power_state"]) == ("stopped", "shutdown"), started
    assert started["last_change"]["action"] == "power_off", started
    assert started["last_event"]["transition"] in ("started", "resumed", "stopped"), started
    assert {r["host"] for r in report["vms"]} == {HOST_A, HOST_B}
    # The beacon's resync on connecting, or a later retry it fired for a grace a sync above
    # asked to be decided again (the acpi guest first seen off).
    assert report["hosts"][HOST_A]["last_resync"]["reason"] in ("connected", "retry")
    assert HOST_A in report["hosts"] and HOST_B in report["hosts"]

    # The same two, from the minions themselves.
    asked = run(fleet_master, "vmpower.report", "source=minions", f"tgt={HOST_A},{HOST_B}", "tgt_type=list")
    mine = {r["uuid"]: r for r in asked["vms"]}
    assert mine[selfstop.uuid]["vm_state"] == "stopped" and "the guest shut down" in \
        mine[selfstop.uuid]["last_change"]["reason"]
    assert mine[acpi.uuid]["last_change"]["action"] == "power_off"
    assert asked["failed"] == {}
    assert asked["hosts"][HOST_A]["event_loop_connected"] is True
    assert asked["hosts"][HOST_B]["event_loop_connected"] is None  # no beacon there

    # The history from the store: the audit entries and the events, in order.
    history = run(fleet_master, "vmpower.history", selfstop.uuid)
    sources = [e["source"] for e in history[selfstop.uuid]]
    assert "audit" in sources and "lifecycle" in sources and "reconcile" in sources

    # A sync through the vmpower returner writes the metrics file, which counts what happened.
    # The minion runs a job's returners after it has answered the master, and a sync of the
    # scheduler's (periodic or wake-up, also through the returner) may have written the file
    # before: wait for this sync's file, a new one (it is replaced atomically).
    before = _file_stamp(metrics_file)
    summary = minion_return(salt_cmd(fleet_master, HOST_A, "vmpower.sync", "--return", "vmpower"), HOST_A)
    wait_until(lambda: _file_stamp(metrics_file) not in (None, before), 60,
               f"the metrics file {metrics_file} written by this sync")
    with open(metrics_file) as handle:
        families = {f.name: f for f in text_string_to_metric_families(handle.read())}
    actions = {s.labels["action"]: s.value for s in families["vmpower_actions"].samples
               if s.name == "vmpower_actions_total"}
    assert actions.get("power_off", 0) >= 2, actions
    assert [s.value for s in families["vmpower_event_loop_connected"].samples] == [1]
    vms = {(s.labels["vm_state"], s.labels["power_state"]): s.value for s in families["vmpower_vms"].samples}
    assert vms[("stopped", "shutdown")] >= 2
    assert sum(vms.values()) == summary["checked"]
    hosts = run(fleet_master, "vmpower.hosts")
    assert hosts["hosts"][HOST_A]["last_sync_took"] is not None
    assert hosts["hosts"][HOST_A]["event_loop_connected"] is True


def test_a_malformed_event_is_skipped_and_counted_and_the_rest_kept(
        fleet_master, host_a, host_b, fleet_store, event_listener):
    before = run(fleet_master, "vmpower.hosts")["counters"]
    since = time.time()
    fire_beacon_event(host_b, f"salt/beacon/{HOST_B}/vmpower/lifecycle/stopped",
                      {"uuid": "not-a-uuid", "id": HOST_B})
    fire_beacon_event(host_b, f"salt/beacon/{HOST_B}/vmpower/resync",
                      {"reason": "overflow", "lost": 3, "id": HOST_B})
    wait_for_job_return(event_listener, MASTER, HOST_B, "vmpower.sync", since)  # the reactor's answer
    wait_until(lambda: stored_events(fleet_store, kind="sync", minion=HOST_B)
               and any(e["at"] >= since for e in stored_events(fleet_store, kind="sync", minion=HOST_B)),
               60, "the sync the reactor ran for the resync, in the fleet store")
    after = run(fleet_master, "vmpower.hosts")
    assert after["counters"]["malformed_events"] == before.get("malformed_events", 0) + 1
    assert after["hosts"][HOST_B]["last_resync"]["reason"] == "overflow"
    # The master is still there and answers.
    assert minion_return(salt_cmd(fleet_master, HOST_B, "test.ping"), HOST_B) is True
    assert json.dumps(after)  # JSON all the way (--out=json)


@pytest.fixture(scope="module")
def broken_master(salt_factories, vmpower_file_root):
    """A master whose fleet store is a PostgreSQL server nobody runs."""
    factory = salt_factories.salt_master_daemon("vmp-fleet-broken", overrides=master_config({
        "event_return": "vmpower",
        "vmpower": {"store": "postgresql://vmpower:s3cret@127.0.0.1:1/fleet"},
    }, vmpower_file_root))
    with factory.started():
        yield factory


def test_an_unreachable_store_is_a_clear_error_and_the_master_keeps_running(broken_master):
    result = broken_master.salt_run_cli(timeout=120).run("vmpower.report", "source=store")
    told = f"{result.stdout}\n{result.stderr}"
    assert "the fleet store cannot be read" in told, told
    assert "postgresql://vmpower:***@127.0.0.1:1/fleet" in told and "s3cret" not in told, told
    # An event for the returner: it cannot keep it, says so in the master's log, and goes on.
    sent = broken_master.salt_run_cli(timeout=120).run(
        "event.send", "salt/beacon/vmp-x/vmpower/resync", '{"reason": "connected", "lost": 0, "id": "vmp-x"}')
    assert sent.returncode == 0, sent.stderr
    log = Path(broken_master.config["root_dir"]) / "logs" / "master.log"
    wait_until(lambda: log.exists() and "vmpower returner: 1 vmpower event(s) not kept" in log.read_text(),
               60, f"the returner's error in {log}")
    assert "s3cret" not in log.read_text()
    assert broken_master.is_running()
    again = broken_master.salt_run_cli(timeout=120).run("vmpower.hosts", "source=store")
    assert "the fleet store cannot be read" in f"{again.stdout}\n{again.stderr}"


def test_a_sync_return_is_a_fact_only_when_its_minion_sealed_it(
        fleet_master, host_b, host_c, fleet_store):
    def host(view="vmpower.hosts"):
        return run(fleet_master, view, "source=store")["hosts"][HOST_C]

    # The reactor syncs a minion that started: its sealed return, through the master, is a fact.
    wait_until(lambda: stored_events(fleet_store, minion=HOST_C, kind="sync", authenticated=1), 60,
               "host C's sync after its start, kept as a fact")
    before = host()
    assert before["last_sync_at"] and before["problems"] == [] and before["event_loop_connected"] is None

    # Host B's beacon batch carries a return of a later sync in host C's name, sealed with the
    # only key host B has: on the master's bus it is the same tag and data as a real return.
    jid = "20990101000000000001"
    forged = fleet.seal({"id": HOST_C, "pki_dir": host_b.config["pki_dir"]},
                        {"host": HOST_C, "checked": 3, "updated": 0, "actions": [], "took": 12.5,
                         "event_loop": {"connected": True}})
    fire_beacon_event(host_b, f"salt/job/{jid}/ret/{HOST_C}",
                      {"fun": "vmpower.sync", "id": HOST_C, "jid": jid, "success": True, "retcode": 0,
                       "fun_args": [], "return": forged})
    kept = wait_until(lambda: stored_events(fleet_store, tag=f"salt/job/{jid}/ret/{HOST_C}"), 60,
                      "the forged return in the fleet store")
    assert [(e["minion"], e["kind"], e["authenticated"]) for e in kept] == [(HOST_C, "sync", 0)]
    for view in ("vmpower.hosts", "vmpower.report"):
        seen = host(view)
        assert (seen["last_sync_at"], seen["last_sync_took"], seen["event_loop_connected"]) == (
            before["last_sync_at"], before["last_sync_took"], None), seen

    # A real sync on host C is a fact again.
    since = time.time()
    summary = minion_return(salt_cmd(fleet_master, HOST_C, "vmpower.sync"), HOST_C)
    assert summary["vmpower_seal"]["at"] >= since
    wait_until(lambda: [e for e in stored_events(fleet_store, minion=HOST_C, kind="sync", authenticated=1)
                        if e["at"] >= since], 60, "host C's new sealed sync, kept as a fact")
    for view in ("vmpower.hosts", "vmpower.report"):
        seen = host(view)
        assert seen["last_sync_at"] >= since and seen["last_sync_took"] == summary["took"], seen
        assert seen["problems"] == [], seen
