"""Live migration between two real hypervisor hosts, with two real salt-minions and the fleet
store on a real PostgreSQL.

- two libvirtds on this machine, each in its own mount and UTS namespaces
  (``vmpower_lab.hosts``, the ``lab_hosts`` fixture), a real TCG guest migrating between them;
- ``vmpower-ha`` runs on host A, ``vmpower-hb`` on host B: each a real salt-minion with the
  vmpower beacon on its own host's libvirtd, the session's master with the shipped reactor;
- both minions keep their records in one PostgreSQL database (a server the test starts), where
  ``host`` says which minion owns each VM.

What must hold: after A -> B (with and without ``--undefinesource``) B owns the record (taken
by compare-and-set, audited), A neither restarts the guest nor records it stopped nor warns
about it, a guest shutdown on B is then handled by B, and migrating back hands it back.

Everything is read from the records and the audit log in PostgreSQL; every wait is bounded and
no step is timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import pytest

from vmpower_lab import hosts as labhosts
from vmpower_lab import lab

from .conftest import STOP_GRACE
from .helpers import beacon_config, salt_call, wait_for_job_return, wait_for_start_syncs, wait_until

libvirt = pytest.importorskip("libvirt")
psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.real

MINION_A = "vmpower-ha"
MINION_B = "vmpower-hb"


@pytest.fixture
def record():
    """``record(case, line)``: print an observation (shown with ``-s`` and on failure)."""
    def note(case: str, line: str) -> None:
        print(f"{case}: {line}")
    return note


# ---------------------------------------------------------------------------------------------
# The fleet store: a real PostgreSQL server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet_dsn():
    """A database of its own on a PostgreSQL server the module starts (and stops)."""
    from tests.unit.pgserver import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "no PostgreSQL server binaries (scripts/setup.sh installs them)")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server.database()
    finally:
        server.stop()


class Fleet:
    """Read-only views of the fleet store, straight from PostgreSQL."""

    def __init__(self, dsn: str):
        self.dsn = dsn

    def _rows(self, sql: str, args=()) -> list[dict]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(sql, args)
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def record(self, uuid: str) -> dict | None:
        rows = self._rows("SELECT * FROM instances WHERE uuid = %s", (uuid,))
        return rows[0] if rows else None

    def audit(self, uuid: str, after_id: int = 0) -> list[dict]:
        rows = self._rows("SELECT * FROM audit WHERE uuid = %s AND id > %s ORDER BY id",
                          (uuid, after_id))
        for row in rows:
            row["old"], row["new"] = json.loads(row["old"]), json.loads(row["new"])
        return rows

    def last_audit_id(self, uuid: str) -> int:
        rows = self.audit(uuid)
        return rows[-1]["id"] if rows else 0

    def wait_for(self, uuid: str, timeout: float = 90, **expected) -> dict:
        def matching():
            found = self.record(uuid)
            if found and all(found.get(key) == value for key, value in expected.items()):
                return found
            return None
        return wait_until(matching, timeout, lambda: f"the fleet record of {uuid} to have "
                          f"{expected}; it is {self.record(uuid)!r}; audit: {self.audit(uuid)!r}")


@pytest.fixture(scope="module")
def fleet(fleet_dsn) -> Fleet:
    return Fleet(fleet_dsn)


# ---------------------------------------------------------------------------------------------
# Two minions, one per lab host
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def host_minions(minion_factory, salt_master, event_listener, lab_hosts, fleet_dsn):
    """``{"hosta": minion A, "hostb": minion B}``: each with the vmpower beacon on its own lab
    host, the fleet store, no periodic sync during the run. Handed out once each beacon has
    connected and the sync the reactor runs for it has returned."""
    started = {}
    with contextlib.ExitStack() as stack:
        for host, minion_id in (("hosta", MINION_A), ("hostb", MINION_B)):
            uri = lab_hosts[host].uri
            before = time.time()
            started[host] = stack.enter_context(minion_factory.started(
                minion_id, uri=uri,
                vmpower={"store": fleet_dsn, "sync_interval": 3600, "stop_timeout": 30,
                         "stop_grace": STOP_GRACE},
                beacons={"vmpower": beacon_config(uri=uri, stop_grace=STOP_GRACE)}))
            wait_for_start_syncs(event_listener, salt_master.id, minion_id, before)
        yield started


@pytest.fixture
def conns(lab_hosts):
    """A libvirt connection of the test's own to each lab host."""
    opened = {host.name: libvirt.open(host.uri) for host in lab_hosts}
    yield opened
    for conn in opened.values():
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def reconciled(event_listener, salt_master, minion_id, uuid, since, timeout=90, **expected):
    """Wait for a ``vmpower.reconcile`` of ``uuid`` on ``minion_id`` (the reactor's answer to
    an event) that returned the ``expected`` values; return its return."""
    def match(ret):
        return (isinstance(ret, dict) and ret.get("uuid") == uuid
                and all(ret.get(key) == value for key, value in expected.items()))
    return wait_for_job_return(event_listener, salt_master.id, minion_id, "vmpower.reconcile",
                               since, timeout=timeout, match=match)["return"]


def sync_about(minion, uuid) -> dict:
    """``vmpower.sync`` on ``minion``: what its report says about ``uuid`` (actions, warnings,
    skipped entries), and the whole report."""
    report = salt_call(minion, "vmpower.sync")
    assert isinstance(report, dict), report
    mine = {key: [entry for entry in report.get(key) or [] if entry.get("uuid") == uuid]
            for key in ("actions", "warnings", "skipped", "busy")}
    return {"report": report, **mine}


def state(conn, uuid):
    """``(state, reason)`` of ``uuid`` on ``conn``'s host, or None if it has no such domain."""
    try:
        return tuple(conn.lookupByUUIDString(uuid).state())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def acted(entries) -> list[dict]:
    """The audit entries that acted on the domain or recorded it stopped."""
    return [entry for entry in entries
            if entry["action"] in ("start", "power_off") or entry["new"].get("vm_state") == "stopped"]


def took_ownership(entries, minion_id) -> list[dict]:
    return [entry for entry in entries if entry["new"].get("host") == minion_id]


def settle(event_listener, salt_master, uuid, since):
    """Wait until the source's held-back STOPPED (``migrated``) has been fired and reconciled:
    only then has every event of the migration reached vmpower."""
    return reconciled(event_listener, salt_master, MINION_A, uuid, since, transition="stopped")


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------
def test_live_migration_without_undefinesource_moves_ownership_and_back(
        host_minions, fleet, conns, lab_hosts, make_host_guest, salt_master, event_listener,
        record):
    """``virsh migrate --live`` A -> B (the source keeps a definition, shut off ``migrated``):
    B takes the record, A lets go and does nothing, not at its next sync either; back B -> A
    hands it back, and A does not power it off on its return."""
    minion_a, minion_b = host_minions["hosta"], host_minions["hostb"]
    guest, dom = make_host_guest("hosta", "acpi")
    lab.wait_guest_ready(dom)
    before = fleet.wait_for(guest.uuid, host=MINION_A, vm_state="active", power_state="running")
    mark = fleet.last_audit_id(guest.uuid)

    since = time.time()
    began = time.monotonic()
    arrived = labhosts.migrate(dom, conns["hostb"])
    took = time.monotonic() - began
    pid_on_b = lab_hosts["hostb"].qemu_pid(guest.name)
    taken = fleet.wait_for(guest.uuid, host=MINION_B, power_state="running")
    settle(event_listener, salt_master, guest.uuid, since)

    assert taken["vm_state"] == "active" and taken["task_state"] == "", taken
    assert taken["version"] > before["version"]
    assert state(conns["hosta"], guest.uuid) == (libvirt.VIR_DOMAIN_SHUTOFF,
                                                 libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)
    entries = fleet.audit(guest.uuid, mark)
    takes = took_ownership(entries, MINION_B)
    assert len(takes) == 1, entries
    assert f"migrated from {MINION_A}" in takes[0]["reason"] or "migrated from no host" in \
        takes[0]["reason"], takes
    assert acted(entries) == [], entries

    # A's sync: nothing to do, nothing to warn about, nothing written.
    settled = fleet.record(guest.uuid)
    on_a = sync_about(minion_a, guest.uuid)
    assert (on_a["actions"], on_a["warnings"]) == ([], []), on_a
    assert fleet.record(guest.uuid) == settled
    on_b = sync_about(minion_b, guest.uuid)
    assert (on_b["actions"], on_b["warnings"], on_b["skipped"]) == ([], [], []), on_b
    after_syncs = fleet.audit(guest.uuid, mark)
    assert acted(after_syncs) == [], after_syncs
    assert state(conns["hosta"], guest.uuid)[0] == libvirt.VIR_DOMAIN_SHUTOFF  # not restarted
    assert lab_hosts["hostb"].qemu_pid(guest.name) == pid_on_b  # untouched on B
    record("fleet migrate A->B (live)", f"migration {took:.2f} s; audit {_summary(after_syncs)}")

    # And back: A takes it again, B's transient domain is gone, nobody powers it off.
    mark = fleet.last_audit_id(guest.uuid)
    since = time.time()
    back = labhosts.migrate(arrived, conns["hosta"])
    home = fleet.wait_for(guest.uuid, host=MINION_A, power_state="running")
    reconciled(event_listener, salt_master, MINION_B, guest.uuid, since, transition="stopped")
    assert home["vm_state"] == "active", home
    assert state(conns["hostb"], guest.uuid) is None
    assert back.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    sync_about(minion_a, guest.uuid)
    on_b = sync_about(minion_b, guest.uuid)
    assert (on_b["actions"], on_b["warnings"]) == ([], []), on_b
    entries = fleet.audit(guest.uuid, mark)
    assert len(took_ownership(entries, MINION_A)) == 1, entries
    assert acted(entries) == [], entries
    assert back.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # not powered off on return
    record("fleet migrate B->A (live)", f"audit {_summary(entries)}")


def test_live_migration_with_undefinesource_then_a_guest_shutdown_on_b(
        host_minions, fleet, conns, make_host_guest, salt_master, event_listener, record):
    """``--persistent --undefinesource`` A -> B: B owns the record; A no longer has the domain
    and says nothing about it. The guest then shuts itself down on B: B records it stopped
    (the default policy), A does nothing. Started again on B, it migrates back to A."""
    minion_a, minion_b = host_minions["hosta"], host_minions["hostb"]
    guest, dom = make_host_guest("hosta", "acpi")
    lab.wait_guest_ready(dom)
    fleet.wait_for(guest.uuid, host=MINION_A, vm_state="active", power_state="running")
    mark = fleet.last_audit_id(guest.uuid)

    since = time.time()
    arrived = labhosts.migrate(dom, conns["hostb"], undefine_source=True)
    fleet.wait_for(guest.uuid, host=MINION_B, power_state="running")
    settle(event_listener, salt_master, guest.uuid, since)
    assert state(conns["hosta"], guest.uuid) is None
    entries = fleet.audit(guest.uuid, mark)
    assert len(took_ownership(entries, MINION_B)) == 1, entries
    assert acted(entries) == [], entries
    on_a = sync_about(minion_a, guest.uuid)
    assert (on_a["actions"], on_a["warnings"]) == ([], []), on_a
    assert fleet.record(guest.uuid)["host"] == MINION_B  # A's sync did not take it back

    # A guest shutdown on B is B's to handle.
    mark = fleet.last_audit_id(guest.uuid)
    since = time.time()
    lab.wait_guest_ready(arrived)
    arrived.shutdown()  # the ACPI power button: the guest powers itself off
    assert lab.wait_for_state(arrived, libvirt.VIR_DOMAIN_SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
    ret = reconciled(event_listener, salt_master, MINION_B, guest.uuid, since,
                     transition="stopped")
    stopped = fleet.wait_for(guest.uuid, host=MINION_B, vm_state="stopped", power_state="shutdown")
    assert stopped["task_state"] == "", stopped
    entries = fleet.audit(guest.uuid, mark)
    by_b = [e for e in entries if e["new"].get("vm_state") == "stopped"]
    assert len(by_b) == 1 and by_b[0]["cause"] == "event" and by_b[0]["host"] == MINION_B, entries
    assert all(entry["host"] == MINION_B for entry in entries), entries
    on_a = sync_about(minion_a, guest.uuid)
    assert (on_a["actions"], on_a["warnings"]) == ([], []), on_a
    record("fleet migrate --undefinesource, guest shutdown on B", f"reconcile on B: {ret}")

    # Started on B through vmpower, and back to A the same way.
    assert salt_call(minion_b, "vmpower.start", guest.uuid)["vm_state"] == "active"
    lab.wait_guest_ready(arrived)
    mark = fleet.last_audit_id(guest.uuid)
    since = time.time()
    back = labhosts.migrate(arrived, conns["hosta"], undefine_source=True)
    home = fleet.wait_for(guest.uuid, host=MINION_A, power_state="running")
    reconciled(event_listener, salt_master, MINION_B, guest.uuid, since, transition="stopped")
    assert home["vm_state"] == "active", home
    assert state(conns["hostb"], guest.uuid) is None
    assert back.isPersistent() and back.isActive()
    entries = fleet.audit(guest.uuid, mark)
    assert len(took_ownership(entries, MINION_A)) == 1, entries
    assert acted(entries) == [], entries
    on_b = sync_about(minion_b, guest.uuid)
    assert (on_b["actions"], on_b["warnings"]) == ([], []), on_b


def _summary(entries) -> list[str]:
    return [f"{e['cause']}/{e['action']} host={e['host']}: {e['reason']}" for e in entries]
