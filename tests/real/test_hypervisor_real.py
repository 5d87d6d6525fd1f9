"""Every libvirt call of a job is bounded and says what it waited for, against a real libvirtd
that stops answering (SIGSTOP: alive, its socket open, silent, as a hung daemon is).

- In a process that runs libvirt's event loop (the tests, salt-call), keepalive ends the call.
- In a job process forked from a minion that runs the loop (the beacon's), the loop cannot run:
  the call is given up after ``call_timeout``, naming what was asked; and a connection left idle
  for longer than libvirtd's keepalive allows (it drops it) is opened afresh.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vmpower.hypervisor import KEEPALIVE_COUNT, KEEPALIVE_INTERVAL, Hypervisor, HypervisorError
from vmpower_lab import lab

from .conftest import URI

pytestmark = pytest.mark.usefixtures("libvirt_daemon")


def _libvirtd_pid() -> int:
    # This machine's libvirtd: the lab's hosts (vmpower_lab.hosts) run libvirtds of their own in
    # other mount namespaces, which must not be stopped in its place.
    pids = lab._pids("libvirtd")
    assert len(pids) == 1, pids
    return pids[0]


class Silenced:
    """libvirtd stopped (SIGSTOP) for the length of a with block, continued afterwards."""

    def __enter__(self):
        self.pid = _libvirtd_pid()
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGCONT)


def test_keepalive_ends_a_call_to_a_silent_libvirtd(libvirtd_may_die):
    with Hypervisor(URI) as hv:
        assert hv._own_loop  # this process runs the loop (libvirt_event_loop)
        hv.list_all()
        with Silenced(), pytest.raises(HypervisorError) as raised:
            hv.list_all()
    # Ended by keepalive (about KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1) s), not by the
    # call_timeout of the connection's thread.
    assert "keepalive" in str(raised.value), str(raised.value)
    assert KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1) < Hypervisor(URI).call_timeout
    with Hypervisor(URI) as hv:  # and libvirtd answers again
        hv.list_all()


JOB = textwrap.dedent("""
    import os, signal, sys, time
    from vmpower import eventloop
    from vmpower.hypervisor import Hypervisor, HypervisorError, LibvirtTimeout
    uri, case, libvirtd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    eventloop.ensure_running()  # this process plays the minion running the beacon's loop
    pid = os.fork()
    if pid == 0:  # the job process Salt forks
        with Hypervisor(uri, call_timeout=3) as hv:
            print("own loop:", hv._own_loop, flush=True)
            if case == "silent":
                hv.list_all()
                os.kill(libvirtd, signal.SIGSTOP)
                try:
                    hv.list_all()
                    print("returned", flush=True)
                except LibvirtTimeout as exc:
                    print("timeout:", exc, flush=True)
                finally:
                    os.kill(libvirtd, signal.SIGCONT)
            else:  # idle longer than libvirtd keeps a connection whose keepalives go unanswered
                hv.list_all()
                time.sleep(40)
                try:
                    print("after idle:", len(hv.list_all()) >= 0, flush=True)
                except HypervisorError as exc:
                    print("after idle failed:", exc, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
""")


def _job(case: str) -> list:
    out = subprocess.run([sys.executable, "-c", JOB, URI, case, str(_libvirtd_pid())],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_a_forked_job_gives_up_a_call_to_a_silent_libvirtd_and_names_it(libvirtd_may_die):
    lines = _job("silent")
    assert lines[0] == "own loop: False"
    assert lines[1] == (f"timeout: libvirt at {URI} did not answer within 3s (to list the "
                        f"domains): libvirtd, or the domain's QEMU, is not responding")


def test_a_forked_jobs_idle_connection_is_opened_afresh(libvirt_daemon):
    assert _job("idle") == ["own loop: False", "after idle: True"]
