"""Host and process facts (vmpower.hostinfo), with real processes: a child that runs, one that
is killed (before and after it is reaped), and owners from another boot, host or pid."""

import json
import os
import signal
import subprocess
import sys

import pytest

from vmpower import hostinfo


def test_the_boot_id_is_the_kernels():
    with open("/proc/sys/kernel/random/boot_id") as handle:
        assert hostinfo.boot_id() == handle.read().strip()
    assert len(hostinfo.boot_id()) == 36


def test_this_process_owns_its_own_task():
    owner = json.loads(hostinfo.process_owner("m1"))
    assert set(owner) == {"host", "boot_id", "pid", "start_time", "since"}
    assert owner["host"] == "m1" and owner["pid"] == os.getpid()
    assert owner["boot_id"] == hostinfo.boot_id() and owner["start_time"].isdigit()
    assert hostinfo.owner_alive(hostinfo.process_owner("m1"), "m1") is True
    assert hostinfo.owner_alive(hostinfo.process_owner("m1")) is True


def test_a_killed_owner_is_gone_reaped_or_not():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        owner = hostinfo.process_owner("m1", pid=child.pid)
        assert hostinfo.owner_alive(owner, "m1") is True
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
        assert hostinfo.owner_alive(owner, "m1") is False
    finally:
        child.kill()
        child.wait()
    assert hostinfo.owner_alive(owner, "m1") is False


def test_a_reused_pid_is_another_process():
    owner = json.loads(hostinfo.process_owner("m1"))
    owner["start_time"] = str(int(owner["start_time"]) - 1)  # this pid, but an earlier process
    assert hostinfo.owner_alive(json.dumps(owner), "m1") is False


def test_an_owner_from_an_earlier_boot_is_gone():
    owner = json.loads(hostinfo.process_owner("m1"))
    owner["boot_id"] = "00000000-0000-4000-8000-000000000000"
    assert hostinfo.owner_alive(json.dumps(owner), "m1") is False


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"pid": "x", "boot_id": "b"}',
                                  '{"host": "m1", "pid": 1}'])
def test_what_is_not_an_owner_cannot_be_told(text):
    assert hostinfo.owner_alive(text, "m1") is None


def test_another_hosts_owner_cannot_be_told_here():
    assert hostinfo.owner_alive(hostinfo.process_owner("m2"), "m1") is None


def test_start_time_of_a_process_with_parentheses_in_its_name(tmp_path):
    odd = tmp_path / "a) b (c"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import time; time.sleep(600)"])
    try:
        with open(f"/proc/{child.pid}/stat") as handle:
            expected = handle.read().rsplit(")", 1)[1].split()[19]
        assert hostinfo.process_start_time(child.pid) == expected
    finally:
        child.kill()
        child.wait()
    assert hostinfo.process_start_time(child.pid) == ""


@pytest.mark.parametrize("says, expected", [("stopping", True), ("running", False),
                                            ("degraded", False), ("offline", None), ("", None)])
def test_host_stopping_is_what_systemd_says(tmp_path, monkeypatch, says, expected):
    # systemd's "stopping" cannot be produced on demand: a systemctl on PATH answers instead.
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f"#!/bin/sh\n[ \"$1\" = is-system-running ] && echo '{says}'\n")
    systemctl.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(hostinfo, "SYSTEMD_BOOTED_PATH", str(tmp_path))  # systemd is init
    assert hostinfo.host_stopping() is expected


def test_host_stopping_without_systemctl_cannot_tell(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no systemctl at all
    monkeypatch.setattr(hostinfo, "SYSTEMD_BOOTED_PATH", str(tmp_path))
    assert hostinfo.host_stopping() is None


def test_host_stopping_where_systemd_is_not_init_asks_no_systemctl(tmp_path, monkeypatch):
    asked = tmp_path / "asked"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f"#!/bin/sh\ntouch {asked}\necho stopping\n")
    systemctl.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(hostinfo, "SYSTEMD_BOOTED_PATH", str(tmp_path / "not-booted-with-systemd"))
    assert hostinfo.host_stopping() is None
    assert not asked.exists()
