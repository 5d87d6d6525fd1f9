"""The master link's resyncs (vmpower.core.reconnect): one per return of the master, spaced,
asked again until a sync answers, and given up after the retries."""

from vmpower.core.reconnect import Reconnect


def fired(resyncs, times):
    return [t for t in times if resyncs.due(t)]


def test_nothing_is_due_until_the_master_comes_back():
    resyncs = Reconnect()
    assert fired(resyncs, [0, 100, 1000]) == []


def test_a_return_is_announced_at_once_and_once():
    resyncs = Reconnect()
    resyncs.back()
    assert fired(resyncs, [5.0, 5.1, 6.0]) == [5.0]


def test_an_answered_resync_is_not_asked_again():
    resyncs = Reconnect(answer_wait=15)
    resyncs.back()
    assert resyncs.due(10.0)
    resyncs.answered(11.0)
    assert fired(resyncs, [25.0, 100.0, 1000.0]) == []


def test_a_sync_that_began_before_the_resync_does_not_answer_it():
    resyncs = Reconnect(answer_wait=15)
    resyncs.back()
    assert resyncs.due(10.0)
    resyncs.answered(9.0)
    assert fired(resyncs, [24.9, 25.0]) == [25.0]


def test_an_unanswered_resync_is_asked_again_with_doubling_waits_then_given_up():
    resyncs = Reconnect(answer_wait=15, retries=3)
    resyncs.back()
    times = [0.0] + [float(t) for t in range(1, 400)]
    assert fired(resyncs, times) == [0.0, 15.0, 45.0, 105.0]
    assert resyncs.given_up == 1
    resyncs.answered(500.0)  # too late to matter: nothing is outstanding
    assert fired(resyncs, [1000.0]) == []


def test_a_sync_between_two_retries_answers_the_first_ask():
    resyncs = Reconnect(answer_wait=15)
    resyncs.back()
    assert fired(resyncs, [0.0, 15.0]) == [0.0, 15.0]
    resyncs.answered(5.0)  # began after the first ask, finished after the retry
    assert fired(resyncs, [45.0, 200.0]) == []


def test_a_flapping_link_costs_one_return_per_spacing():
    resyncs = Reconnect(spacing=10, answer_wait=1000)
    announced = []
    for second in range(30):
        resyncs.back()
        if resyncs.due(float(second)):
            announced.append(second)
    assert announced == [0, 10, 20]


def test_a_new_return_starts_the_retries_afresh():
    resyncs = Reconnect(spacing=10, answer_wait=15, retries=1)
    resyncs.back()
    assert fired(resyncs, [0.0, 15.0]) == [0.0, 15.0]
    resyncs.back()
    assert fired(resyncs, [20.0, 34.0, 35.0]) == [20.0, 35.0]
