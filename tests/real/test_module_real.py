"""The ``vmpower`` execution module, loaded by Salt's loader, against a real libvirtd and real
QEMU guests: get_info, stop (graceful and forced), sync after a guest shut itself down, sync
powering off a VM started behind vmpower's back, and history saying why."""

import time

import libvirt
import pytest

from vmpower_lab import lab

from .conftest import URI

pytestmark = pytest.mark.real


@pytest.fixture
def vmpower(load_minion, libvirt_daemon):
    return load_minion(URI, stop_timeout=30).functions


def test_get_info_of_a_running_guest(vmpower, make_guest):
    guest, _dom = make_guest("acpi")
    info = vmpower["vmpower.get_info"](guest.name)
    assert info["uuid"] == guest.uuid and info["power_state"] == "running"
    assert (info["max_mem"], info["num_cpu"]) == (32 * 1024, 1)  # KiB, as libvirt gives it
    assert info["cpu_time"] > 0  # ns
    assert vmpower["vmpower.get_info"](guest.uuid)["name"] == guest.name


def test_stop_a_guest_that_powers_itself_off_on_acpi(vmpower, make_guest):
    guest, dom = make_guest("acpi")
    lab.wait_guest_ready(dom)
    result = vmpower["vmpower.stop"](guest.name, timeout=60)
    assert result["result"].startswith("shut down gracefully"), result
    assert (result["vm_state"], result["power_state"]) == ("stopped", "shutdown")
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN]


def test_stop_a_guest_that_ignores_acpi_is_forced_after_the_timeout(vmpower, make_guest):
    guest, dom = make_guest("stubborn")
    lab.wait_guest_ready(dom)
    result = vmpower["vmpower.stop"](guest.name, timeout=3)
    assert result["result"] == "still running after 3s: powered off"
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED]
    history = vmpower["vmpower.history"](guest.name)
    assert [e["action"] for e in history] == ["adopt", "powering-off", "done"]
    # task_owner: who set the task_state, audited, and cleared with it.
    assert history[-1]["new"] == {"vm_state": "stopped", "power_state": "shutdown", "task_state": "",
                                  "task_owner": ""}


def test_sync_records_a_guest_that_shut_itself_down_as_stopped(load_minion, libvirt_daemon,
                                                                 make_guest):
    vmpower = load_minion(URI, stop_timeout=30, stop_grace=2).functions
    guest, dom = make_guest("selfstop", start=False)
    vmpower["vmpower.sync"]()
    assert vmpower["vmpower.start"](guest.name)["vm_state"] == "active"
    lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF)  # nobody asked it to
    # First seen off: recorded, and no path acts before stop_grace.
    held = vmpower["vmpower.sync"]()
    assert not [a for a in held["actions"] if a["uuid"] == guest.uuid] and "retry_at" in held
    time.sleep(max(0.0, held["retry_at"] - time.time()))
    report = vmpower["vmpower.sync"]()
    mine = [a for a in report["actions"] if a["uuid"] == guest.uuid]
    assert len(mine) == 1 and (mine[0]["vm_state"], mine[0]["power_state"]) == ("stopped", "shutdown")
    seen, why = vmpower["vmpower.history"](guest.name)[-2:]
    assert (seen["old"], seen["new"]) == ({"power_state": "running"}, {"power_state": "shutdown"})
    assert why["cause"] == "sync"
    assert (why["old"], why["new"]) == ({"vm_state": "active"}, {"vm_state": "stopped"})
    assert "vm_state=active but the guest shut down (libvirt reason: shutdown)" in why["reason"]


def test_sync_powers_off_a_stopped_vm_started_behind_its_back(vmpower, make_guest):
    guest, dom = make_guest("acpi", start=False)
    vmpower["vmpower.sync"]()
    dom.create()  # virsh start, behind vmpower's back
    report = vmpower["vmpower.sync"]()
    mine = [a for a in report["actions"] if a["uuid"] == guest.uuid]
    assert mine and mine[0]["action"] == "power_off"
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    why = vmpower["vmpower.history"](guest.uuid)[-1]
    assert why["action"] == "power_off"
    assert "vm_state=stopped but the domain is running: powering it off" in why["reason"]
