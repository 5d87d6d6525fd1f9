"""Batched libvirt calls on the test driver: the migration checks and the power actions of a
sync are handed to the connection's thread once for them all, each call still bounded on its
own, and each domain's outcome its own (a failure or a hung call acts on no other domain)."""

import threading
import time
import uuid as uuidlib
from typing import ClassVar
from unittest import mock

import pytest

from vmpower.core.settings import parse_settings
from vmpower.hypervisor import Hypervisor, HypervisorError, LibvirtTimeout
from vmpower.operations import HostOperations
from vmpower.store import open_store

from .conftest import TEST_URI, Clock

HOST = "minion-1"
BOOT = "boot-1"


class _Hangs(Hypervisor):
    """A host where reading the job of the domains in ``hang_job``, or powering off those in
    ``hang``, never returns (a QEMU that does not answer), and reading the job of those in
    ``unreadable`` fails."""

    hang: ClassVar[set] = set()
    hang_job: ClassVar[set] = set()
    unreadable: ClassVar[set] = set()
    released = threading.Event()  # set to let the hung calls return at last

    def _hang_on(self, uuid, hung):
        if uuid in hung:
            self.released.wait(30)

    def migration_job(self, uuid):
        self._hang_on(uuid, self.hang_job)
        if uuid in self.unreadable:
            raise HypervisorError(f"cannot read the job of {uuid}")
        return super().migration_job(uuid)

    def power_off(self, uuid):
        self._hang_on(uuid, self.hang)
        return super().power_off(uuid)


@pytest.fixture
def store(tmp_path):
    with open_store(str(tmp_path / "records.sqlite")) as s:
        yield s


@pytest.fixture
def hangs():
    released = threading.Event()
    with mock.patch.multiple(_Hangs, hang=set(), hang_job=set(), unreadable=set(),
                             released=released):
        yield _Hangs
    released.set()  # the daemon thread of a hung call may end


def test_an_empty_batch_hands_nothing_over(testdriver):
    with Hypervisor(TEST_URI) as hv, mock.patch.object(hv._caller, "call_each") as call_each:
        assert hv.migration_jobs([]) == {}
        assert hv.power_actions([]) == {}
    call_each.assert_not_called()


def test_each_power_action_has_its_own_outcome(testdriver):
    first, off, last = testdriver.define("a"), testdriver.define("off", start=False), testdriver.define("c")
    started = testdriver.define("s", start=False)
    gone = str(uuidlib.uuid4())
    with Hypervisor(TEST_URI) as hv:
        done = hv.power_actions([("power_off", first.UUIDString()), ("power_off", gone),
                                 ("power_off", off.UUIDString()), ("power_off", last.UUIDString()),
                                 ("start", started.UUIDString())])
    assert done[first.UUIDString()] is True and done[last.UUIDString()] is True
    assert isinstance(done[gone], HypervisorError)  # fails that domain, and no other
    assert done[off.UUIDString()] is False  # already off
    assert done[started.UUIDString()] is True
    assert not first.isActive() and not last.isActive() and started.isActive()


def test_a_power_action_that_is_no_power_action_is_refused(testdriver):
    dom = testdriver.define("a")
    with Hypervisor(TEST_URI) as hv, pytest.raises(ValueError, match="not a power action"):
        hv.power_actions([("undefine", dom.UUIDString())])
    assert dom.isActive()


def test_the_migration_jobs_of_a_batch_each_read_on_its_own(testdriver, hangs):
    readable, unreadable = testdriver.define("r"), testdriver.define("u")
    hangs.unreadable = {unreadable.UUIDString()}
    with hangs(TEST_URI) as hv:
        jobs = hv.migration_jobs([unreadable.UUIDString(), readable.UUIDString()])
    # Cannot be told: None, never False; the other is read as ever.
    assert jobs == {unreadable.UUIDString(): None, readable.UUIDString(): False}


def test_a_hung_power_action_stops_the_batch_there_and_acts_on_nothing_after_it(testdriver, hangs):
    before, hung, after = testdriver.define("b"), testdriver.define("h"), testdriver.define("z")
    hangs.hang = {hung.UUIDString()}
    with hangs(TEST_URI, call_timeout=0.5) as hv:
        done = hv.power_actions([("power_off", dom.UUIDString()) for dom in (before, hung, after)])
        assert hv.stuck == f"power off {hung.UUIDString()}"
        hangs.released.set()  # the hung call returns at last: the batch must not go on
        hv._caller.thread.join(10)
    assert done[before.UUIDString()] is True and not before.isActive()
    assert isinstance(done[hung.UUIDString()], LibvirtTimeout)
    assert "did not answer within 0.5s (to power off" in str(done[hung.UUIDString()])
    assert isinstance(done[after.UUIDString()], LibvirtTimeout)
    assert "still busy with" in str(done[after.UUIDString()])
    assert after.isActive()  # given up on: never powered off, even once the thread was free


def test_a_hung_migration_check_raises_as_one_call_would(testdriver, hangs):
    hung, other = testdriver.define("h"), testdriver.define("o")
    hangs.hang_job = {hung.UUIDString()}
    with hangs(TEST_URI, call_timeout=0.5) as hv:
        with pytest.raises(LibvirtTimeout, match="to read the job of"):
            hv.migration_jobs([hung.UUIDString(), other.UUIDString()])
        with pytest.raises(LibvirtTimeout, match="still busy"):  # the connection is unusable
            hv.migration_jobs([other.UUIDString()])


def test_each_call_of_a_batch_has_the_whole_timeout(testdriver):
    """A batch may take longer than one call's timeout: only a call that takes longer fails."""
    doms = [testdriver.define(f"slow{i}") for i in range(4)]

    class _Slow(Hypervisor):
        def power_off(self, uuid):
            time.sleep(0.4)
            return super().power_off(uuid)

    with _Slow(TEST_URI, call_timeout=1.0) as hv:
        done = hv.power_actions([("power_off", dom.UUIDString()) for dom in doms])
        assert hv.stuck is None
    assert all(done[dom.UUIDString()] is True for dom in doms)


def _operations(store, hypervisor):
    return HostOperations(parse_settings({"uri": TEST_URI, "stop_timeout": 0}), HOST, store,
                          hypervisor=hypervisor, clock=Clock(), boot_id=lambda: BOOT,
                          stopping=lambda: False)


def _started_behind_its_back(testdriver, store, hypervisor, names):
    """Domains recorded stopped, then started behind vmpower's back: a sync powers them off."""
    doms = [testdriver.define(name, start=False) for name in names]
    _operations(store, hypervisor).sync()
    for dom in doms:
        dom.create()
    return doms


def test_a_sync_does_not_act_on_a_vm_whose_migration_check_hung(store, testdriver, hangs):
    doms = _started_behind_its_back(testdriver, store, hangs, ["a", "b", "c"])
    hangs.hang_job = {doms[1].UUIDString()}
    ops = _operations(store, lambda uri: hangs(uri, call_timeout=0.5))
    with pytest.raises(LibvirtTimeout):
        ops.sync()
    assert all(dom.isActive() for dom in doms)  # no check missing, no action taken
    assert {store.get(dom.UUIDString()).vm_state.value for dom in doms} == {"stopped"}


def test_a_sync_does_not_act_on_a_vm_whose_migration_job_cannot_be_read(store, testdriver, hangs):
    unreadable, readable = _started_behind_its_back(testdriver, store, hangs, ["u", "r"])
    hangs.unreadable = {unreadable.UUIDString()}
    report = _operations(store, hangs).sync()
    assert unreadable.isActive() and not readable.isActive()
    assert [action["name"] for action in report["actions"]] == [readable.name()]
    assert "could not say whether a migration job runs" in store.history(unreadable.UUIDString())[-1]["reason"]
    assert store.get(unreadable.UUIDString()).vm_state.value == "stopped"


def test_a_sync_records_each_vm_s_own_outcome_when_a_power_off_hangs(store, testdriver, hangs):
    doms = _started_behind_its_back(testdriver, store, hangs, ["a", "b", "c"])
    hung = sorted(doms, key=lambda dom: dom.UUIDString())[1]  # the locked phase goes by UUID
    hangs.hang = {hung.UUIDString()}
    ops = _operations(store, lambda uri: hangs(uri, call_timeout=0.5))
    with pytest.raises(LibvirtTimeout, match="the sync ends here"):
        ops.sync()
    hangs.released.set()
    first, _, last = sorted(doms, key=lambda dom: dom.UUIDString())
    # Every outcome recorded, each its own: powered off (its state after it could not be read
    # on the hung connection), timed out, not tried.
    assert not first.isActive()
    assert "cannot read the state of" in store.history(first.UUIDString())[-1]["reason"]
    assert "did not answer within 0.5s" in store.history(hung.UUIDString())[-1]["reason"]
    assert last.isActive()
    assert "cannot power off" in store.history(last.UUIDString())[-1]["reason"]

