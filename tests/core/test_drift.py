"""When a record began to disagree with its power state (``Record.drift_since``): set by the
one place a record changes, for metrics and reports; no rule reads it."""

from hypothesis import given
from hypothesis import strategies as st

from vmpower.core.model import PowerState, Record, VmState, drifting
from vmpower.core.rules import adopt
from vmpower.core.settings import InstancePolicy

from .test_rules import live

RUNNING = Record("u1", "web1", "hv1", VmState.ACTIVE, PowerState.RUNNING, version=1)


def test_a_record_that_begins_to_disagree_drifts_from_that_write():
    off = RUNNING.updated(100.0, power_state=PowerState.SHUTDOWN)
    assert off.drift_since == 100.0


def test_a_drift_goes_on_from_when_it_began_through_later_writes():
    off = RUNNING.updated(100.0, power_state=PowerState.SHUTDOWN)
    locked = off.updated(160.0, task_state="powering-on")
    assert locked.drift_since == 100.0
    crashed = locked.updated(170.0, power_state=PowerState.CRASHED)
    assert crashed.drift_since == 100.0


def test_a_record_that_agrees_again_no_longer_drifts():
    off = RUNNING.updated(100.0, power_state=PowerState.SHUTDOWN)
    assert off.updated(130.0, vm_state=VmState.STOPPED).drift_since == 0.0
    assert off.updated(130.0, power_state=PowerState.RUNNING).drift_since == 0.0


def test_a_drift_read_without_its_start_begins_at_the_next_write():
    # A store written before drift_since existed has 0.0 for a record that already drifted.
    old = RUNNING._replace(power_state=PowerState.SHUTDOWN)
    assert old.updated(200.0, task_state="").drift_since == 200.0


def test_a_vm_state_that_expects_nothing_never_drifts():
    assert not drifting(VmState.ERROR, PowerState.RUNNING)
    assert not drifting("building", "shutdown")
    assert drifting("active", "paused") and not drifting(VmState.PAUSED, PowerState.PAUSED)


def test_a_domain_first_seen_against_its_pinned_state_drifts_from_its_adoption():
    record = adopt("u2", "db1", "hv1", live(PowerState.SHUTDOWN, "shutdown"),
                   InstancePolicy(vm_state=VmState.ACTIVE), at=50.0)
    assert (record.vm_state, record.drift_since) == (VmState.ACTIVE, 50.0)
    adopted = adopt("u3", "db2", "hv1", live(PowerState.SHUTDOWN, "shutdown"),
                    InstancePolicy(), at=50.0)
    assert (adopted.vm_state, adopted.drift_since) == (VmState.STOPPED, 0.0)


@given(st.lists(st.tuples(st.sampled_from(list(VmState)), st.sampled_from(list(PowerState))),
                max_size=12))
def test_drift_since_is_when_the_current_disagreement_began(states):
    record, began = RUNNING, 0.0
    for at, (vm_state, power_state) in enumerate(states, start=1):
        was = drifting(record.vm_state, record.power_state)
        record = record.updated(float(at), vm_state=vm_state, power_state=power_state)
        now = drifting(vm_state, power_state)
        began = (began if was else float(at)) if now else 0.0
        assert record.drift_since == began
