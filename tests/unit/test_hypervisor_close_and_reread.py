"""A Hypervisor closes its connection at the end of its block, and reads the states of listed
domains again in one bulk call (a sync's re-read under the instance locks)."""

import logging

from vmpower.core.model import PowerState
from vmpower.hypervisor import Hypervisor

from .conftest import TEST_URI


def test_the_connection_is_closed_at_the_end_of_the_block(testdriver, caplog):
    testdriver.define("x")
    with caplog.at_level(logging.WARNING, logger="vmpower.hypervisor"):
        with Hypervisor(TEST_URI) as hv:
            hv.list_all()
            conn = hv._conn
        assert hv._conn is None and hv._handles == {}
    assert conn is not None
    assert [r.getMessage() for r in caplog.records] == []


def test_find_listed_reads_the_listed_domains_now(testdriver):
    on, off = testdriver.define("on"), testdriver.define("off", start=False)
    with Hypervisor(TEST_URI) as hv:
        listed = hv.list_all()
        on.destroy()  # behind the listing's back: the re-read must see it
        off.create()
        found = hv.find_listed([on.UUIDString(), off.UUIDString(), "not-listed"])
        assert set(found) == {on.UUIDString(), off.UUIDString()}  # the unlisted one: find it
        assert found[on.UUIDString()].state.power_state is PowerState.SHUTDOWN
        assert found[off.UUIDString()].state.power_state is PowerState.RUNNING
        assert found[off.UUIDString()].name == off.name()
        assert listed[on.UUIDString()].state.power_state is PowerState.RUNNING
        assert hv.find_listed([]) == {}


def test_find_listed_gives_nothing_when_a_listed_domain_is_gone(testdriver):
    gone, kept = testdriver.define("gone", start=False), testdriver.define("kept")
    with Hypervisor(TEST_URI) as hv:
        hv.list_all()
        gone.undefine()
        # Left to find one by one, which tells a gone domain apart.
        found = hv.find_listed([gone.UUIDString(), kept.UUIDString()])
        assert set(found) <= {kept.UUIDString()}
        assert hv.find(gone.UUIDString()).state.power_state is PowerState.NOSTATE
