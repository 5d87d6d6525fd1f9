"""Fixtures for tests on libvirt's test driver (``test:///default``).

The test driver is shared by every connection in this process, so each test defines its own
domains under a unique prefix and removes them afterwards.

And a real PostgreSQL server for the store's second backend, started once per session when a
test asks for it, with a fresh database per test.
"""

import importlib.util
import itertools
import os
import uuid as uuidlib

import libvirt
import pytest

from vmpower import eventloop

from .pgserver import PostgresServer, find_bindir

TEST_URI = "test:///default"
_counter = itertools.count()

DOMAIN_XML = """<domain type='test'>
  <name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory><vcpu>1</vcpu>
  <os><type>hvm</type></os>
</domain>"""


class TestDriver:
    """Defines domains on the shared test driver and cleans them up."""

    def __init__(self):
        self.conn = libvirt.open(TEST_URI)
        self.prefix = f"t{next(_counter)}-"
        self.domains = []

    def define(self, name, start=True):
        dom = self.conn.defineXML(DOMAIN_XML.format(name=self.prefix + name, uuid=uuidlib.uuid4()))
        self.domains.append(dom)
        if start:
            dom.create()
        return dom

    def close(self):
        for dom in self.domains:
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
        self.conn.close()


@pytest.fixture
def journal(tmp_path):
    """A journal of observed events, as a host's beacon writes it (``journal_event``) and its
    reconciles read it."""
    from vmpower.journal import Journal

    with Journal(str(tmp_path / "journal.sqlite")) as opened:
        yield opened


def journal_event(journal, uuid, transition, reason, at, boot_id, uri=TEST_URI):
    """Journal one lifecycle event as the beacon does when it fires it: ``transition`` and
    ``reason`` as it observed them, libvirt having called back at ``at`` on the host's
    monotonic clock in the boot ``boot_id``. Returns the event's ``seq``."""
    from vmpower.core.journal import Observation

    [seq] = journal.append([Observation(0, boot_id, uri, uuid, transition, reason, at,
                                        1_800_000_000.0 + at)])
    return seq


class Clock:
    """The host's monotonic clock, stepped by the test."""

    def __init__(self, at=1000.0):
        self.at = at

    def __call__(self):
        return self.at

    def step(self, seconds):
        self.at += seconds


@pytest.fixture(scope="session", autouse=True)
def test_driver_events():
    """One callback registered on the test driver's event state for the whole session.

    Every connection to ``test:///default`` in this process shares one driver, and with it one
    queue of events. libvirt removes that queue's timer when the last callback on it is
    deregistered. An event queued at that moment (a test's ``undefine()`` while the watcher it
    just retired deregisters on its own thread) is left in the queue with no timer, and the next
    registration adds a timer that libvirt never arms: it arms the timer only when an event
    joins an empty queue. From then on no event of this process reaches any callback (a
    watcher connects and sees nothing). A production beacon is not exposed: its connection
    goes through libvirtd (qemu:///system), whose events each connection queues for itself,
    and a watcher never registers again on a connection it deregistered. Here, one callback
    that stays keeps the timer.
    """
    eventloop.ensure_running()  # libvirt's event implementation comes before the connection
    conn = libvirt.open(TEST_URI)
    callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                           lambda *_: None, None)
    yield
    conn.domainEventDeregisterAny(callback)
    conn.close()


@pytest.fixture
def testdriver():
    driver = TestDriver()
    yield driver
    driver.close()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of the tests' own, for the whole session; stopped at its end.

    Skipped where there is no PostgreSQL (``scripts/setup.sh`` installs it) or no psycopg,
    except in CI, where a missing install must not pass as green.
    """
    bindir = find_bindir()
    missing = ("no PostgreSQL server binaries (initdb, pg_ctl, postgres) under "
               "/usr/lib/postgresql/*/bin or on PATH" if bindir is None else
               "psycopg is not installed" if importlib.util.find_spec("psycopg") is None else None)
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"PostgreSQL tests: {missing}")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres):
    """The DSN of a clean store on the session's server (a password over TCP): a new schema
    of one database, so advisory locks, which are per database, are shared as in a fleet."""
    return postgres.schema()


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request, tmp_path):
    """Where a store is, once for each backend: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "records.sqlite")
    return request.getfixturevalue("postgres_dsn")
