"""vmpower_lab.lab against a real libvirtd: the guests really do what their boot sectors promise."""

import os
import signal
import threading
import time

import pytest

from vmpower_lab import lab

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real


@pytest.mark.parametrize("kind", lab.GUEST_KINDS)
def test_boot_sector_is_a_bootable_mbr(kind):
    sector = lab.boot_sector(kind)
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"


def test_boot_sector_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown guest kind"):
        lab.boot_sector("linux")


def test_configure_qemu_conf_is_idempotent(tmp_path):
    conf = tmp_path / "qemu.conf"
    conf.write_text('# a comment\nuser = "qemu"\nvnc_listen = "0.0.0.0"\n')
    assert lab.configure_qemu_conf(conf) is True
    first = conf.read_text()
    assert lab.configure_qemu_conf(conf) is False
    assert conf.read_text() == first
    lines = first.splitlines()
    assert '#vmpower-lab# user = "qemu"' in lines  # libvirt would use the first "user".
    assert [line for line in lines if line.startswith("user")] == ['user = "root"']
    assert 'security_driver = "none"' in lines
    assert 'vnc_listen = "0.0.0.0"' in lines


def test_daemon_answers(libvirt_daemon):
    assert libvirt_daemon.is_running()
    assert libvirt_daemon.answers()


def test_daemon_context_leaves_a_running_daemon_alone(libvirt_daemon):
    with lab.LibvirtDaemon() as other:
        assert not other.started_libvirtd and not other.started_virtlogd
    assert libvirt_daemon.answers()


def test_acpi_guest_powers_off_on_shutdown_request(events, make_guest, record):
    created = time.monotonic()
    guest, dom = make_guest("acpi")
    lab.wait_guest_ready(dom)
    ready = time.monotonic()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    asked = time.monotonic()
    dom.shutdown()
    reason = lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF)
    off = time.monotonic()
    assert reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
    events.wait_for(guest.name, "STOPPED", "SHUTDOWN")

    record("acpi + shutdown()", f"events {events.pairs(guest.name)}")
    record("acpi + shutdown()", f"define+create -> boot sector running: {ready - created:.2f} s")
    record("acpi + shutdown()", f"shutdown() -> SHUTOFF: {off - asked:.2f} s")
    record("acpi + shutdown()", f"timeline from shutdown(): {events.timeline(guest.name, asked)}")


def test_stubborn_guest_ignores_shutdown_until_destroyed(events, make_guest, record):
    guest, dom = make_guest("stubborn")
    lab.wait_guest_ready(dom)

    dom.shutdown()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        time.sleep(0.2)

    destroyed = time.monotonic()
    dom.destroy()
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED]
    events.wait_for(guest.name, "STOPPED", "DESTROYED")

    record("stubborn + shutdown() + destroy()", f"events {events.pairs(guest.name)}")
    record(
        "stubborn + shutdown() + destroy()",
        f"timeline from destroy(): {events.timeline(guest.name, destroyed)}",
    )


def test_selfstop_guest_powers_off_unasked(events, make_guest, record):
    created = time.monotonic()
    guest, dom = make_guest("selfstop")
    lab.wait_guest_ready(dom)
    ready = time.monotonic()

    reason = lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF)
    off = time.monotonic()
    assert reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
    events.wait_for(guest.name, "STOPPED", "SHUTDOWN")

    record("selfstop", f"events {events.pairs(guest.name)}")
    record("selfstop", f"boot sector running -> SHUTOFF: {off - ready:.2f} s (~2 s is its delay)")
    record("selfstop", f"timeline from define: {events.timeline(guest.name, created)}")


def test_killed_qemu_is_shutoff_crashed(events, make_guest, record):
    guest, dom = make_guest("acpi")
    lab.wait_guest_ready(dom)

    killed = time.monotonic()
    os.kill(lab.qemu_pid(guest.name), signal.SIGKILL)
    reason = lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF)
    assert reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
    events.wait_for(guest.name, "STOPPED", "FAILED")

    record("kill -9 qemu", f"events {events.pairs(guest.name)}")
    record("kill -9 qemu", f"timeline from kill: {events.timeline(guest.name, killed)}")


def test_guests_have_their_own_images_and_are_removed(conn, make_guest):
    first, _ = make_guest("stubborn", "-1")
    second, _ = make_guest("stubborn", "-2")
    assert first.image != second.image
    assert first.image.stat().st_size == lab.IMAGE_SIZE

    removed = lab.remove_guests(conn, first.name.removesuffix("stubborn-1"))

    assert sorted(removed) == sorted([first.name, second.name])
    assert not first.image.exists() and not second.image.exists()
    names = {dom.name() for dom in conn.listAllDomains()}
    assert first.name not in names and second.name not in names


def test_guest_survives_libvirtd_kill_and_restart(libvirt_daemon, conn, make_guest, record):
    if not libvirt_daemon.started_libvirtd:
        pytest.skip("libvirtd ran before the tests; not killing someone else's daemon")
    guest, _ = make_guest("stubborn")
    pid = lab.qemu_pid(guest.name)
    closed = []
    close_seen = threading.Event()

    def on_close(_conn, reason, _opaque):
        closed.append(reason)
        close_seen.set()

    conn.registerCloseCallback(on_close, None)

    libvirt_daemon.kill()
    assert not libvirt_daemon.is_running()
    assert close_seen.wait(30), "no close callback after libvirtd was killed"
    assert closed == [libvirt.VIR_CONNECT_CLOSE_REASON_EOF]
    os.kill(pid, 0)  # The guest's QEMU is untouched.

    libvirt_daemon.start()
    with_new_daemon = libvirt.open(lab.DEFAULT_URI)
    try:
        dom = with_new_daemon.lookupByUUIDString(guest.uuid)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert lab.qemu_pid(guest.name) == pid
    finally:
        with_new_daemon.close()

    libvirt_daemon.restart()  # Gracefully this time.
    with_new_daemon = libvirt.open(lab.DEFAULT_URI)
    try:
        assert with_new_daemon.lookupByUUIDString(guest.uuid).isActive()
    finally:
        with_new_daemon.close()

    record("libvirtd kill -9", f"close callback reasons {closed} (1 = VIR_CONNECT_CLOSE_REASON_EOF)")
