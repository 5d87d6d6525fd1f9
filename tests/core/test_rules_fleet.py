"""The rules for a fleet's everyday operations, cell by cell: migration and ownership, host
shutdown and boot, one grace for every path, libvirt's own crash handling, interrupted
operations, renames, back-off."""

import dataclasses
import itertools
import json

import pytest

from vmpower.core.model import GONE, LiveState, Record, Transition
from vmpower.core.model import PowerState as P
from vmpower.core.model import VmState as V
from vmpower.core.rules import (
    LIBVIRT_HANDLES_CRASH,
    Action,
    Facts,
    adopt,
    autostart_warning,
    decide,
    not_to_record,
    refuse_power,
    reset,
)
from vmpower.core.settings import ConfigError, InstancePolicy, Settings, parse_instance

HOST, OTHER = "minion-a", "minion-b"
NOW = 1_000_000.0
CLOCK = 5_000.0
BOOT, OLD_BOOT = "boot-2", "boot-1"
SETTINGS = Settings()
DEFAULT = InstancePolicy()
PINNED = parse_instance("vm1", {"vm_state": "active"})
RESTART = parse_instance("vm1", {"on_guest_shutdown": "restart", "on_crash": "restart"})
HOST_STOP = parse_instance("vm1", {"on_host_shutdown": "stop"})
POLICIES = {"default": DEFAULT, "pinned": PINNED, "restart": RESTART}
SYNC = Facts(clock=CLOCK, boot_id=BOOT, on_crash="destroy", migrating=False)
# A stopped event this host's beacon observed (journaled) stop_grace ago.
EVENT = dataclasses.replace(SYNC, event=Transition.STOPPED, event_at=CLOCK - SETTINGS.stop_grace)
OFF_STATES = [LiveState(P.SHUTDOWN, "shutdown"), LiveState(P.SHUTDOWN, "destroyed"),
              LiveState(P.SHUTDOWN, "crashed"), LiveState(P.CRASHED, "panicked"),
              LiveState(P.SHUTDOWN, "failed")]


def record(vm_state=V.ACTIVE, power=P.RUNNING, **kw):
    fields = {"uuid": "u-1", "name": "vm1", "host": HOST, "vm_state": vm_state, "power_state": power,
                  "version": 3, "boot_id": BOOT}
    fields.update(kw)
    return Record(**fields)


def nothing(decision):
    return decision.action is Action.NONE and not decision.outcome


def acts(decision):
    return decision.action is not Action.NONE or "vm_state" in decision.outcome


class TestMigratedOrSavedLivesElsewhere:
    @pytest.mark.parametrize("vm_state,recorded,policy,reason,facts", list(itertools.product(
        V, P, POLICIES, ["migrated", "saved"], [SYNC, EVENT])))
    def test_never_restarted_never_recorded_stopped(self, vm_state, recorded, policy, reason, facts):
        live = LiveState(P.SHUTDOWN, reason)
        decision = decide(record(vm_state, recorded), live, HOST, POLICIES[policy], SETTINGS,
                          NOW, facts=facts)
        assert nothing(decision) and not decision.skipped and decision.retry_in is None
        assert decision.observed.get("vm_state", POLICIES[policy].vm_state) in (None, vm_state,
                                                                               POLICIES[policy].vm_state)
        assert decision.observed.get("vm_state") is not V.STOPPED or vm_state is V.STOPPED
        if reason == "migrated":  # the source lets go; a save file stays on its host
            assert decision.observed["host"] == "" and f"migrated away from {HOST}" in decision.reason
        else:
            assert "host" not in decision.observed and "save file" in decision.reason
        assert "off_since" not in decision.observed  # not an off spell vmpower waits out

    @pytest.mark.parametrize("owner", ["", OTHER])
    def test_shut_off_here_and_owned_elsewhere_is_not_a_warning_every_sync(self, owner):
        decision = decide(record(host=owner, power=P.SHUTDOWN), LiveState(P.SHUTDOWN, "migrated"),
                          HOST, DEFAULT, SETTINGS, NOW, facts=SYNC)
        assert nothing(decision) and not decision.observed
        assert not decision.skipped and not decision.warning

    @pytest.mark.parametrize("reason,host", [("migrated", ""), ("saved", HOST)])
    def test_a_first_seen_domain_that_lives_elsewhere_is_adopted_active(self, reason, host):
        rec = adopt("u-9", "new", HOST, LiveState(P.SHUTDOWN, reason), DEFAULT, NOW, SYNC)
        assert (rec.vm_state, rec.host) == (V.ACTIVE, host)


class TestOwnershipFollowsTheRunningDomain:
    @pytest.mark.parametrize("owner,recorded,reason,taken", [
        ("", P.SHUTDOWN, "booted", True),     # the source let go
        ("", P.RUNNING, "migrated", True),
        (OTHER, P.SHUTDOWN, "booted", True),  # its owner does not run it
        (OTHER, P.NOSTATE, "booted", True),   # gone from its owner (--undefinesource)
        (OTHER, P.PAUSED, "unpaused", True),
        (OTHER, P.RUNNING, "migrated", True),  # libvirt says it came here by migration
        (OTHER, P.RUNNING, "booted", False),  # its owner runs it: two copies? hands off
        (OTHER, P.RUNNING, "unpaused", False),
    ])
    @pytest.mark.parametrize("vm_state", [V.ACTIVE, V.STOPPED, V.PAUSED])
    def test_the_host_where_it_runs_takes_it(self, owner, recorded, reason, taken, vm_state):
        rec = record(vm_state, recorded, host=owner, boot_id="boot-of-" + (owner or "x"))
        decision = decide(rec, LiveState(P.RUNNING, reason), HOST, DEFAULT, SETTINGS, NOW,
                          facts=SYNC)
        if taken:
            assert decision.observed["host"] == HOST and not decision.skipped
            assert f"migrated from {owner or 'no host'}" in decision.reason
            assert decision.observed["boot_id"] == BOOT  # written in this host's boot now
            # Taken as a first sight is: a VM that runs here is active, never powered off
            # because another host last recorded it stopped.
            assert decision.action is Action.NONE
            assert decision.observed.get("vm_state", vm_state) is V.ACTIVE
        else:
            assert decision.skipped and not decision.observed and OTHER in decision.reason

    @pytest.mark.parametrize("live", OFF_STATES + [LiveState(P.SUSPENDED, "user"), GONE])
    def test_a_domain_that_does_not_run_here_is_not_taken(self, live):
        decision = decide(record(power=P.SHUTDOWN, host=OTHER), live, HOST, PINNED, SETTINGS, NOW,
                          facts=EVENT)
        assert decision.skipped and nothing(decision) and not decision.observed

    @pytest.mark.parametrize("owner", [OTHER, ""])
    @pytest.mark.parametrize("recorded", [V.ACTIVE, V.STOPPED])
    def test_a_vm_moved_by_hand_and_paused_on_arrival_is_taken(self, owner, recorded):
        decision = decide(record(recorded, P.SHUTDOWN, host=owner), LiveState(P.PAUSED, "user"),
                          HOST, DEFAULT, SETTINGS, NOW, facts=SYNC)
        assert decision.observed["host"] == HOST and decision.action is Action.NONE
        assert f"moved from {owner or 'no host'}: it is paused on {HOST}" in decision.reason
        # Never powered off because the host it left recorded it stopped.
        assert decision.observed.get("vm_state", recorded) in (V.ACTIVE, V.PAUSED)

    def test_a_paused_copy_of_a_vm_its_owner_runs_is_not_taken(self):
        decision = decide(record(power=P.RUNNING, host=OTHER), LiveState(P.PAUSED, "user"), HOST,
                          DEFAULT, SETTINGS, NOW, facts=SYNC)
        assert decision.skipped and not decision.observed and OTHER in decision.reason

    @pytest.mark.parametrize("live", OFF_STATES)
    def test_a_vm_no_host_owns_and_off_here_is_taken_with_its_grace(self, live):
        decision = decide(record(power=P.SHUTDOWN, host=""), live, HOST, PINNED, SETTINGS, NOW,
                          facts=SYNC)
        assert decision.observed["host"] == HOST and "owned by no host" in decision.reason
        assert decision.action is Action.NONE  # nothing started on the spot

    @pytest.mark.parametrize("reason", ["migrated", "saved"])
    def test_a_vm_no_host_owns_that_lives_elsewhere_is_not_taken(self, reason):
        decision = decide(record(power=P.SHUTDOWN, host=""), LiveState(P.SHUTDOWN, reason), HOST,
                          PINNED, SETTINGS, NOW, facts=SYNC)
        assert "host" not in decision.observed and decision.action is Action.NONE

    def test_a_domain_no_longer_defined_here_is_let_go(self):
        decision = decide(record(), GONE, HOST, DEFAULT, SETTINGS, NOW, facts=SYNC)
        assert decision.observed["host"] == "" and "no longer defined" in decision.reason
        assert nothing(decision)


MID_MIGRATION = [
    (LiveState(P.PAUSED, "migration"), SYNC),
    (LiveState(P.PAUSED, "starting_up"), dataclasses.replace(SYNC, event=Transition.STARTED,
                                                             event_reason="migrated")),
] + [(LiveState(power, "booted"), dataclasses.replace(SYNC, migrating=True)) for power in P]


class TestMidMigrationIsHandsOff:
    @pytest.mark.parametrize("live,facts", MID_MIGRATION)
    @pytest.mark.parametrize("vm_state,owner", list(itertools.product(V, [HOST, OTHER, ""])))
    def test_nothing_at_all(self, live, facts, vm_state, owner):
        decision = decide(record(vm_state, P.RUNNING, host=owner), live, HOST, PINNED, SETTINGS,
                          NOW, facts=facts)
        assert decision.skipped and nothing(decision) and not decision.observed
        assert "migration" in decision.reason

    @pytest.mark.parametrize("live,facts", MID_MIGRATION)
    def test_not_even_recorded(self, live, facts):
        assert "migration" in not_to_record(live, DEFAULT, None, facts)

    def test_a_domain_libvirt_starts_is_recorded(self):
        assert not_to_record(LiveState(P.PAUSED, "starting_up"), DEFAULT, None, SYNC) is None


class TestAMigrationJobThatCannotBeReadIsHandsOff:
    UNKNOWN = dataclasses.replace(SYNC, migrating=None, migration_unknown=True)

    @pytest.mark.parametrize("power", [P.RUNNING, P.PAUSED])
    @pytest.mark.parametrize("vm_state", list(V))
    def test_nothing_at_all(self, power, vm_state):
        decision = decide(record(vm_state, P.SHUTDOWN), LiveState(power, "booted"), HOST,
                          DEFAULT, SETTINGS, NOW, facts=self.UNKNOWN)
        assert decision.skipped and nothing(decision) and not decision.observed
        assert decision.rule == "migrating" and "could not say" in decision.reason

    def test_not_even_recorded(self):
        assert "could not say" in not_to_record(LiveState(P.PAUSED, "booted"), DEFAULT, None,
                                                 self.UNKNOWN)

    def test_a_domain_that_is_off_cannot_be_migrating(self):
        decision = decide(record(V.ACTIVE, P.RUNNING), LiveState(P.SHUTDOWN, "shutdown"), HOST,
                          DEFAULT, SETTINGS, NOW, facts=self.UNKNOWN)
        assert not decision.skipped


OFF_ACTIVE = [(V.ACTIVE, live) for live in OFF_STATES if live.reason != "failed"] + [
    (V.PAUSED, LiveState(P.SHUTDOWN, "shutdown"))]
HOST_SHUTDOWNS = {
    "event": (record(), EVENT, {"event_reason": "host_shutdown"}),
    "recorded": (record(power=P.SHUTDOWN, off_reason="host_shutdown", off_since=1.0), SYNC, {}),
    "rebooted": (record(boot_id=OLD_BOOT), SYNC, {}),
    "rebooted, recorded off": (record(power=P.SHUTDOWN, boot_id=OLD_BOOT, off_since=9e9), SYNC, {}),
    "host stopping": (record(), EVENT, {"host_stopping": True}),  # a guest_shutdown event, even
}


class TestHostShutdown:
    @pytest.mark.parametrize("vm_state,live", OFF_ACTIVE)
    @pytest.mark.parametrize("how", HOST_SHUTDOWNS)
    @pytest.mark.parametrize("policy", ["default", "pinned"])
    def test_ignore_is_the_default_record_only(self, vm_state, live, how, policy):
        rec, facts, extra = HOST_SHUTDOWNS[how]
        policy = POLICIES[policy]
        if policy.vm_state and policy.vm_state is not vm_state:
            vm_state = policy.vm_state
        rec = rec.replace(vm_state=vm_state)
        decision = decide(rec, live, HOST, policy, SETTINGS, NOW,
                          facts=dataclasses.replace(facts, **extra))
        assert nothing(decision) and not decision.skipped and decision.retry_in is None
        assert "on_host_shutdown=ignore" in decision.reason
        # Remembered, so later syncs (no event, same boot) keep their hands off too.
        assert decision.observed.get("off_reason", rec.off_reason) == "host_shutdown"

    @pytest.mark.parametrize("how", HOST_SHUTDOWNS)
    def test_stop_takes_it_as_the_operators_intent_after_the_grace(self, how):
        rec, facts, extra = HOST_SHUTDOWNS[how]
        decision = decide(rec, LiveState(P.SHUTDOWN, "shutdown"), HOST, HOST_STOP, SETTINGS, NOW,
                          facts=dataclasses.replace(facts, **extra))
        if facts.event or how == "recorded":  # held by the beacon, or known off long since
            assert decision.action is Action.POWER_OFF
            assert decision.outcome == {"vm_state": V.STOPPED}
            assert "on_host_shutdown=stop" in decision.reason
        else:
            assert nothing(decision) and decision.retry_in == SETTINGS.stop_grace

    def test_stop_contradicts_a_pin_to_active(self):
        with pytest.raises(ConfigError, match="on_host_shutdown: stop contradicts it"):
            parse_instance("vm1", {"vm_state": "active", "on_host_shutdown": "stop"})

    def test_unknown_values_are_named(self):
        with pytest.raises(ConfigError, match="on_host_shutdown must be one of ignore, stop"):
            parse_instance("vm1", {"on_host_shutdown": "shrug"})

    def test_a_record_from_before_boot_ids_is_not_taken_for_a_reboot(self):
        decision = decide(record(boot_id=""), LiveState(P.SHUTDOWN, "shutdown"), HOST, DEFAULT,
                          SETTINGS, NOW, facts=EVENT)
        assert decision.action is Action.POWER_OFF and "off_reason" not in decision.observed

    @pytest.mark.parametrize("live", [LiveState(P.RUNNING, "booted"), LiveState(P.PAUSED, "user")])
    def test_when_it_runs_again_the_books_are_closed(self, live):
        rec = record(power=P.SHUTDOWN, off_reason="host_shutdown", off_since=7.0, boot_id=OLD_BOOT)
        decision = decide(rec, live, HOST, DEFAULT, SETTINGS, NOW, facts=SYNC)
        assert decision.observed["off_reason"] == "" and decision.observed["off_since"] == 0.0
        assert decision.observed["boot_id"] == BOOT

    def test_a_running_vm_seen_in_a_new_boot_learns_the_boot(self):
        # ...so that a guest shutdown later in this boot is not taken for the host's.
        decision = decide(record(boot_id=OLD_BOOT), LiveState(P.RUNNING, "booted"), HOST,
                          DEFAULT, SETTINGS, NOW, facts=SYNC)
        assert decision.observed == {"boot_id": BOOT} and nothing(decision)


class TestAutostart:
    @pytest.mark.parametrize("pin,autostart,warns", [
        (None, True, False), (None, False, False), ("active", True, False),
        ("active", False, True), ("stopped", True, True), ("stopped", False, False),
        ("active", None, False)])
    def test_a_warning_when_autostart_contradicts_the_pin(self, pin, autostart, warns):
        policy = parse_instance("vm1", {"vm_state": pin}) if pin else DEFAULT
        assert bool(autostart_warning(policy, autostart)) is warns


class TestOneGrace:
    @pytest.mark.parametrize("vm_state,live", OFF_ACTIVE)
    @pytest.mark.parametrize("policy", POLICIES)
    @pytest.mark.parametrize("off_for", [0.0, 1.0, 14.9])
    def test_no_path_acts_within_stop_grace(self, vm_state, live, policy, off_for):
        rec = record(vm_state, live.power_state, off_since=CLOCK - off_for)
        decision = decide(rec, live, HOST, POLICIES[policy], SETTINGS, NOW, facts=SYNC)
        assert nothing(decision) and decision.retry_in == pytest.approx(15.0 - off_for)
        assert "stop_grace=15s" in decision.reason

    @pytest.mark.parametrize("boot_id,off_since", [(OLD_BOOT, CLOCK - 100), ("", CLOCK - 100),
                                                   (BOOT, CLOCK + 100), (BOOT, 0.0)])
    def test_an_off_since_from_another_boot_or_clock_is_not_trusted(self, boot_id, off_since):
        rec = record(power=P.SHUTDOWN, boot_id=boot_id, off_since=off_since)
        decision = decide(rec, LiveState(P.SHUTDOWN, "shutdown"), HOST, HOST_STOP, SETTINGS, NOW,
                          facts=SYNC)
        assert not acts(decision) and decision.retry_in == 15.0
        assert decision.observed["off_since"] == CLOCK and decision.observed["boot_id"] == BOOT

    def test_a_step_of_the_wall_clock_neither_holds_nor_releases(self):
        rec = record(power=P.SHUTDOWN, off_since=CLOCK - 5)
        for at in (NOW - 86400, NOW, NOW + 86400):
            decision = decide(rec, LiveState(P.SHUTDOWN, "shutdown"), HOST, DEFAULT, SETTINGS, at,
                              facts=SYNC)
            assert decision.retry_in == 10.0

    def test_a_hard_reboot_is_harmless_whichever_path_sees_it(self):
        first = decide(record(), LiveState(P.SHUTDOWN, "destroyed"), HOST, PINNED, SETTINGS, NOW,
                       facts=SYNC)
        assert nothing(first) and first.observed["off_since"] == CLOCK
        rec = record().replace(**first.observed)
        back = decide(rec, LiveState(P.RUNNING, "booted"), HOST, PINNED, SETTINGS, NOW,
                      facts=dataclasses.replace(SYNC, clock=CLOCK + 2))
        assert nothing(back) and back.observed == {"power_state": P.RUNNING, "off_since": 0.0,
                                                   "off_reason": ""}

    def test_the_grace_is_a_setting(self):
        rec = record(power=P.SHUTDOWN, off_since=CLOCK - 5)
        short = Settings(stop_grace=5)
        decision = decide(rec, LiveState(P.SHUTDOWN, "shutdown"), HOST, DEFAULT, short, NOW,
                          facts=SYNC)
        assert decision.action is Action.POWER_OFF


class TestCrashesFollowLibvirt:
    CRASHES = (LiveState(P.CRASHED, "panicked"), LiveState(P.SHUTDOWN, "crashed"))

    @pytest.mark.parametrize("live", CRASHES)
    @pytest.mark.parametrize("on_crash", sorted(LIBVIRT_HANDLES_CRASH))
    @pytest.mark.parametrize("policy", POLICIES)
    @pytest.mark.parametrize("vm_state", [V.ACTIVE, V.PAUSED])
    def test_libvirt_handles_it_vmpower_records_it(self, live, on_crash, policy, vm_state):
        vm_state = POLICIES[policy].vm_state or vm_state
        decision = decide(record(vm_state), live, HOST, POLICIES[policy], SETTINGS, NOW,
                          facts=dataclasses.replace(EVENT, on_crash=on_crash))
        assert nothing(decision) and decision.observed["power_state"] is live.power_state
        assert f"<on_crash>{on_crash}</on_crash>" in decision.reason

    @pytest.mark.parametrize("live", CRASHES)
    @pytest.mark.parametrize("policy,action", [("default", Action.POWER_OFF),
                                               ("restart", Action.START), ("pinned", Action.START)])
    def test_destroy_leaves_it_to_vmpowers_policy(self, live, policy, action):
        decision = decide(record(), live, HOST, POLICIES[policy], SETTINGS, NOW, facts=EVENT)
        assert decision.action is action

    @pytest.mark.parametrize("on_crash", sorted(LIBVIRT_HANDLES_CRASH) + ["destroy", None, ""])
    def test_qemu_killed_is_not_a_crash_libvirt_handles(self, on_crash):
        decision = decide(record(), LiveState(P.SHUTDOWN, "failed"), HOST, DEFAULT, SETTINGS, NOW,
                          facts=dataclasses.replace(EVENT, on_crash=on_crash))
        assert decision.action is Action.POWER_OFF and "QEMU was killed" in decision.reason

    def test_not_read_yet_asks_for_a_recheck(self):
        decision = decide(record(), self.CRASHES[0], HOST, DEFAULT, SETTINGS, NOW,
                          facts=dataclasses.replace(EVENT, on_crash=None))
        assert nothing(decision) and decision.recheck

    def test_unreadable_is_recorded_and_warned_not_acted_on(self):
        decision = decide(record(), self.CRASHES[0], HOST, DEFAULT, SETTINGS, NOW,
                          facts=dataclasses.replace(EVENT, on_crash=""))
        assert nothing(decision) and decision.warning


OWNER = json.dumps({"host": HOST, "boot_id": BOOT, "pid": 4242, "start_time": 1, "since": 2})


class TestInterruptedOperations:
    @pytest.mark.parametrize("vm_state,power", list(itertools.product(V, P)))
    @pytest.mark.parametrize("alive", [True, None])
    def test_a_live_or_unknown_owner_keeps_hands_off(self, vm_state, power, alive):
        rec = record(vm_state, task_state="powering-off", task_owner=OWNER)
        decision = decide(rec, LiveState(power), HOST, DEFAULT, SETTINGS, NOW,
                          facts=dataclasses.replace(EVENT, owner_alive=alive))
        assert decision.skipped and not decision.observed

    @pytest.mark.parametrize("vm_state,power", list(itertools.product(V, P)))
    def test_a_gone_owner_is_cleared_and_the_vm_decided_again(self, vm_state, power):
        rec = record(vm_state, P.RUNNING, task_state="powering-off", task_owner=OWNER)
        facts = dataclasses.replace(EVENT, owner_alive=False)
        decision = decide(rec, LiveState(power), HOST, DEFAULT, SETTINGS, NOW, facts=facts)
        assert decision.observed["task_state"] == "" and decision.observed["task_owner"] == ""
        assert "pid 4242 on minion-a, which is gone: cleared" in decision.reason
        again = decide(rec.replace(task_state="", task_owner=""), LiveState(power), HOST, DEFAULT,
                       SETTINGS, NOW, facts=facts)
        assert (decision.action, dict(decision.outcome)) == (again.action, dict(again.outcome))

    def test_a_task_state_without_owner_is_never_cleared_by_vmpower(self):
        rec = record(task_state="powering-off")
        decision = decide(rec, LiveState(P.SHUTDOWN), HOST, DEFAULT, SETTINGS, NOW,
                          facts=dataclasses.replace(EVENT, owner_alive=False))
        assert decision.skipped

    def test_a_pillar_task_state_is_never_cleared(self):
        policy = InstancePolicy(task_state="maintenance")
        rec = record(task_state="powering-off", task_owner=OWNER)
        decision = decide(rec, LiveState(P.SHUTDOWN), HOST, policy, SETTINGS, NOW,
                          facts=dataclasses.replace(EVENT, owner_alive=False))
        assert decision.skipped and not decision.observed and "(pillar)" in decision.reason
        assert reset(rec, LiveState(P.SHUTDOWN), policy).refused


class TestRefusals:
    @pytest.mark.parametrize("wanted", [V.ACTIVE, V.STOPPED])
    def test_each_reason_to_refuse(self, wanted):
        other = V.STOPPED if wanted is V.ACTIVE else V.ACTIVE
        assert "bad pillar" in refuse_power("vm1", None, DEFAULT, "bad pillar x", wanted)
        assert "managed: false" in refuse_power("vm1", None, InstancePolicy(managed=False), None,
                                                wanted)
        assert f"cannot be made {wanted.value}" in refuse_power(
            "vm1", None, InstancePolicy(vm_state=other), None, wanted)
        assert "task_state=maintenance (pillar)" in refuse_power(
            "vm1", None, InstancePolicy(task_state="maintenance"), None, wanted)
        busy = record(task_state="powering-on", task_owner=OWNER)
        assert "task_state=powering-on" in refuse_power("vm1", busy, DEFAULT, None, wanted, True)
        assert "task_state=powering-on" in refuse_power("vm1", busy, DEFAULT, None, wanted, None)
        assert refuse_power("vm1", busy, DEFAULT, None, wanted, False) is None  # owner gone
        assert refuse_power("vm1", record(), InstancePolicy(vm_state=wanted), None, wanted) is None


class TestReset:
    @pytest.mark.parametrize("owner,here", [(OTHER, LiveState(P.SHUTDOWN, "unknown")),
                                            (OTHER, GONE), ("", GONE)])
    @pytest.mark.parametrize("vm_state", [None, V.ACTIVE, V.STOPPED])
    def test_only_the_owner_resets_unless_forced_with_a_vm_state(self, owner, here, vm_state):
        rec = record(V.ERROR, P.RUNNING, host=owner, restart_count=5)
        refused = reset(rec, here, DEFAULT, vm_state, HOST)
        assert refused.refused and not refused.fields and "force=True" in refused.reason
        assert (owner or "owned by no host") in refused.reason
        forced = reset(rec, here, DEFAULT, vm_state, HOST, force=True)
        if vm_state is None:  # this host cannot read its state: the operator must say it
            assert forced.refused and "give the vm_state" in forced.reason
        else:
            assert not forced.refused and forced.fields["vm_state"] is vm_state
            assert ("forced on minion-a, over the owner minion-b" in forced.reason) == bool(owner)

    @pytest.mark.parametrize("owner", [HOST, ""])
    def test_the_owner_or_the_host_that_has_an_unowned_vm_resets_it(self, owner):
        rec = record(V.ERROR, P.SHUTDOWN, host=owner)
        done = reset(rec, LiveState(P.SHUTDOWN, "shutdown"), DEFAULT, None, HOST)
        assert not done.refused and done.fields["vm_state"] is V.STOPPED
        assert "forced" not in done.reason

    @pytest.mark.parametrize("power,vm_after", [(P.RUNNING, V.ACTIVE), (P.SHUTDOWN, V.STOPPED)])
    def test_out_of_error_to_what_it_does(self, power, vm_after):
        rec = record(V.ERROR, power, restart_count=5, last_restart_at=NOW)
        done = reset(rec, LiveState(power), DEFAULT)
        assert done.fields == {"vm_state": vm_after, "restart_count": 0, "last_restart_at": 0.0}
        assert "error -> " in done.reason and not done.refused

    def test_a_task_state_vmpower_set_is_cleared_even_with_a_live_owner(self):
        done = reset(record(task_state="powering-off", task_owner=OWNER), LiveState(P.RUNNING),
                     DEFAULT)
        assert done.fields == {"task_state": "", "task_owner": ""}
        assert "set by pid 4242" in done.reason

    def test_a_vm_state_given(self):
        done = reset(record(V.ERROR), LiveState(P.SHUTDOWN), DEFAULT, V.ACTIVE)
        assert done.fields["vm_state"] is V.ACTIVE
        assert reset(record(), LiveState(P.RUNNING), PINNED, V.STOPPED).refused

    def test_nothing_to_reset(self):
        done = reset(record(), LiveState(P.RUNNING), DEFAULT)
        assert not done.fields and not done.refused and "nothing to reset" in done.reason


class TestRenames:
    def test_the_record_takes_the_live_name(self):
        decision = decide(record(), LiveState(P.RUNNING, "booted"), HOST, DEFAULT, SETTINGS, NOW,
                          facts=dataclasses.replace(SYNC, name="vm1-new"))
        assert decision.observed == {"name": "vm1-new"} and "renamed vm1 -> vm1-new" in decision.reason

    def test_a_gone_domain_keeps_its_name(self):
        decision = decide(record(), GONE, HOST, DEFAULT, SETTINGS, NOW, facts=SYNC)
        assert "name" not in decision.observed


class TestBackOffOnTime:
    def test_a_backed_off_restart_says_when_to_retry(self):
        settings = Settings(restart_backoff=10)
        rec = record(power=P.SHUTDOWN, restart_count=2, last_restart_at=CLOCK - 5)
        decision = decide(rec, LiveState(P.SHUTDOWN, "shutdown"), HOST, PINNED, settings, NOW,
                          facts=EVENT)
        assert nothing(decision) and decision.retry_in == 15.0

    def test_a_decision_with_nothing_to_wait_for_has_no_retry(self):
        decision = decide(record(), LiveState(P.RUNNING), HOST, PINNED, SETTINGS, NOW, facts=SYNC)
        assert decision.retry_in is None


class TestWentOffUnseen:
    """libvirt's shut-off reason is volatile: after a libvirtd restart a copy of a VM migrated
    away reads "shut off (unknown)", as one that went off here would. Only what this host's
    beacon saw (``Facts.seen_off``) tells them apart; without it nothing is done."""

    LOST = LiveState(P.SHUTDOWN, "unknown")

    def decide(self, rec, seen_off, clock=CLOCK, **facts):
        return decide(rec, self.LOST, HOST, PINNED, SETTINGS, NOW,
                      facts=dataclasses.replace(SYNC, clock=clock, seen_off=seen_off, **facts))

    @pytest.mark.parametrize("recorded", [P.RUNNING, P.PAUSED])
    def test_the_journal_is_read_before_anything_is_decided(self, recorded):
        decision = self.decide(record(power=recorded), None)
        assert decision.recheck and decision.action is Action.NONE and not decision.outcome

    @pytest.mark.parametrize("clock", [CLOCK, CLOCK + 10 * SETTINGS.stop_grace])
    def test_unseen_it_is_recorded_and_reported_never_started(self, clock):
        decision = self.decide(record(), "", clock)
        assert decision.action is Action.NONE and decision.warning and not decision.attempted
        assert decision.observed["off_reason"] == "not_seen"
        assert decision.observed["power_state"] is P.SHUTDOWN and "host" not in decision.observed
        assert "may have been migrated away" in decision.reason

    def test_once_unseen_it_stays_so_until_it_runs_again(self):
        rec = record(power=P.SHUTDOWN, off_reason="not_seen", off_since=CLOCK - 1000)
        decision = self.decide(rec, None)  # no journal read needed
        assert decision.action is Action.NONE and decision.warning and not decision.recheck
        running = decide(rec, LiveState(P.RUNNING, "booted"), HOST, PINNED, SETTINGS, NOW, facts=SYNC)
        assert running.observed["off_reason"] == ""

    @pytest.mark.parametrize("reason", ["migrated", "saved"])
    def test_seen_leaving_it_lives_elsewhere(self, reason):
        decision = self.decide(record(), reason)
        assert decision.action is Action.NONE and "as this host's beacon saw" in decision.reason
        assert decision.observed.get("host", HOST) == ("" if reason == "migrated" else HOST)

    def test_seen_leaving_after_it_was_taken_as_unseen_it_is_let_go(self):
        # The sync that answered the libvirtd restart came before the held STOPPED (migrated).
        rec = record(power=P.SHUTDOWN, off_reason="not_seen", off_since=CLOCK - 5)
        decision = self.decide(rec, "migrated")
        assert decision.action is Action.NONE and not decision.warning
        assert (decision.observed["host"], decision.observed["off_reason"]) == ("", "")

    def test_let_go_it_is_not_taken_back_while_the_beacon_saw_it_leave(self):
        # Every later sync: no host owns it, and this host's beacon saw it migrate away.
        rec = record(host="", power=P.SHUTDOWN)
        decision = self.decide(rec, "migrated")
        assert decision.action is Action.NONE and decision.observed == {}
        assert "shut off here because it was migrated" in decision.reason
        unseen = self.decide(rec, "")  # not seen leaving: this host has the only known copy
        assert unseen.observed["host"] == HOST and unseen.action is Action.NONE

    @pytest.mark.parametrize("reason", ["shutdown", "destroyed", "crashed", "failed"])
    def test_seen_going_off_here_the_pin_restarts_it_after_the_grace(self, reason):
        held = self.decide(record(), reason)
        assert held.action is Action.NONE and held.retry_in
        due = self.decide(record(power=P.SHUTDOWN, off_since=CLOCK), reason,
                          CLOCK + SETTINGS.stop_grace)
        assert due.action is Action.START

    def test_an_observed_stop_being_reconciled_is_seen(self):
        decision = self.decide(record(), None, event=Transition.STOPPED,
                               event_reason="shutdown", event_at=CLOCK - SETTINGS.stop_grace)
        assert decision.action is Action.START

    def test_a_host_reboot_is_still_a_host_shutdown(self):
        decision = self.decide(record(boot_id="boot-0"), "")
        assert decision.action is Action.NONE and "shut down by the host" in decision.reason


class TestARunNotSeenByTheRecord:
    """A recorded off spell ends when this host's beacon saw the domain afterwards (a start
    whose event was lost, or dropped as stale): the grace counts from then, not from the
    record's older spell."""

    def test_the_grace_counts_from_the_last_sighting(self):
        rec = record(power=P.SHUTDOWN, off_since=CLOCK - 60.0)
        facts = dataclasses.replace(SYNC, seen_at=CLOCK - 5.0)
        decision = decide(rec, LiveState(P.SHUTDOWN, "shutdown"), HOST, DEFAULT, SETTINGS, NOW,
                          facts=facts)
        assert decision.action is Action.NONE and decision.retry_in == SETTINGS.stop_grace - 5.0
        assert decision.observed["off_since"] == CLOCK - 5.0

    @pytest.mark.parametrize("seen_at", [0.0, CLOCK - 90.0, CLOCK + 1.0])
    def test_a_sighting_before_the_spell_or_ahead_of_the_clock_changes_nothing(self, seen_at):
        rec = record(power=P.SHUTDOWN, off_since=CLOCK - 60.0)
        facts = dataclasses.replace(SYNC, seen_at=seen_at)
        decision = decide(rec, LiveState(P.SHUTDOWN, "shutdown"), HOST, DEFAULT, SETTINGS, NOW,
                          facts=facts)
        assert decision.action is Action.POWER_OFF and "off_since" not in decision.observed
