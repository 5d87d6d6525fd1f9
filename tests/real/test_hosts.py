"""The lab's second hypervisor host (vmpower_lab.hosts): two real libvirtds on this machine,
each in its own mount and UTS namespaces, and real QEMU guests live-migrating between them.

What each side sees during a migration is asserted event by event and state by state, as
/work/shared/REAL_LIBVIRT.md describes it; vmpower's migration rules rest on exactly this.
And the guests that crash through pvpanic, for the ``<on_crash>`` cases.
"""

import os
import signal
import time
import xml.etree.ElementTree as ET

import pytest

from vmpower_lab import hosts as labhosts
from vmpower_lab import lab

from .conftest import LifecycleRecorder

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

MIGRATED = "MIGRATED"


@pytest.fixture
def host_conns(lab_hosts):
    """``{"hosta": conn, "hostb": conn}``, each with a LifecycleRecorder (``.events``)."""
    conns, recorders = {}, {}
    for host in lab_hosts:
        conns[host.name] = libvirt.open(host.uri)
        recorders[host.name] = LifecycleRecorder(conns[host.name])
    yield conns, recorders
    for name, conn in conns.items():
        recorders[name].close()
        conn.close()


def host_uuid(conn) -> str:
    return ET.fromstring(conn.getCapabilities()).findtext("./host/uuid")


def state_of(conn, name):
    """``(state, reason)`` of domain ``name`` on ``conn``, or None if the host has no such domain."""
    try:
        return tuple(conn.lookupByName(name).state())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def test_two_hosts_answer_each_as_itself(lab_hosts, host_conns, make_host_guest):
    conns, _ = host_conns
    a, b = conns["hosta"], conns["hostb"]
    assert (a.getHostname(), b.getHostname()) == ("hosta", "hostb")
    assert host_uuid(a) != host_uuid(b)
    assert host_uuid(a) == lab_hosts["hosta"].host_uuid
    guest, _ = make_host_guest("hosta", "stubborn", start=False)
    assert guest.name in [dom.name() for dom in a.listAllDomains()]
    assert guest.name not in [dom.name() for dom in b.listAllDomains()]
    # Not this machine's libvirtd: the main lab's process lookups do not see them.
    for host in lab_hosts:
        assert host.daemon_pid("libvirtd") not in lab._pids("libvirtd")
        assert host.daemon_pid("virtlogd") not in lab._pids("virtlogd")


def test_qemu_runs_under_the_hosts_subreaper(lab_hosts, make_host_guest):
    """The guest's QEMU is the supervisor's child (adopted as the child subreaper), not PID 1's,
    so it is reaped as soon as it exits."""
    host = lab_hosts["hosta"]
    guest, dom = make_host_guest("hosta", "stubborn")
    pid = host.qemu_pid(guest.name)
    supervisor = host.processes()[0]
    assert _parent(pid) == supervisor
    assert _parent(host.daemon_pid("libvirtd")) == supervisor
    dom.destroy()
    assert not _exists(pid)  # gone, not a zombie waiting for PID 1


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_live_migration_and_back_without_undefinesource(lab_hosts, host_conns, make_host_guest,
                                                        record):
    """``virsh migrate --live`` (no ``--undefinesource``): the source keeps a shut off
    (migrated) definition, the destination runs it transient; then back again."""
    conns, events = host_conns
    a, b = conns["hosta"], conns["hostb"]
    guest, dom = make_host_guest("hosta", "acpi")
    lab.wait_guest_ready(dom)
    source_pid = lab_hosts["hosta"].qemu_pid(guest.name)

    began = time.monotonic()
    arrived = labhosts.migrate(dom, b)
    took = time.monotonic() - began
    assert arrived.UUIDString() == guest.uuid
    assert tuple(arrived.state()) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
    assert not arrived.isPersistent()
    assert lab.guest_ready(arrived)  # its memory came along: the boot sector's marker is there
    events["hostb"].wait_for(guest.name, "RESUMED", MIGRATED)
    events["hosta"].wait_for(guest.name, "STOPPED", MIGRATED)
    assert state_of(a, guest.name) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)
    assert a.lookupByName(guest.name).isPersistent()
    assert not _exists(source_pid)
    assert events["hosta"].pairs(guest.name)[-2:] == ["SUSPENDED/MIGRATED", "STOPPED/MIGRATED"]
    assert events["hostb"].pairs(guest.name) == ["STARTED/MIGRATED", "RESUMED/MIGRATED"]

    began = time.monotonic()
    seen_on_a = len(events["hosta"].pairs(guest.name))
    began = time.monotonic()
    back = labhosts.migrate(arrived, a)
    took_back = time.monotonic() - began
    events["hostb"].wait_for(guest.name, "STOPPED", MIGRATED)
    events["hosta"].wait_for(guest.name, "RESUMED", MIGRATED)
    assert tuple(back.state()) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
    assert back.isPersistent()  # still A's own definition
    assert state_of(b, guest.name) is None  # transient on B: gone with the migration
    assert lab.guest_ready(back)
    # On A: started and resumed by the migration, and no DEFINED: its definition never left.
    assert events["hosta"].pairs(guest.name)[seen_on_a:] == ["STARTED/MIGRATED", "RESUMED/MIGRATED"]
    assert events["hostb"].pairs(guest.name)[2:] == ["SUSPENDED/MIGRATED", "STOPPED/MIGRATED"]
    record("migrate A->B (live)", f"source {events['hosta'].pairs(guest.name)}")
    record("migrate A->B (live)", f"destination {events['hostb'].pairs(guest.name)}")
    record("migrate A->B (live)", f"took {took:.2f} s; back B->A {took_back:.2f} s")


def test_live_migration_with_undefinesource(host_conns, make_host_guest, record):
    """``virsh migrate --live --persistent --undefinesource``: the domain is gone from the
    source and defined on the destination; a guest shutdown there then works as usual."""
    conns, events = host_conns
    a, b = conns["hosta"], conns["hostb"]
    guest, dom = make_host_guest("hosta", "acpi")
    lab.wait_guest_ready(dom)

    began = time.monotonic()
    arrived = labhosts.migrate(dom, b, undefine_source=True)
    took = time.monotonic() - began
    events["hosta"].wait_for(guest.name, "STOPPED", MIGRATED)
    events["hostb"].wait_for(guest.name, "RESUMED", MIGRATED)
    assert arrived.isPersistent()
    assert tuple(arrived.state()) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
    assert state_of(a, guest.name) is None
    assert events["hostb"].pairs(guest.name) == ["STARTED/MIGRATED", "DEFINED/ADDED",
                                                 "RESUMED/MIGRATED"]
    assert "UNDEFINED/REMOVED" not in events["hosta"].pairs(guest.name)

    arrived.shutdown()  # ACPI: the guest powers itself off on its new host
    assert lab.wait_for_state(arrived, libvirt.VIR_DOMAIN_SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
    events["hostb"].wait_for(guest.name, "STOPPED", "SHUTDOWN")
    assert events["hostb"].pairs(guest.name)[-2:] == ["SHUTDOWN/GUEST", "STOPPED/SHUTDOWN"]
    record("migrate A->B --undefinesource", f"source {events['hosta'].pairs(guest.name)}")
    record("migrate A->B --undefinesource", f"destination {events['hostb'].pairs(guest.name)}")
    record("migrate A->B --undefinesource", f"took {took:.2f} s")


def test_a_migrated_guest_can_go_back_with_undefinesource(host_conns, make_host_guest):
    conns, events = host_conns
    a, b = conns["hosta"], conns["hostb"]
    guest, dom = make_host_guest("hosta", "stubborn")
    arrived = labhosts.migrate(dom, b, undefine_source=True)
    back = labhosts.migrate(arrived, a, undefine_source=True)
    events["hostb"].wait_for(guest.name, "STOPPED", MIGRATED)
    assert back.isPersistent() and back.isActive()
    assert state_of(b, guest.name) is None
    assert [d.name() for d in a.listAllDomains() if d.name() == guest.name] == [guest.name]


def test_a_libvirtd_restart_forgets_why_a_migrated_source_copy_is_off(
        lab_hosts, host_conns, make_host_guest):
    """After ``migrate --live --persistent`` (the source keeps its definition) the source's
    copy is ``shut off (migrated)``; once the source's libvirtd restarts, it is ``shut off
    (unknown)``: the reason lived only in libvirtd's memory. A guest that runs on the source
    runs on through the restart, in the same QEMU process."""
    conns, events = host_conns
    guest, dom = make_host_guest("hosta", "acpi")
    staying, _ = make_host_guest("hosta", "stubborn")
    lab.wait_guest_ready(dom)
    staying_pid = lab_hosts["hosta"].qemu_pid(staying.name)
    labhosts.migrate(dom, conns["hostb"], persistent=True)
    events["hosta"].wait_for(guest.name, "STOPPED", MIGRATED)
    assert state_of(conns["hosta"], guest.name) == (libvirt.VIR_DOMAIN_SHUTOFF,
                                                    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)

    lab_hosts["hosta"].restart_libvirtd()
    again = libvirt.open(lab_hosts["hosta"].uri)
    try:
        assert state_of(again, guest.name) == (libvirt.VIR_DOMAIN_SHUTOFF,
                                               libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN)
        assert state_of(again, staying.name)[0] == libvirt.VIR_DOMAIN_RUNNING
        assert lab_hosts["hosta"].qemu_pid(staying.name) == staying_pid
        assert lab_hosts["hosta"].running()  # still under the same supervisor
    finally:
        again.close()
    assert state_of(conns["hostb"], guest.name)[0] == libvirt.VIR_DOMAIN_RUNNING


def test_lab_stop_leaves_no_process(tmp_path_factory, libvirt_event_loop):
    """A lab of its own, with a running guest on each host: after stop() none of its
    processes (supervisors, libvirtds, virtlogds, QEMUs) is left."""
    reason = lab.have_lab_prerequisites()
    if reason:
        pytest.skip(reason)
    lab2 = labhosts.TwoHostLab(names=("hostc", "hostd")).start()
    try:
        pids = []
        for index, host in enumerate(lab2):
            guest = lab.define_guest(host.uri, f"vmpower-m-stop-{index}", "stubborn", lab2.disks)
            processes = host.processes()
            # The supervisor, then its children: virtlogd, libvirtd and the guest's QEMU.
            assert {host.daemon_pid("virtlogd"), host.daemon_pid("libvirtd"),
                    host.qemu_pid(guest.name)} <= set(processes[1:]), processes
            pids += processes
    finally:
        lab2.stop()
    assert [pid for pid in pids if _exists(pid)] == []
    assert not lab2.root.exists()


class _BrokenHost(labhosts.LabHost):
    def write_config(self):
        super().write_config()
        (self.root / "etc" / "libvirtd.conf").write_text("this is = not [ a libvirtd.conf\n")


def test_lab_host_that_cannot_start_says_why(tmp_path):
    host = _BrokenHost("hostx", tmp_path / "hostx", 7, timeout=20)
    with pytest.raises(RuntimeError, match="lab host hostx did not answer"):
        host.start()
    assert host.processes() == []
    assert not host.running()


# ---------------------------------------------------------------------------------------------
# Guests that panic (pvpanic), on the main libvirtd
# ---------------------------------------------------------------------------------------------
def test_panic_guest_with_on_crash_preserve_stays_crashed(events, make_guest, record):
    guest, dom = make_guest("panic", on_crash="preserve")
    lab.wait_guest_ready(dom)
    pid = lab.qemu_pid(guest.name)
    dom.shutdown()  # the power button makes this boot sector panic
    reason = lab.wait_for_state(dom, libvirt.VIR_DOMAIN_CRASHED)
    assert reason == libvirt.VIR_DOMAIN_CRASHED_PANICKED
    events.wait_for(guest.name, "CRASHED", "PANICKED")
    assert _exists(pid)  # preserved: QEMU still there, for a dump
    time.sleep(1)  # nothing more follows on its own
    assert tuple(dom.state()) == (libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_CRASHED_PANICKED)
    assert events.pairs(guest.name)[-1] == "CRASHED/PANICKED"
    record("panic, on_crash=preserve", f"events {events.pairs(guest.name)}")


def test_panic_guest_with_on_crash_destroy_is_shut_off_crashed(events, make_guest, record):
    guest, dom = make_guest("panic")
    lab.wait_guest_ready(dom)
    dom.shutdown()
    assert lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
    events.wait_for(guest.name, "STOPPED", "CRASHED")
    assert events.pairs(guest.name)[-2:] == ["CRASHED/PANICKED", "STOPPED/CRASHED"]
    record("panic, on_crash=destroy", f"events {events.pairs(guest.name)}")


def test_selfpanic_guest_panics_unasked(events, make_guest):
    guest, dom = make_guest("selfpanic", on_crash="preserve")
    lab.wait_guest_ready(dom)
    assert lab.wait_for_state(dom, libvirt.VIR_DOMAIN_CRASHED) == libvirt.VIR_DOMAIN_CRASHED_PANICKED
    events.wait_for(guest.name, "CRASHED", "PANICKED")


def test_define_guest_rejects_unknown_on_crash(tmp_path):
    with pytest.raises(ValueError, match="unknown on_crash"):
        lab.define_guest("test:///default", "vmpower-test-x", "acpi", tmp_path, on_crash="explode")


def test_killed_qemu_of_a_lab_host_is_shutoff_crashed(lab_hosts, host_conns, make_host_guest):
    _, events = host_conns
    guest, dom = make_host_guest("hostb", "stubborn")
    os.kill(lab_hosts["hostb"].qemu_pid(guest.name), signal.SIGKILL)
    assert lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF) == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
    events["hostb"].wait_for(guest.name, "STOPPED", "FAILED")


# ---------------------------------------------------------------------------------------------
# The subreaper itself, with plain processes
# ---------------------------------------------------------------------------------------------
def _start_reaper(*args):
    import subprocess
    import sys

    from vmpower_lab import reaper

    proc = subprocess.Popen([sys.executable, reaper.SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_reaper_adopts_what_its_commands_leave_behind_and_stops_it():
    from vmpower_lab import reaper

    proc, status = _start_reaper("--grace", "5", "--", "sh", "-c", "sleep 600 & echo $! >&2")
    try:
        assert status == reaper.STARTED
        orphan = int(proc.stderr.readline())
        assert _parent(orphan) == proc.pid  # adopted: the shell that started it has exited
        assert proc.poll() is None  # it runs as long as a child of its own does
    finally:
        proc.terminate()
        proc.wait(30)
    assert not _exists(orphan)
    assert proc.returncode == 0


def test_reaper_exits_when_its_last_child_is_gone():
    from vmpower_lab import reaper

    proc, status = _start_reaper("--", "sh", "-c", "sleep 0.2 &")
    assert status == reaper.STARTED
    assert proc.wait(30) == 0


def test_reaper_says_when_a_command_fails():
    proc, status = _start_reaper("--", "sh", "-c", "exit 3", "--", "sh", "-c", "sleep 600 &")
    assert status == "reaper: failed: sh -c exit 3 exited 3"
    assert proc.wait(30) == 1  # the commands after it were not run
