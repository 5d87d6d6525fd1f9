"""libvirt access on the test driver (``test:///default``): lookups that the input decides (and
that stay right while the garbage collector frees domains between a failing call and its error),
and the facts the rules read: ``<on_crash>``, migration jobs, autostart."""

import gc
import subprocess
import sys
import textwrap
import threading
import uuid as uuidlib

import libvirt
import pytest

from vmpower.hypervisor import Hypervisor, HypervisorError, LibvirtTimeout, UnknownDomain

from .conftest import TEST_URI

CRASH_XML = """<domain type='test'>
  <name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory><vcpu>1</vcpu>
  <os><type>hvm</type></os>{on_crash}
</domain>"""


class _Cycle:
    """Garbage that only the cyclic collector frees; freeing it frees its virDomain too
    (virDomainFree, a libvirt call that resets the thread's last error)."""

    def __init__(self, dom):
        self.dom = dom
        self.me = self


@pytest.fixture
def gc_pressure():
    """The collector runs every 13 allocations; a test makes 5 cycles per lookup. With this
    rhythm the old lookup lost its error code (read as None) in 19,998 calls of 20,000."""
    old = gc.get_threshold()
    gc.set_threshold(13, 1000, 1000)
    yield
    gc.set_threshold(*old)


def test_lookups_by_name_never_fail_while_the_gc_frees_domains(testdriver, gc_pressure):
    dom = testdriver.define("x")
    name = dom.name()
    wrong = []
    with Hypervisor(TEST_URI) as hv:
        for _ in range(5000):
            for _ in range(5):
                _Cycle(testdriver.conn.lookupByName(name))
            hv._handles.clear()  # no cached handle: every lookup asks libvirt
            if hv.lookup(name).name() != name:
                wrong.append("found another domain")
            try:
                hv.lookup(name + "-missing")
                wrong.append("found a missing domain")
            except UnknownDomain:
                pass
    assert wrong == []


def test_what_the_text_is_decides_the_lookup(testdriver):
    dom = testdriver.define("y")
    uuid = dom.UUIDString()
    with Hypervisor(TEST_URI) as hv:
        assert hv.lookup(uuid).name() == dom.name()
        assert hv.lookup(uuid.replace("-", "").upper()).name() == dom.name()
        assert hv.lookup(dom.name()).UUIDString() == uuid
        with pytest.raises(UnknownDomain, match="no domain named or with UUID 'nope'"):
            hv.lookup("nope")
        with pytest.raises(UnknownDomain):
            hv.lookup(str(uuidlib.uuid4()))
    # A domain named like a UUID is still found by its name.
    odd_name = str(uuidlib.uuid4())
    odd = testdriver.conn.defineXML(CRASH_XML.format(name=odd_name, uuid=uuidlib.uuid4(), on_crash=""))
    testdriver.domains.append(odd)
    with Hypervisor(TEST_URI) as hv:
        assert hv.lookup(odd_name).UUIDString() == odd.UUIDString()


@pytest.mark.parametrize("on_crash,expected", [
    ("", "destroy"),  # libvirt's default
    ("<on_crash>preserve</on_crash>", "preserve"),
    ("<on_crash>restart</on_crash>", "restart"),
    ("<on_crash>coredump-destroy</on_crash>", "coredump-destroy"),
])
def test_on_crash_is_read_from_the_domains_xml(testdriver, on_crash, expected):
    name = f"{testdriver.prefix}crash-{expected}"
    dom = testdriver.conn.defineXML(CRASH_XML.format(name=name, uuid=uuidlib.uuid4(), on_crash=on_crash))
    testdriver.domains.append(dom)
    with Hypervisor(TEST_URI) as hv:
        assert hv.on_crash(dom.UUIDString()) == expected
        assert hv.on_crash(str(uuidlib.uuid4())) == ""  # gone: cannot be read


def test_no_migration_job_on_a_driver_without_jobs(testdriver):
    dom = testdriver.define("m")
    with Hypervisor(TEST_URI) as hv:
        assert hv.migration_job(dom.UUIDString()) is False
        assert hv.migration_job(str(uuidlib.uuid4())) is False


def test_autostart_domains_in_one_call(testdriver):
    auto = testdriver.define("auto")
    plain = testdriver.define("plain")
    auto.setAutostart(1)
    try:
        with Hypervisor(TEST_URI) as hv:
            found = hv.autostart_set()
        assert auto.UUIDString() in found and plain.UUIDString() not in found
    finally:
        auto.setAutostart(0)
    with Hypervisor(TEST_URI) as hv:
        assert auto.UUIDString() not in hv.autostart_set()


def test_jobstats_is_what_the_test_driver_lacks():
    """The premise of the test above: the test driver has no jobs (a real migration job is
    seen by tests/real on two real libvirtds)."""
    conn = libvirt.open(TEST_URI)
    try:
        with pytest.raises(libvirt.libvirtError) as raised:
            conn.listAllDomains()[0].jobStats()
        assert raised.value.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT
    finally:
        conn.close()


def test_a_call_that_does_not_return_is_given_up_and_named(testdriver):
    dom = testdriver.define("b")
    never = threading.Event()
    with Hypervisor(TEST_URI, call_timeout=0.2) as hv:
        assert hv.lookup(dom.name()).UUIDString() == dom.UUIDString()  # calls go through
        with pytest.raises(LibvirtTimeout, match=r"libvirt at test:///default did not answer "
                                                 r"within 0.2s \(to wait for a hung libvirtd\)"):
            hv._bounded_call("wait for a hung libvirtd", never.wait)
        # The connection is busy for good: every later call says with what, at once.
        with pytest.raises(LibvirtTimeout, match="still busy with 'wait for a hung libvirtd', "
                                                 "which did not return: cannot look up"):
            hv.lookup(dom.name())
    never.set()  # the stuck thread is a daemon thread; here it may end


def test_the_connection_runs_on_a_thread_of_its_own_and_the_loop_runs_here(testdriver):
    dom = testdriver.define("c")
    with Hypervisor(TEST_URI) as hv:
        assert hv._own_loop is True  # this process can run libvirt's event loop: keepalive
        assert hv.state(dom.UUIDString()).power_state.value == "running"
        assert hv._caller.thread.is_alive() and hv._caller.thread.daemon
        thread = hv._caller.thread
    thread.join(10)
    assert not thread.is_alive()  # ended with the with block
    with pytest.raises(HypervisorError, match="use Hypervisor in a with block"):
        hv.lookup(dom.name())


def test_a_forked_job_reopens_an_idle_connection_and_runs_no_loop_of_its_own():
    """In a job forked from a process that runs libvirt's event loop, keepalives cannot be
    answered, so an idle connection is opened afresh (tests/real shows libvirtd dropping one)."""
    code = textwrap.dedent("""
        import os, time
        from vmpower import eventloop, hypervisor
        eventloop.ensure_running()
        pid = os.fork()
        if pid == 0:
            hypervisor.IDLE_REOPEN = 0.05
            with hypervisor.Hypervisor("test:///default") as hv:
                first = hv._conn
                hv.list_all()
                same = hv._conn is first
                time.sleep(0.2)
                hv.list_all()
                print(hv._own_loop, same, hv._conn is first, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        with hypervisor.Hypervisor("test:///default") as hv:  # the parent runs the loop
            print(hv._own_loop, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.stdout.split() == ["False", "True", "False", "True"], out.stderr
