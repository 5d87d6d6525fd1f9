"""The decision table, cell by cell: every vm_state x power_state, locks, hosts and pillar.

The table's answers are those for a VM known off for at least ``stop_grace`` (a non-stale
``stopped`` event says so); what a sync that sees the VM off for the first time does (it
waits) is tested cell by cell too. The rules for a fleet's everyday operations (migration, host
shutdown, <on_crash>, interrupted operations, renames) are in test_rules_fleet.py.
"""

import dataclasses
import itertools

import pytest

from vmpower.core.model import OFF as OFF_STATES
from vmpower.core.model import LiveState, Record, Transition
from vmpower.core.model import PowerState as P
from vmpower.core.model import VmState as V
from vmpower.core.rules import (
    RESTART_RESET_AFTER,
    Action,
    Facts,
    adopt,
    decide,
    refuse_power,
    reset,
)
from vmpower.core.settings import InstancePolicy, OnCrash, OnGuestShutdown, Settings, parse_instance

HOST = "minion-a"
NOW = 1_000_000.0
SETTINGS = Settings()
DEFAULT = InstancePolicy()
BOOT = "boot-1"
CLOCK = 5_000.0  # the host's monotonic clock now
# The facts a sync has read (libvirt's default <on_crash>, no migration, this boot).
SYNC = Facts(clock=CLOCK, boot_id=BOOT, on_crash="destroy", migrating=False)
# ... and those of a reconcile for a non-stale stopped event that this host's beacon observed
# (journaled) stop_grace ago: off for stop_grace.
KNOWN_OFF = dataclasses.replace(SYNC, event=Transition.STOPPED, event_at=CLOCK - SETTINGS.stop_grace)
# Keys of ``observed`` that keep the off spell's books, tested in test_rules_fleet.py.
BOOKKEEPING = {"off_since", "boot_id", "off_reason"}

# The spec's rules 4-8 restated as data: (vm_state, live power) -> (action, vm_state after,
# warning). Cells not listed do nothing.
OFF = Action.POWER_OFF
EXPECTED = {
    (V.ACTIVE, P.SHUTDOWN): (OFF, V.STOPPED, False),
    (V.ACTIVE, P.CRASHED): (OFF, V.STOPPED, False),
    (V.ACTIVE, P.SUSPENDED): (OFF, V.STOPPED, False),
    (V.ACTIVE, P.PAUSED): (Action.NONE, None, True),
    (V.ACTIVE, P.NOSTATE): (Action.NONE, None, True),
    (V.STOPPED, P.RUNNING): (OFF, None, False),
    (V.STOPPED, P.PAUSED): (OFF, None, False),
    (V.STOPPED, P.SUSPENDED): (OFF, None, False),
    (V.PAUSED, P.SHUTDOWN): (OFF, V.STOPPED, False),
    (V.PAUSED, P.CRASHED): (OFF, V.STOPPED, False),
    (V.DELETED, P.RUNNING): (Action.NONE, None, True),
    (V.DELETED, P.PAUSED): (Action.NONE, None, True),
    (V.DELETED, P.SUSPENDED): (Action.NONE, None, True),
    (V.DELETED, P.CRASHED): (Action.NONE, None, True),
}
REASON_FOR = {P.SHUTDOWN: "shutdown", P.CRASHED: "unknown"}
CELLS = list(itertools.product(V, P, P))  # vm_state, recorded power, live power


def record(vm_state=V.ACTIVE, power=P.RUNNING, **kw):
    fields = {"uuid": "u-1", "name": "vm1", "host": HOST, "vm_state": vm_state, "power_state": power,
                  "version": 3, "boot_id": BOOT}
    fields.update(kw)
    return Record(**fields)


def live(power, reason=None):
    return LiveState(power, reason or REASON_FOR.get(power, "unknown"))


def event_facts(power):
    """The facts of a reconcile for the (non-stale) event that brought the domain there, as
    this host's beacon observed it stop_grace ago."""
    if power not in OFF_STATES:
        return SYNC
    return KNOWN_OFF


def changes(decision):
    """``observed`` without the off spell's bookkeeping."""
    return {k: v for k, v in decision.observed.items() if k not in BOOKKEEPING}


def nothing(decision):
    return decision.action is Action.NONE and not decision.observed and not decision.outcome


@pytest.mark.parametrize("vm_state,recorded,power", CELLS)
def test_every_vm_state_and_power_state_pair(vm_state, recorded, power):
    decision = decide(record(vm_state, recorded), live(power), HOST, DEFAULT, SETTINGS, NOW,
                      facts=event_facts(power))
    action, vm_after, warning = EXPECTED.get((vm_state, power), (Action.NONE, None, False))
    assert decision.action is action, decision.reason
    assert decision.outcome.get("vm_state") is vm_after
    assert decision.warning is warning
    assert not decision.skipped and decision.retry_in is None
    # Rule 3: the truth is written whenever it differs, and only then.
    assert changes(decision) == ({"power_state": power} if power is not recorded else {})
    # Rule 5 re-reads before stopping a VM that is meant to run.
    assert decision.recheck is (vm_state is V.ACTIVE and power in (P.SHUTDOWN, P.CRASHED))
    assert decision.reason and decision.rule  # every answer names the rule that gave it


# Cells whose answer acts on (or records the end of) a VM that went off: held by the grace.
HELD = {(V.ACTIVE, P.SHUTDOWN), (V.ACTIVE, P.CRASHED), (V.PAUSED, P.SHUTDOWN),
        (V.PAUSED, P.CRASHED)}


@pytest.mark.parametrize("vm_state,recorded,power", CELLS)
def test_every_cell_as_a_sync_first_sees_it(vm_state, recorded, power):
    """No event: a VM that went off since the record was written has been off for no time
    known, so every decision that would act on it waits for stop_grace."""
    went_off = power in OFF_STATES and recorded not in OFF_STATES
    decision = decide(record(vm_state, recorded), live(power), HOST, DEFAULT, SETTINGS, NOW,
                      facts=SYNC)
    assert decision.rule
    assert changes(decision) == ({"power_state": power} if power is not recorded else {})
    if went_off and (vm_state, power) in HELD:
        assert nothing(dataclasses.replace(decision, observed={}))
        assert decision.retry_in == SETTINGS.stop_grace and "waiting 15s more" in decision.reason
        assert decision.observed["off_since"] == CLOCK  # first seen off now, on this clock
    else:
        action, vm_after, _warning = EXPECTED.get((vm_state, power), (Action.NONE, None, False))
        if (vm_state, power) in HELD:  # recorded off already, but since when is not known
            action, vm_after = Action.NONE, None
        assert decision.action is action and decision.outcome.get("vm_state") is vm_after


@pytest.mark.parametrize("vm_state,power", sorted(HELD))
@pytest.mark.parametrize("off_for", [0.0, 14.0, 15.0, 600.0])
def test_a_vm_known_off_for_stop_grace_is_acted_on(vm_state, power, off_for):
    rec = record(vm_state, power, off_since=CLOCK - off_for)
    decision = decide(rec, live(power), HOST, DEFAULT, SETTINGS, NOW, facts=SYNC)
    if off_for >= SETTINGS.stop_grace:
        assert decision.action is Action.POWER_OFF and decision.retry_in is None
    else:
        assert nothing(decision) and decision.retry_in == SETTINGS.stop_grace - off_for


@pytest.mark.parametrize("vm_state,recorded,power", CELLS)
@pytest.mark.parametrize("where", ["record", "pillar"])
def test_task_state_means_nothing_at_all(vm_state, recorded, power, where):
    rec = record(vm_state, recorded, task_state="maintenance" if where == "record" else "")
    policy = InstancePolicy(task_state="maintenance" if where == "pillar" else "")
    decision = decide(rec, live(power), HOST, policy, SETTINGS, NOW)
    assert decision.skipped and decision.action is Action.NONE
    assert not decision.observed and not decision.outcome
    assert f"task_state=maintenance ({where})" in decision.reason


@pytest.mark.parametrize("vm_state,recorded,power", CELLS)
def test_a_vm_recorded_on_another_host_is_left_alone(vm_state, recorded, power):
    decision = decide(record(vm_state, recorded, host="minion-b"), live(power), HOST, DEFAULT,
                      SETTINGS, NOW, facts=event_facts(power))
    if power in (P.RUNNING, P.PAUSED) and recorded is not P.RUNNING:
        # Ownership follows the live domain: its recorded owner does not run it.
        moved = "migrated from minion-b" if power is P.RUNNING else "moved from minion-b"
        assert decision.observed["host"] == HOST and moved in decision.reason
        assert not decision.skipped
    else:
        assert decision.skipped and nothing(decision)
        assert "minion-b" in decision.reason


@pytest.mark.parametrize("vm_state,power", list(itertools.product(V, P)))
def test_unmanaged_vms_are_recorded_but_never_acted_on(vm_state, power):
    policy = InstancePolicy(managed=False)
    decision = decide(record(vm_state, P.RUNNING), live(power), HOST, policy, SETTINGS, NOW)
    assert decision.action is Action.NONE and not decision.outcome
    assert changes(decision) == ({"power_state": power} if power is not P.RUNNING else {})
    assert "managed: false" in decision.reason


def test_bad_pillar_takes_the_vm_out_of_vmpowers_hands():
    decision = decide(record(V.STOPPED), live(P.RUNNING), HOST, DEFAULT, SETTINGS, NOW,
                      pillar_error="vmpower:instances:vm1:vm_state must be one of ...")
    assert decision.skipped and nothing(decision)
    assert "bad pillar" in decision.reason


# Values a newer vmpower on a shared store, or a hand edit, may leave in a record; this version
# knows none of them. (SQLite keeps text put in a number column as text.)
UNKNOWN_VALUES = [("vm_state", "hibernated"), ("power_state", "frozen"),
                  ("off_reason", "cosmic_ray"), ("restart_count", "many"),
                  ("off_since", "yesterday"), ("version", None)]


@pytest.mark.parametrize("field,value", UNKNOWN_VALUES)
@pytest.mark.parametrize("power", list(P))
def test_an_unknown_stored_value_takes_the_vm_out_of_vmpowers_hands(field, value, power):
    stored = record(V.STOPPED, P.SHUTDOWN).replace(**{field: value})
    for facts in (SYNC, event_facts(power)):
        decision = decide(stored, live(power), HOST, DEFAULT, SETTINGS, NOW, facts=facts)
        assert decision.skipped and nothing(decision), decision
        assert decision.warning  # logged, every time: a person must look
        assert f"{field}={value!r}" in decision.reason and "does not know" in decision.reason


@pytest.mark.parametrize("wanted", [V.ACTIVE, V.STOPPED])
@pytest.mark.parametrize("field,value", UNKNOWN_VALUES)
def test_stop_and_start_are_refused_on_a_record_with_an_unknown_value(field, value, wanted):
    refusal = refuse_power("vm1", record(**{field: value}), DEFAULT, None, wanted)
    assert refusal and f"{field}={value!r}" in refusal and "reset_state" in refusal


def test_reset_state_replaces_unknown_values_with_a_vm_state_the_operator_gives():
    stored = record(vm_state="hibernated", power_state="frozen", off_reason="cosmic_ray",
                    restart_count="many")
    without = reset(stored, live(P.RUNNING), DEFAULT)
    assert without.refused and "vm_state=" in without.reason and "hibernated" in without.reason
    answer = reset(stored, live(P.RUNNING), DEFAULT, V.ACTIVE)
    assert not answer.refused
    assert dict(answer.fields) == {"vm_state": V.ACTIVE, "power_state": P.RUNNING,
                                   "off_reason": "", "restart_count": 0, "last_restart_at": 0.0}
    fixed = stored.replace(**answer.fields)
    assert not decide(fixed, live(P.RUNNING), HOST, DEFAULT, SETTINGS, NOW, facts=SYNC).skipped
    # Only the value this version knows is kept; one it cannot set right is refused.
    assert reset(record(version="seven"), live(P.RUNNING), DEFAULT, V.ACTIVE).refused


def test_pillar_pin_overrides_and_rewrites_the_recorded_vm_state():
    policy = parse_instance("vm1", {"vm_state": "stopped"})
    decision = decide(record(V.ACTIVE), live(P.RUNNING), HOST, policy, SETTINGS, NOW)
    assert decision.observed == {"vm_state": V.STOPPED}
    assert decision.action is Action.POWER_OFF
    assert "pillar pins vm_state=stopped" in decision.reason


class TestGuestShutdownPolicies:
    def test_stop_is_the_default_and_says_why(self):
        decision = decide(record(), live(P.SHUTDOWN, "shutdown"), HOST, DEFAULT, SETTINGS, NOW,
                          facts=KNOWN_OFF)
        assert decision.action is Action.POWER_OFF
        assert decision.outcome == {"vm_state": V.STOPPED}
        assert "shut down" in decision.reason and "on_guest_shutdown=stop" in decision.reason

    def test_ignore_records_the_truth_and_nothing_else(self):
        policy = InstancePolicy(on_guest_shutdown=OnGuestShutdown.IGNORE)
        decision = decide(record(), live(P.SHUTDOWN), HOST, policy, SETTINGS, NOW, facts=KNOWN_OFF)
        assert decision.action is Action.NONE and not decision.outcome
        assert changes(decision) == {"power_state": P.SHUTDOWN}

    def test_restart_policy_starts_it_and_counts(self):
        policy = InstancePolicy(on_guest_shutdown=OnGuestShutdown.RESTART)
        decision = decide(record(), live(P.SHUTDOWN), HOST, policy, SETTINGS, NOW, facts=KNOWN_OFF)
        assert decision.action is Action.START
        # When, on this boot's monotonic clock: the back-off of the next restart runs on it.
        assert decision.attempted == {"restart_count": 1, "last_restart_at": CLOCK, "boot_id": BOOT}

    @pytest.mark.parametrize("power,reason", [(P.CRASHED, "panicked"), (P.SHUTDOWN, "crashed"),
                                              (P.SHUTDOWN, "failed")])
    def test_a_crash_follows_on_crash_not_on_guest_shutdown(self, power, reason):
        restart_on_shutdown = InstancePolicy(on_guest_shutdown=OnGuestShutdown.RESTART)
        decision = decide(record(), live(power, reason), HOST, restart_on_shutdown, SETTINGS, NOW,
                          facts=KNOWN_OFF)
        assert decision.action is Action.POWER_OFF and "on_crash=stop" in decision.reason
        restart_on_crash = InstancePolicy(on_crash=OnCrash.RESTART)
        decision = decide(record(), live(power, reason), HOST, restart_on_crash, SETTINGS, NOW,
                          facts=KNOWN_OFF)
        assert decision.action is Action.START and "crashed" in decision.reason


class TestPinnedActive:
    policy = parse_instance("vm1", {"vm_state": "active"})

    @pytest.mark.parametrize("power,reason", [(P.SHUTDOWN, "shutdown"), (P.SHUTDOWN, "crashed"),
                                              (P.CRASHED, "panicked")])
    def test_it_is_started_again_after_shutdown_or_crash(self, power, reason):
        decision = decide(record(), live(power, reason), HOST, self.policy, SETTINGS, NOW, facts=KNOWN_OFF)
        assert decision.action is Action.START and decision.recheck
        assert "pillar pins vm_state=active" in decision.reason

    def test_restarts_back_off_exponentially(self):
        settings = Settings(restart_backoff=10, restart_limit=5)
        # The second restart waits 10 s after the first, the third 20 s after the second.
        for restarts, delay in ((1, 10), (2, 20), (3, 40)):
            rec = record(power=P.SHUTDOWN, restart_count=restarts, last_restart_at=CLOCK - delay + 1)
            early = decide(rec, live(P.SHUTDOWN), HOST, self.policy, settings, NOW, facts=KNOWN_OFF)
            assert early.action is Action.NONE and "backs off" in early.reason
            assert early.retry_in == 1
            rec = rec.replace(last_restart_at=CLOCK - delay)
            due = decide(rec, live(P.SHUTDOWN), HOST, self.policy, settings, NOW, facts=KNOWN_OFF)
            assert due.action is Action.START
            assert due.attempted["restart_count"] == restarts + 1

    def test_the_limit_turns_it_to_error(self):
        settings = Settings(restart_limit=3)
        rec = record(power=P.SHUTDOWN, restart_count=3, last_restart_at=NOW - 10_000)
        decision = decide(rec, live(P.SHUTDOWN), HOST, self.policy, settings, NOW, facts=KNOWN_OFF)
        assert decision.action is Action.NONE and decision.warning
        assert decision.outcome == {"vm_state": V.ERROR}
        # ...and error is hands off from then on.
        errored = decide(rec.replace(vm_state=V.ERROR), live(P.SHUTDOWN), HOST, DEFAULT,
                         settings, NOW, facts=KNOWN_OFF)
        assert errored.action is Action.NONE and not errored.outcome

    def test_the_back_off_runs_on_the_monotonic_clock_not_the_wall_clock(self):
        """Restarted once; it goes off again and 11 s pass on the host's monotonic clock while
        the wall clock steps back an hour (NTP, a hand-set date): the 10 s back-off is over."""
        settings = Settings(restart_backoff=10, restart_limit=5)
        first = decide(record(power=P.SHUTDOWN), live(P.SHUTDOWN), HOST, self.policy, settings,
                       NOW, facts=KNOWN_OFF)
        assert first.action is Action.START
        restarted = record(power=P.SHUTDOWN, **first.attempted)
        later = dataclasses.replace(KNOWN_OFF, clock=CLOCK + 11)
        again = decide(restarted, live(P.SHUTDOWN), HOST, self.policy, settings, NOW - 3600 + 11,
                       facts=later)
        assert again.action is Action.START, again.reason
        assert again.attempted["restart_count"] == 2

    def test_a_wall_clock_last_restart_starts_the_back_off_again_from_now(self):
        """As an older vmpower wrote it: ahead of the monotonic clock, so it cannot be placed.
        Conservative but live: the restart waits one back-off from now, never for ever."""
        settings = Settings(restart_backoff=10, restart_limit=5)
        rec = record(power=P.SHUTDOWN, restart_count=2, last_restart_at=NOW - 5)
        decision = decide(rec, live(P.SHUTDOWN), HOST, self.policy, settings, NOW, facts=KNOWN_OFF)
        assert decision.action is Action.NONE and decision.retry_in == 20
        assert decision.observed["last_restart_at"] == CLOCK
        rebased = rec.replace(**decision.observed)
        later = dataclasses.replace(KNOWN_OFF, clock=CLOCK + 20)
        due = decide(rebased, live(P.SHUTDOWN), HOST, self.policy, settings, NOW, facts=later)
        assert due.action is Action.START and due.attempted["restart_count"] == 3

    def test_a_restart_of_another_boot_counts_from_when_this_boot_first_saw_it(self):
        """The host rebooted: the monotonic time of the last restart belongs to the boot before.
        The back-off and the count's reset both start again from the first look in this boot."""
        settings = Settings(restart_backoff=10, restart_limit=5)
        rec = record(restart_count=2, boot_id="boot-0", last_restart_at=CLOCK - 10 * RESTART_RESET_AFTER)
        seen = decide(rec, live(P.RUNNING), HOST, self.policy, settings, NOW, facts=SYNC)
        assert seen.observed == {"last_restart_at": CLOCK, "boot_id": BOOT}
        rec = rec.replace(**seen.observed)
        crashed = rec.replace(power_state=P.SHUTDOWN)
        soon = dataclasses.replace(KNOWN_OFF, clock=CLOCK + 5)
        decision = decide(crashed, live(P.SHUTDOWN), HOST, self.policy, settings, NOW, facts=soon)
        assert decision.action is Action.NONE and decision.retry_in == 15
        later = dataclasses.replace(SYNC, clock=CLOCK + RESTART_RESET_AFTER)
        kept_running = decide(rec, live(P.RUNNING), HOST, self.policy, settings, NOW, facts=later)
        assert kept_running.observed == {"restart_count": 0}

    def test_a_vm_that_keeps_running_earns_its_count_back(self):
        rec = record(restart_count=2, last_restart_at=CLOCK - RESTART_RESET_AFTER)
        decision = decide(rec, live(P.RUNNING), HOST, self.policy, SETTINGS, NOW, facts=SYNC)
        assert decision.observed == {"restart_count": 0}
        recent = rec.replace(last_restart_at=CLOCK - 1)
        assert not decide(recent, live(P.RUNNING), HOST, self.policy, SETTINGS, NOW,
                          facts=SYNC).observed


@pytest.mark.parametrize("power,vm_state", [(P.RUNNING, V.ACTIVE), (P.PAUSED, V.PAUSED),
                                            (P.SUSPENDED, V.SUSPENDED), (P.SHUTDOWN, V.STOPPED),
                                            (P.CRASHED, V.STOPPED), (P.NOSTATE, V.STOPPED)])
def test_a_new_domain_adopts_its_vm_state_from_its_power_state(power, vm_state):
    rec = adopt("u-9", "new", HOST, live(power), DEFAULT, NOW, SYNC)
    assert (rec.vm_state, rec.power_state, rec.host, rec.task_state) == (vm_state, power, HOST, "")
    # An adopted record is in sync with what it was adopted from.
    assert nothing(decide(rec, live(power), HOST, DEFAULT, SETTINGS, NOW, facts=SYNC))


def test_a_domain_seen_while_libvirt_starts_it_is_adopted_active():
    """libvirt starts a domain paused (reason starting_up) and resumes it: a sync that sees it
    then must not record it as paused, which would stay so while it runs."""
    starting = LiveState(P.PAUSED, "starting_up")
    rec = adopt("u-9", "new", HOST, starting, DEFAULT, NOW)
    assert (rec.vm_state, rec.power_state) == (V.ACTIVE, P.PAUSED)
    later = decide(rec, live(P.RUNNING), HOST, DEFAULT, SETTINGS, NOW)
    assert later.action is Action.NONE and later.observed == {"power_state": P.RUNNING}
    assert adopt("u-9", "new", HOST, LiveState(P.PAUSED, "user"), DEFAULT, NOW).vm_state is V.PAUSED


def test_a_pin_wins_over_adoption():
    rec = adopt("u-9", "new", HOST, live(P.RUNNING), InstancePolicy(vm_state=V.STOPPED), NOW)
    assert rec.vm_state is V.STOPPED
