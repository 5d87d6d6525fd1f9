"""Fixtures for tests against a real libvirtd and real QEMU guests (see vmpower.lab).

The session starts libvirtd through LibvirtDaemon (and stops it again if it started it), runs
libvirt's default event loop in a thread, and removes every ``vmpower-test-`` domain before and
after. Lifecycle events observed by the tests are printed in pytest's terminal summary.
"""

import threading
import time
from collections import defaultdict

import pytest

from vmpower import eventloop, lab

libvirt = pytest.importorskip("libvirt")

URI = lab.DEFAULT_URI
PREFIX = "vmpower-test-"

_EVENT_NAMES = (
    "DEFINED", "UNDEFINED", "STARTED", "SUSPENDED", "RESUMED",
    "STOPPED", "SHUTDOWN", "PMSUSPENDED", "CRASHED",
)  # fmt: skip

# Case name -> lines describing what was observed; printed by pytest_terminal_summary.
_OBSERVED: dict[str, list[str]] = {}


def event_name(event: int, detail: int) -> tuple[str, str]:
    """Names for a lifecycle (event, detail) pair, e.g. ("STOPPED", "SHUTDOWN")."""
    for name in _EVENT_NAMES:
        if getattr(libvirt, f"VIR_DOMAIN_EVENT_{name}") == event:
            prefix = f"VIR_DOMAIN_EVENT_{name}_"
            details = {
                getattr(libvirt, attr): attr[len(prefix) :]
                for attr in dir(libvirt)
                if attr.startswith(prefix)
            }
            return name, details.get(detail, str(detail))
    return str(event), str(detail)


class LifecycleRecorder:
    """Records every lifecycle event of one connection, per domain name, with its time."""

    def __init__(self, conn):
        self.conn = conn
        self.events = defaultdict(list)  # domain name -> [(monotonic time, event, detail)]
        self._cond = threading.Condition()
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )

    def _on_event(self, _conn, dom, event, detail, _opaque):
        with self._cond:
            self.events[dom.name()].append((time.monotonic(), *event_name(event, detail)))
            self._cond.notify_all()

    def wait_for(self, name: str, event: str, detail: str, timeout: float = 60.0) -> float:
        """Wait until domain ``name`` has had ``event``/``detail``; return when it arrived."""
        def arrived():
            return [t for t, e, d in self.events[name] if (e, d) == (event, detail)]

        with self._cond:
            if not self._cond.wait_for(arrived, timeout):
                pytest.fail(f"no {event}/{detail} for {name} in {timeout} s: {self.pairs(name)}")
            return arrived()[0]

    def pairs(self, name: str) -> list[str]:
        """The events of domain ``name`` so far, as "EVENT/detail" strings."""
        with self._cond:
            return [f"{event}/{detail}" for _, event, detail in self.events[name]]

    def timeline(self, name: str, since: float) -> str:
        """The events of domain ``name`` with their times in seconds after ``since``."""
        with self._cond:
            return ", ".join(f"{e}/{d} +{t - since:.2f}s" for t, e, d in self.events[name])

    def close(self):
        try:
            self.conn.domainEventDeregisterAny(self._callback_id)
        except libvirt.libvirtError:
            pass  # The connection died with a killed libvirtd; nothing left to deregister.


def pytest_terminal_summary(terminalreporter):
    if not _OBSERVED:
        return
    terminalreporter.section("observed on the real libvirtd")
    for case, lines in _OBSERVED.items():
        for line in lines:
            terminalreporter.write_line(f"{case}: {line}")


@pytest.fixture
def record():
    """``record(case, line)`` notes an observation for the terminal summary (and prints it)."""

    def note(case: str, line: str) -> None:
        print(f"{case}: {line}")
        _OBSERVED.setdefault(case, []).append(line)

    return note


@pytest.fixture(scope="session")
def libvirt_event_loop():
    """libvirt's default event loop for the session: vmpower's own, so one process never runs two.

    It must be registered before any connection is opened, as libvirt requires for events.
    """
    eventloop.ensure_running()


@pytest.fixture(scope="session")
def libvirt_daemon(libvirt_event_loop):
    """A running local libvirtd; stopped at the end if this fixture started it."""
    reason = lab.have_lab_prerequisites()
    if reason:
        pytest.skip(reason)
    daemon = lab.LibvirtDaemon(URI).start()
    lab.remove_guests(URI, PREFIX)  # Leftovers of an interrupted session.
    try:
        yield daemon
    finally:
        if daemon.is_running():
            lab.remove_guests(URI, PREFIX)
        daemon.stop()


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guests")


@pytest.fixture
def conn(libvirt_daemon):
    """A connection of this test's own (a test may kill libvirtd under it)."""
    connection = libvirt.open(URI)
    yield connection
    try:
        connection.close()
    except libvirt.libvirtError:
        pass  # Already dead with the libvirtd it was connected to.


@pytest.fixture
def events(conn):
    """A LifecycleRecorder on this test's connection, registered before any guest exists."""
    recorder = LifecycleRecorder(conn)
    yield recorder
    recorder.close()


@pytest.fixture
def make_guest(request, conn, guest_dir):
    """Define and start lab guests named ``vmpower-test-<test>-<kind>``; removed afterwards.

    Returns ``(Guest, virDomain)``.
    """
    prefix = f"{PREFIX}{request.node.name.removeprefix('test_')}-"

    def make(kind: str, suffix: str = "", start: bool = True):
        guest = lab.define_guest(conn, f"{prefix}{kind}{suffix}", kind, guest_dir, start=start)
        return guest, conn.lookupByUUIDString(guest.uuid)

    yield make
    lab.remove_guests(URI, prefix)  # By URI: the test's connection may be dead.
