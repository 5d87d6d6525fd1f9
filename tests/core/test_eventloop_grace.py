"""The pure pieces of the event path: the STOPPED grace and the storm guard, on a hand-moved
monotonic clock, cell by cell."""

import pytest

from vmpower.core.burst import BurstGuard
from vmpower.core.grace import StopGrace
from vmpower.core.model import Transition

T = Transition


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_everything_but_stopped_goes_through_at_once(clock):
    grace = StopGrace(15, clock)
    for transition in (T.STARTED, T.PAUSED, T.RESUMED, T.SUSPENDED, T.CRASHED):
        assert grace.offer("a", transition, transition.value) == [transition.value]
    assert len(grace) == 0 and grace.next_due() is None


@pytest.mark.parametrize("seconds", [0, 15])
def test_offering_into_one_list_gives_what_offering_one_by_one_gives(seconds):
    stream = [("a", T.STOPPED, 100.0), ("b", T.STOPPED, 101.0), ("a", T.STARTED, 105.0),
              ("c", T.PAUSED, 116.0), ("b", T.RESUMED, 117.0), ("c", T.STOPPED, 118.0),
              ("c", T.STOPPED, 140.0)]
    one_by_one, into = StopGrace(seconds, Clock()), StopGrace(seconds, Clock())
    expected, out = [], []
    for i, (uuid, transition, at) in enumerate(stream):
        expected.extend(one_by_one.offer(uuid, transition, i, at))
        into.offer_into(out, uuid, transition, i, at)
        assert (out, list(into)) == (expected, list(one_by_one))
    assert out == ([0, 1, 2, 3, 4, 5, 6] if seconds == 0 else [2, 1, 3, 4, 5])


def test_a_stopped_is_held_for_its_grace_and_then_due(clock):
    grace = StopGrace(15, clock)
    assert grace.offer("a", T.STOPPED, "stop a") == []
    assert len(grace) == 1 and grace.next_due() == 115.0
    clock.now = 114.999
    assert grace.due() == []
    clock.now = 115.0
    assert grace.due() == ["stop a"]
    assert grace.due() == [] and len(grace) == 0


def test_any_later_event_of_the_domain_cancels_its_stop(clock):
    grace = StopGrace(15, clock)
    grace.offer("a", T.STOPPED, "stop a")
    clock.now += 0.3
    assert grace.offer("a", T.STARTED, "start a") == ["start a"]  # a hard reboot: only the start
    clock.now += 60
    assert grace.due() == [] and len(grace) == 0


def test_another_domains_event_cancels_nothing(clock):
    grace = StopGrace(15, clock)
    grace.offer("a", T.STOPPED, "stop a")
    assert grace.offer("b", T.STARTED, "start b") == ["start b"]
    assert len(grace) == 1


def test_stops_fall_due_in_the_order_they_happened(clock):
    grace = StopGrace(10, clock)
    grace.offer("a", T.STOPPED, "stop a")
    clock.now += 1
    grace.offer("b", T.STOPPED, "stop b")
    clock.now += 20
    assert grace.due() == ["stop a", "stop b"]


def test_a_stop_whose_grace_ended_before_the_next_event_comes_first(clock):
    grace = StopGrace(10, clock)
    grace.offer("a", T.STOPPED, "stop a", at=100)
    # The next event happened at 111, after the grace: the stop is fired before it.
    assert grace.offer("a", T.STARTED, "start a", at=111) == ["stop a", "start a"]


def test_a_second_stop_of_the_same_domain_restarts_its_grace(clock):
    grace = StopGrace(10, clock)
    grace.offer("a", T.STOPPED, "first")
    clock.now += 5
    grace.offer("a", T.STOPPED, "second")
    clock.now += 6
    assert grace.due() == []
    clock.now += 4
    assert grace.due() == ["second"]


def test_no_grace_means_no_holding(clock):
    grace = StopGrace(0, clock)
    assert grace.offer("a", T.STOPPED, "stop a") == ["stop a"]


def test_drop_forgets_what_is_held_and_change_applies_to_new_stops(clock):
    grace = StopGrace(10, clock)
    grace.offer("a", T.STOPPED, "stop a")
    assert grace.drop() == ["stop a"] and len(grace) == 0
    grace.change(2)
    grace.offer("b", T.STOPPED, "stop b")
    assert grace.next_due() == 102.0


def test_a_negative_grace_is_refused(clock):
    with pytest.raises(ValueError, match="stop_grace must be at least 0"):
        StopGrace(-1, clock)


# The storm guard.
def test_up_to_the_limit_per_second_every_event_is_fired():
    guard = BurstGuard(3)
    # (binary fractions, so that the window's edges are exact)
    assert [guard.admit(t) for t in (0.0, 0.125, 0.25)] == [True] * 3
    assert [guard.admit(t) for t in (1.0625, 1.125, 1.25)] == [True] * 3  # a new second
    assert not guard.in_burst and guard.next_due() is None


def test_one_more_than_the_limit_starts_a_burst_that_swallows_the_rest():
    guard = BurstGuard(3)
    assert [guard.admit(t) for t in (0.0, 0.1, 0.2, 0.3, 0.4)] == [True, True, True, False, False]
    assert guard.in_burst and guard.swallowed == 2
    assert guard.next_due() == 1.4  # a quiet second after the last event


def test_the_burst_ends_after_a_quiet_second_with_the_count_of_what_it_swallowed():
    guard = BurstGuard(2)
    for t in (0.0, 0.125, 0.25, 0.375, 0.875):
        guard.admit(t)
    assert guard.due(1.75) is None  # 0.875 s since the last event
    assert guard.due(1.875) == 3
    assert not guard.in_burst and guard.bursts == 1
    assert guard.admit(2.0)  # counting starts anew


def test_a_storm_that_never_calms_down_is_answered_every_longest_seconds():
    guard = BurstGuard(1, quiet=1.0, longest=30.0)
    t, answers = 0.0, []
    while t < 65:
        guard.admit(t)
        swallowed = guard.due(t)
        if swallowed is not None:
            answers.append(t)
        t += 0.1
    assert len(answers) == 2  # at ~30 s and ~60 s: bounded, however long the storm


def test_limit_zero_turns_the_guard_off():
    guard = BurstGuard(0)
    assert all(guard.admit(t / 1000) for t in range(1000))
    assert guard.due(5.0) is None
