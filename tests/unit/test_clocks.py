"""Every duration runs on the host's monotonic clock (with the boot id where it crosses
processes); the wall clock is for what people read. A wall clock stepped back an hour (NTP, a
hand-set date) stretches no back-off and silences no resync.

HostOperations on libvirt's test driver and a real SQLite file; both clocks are the test's.
"""

import time

import pytest

from vmpower import operations as operations_module
from vmpower.core.settings import parse_settings
from vmpower.operations import HostOperations
from vmpower.store import open_store

from .conftest import TEST_URI, Clock

HOST = "minion-1"
BOOT = "boot-1"



@pytest.fixture
def store(tmp_path):
    with open_store(str(tmp_path / "records.sqlite")) as s:
        yield s


def test_a_backward_wall_step_does_not_stretch_the_restart_back_off(store, testdriver, monkeypatch):
    dom = testdriver.define("pinned")
    clock = Clock()
    ops = HostOperations(parse_settings({"uri": TEST_URI, "stop_timeout": 0, "stop_grace": 15,
                                         "restart_backoff": 10,
                                         "instances": {dom.name(): {"vm_state": "active"}}}),
                         HOST, store, clock=clock, boot_id=lambda: BOOT, stopping=lambda: False)
    ops.sync()
    dom.destroy()  # QEMU killed
    ops.sync()  # seen off: the grace begins
    clock.step(15)
    assert [a["action"] for a in ops.sync()["actions"]] == ["start"]  # restart 1, at once
    dom.destroy()
    monkeypatch.setattr(operations_module, "now", lambda: time.time() - 3600)  # NTP steps back 1 h
    ops.sync()
    clock.step(15)  # the grace, and more than the 10 s back-off of restart 2
    report = ops.sync()
    assert [a["action"] for a in report["actions"]] == ["start"], report
    assert dom.isActive() and store.get(dom.UUIDString()).restart_count == 2
