"""Fixtures for tests against a real libvirtd and real QEMU guests (see vmpower_lab.lab).

The libvirtd, the event loop, ``conn`` and ``make_guest`` are shared with tests/daemons and live
in tests/conftest.py: the session starts libvirtd through LibvirtDaemon (and stops it again if it
started it), runs libvirt's default event loop in a thread, and removes every ``vmpower-test-``
domain before and after. Lifecycle events observed by the tests here are printed in pytest's
terminal summary.
"""

import threading
import time
from collections import defaultdict

import pytest

from vmpower_lab import lab

libvirt = pytest.importorskip("libvirt")

URI = lab.DEFAULT_URI

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
    from tests.conftest import LAB_TIMINGS

    if not _OBSERVED and not LAB_TIMINGS:
        return
    terminalreporter.section("observed on the real libvirtd")
    for line in LAB_TIMINGS:
        terminalreporter.write_line(line)
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


@pytest.fixture
def events(conn):
    """A LifecycleRecorder on this test's connection, registered before any guest exists."""
    recorder = LifecycleRecorder(conn)
    yield recorder
    recorder.close()
