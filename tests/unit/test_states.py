"""The ``vmpower.running`` / ``vmpower.stopped`` states as Salt loads them, on the test driver."""

import pytest

from vmpower.store import open_store

from .conftest import TEST_URI


@pytest.fixture
def states(load_minion):
    """The minion's state functions on the test driver; ``test`` and pillar set per call."""
    def load(test=False, pillar=None):
        return load_minion(TEST_URI, pillar, test, stop_timeout=0).states
    return load


def test_running_starts_then_reports_no_changes(states, testdriver):
    a, b = testdriver.define("web-a", start=False), testdriver.define("web-b", start=False)
    pattern = testdriver.prefix + "web-*"
    dry = states(test=True)["vmpower.running"](pattern)
    assert dry["result"] is None and set(dry["changes"]) == {a.name(), b.name()}
    assert not a.isActive() and not b.isActive()  # test=True changes nothing
    ret = states()["vmpower.running"](pattern)
    assert ret["result"] is True, ret["comment"]
    assert ret["changes"][a.name()]["new"] == {"vm_state": "active", "power_state": "running"}
    assert a.isActive() and b.isActive()
    again = states()["vmpower.running"](pattern)
    assert (again["result"], again["changes"]) == (True, {})
    assert "already running" in again["comment"]


def test_stopped_records_intent_and_powers_off(states, testdriver):
    dom = testdriver.define("db")
    dry = states(test=True)["vmpower.stopped"](dom.name())
    assert dry["result"] is None and dom.isActive()
    ret = states()["vmpower.stopped"](dom.name(), force=True)
    assert ret["result"] is True and not dom.isActive()
    assert ret["changes"][dom.name()]["old"]["power_state"] == "running"
    assert states()["vmpower.stopped"](dom.name())["changes"] == {}


def test_states_are_audited_as_state(states, testdriver, tmp_path):
    dom = testdriver.define("db")
    states()["vmpower.stopped"](dom.name(), force=True)
    with open_store(str(tmp_path / "cache" / "vmpower" / "records.sqlite")) as store:
        causes = {e["cause"] for e in store.history(dom.UUIDString()) if e["action"] != "adopt"}
    assert causes == {"state"}


def test_no_match(states, testdriver):
    assert states()["vmpower.running"]("no-such-vm")["result"] is False
    glob = states()["vmpower.running"]("no-such-*")
    assert glob["result"] is True and "No domain" in glob["comment"]


def test_bad_arguments_and_pins_fail_clearly(states, testdriver):
    dom = testdriver.define("db")
    assert "timeout must be a number" in states()["vmpower.stopped"](dom.name(), timeout="x")["comment"]
    pinned = states(pillar={"vmpower": {"instances": {dom.name(): {"vm_state": "active"}}}})
    ret = pinned["vmpower.stopped"](dom.name())
    assert ret["result"] is False and "pillar pins vm_state=active" in ret["comment"]
    assert dom.isActive()
