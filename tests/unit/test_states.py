"""The ``vmpower.running`` / ``vmpower.stopped`` states as Salt loads them, on the test driver."""

import time

import pytest

from vmpower.core.model import Cause
from vmpower.store import Change, open_store

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


def test_no_match_fails_with_a_clear_comment(states, testdriver):
    name = states()["vmpower.running"]("no-such-vm")
    assert name["result"] is False
    assert name["comment"] == "No domain on this host matches the name or UUID 'no-such-vm'"
    for test in (False, True):
        glob = states(test=test)["vmpower.stopped"]("no-such-*")
        assert (glob["result"], glob["changes"]) == (False, {})
        assert glob["comment"] == "No domain on this host matches the glob 'no-such-*'"


def _pillar(name, **policy):
    return {"vmpower": {"instances": {name: policy}}}


def _lock_in_record(load_minion, dom, task_state):
    """A task_state in the record with no owner (set by hand, or by an older vmpower)."""
    minion = load_minion(TEST_URI, stop_timeout=0)
    minion.functions["vmpower.sync"]()
    with open_store(minion.store_path) as store:
        record = store.get(dom.UUIDString())
        assert store.commit([Change(record, record.updated(time.time(), task_state=task_state),
                                    Cause.API, "lock", "locked by the test")], time.time()) == []


REFUSALS = [
    # (state, domain running?, pillar policy, what the comment says)
    ("vmpower.stopped", True, {"vm_state": "active"}, "pillar pins vm_state=active"),
    ("vmpower.running", False, {"vm_state": "stopped"}, "pillar pins vm_state=stopped"),
    ("vmpower.stopped", True, {"task_state": "maintenance"}, "has task_state=maintenance (pillar)"),
    ("vmpower.running", False, {"task_state": "maintenance"}, "has task_state=maintenance (pillar)"),
    ("vmpower.stopped", True, {"managed": False}, "is managed: false in pillar"),
    ("vmpower.running", False, {"managed": False}, "is managed: false in pillar"),
]


@pytest.mark.parametrize("state, running, policy, why", REFUSALS)
def test_test_mode_predicts_the_refusal_of_the_real_run(states, testdriver, state, running,
                                                        policy, why):
    dom = testdriver.define("db", start=running)
    pillar = _pillar(dom.name(), **policy)
    dry = states(test=True, pillar=pillar)[state](dom.name())
    real = states(pillar=pillar)[state](dom.name())
    assert bool(dom.isActive()) is running  # neither run touched it
    for ret in (dry, real):
        assert (ret["result"], ret["changes"]) == (False, {}), ret
        assert why in ret["comment"], ret["comment"]
    assert dry["comment"].startswith(f"{dom.name()} would not be made ")


@pytest.mark.parametrize("state, running", [("vmpower.stopped", True), ("vmpower.running", False)])
def test_test_mode_predicts_a_task_state_in_the_record(states, testdriver, load_minion, state,
                                                       running):
    dom = testdriver.define("db", start=running)
    _lock_in_record(load_minion, dom, "rebuilding")
    dry = states(test=True)[state](dom.name())
    real = states()[state](dom.name())
    for ret in (dry, real):
        assert ret["result"] is False and "has task_state=rebuilding" in ret["comment"], ret
    assert bool(dom.isActive()) is running


def test_a_refused_match_fails_the_state_and_the_others_converge(states, testdriver):
    free, pinned = testdriver.define("web-free", start=False), testdriver.define("web-pinned", start=False)
    pillar = _pillar(pinned.name(), vm_state="stopped")
    pattern = testdriver.prefix + "web-*"
    dry = states(test=True, pillar=pillar)["vmpower.running"](pattern)
    assert dry["result"] is False and set(dry["changes"]) == {free.name()}
    assert f"{pinned.name()} would not be made running" in dry["comment"]
    real = states(pillar=pillar)["vmpower.running"](pattern)
    assert real["result"] is False and set(real["changes"]) == {free.name()}
    assert free.isActive() and not pinned.isActive()


@pytest.mark.parametrize("state, running, kwargs", [("vmpower.running", False, {}),
                                                   ("vmpower.stopped", True, {"force": True})])
def test_changes_have_the_same_shape_in_test_mode_and_a_real_run(states, testdriver, state,
                                                                 running, kwargs):
    dom = testdriver.define("vm", start=running)
    dry = states(test=True)[state](dom.name(), **kwargs)
    real = states()[state](dom.name(), **kwargs)
    assert dry["result"] is None and real["result"] is True, (dry, real)
    assert dry["changes"] == real["changes"]  # the prediction is what the run did
    change = real["changes"][dom.name()]
    assert set(change) == {"old", "new"} and set(change["new"]) == {"vm_state", "power_state"}


def test_every_state_has_an_example_in_its_docstring(states):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "_states" / "vmpower.py"
    spec = importlib.util.spec_from_file_location("vmpower_states_doc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for function in (module.running, module.stopped):
        assert ".. code-block:: yaml" in function.__doc__ and f"vmpower.{function.__name__}:" in function.__doc__


def test_bad_arguments_and_pins_fail_clearly(states, testdriver):
    dom = testdriver.define("db")
    assert "timeout must be a number" in states()["vmpower.stopped"](dom.name(), timeout="x")["comment"]
    pinned = states(pillar={"vmpower": {"instances": {dom.name(): {"vm_state": "active"}}}})
    ret = pinned["vmpower.stopped"](dom.name())
    assert ret["result"] is False and "pillar pins vm_state=active" in ret["comment"]
    assert dom.isActive()
