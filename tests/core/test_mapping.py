"""libvirt's numbers to vmpower's words, checked against the real libvirt bindings."""

import itertools

import libvirt
import pytest

from vmpower.core.mapping import (
    DOMAIN_STATES,
    EXPECTED_POWER,
    LIFECYCLE_EVENTS,
    TRANSLATIONS,
    LifecycleTranslator,
    is_stale,
    live_state,
    translate_lifecycle,
    translate_reboot,
)
from vmpower.core.model import LiveState
from vmpower.core.model import PowerState as P
from vmpower.core.model import Transition as T

EVERY_EVENT = [(event, detail) for event, (_, _, details) in LIFECYCLE_EVENTS.items()
               for detail in details]


@pytest.mark.parametrize("event,detail", EVERY_EVENT)
def test_every_lifecycle_number_matches_the_bindings(event, detail):
    name, _, details = LIFECYCLE_EVENTS[event]
    assert getattr(libvirt, f"VIR_DOMAIN_EVENT_{name}") == event
    assert getattr(libvirt, f"VIR_DOMAIN_EVENT_{name}_{details[detail][0]}") == detail


def test_every_lifecycle_detail_libvirt_has_is_mapped():
    for name, _, details in LIFECYCLE_EVENTS.values():
        prefix = f"VIR_DOMAIN_EVENT_{name}_"
        known = {getattr(libvirt, attr) for attr in dir(libvirt) if attr.startswith(prefix)}
        assert known <= set(details), f"{name}: unmapped details {known - set(details)}"


@pytest.mark.parametrize("state", DOMAIN_STATES)
def test_domain_states_match_the_bindings(state):
    names = {1: "RUNNING", 2: "BLOCKED", 3: "PAUSED", 4: "SHUTDOWN", 5: "SHUTOFF", 6: "CRASHED",
             7: "PMSUSPENDED", 0: "NOSTATE"}
    assert getattr(libvirt, f"VIR_DOMAIN_{names[state]}") == state


@pytest.mark.parametrize("event,detail,transition,reason", [
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED, T.STARTED, "booted"),
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED, T.STARTED, "migrated"),
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED, T.STARTED, "restored"),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, T.STOPPED, "guest_shutdown"),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, T.STOPPED, "destroyed"),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, T.STOPPED, "crashed"),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED, T.STOPPED, "failed"),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, T.STOPPED, "migrated"),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED, T.STOPPED, "saved"),
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED, T.PAUSED, "paused"),
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR, T.PAUSED, "ioerror"),
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED, T.RESUMED, "unpaused"),
    (libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED, libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY, T.SUSPENDED, "memory"),
    (libvirt.VIR_DOMAIN_EVENT_CRASHED, libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED, T.CRASHED, "panicked"),
])
def test_lifecycle_translation(event, detail, transition, reason):
    result = translate_lifecycle(event, detail)
    assert (result.transition, result.reason) == (transition, reason)


@pytest.mark.parametrize("event", [libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
                                   libvirt.VIR_DOMAIN_EVENT_SHUTDOWN])
def test_events_that_change_no_power_state_are_not_transitions(event):
    assert translate_lifecycle(event, 0).transition is None


def test_unknown_numbers_come_through_named_not_failing():
    result = translate_lifecycle(99, 7)
    assert (result.transition, result.libvirt_event, result.libvirt_detail) == (None, "UNKNOWN_99", "UNKNOWN_7")
    assert translate_lifecycle(libvirt.VIR_DOMAIN_EVENT_STOPPED, 42).transition is T.STOPPED
    assert live_state(42, 0) == LiveState(P.NOSTATE, "unknown")


def test_a_host_requested_shutdown_is_told_from_the_guests_own():
    translator = LifecycleTranslator()
    shutdown, stopped = libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_STOPPED
    assert translator.lifecycle("a", shutdown, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_HOST).transition is None
    translator.lifecycle("b", shutdown, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST)
    assert translator.lifecycle("a", stopped, 0).reason == "host_shutdown"
    assert translator.lifecycle("b", stopped, 0).reason == "guest_shutdown"
    # The remembered detail is used once: the next shutdown of "a" starts afresh.
    assert translator.lifecycle("a", stopped, 0).reason == "guest_shutdown"


def test_an_event_between_shutdown_and_stopped_does_not_lose_who_asked():
    translator = LifecycleTranslator()
    translator.lifecycle("a", libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_HOST)
    translator.lifecycle("a", libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_UPDATED)
    assert translator.lifecycle("a", libvirt.VIR_DOMAIN_EVENT_STOPPED, 0).reason == "host_shutdown"


def test_a_new_start_voids_an_old_shutdown_announcement():
    translator = LifecycleTranslator()
    translator.lifecycle("a", libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_HOST)
    translator.lifecycle("a", libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED)
    assert translator.lifecycle("a", libvirt.VIR_DOMAIN_EVENT_STOPPED, 0).reason == "guest_shutdown"


def test_the_memo_holds_every_mapped_pair_translated_as_without_it():
    assert set(TRANSLATIONS) == set(EVERY_EVENT)
    for (event, detail), memo in TRANSLATIONS.items():
        assert memo == translate_lifecycle(event, detail)


@pytest.mark.parametrize("event,detail", EVERY_EVENT + [(99, 7), (libvirt.VIR_DOMAIN_EVENT_STOPPED, 42)])
@pytest.mark.parametrize("announced", [None, *LIFECYCLE_EVENTS[libvirt.VIR_DOMAIN_EVENT_SHUTDOWN][2]])
def test_the_translator_gives_what_the_unmemoised_mapping_gives(event, detail, announced):
    translator = LifecycleTranslator()
    if announced is not None:
        translator.lifecycle("a", libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, announced)
    shutdown_detail = announced if event == libvirt.VIR_DOMAIN_EVENT_STOPPED else None
    assert translator.lifecycle("a", event, detail) == translate_lifecycle(event, detail, shutdown_detail)
    assert set(TRANSLATIONS) == set(EVERY_EVENT)  # what libvirt may add later is not kept


def test_reboot():
    result = translate_reboot()
    assert (result.transition, result.reason, result.libvirt_event) == (T.STARTED, "rebooted", "REBOOT")


@pytest.mark.parametrize("state,reason,power,words", [
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED, P.RUNNING, "booted"),
    (libvirt.VIR_DOMAIN_BLOCKED, 0, P.RUNNING, "blocked"),
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, P.PAUSED, "user"),
    (libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTDOWN_USER, P.SHUTDOWN, "user"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, P.SHUTDOWN, "shutdown"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, P.SHUTDOWN, "crashed"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, P.SHUTDOWN, "destroyed"),
    (libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_CRASHED_PANICKED, P.CRASHED, "panicked"),
    (libvirt.VIR_DOMAIN_PMSUSPENDED, 0, P.SUSPENDED, "unknown"),
    (libvirt.VIR_DOMAIN_NOSTATE, 0, P.NOSTATE, "unknown"),
])
def test_domain_state_to_power_state(state, reason, power, words):
    assert live_state(state, reason) == LiveState(power, words)


def test_every_shutoff_reason_libvirt_has_is_named():
    reasons = {getattr(libvirt, a) for a in dir(libvirt)
               if a.startswith("VIR_DOMAIN_SHUTOFF_") and a != "VIR_DOMAIN_SHUTOFF_LAST"}
    assert reasons <= set(DOMAIN_STATES[libvirt.VIR_DOMAIN_SHUTOFF][1])


@pytest.mark.parametrize("transition,power", list(itertools.product(T, P)))
def test_an_event_is_stale_when_the_domain_has_moved_on(transition, power):
    assert is_stale(transition, LiveState(power)) is (power not in EXPECTED_POWER[transition])


def test_stopped_is_stale_once_the_domain_runs_again():
    assert is_stale(T.STOPPED, LiveState(P.RUNNING))
    assert not is_stale(T.STOPPED, LiveState(P.SHUTDOWN))
    assert not is_stale(T.STARTED, LiveState(P.RUNNING))
