"""The host's pending wake-up (vmpower.core.wakeup): which one is kept when jobs ask, which a
sync answers, when the beacon fires it, and again while no sync answers."""

import math

import pytest

from vmpower.core.wakeup import Alarm, WakeUp, from_dict, keep

BOOT = "boot-1"
OTHER = "boot-0"


def fired(alarm, times, boot=BOOT):
    return [t for t in times if alarm.due(t, boot)]


class TestKeep:
    def test_the_first_ask_is_kept(self):
        assert keep(None, WakeUp(100, BOOT, 90), BOOT) == WakeUp(100, BOOT, 90)

    def test_nothing_asked_keeps_what_is_pending(self):
        assert keep(WakeUp(100, BOOT), None, BOOT) == WakeUp(100, BOOT)
        assert keep(None, None, BOOT) is None

    def test_the_earliest_is_kept(self):
        early, late = WakeUp(100, BOOT, 1), WakeUp(105, BOOT, 2)
        assert keep(early, late, BOOT) == early
        assert keep(late, early, BOOT) == early

    def test_an_equal_due_keeps_the_pending_one(self):
        assert keep(WakeUp(100, BOOT, 1), WakeUp(100, BOOT, 2), BOOT) == WakeUp(100, BOOT, 1)

    def test_one_of_another_boot_is_due_at_once_and_comes_first(self):
        old = WakeUp(10**6, OTHER)
        assert keep(old, WakeUp(5, BOOT), BOOT) == old

    def test_a_sync_that_began_at_or_after_the_due_time_answers_it(self):
        assert keep(WakeUp(100, BOOT), None, BOOT, answered_before=100) is None
        assert keep(WakeUp(100, BOOT), None, BOOT, answered_before=130) is None
        assert keep(WakeUp(100, BOOT), WakeUp(140, BOOT), BOOT, answered_before=130) == \
            WakeUp(140, BOOT)

    def test_a_sync_that_began_before_the_due_time_answers_nothing(self):
        pending = WakeUp(100, BOOT)
        assert keep(pending, None, BOOT, answered_before=99.9) == pending
        assert keep(pending, WakeUp(140, BOOT), BOOT, answered_before=99.9) == pending

    def test_any_sync_of_this_boot_answers_one_of_another_boot(self):
        assert keep(WakeUp(10**6, OTHER), WakeUp(5, BOOT), BOOT, answered_before=1) == WakeUp(5, BOOT)


class TestFromDict:
    def test_round_trip(self):
        wake = WakeUp(12.5, BOOT, 3.0)
        assert from_dict(wake.as_dict()) == wake

    @pytest.mark.parametrize("data", [
        None, [], "x", {}, {"at": 1800000000.0},  # what the scheduler-based wake-up wrote
        {"due": 1.0}, {"due": 1.0, "boot_id": ""}, {"due": "1", "boot_id": BOOT},
        {"due": True, "boot_id": BOOT}, {"due": math.nan, "boot_id": BOOT},
        {"due": math.inf, "boot_id": BOOT}, {"due": 1.0, "boot_id": BOOT, "asked": "x"},
        {"due": 1.0, "boot_id": 7},
    ])
    def test_anything_else_asks_for_nothing(self, data):
        assert from_dict(data) is None


class TestAlarm:
    def test_nothing_pending_nothing_fired(self):
        assert fired(Alarm(), [0, 100, 1e6]) == []

    def test_fired_once_when_due(self):
        alarm = Alarm(answer_wait=15)
        alarm.seen(WakeUp(100, BOOT))
        assert fired(alarm, [99, 99.9, 100, 100.5, 101, 110]) == [100]
        assert alarm.fired == 1

    def test_one_of_another_boot_fires_at_once(self):
        alarm = Alarm()
        alarm.seen(WakeUp(10**6, OTHER))
        assert fired(alarm, [0.5, 1.0]) == [0.5]

    def test_unanswered_it_fires_again_with_doubling_waits_then_gives_up(self):
        alarm = Alarm(answer_wait=15, retries=3)
        alarm.seen(WakeUp(0, BOOT))
        assert fired(alarm, [float(t) for t in range(400)]) == [0.0, 15.0, 45.0, 105.0]
        assert (alarm.fired, alarm.given_up) == (4, 1)
        assert fired(alarm, [1000.0, 10**5]) == []

    def test_a_sync_answering_it_stops_it(self):
        alarm = Alarm(answer_wait=15)
        alarm.seen(WakeUp(0, BOOT))
        assert fired(alarm, [0.0]) == [0.0]
        alarm.seen(None)  # the sync took it out of the file
        assert fired(alarm, [15.0, 100.0]) == []

    def test_the_same_wake_up_seen_again_is_not_fired_again(self):
        alarm = Alarm(answer_wait=15)
        alarm.seen(WakeUp(0, BOOT, 1))
        assert fired(alarm, [0.0]) == [0.0]
        alarm.seen(WakeUp(0, BOOT, 1))
        assert fired(alarm, [1.0, 14.9]) == []

    def test_a_new_wake_up_is_fired_when_due_even_after_one_was_given_up(self):
        alarm = Alarm(answer_wait=1, retries=0)
        alarm.seen(WakeUp(0, BOOT, 0))
        assert fired(alarm, [0.0, 1.0, 2.0]) == [0.0]
        assert alarm.given_up == 1
        alarm.seen(WakeUp(50, BOOT, 30))  # the sync it asked for came and asked again
        assert fired(alarm, [49.0, 50.0, 50.5]) == [50.0]
