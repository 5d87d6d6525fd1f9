"""Fixtures shared by every test directory."""

import re

import pytest
import salt._logging
import salt.config
import salt.loader

from vmpower_lab import lab


@pytest.fixture(autouse=True, scope="session")
def no_deferred_salt_console_log():
    """Importing Salt installs a temporary root log handler that keeps warnings until the process
    exits and then writes them to pytest's stderr, closed by then ("--- Logging error ---").
    A minion replaces it when it configures logging; the tests log warnings on purpose."""
    salt._logging.shutdown_temp_handler()


class LoadedMinion:
    """A minion's execution and state modules loaded by Salt's own loader, in this process."""

    def __init__(self, root, uri, pillar=None, test=False, **vmpower):
        # A store of the test's own, never the shared default (/var/lib/vmpower).
        vmpower.setdefault("store", str(root / "cache" / "vmpower" / "records.sqlite"))
        opts = salt.config.minion_config(None)
        opts.update(id="loader-minion", file_client="local", cachedir=str(root / "cache"),
                    pki_dir=str(root / "pki"), extension_modules=str(root / "extmods"),
                    vmpower={"uri": uri, **vmpower}, pillar=pillar or {}, test=test)
        self.opts = opts
        utils = salt.loader.utils(opts)
        self.functions = salt.loader.minion_mods(opts, utils=utils)
        self._utils = utils

    @property
    def states(self):
        return salt.loader.states(self.opts, self.functions, self._utils,
                                  salt.loader.serializers(self.opts))

    @property
    def store_path(self):
        return self.opts["vmpower"]["store"]


@pytest.fixture
def load_minion(tmp_path):
    """``load_minion(uri, pillar=None, test=False, **vmpower_settings)`` -> LoadedMinion.

    Every call in one test shares the same cachedir, so records persist between loads.
    """
    def load(uri, pillar=None, test=False, **vmpower):
        return LoadedMinion(tmp_path, uri, pillar, test, **vmpower)
    return load


# ---------------------------------------------------------------------------------------------
# A real libvirtd and real QEMU guests (vmpower_lab.lab), shared by tests/real and tests/daemons
# ---------------------------------------------------------------------------------------------
LIBVIRT_URI = lab.DEFAULT_URI

#: Every test guest's name starts with one of these (tests/real, tests/daemons); leftovers of
#: an interrupted session are removed when the session's libvirtd fixture starts and ends.
GUEST_PREFIXES = ("vmpower-test-", "vmpower-d-")


def _remove_test_guests(uri: str = LIBVIRT_URI) -> None:
    for prefix in GUEST_PREFIXES:
        lab.remove_guests(uri, prefix)


@pytest.fixture(scope="session")
def libvirt_event_loop():
    """libvirt's default event loop for the session: vmpower's own, so one process never runs two.

    It must be registered before any connection is opened, as libvirt requires for events.
    """
    pytest.importorskip("libvirt")
    from vmpower import eventloop

    eventloop.ensure_running()


@pytest.fixture(scope="session")
def libvirt_daemon(libvirt_event_loop):
    """A running local libvirtd (``qemu:///system``); stopped at the end if this fixture started
    it, and left running if it ran before the session, whatever tests did to it meanwhile
    (``libvirtd_may_die``)."""
    reason = lab.have_lab_prerequisites()
    if reason:
        pytest.skip(reason)
    daemon = lab.LibvirtDaemon(LIBVIRT_URI).start()
    owned = daemon.started_libvirtd
    _remove_test_guests()  # Leftovers of an interrupted session.
    try:
        yield daemon
    finally:
        if owned and not daemon.answers():
            daemon.start()  # A test killed it and did not bring it back: needed for cleanup.
        if daemon.answers():
            _remove_test_guests()
        if not owned:
            daemon.started_libvirtd = False  # Not ours: leave it as we found it, running.
        daemon.stop()


@pytest.fixture
def libvirtd_may_die(libvirt_daemon):
    """The session's LibvirtDaemon, for a test that kills or restarts libvirtd.

    Skips when libvirtd ran before the session (never kill someone else's daemon). Afterwards
    libvirtd runs and answers again, whatever the test did.
    """
    if not libvirt_daemon.started_libvirtd:
        pytest.skip("libvirtd ran before the tests; not killing someone else's daemon")
    try:
        yield libvirt_daemon
    finally:
        if not libvirt_daemon.answers():
            libvirt_daemon.start()


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guests")


@pytest.fixture
def conn(libvirt_daemon):
    """A connection of this test's own (a test may kill libvirtd under it)."""
    import libvirt

    connection = libvirt.open(LIBVIRT_URI)
    yield connection
    try:
        connection.close()
    except libvirt.libvirtError:
        pass  # Already dead with the libvirtd it was connected to.


@pytest.fixture
def guest_prefix() -> str:
    """How this directory's guests are named (tests/daemons overrides it)."""
    return GUEST_PREFIXES[0]


@pytest.fixture
def make_guest(request, conn, guest_dir, guest_prefix):
    """``make_guest(kind, suffix="", start=True, **define_guest_args)`` defines (and starts) a
    lab guest named ``<guest_prefix><test name>-<kind><suffix>`` and returns ``(Guest, virDomain)``; every
    guest of the test is removed afterwards.

    It uses the test's ``conn`` while that is alive, and a new connection once libvirtd was
    restarted under it.
    """
    import libvirt

    test_name = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name.removeprefix("test_"))
    prefix = f"{guest_prefix}{test_name}-"
    opened = []

    def connection():
        for candidate in [conn, *opened[-1:]]:
            try:
                if candidate.isAlive():
                    return candidate
            except libvirt.libvirtError:
                pass
        opened.append(libvirt.open(LIBVIRT_URI))
        return opened[-1]

    def make(kind: str, suffix: str = "", start: bool = True, **more):
        connected = connection()
        guest = lab.define_guest(connected, f"{prefix}{kind}{suffix}", kind, guest_dir,
                                 start=start, **more)
        return guest, connected.lookupByUUIDString(guest.uuid)

    yield make
    lab.remove_guests(LIBVIRT_URI, prefix)  # By URI: the test's connection may be dead.
    for connected in opened:
        try:
            connected.close()
        except libvirt.libvirtError:
            pass


# ---------------------------------------------------------------------------------------------
# Two hypervisor hosts on this machine (vmpower_lab.hosts), for live migration
# ---------------------------------------------------------------------------------------------
#: Guests on the lab hosts are named ``vmpower-m-<test>-<kind>`` (``make_host_guest``).
HOST_GUEST_PREFIX = "vmpower-m-"

#: How long the lab's hosts took to start, for the terminal summary of tests/real.
LAB_TIMINGS: list = []


@pytest.fixture(scope="session")
def lab_hosts(libvirt_event_loop):
    """Two lab hosts, ``hosta`` and ``hostb``: each a libvirtd of its own in its own mount and
    UTS namespaces, reached at ``lab_hosts["hosta"].uri``; their guests' disks in
    ``lab_hosts.disks``, which both see. Started once per session, stopped at its end (every
    process of theirs with them)."""
    import time

    reason = lab.have_lab_prerequisites()
    if reason:
        pytest.skip(reason)
    from vmpower_lab.hosts import TwoHostLab

    began = time.monotonic()
    hosts = TwoHostLab().start()
    LAB_TIMINGS.append(f"two lab hosts started in {time.monotonic() - began:.2f} s")
    try:
        yield hosts
    finally:
        began = time.monotonic()
        hosts.stop()
        LAB_TIMINGS.append(f"two lab hosts stopped in {time.monotonic() - began:.2f} s")


@pytest.fixture
def make_host_guest(request, lab_hosts):
    """``make_host_guest(host, kind, suffix="", start=True, **define_guest_args)`` defines (and
    starts) a guest on lab host ``host`` (its name, e.g. ``"hosta"``), its disk in the shared
    directory; returns ``(Guest, virDomain)`` on a connection of the test's own. Every guest
    of the test, on every lab host, is removed afterwards."""
    import libvirt

    test_name = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name.removeprefix("test_"))
    prefix = f"{HOST_GUEST_PREFIX}{test_name}-"
    conns = {}

    def make(host: str, kind: str, suffix: str = "", start: bool = True, **more):
        if host not in conns:
            conns[host] = libvirt.open(lab_hosts[host].uri)
        guest = lab.define_guest(conns[host], f"{prefix}{kind}{suffix}", kind, lab_hosts.disks,
                                 start=start, **more)
        return guest, conns[host].lookupByUUIDString(guest.uuid)

    yield make
    for host in lab_hosts:
        if host.answers():
            lab.remove_guests(host.uri, prefix)
    for conn in conns.values():
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
