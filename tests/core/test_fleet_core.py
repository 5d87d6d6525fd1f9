"""The fleet's pure core (vmpower/core/fleet.py): which bus events are vmpower's and who sent
them, what a report says of each VM and host, and the master-side settings; cell by cell."""

import pytest

from vmpower.core import fleet as core
from vmpower.core.settings import ConfigError

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
LIFE = {
    "uuid": UUID,
    "name": "web1",
    "transition": "stopped",
    "reason": "guest_shutdown",
    "libvirt": {"event": "STOPPED", "detail": "SHUTDOWN"},
    "timestamp": 1000.5,
    "seq": 3,
    "uri": "qemu:///system",
}


def beacon_path(minion, data, claimed=None):
    """A beacon event as the master fires it from Salt's beacon path: the minion's data as is."""
    return {**data, "id": claimed or minion}


def fire_master_path(verified, data):
    """An event sent with event.send/fire_master: the master fires the minion's verified load."""
    return {"id": verified, "tag": "ignored", "data": data, "cmd": "_minion_event"}


# --- classify: the shapes ----------------------------------------------------------------
def test_a_beacon_path_lifecycle_event_is_kept_under_the_tags_minion_unauthenticated():
    event = core.classify("salt/beacon/hv1/vmpower/lifecycle/stopped", beacon_path("hv1", LIFE), 2000.0)
    assert (event.kind, event.minion, event.authenticated, event.forged) == ("lifecycle", "hv1", False, False)
    assert (event.uuid, event.name, event.transition, event.reason) == (
        UUID,
        "web1",
        "stopped",
        "guest_shutdown",
    )
    assert event.at == 1000.5  # when libvirt called back, not when the master heard of it


def test_a_beacon_path_event_whose_data_names_another_minion_is_marked_forged():
    event = core.classify(
        "salt/beacon/hv1/vmpower/lifecycle/stopped", beacon_path("hv1", LIFE, claimed="hv2"), 2000.0
    )
    assert (event.minion, event.forged) == ("hv1", True)


def test_an_event_sent_through_fire_master_is_kept_under_the_verified_id():
    event = core.classify("salt/beacon/hv1/vmpower/lifecycle/stopped", fire_master_path("hv1", LIFE), 2000.0)
    assert (event.minion, event.authenticated, event.forged) == ("hv1", True, False)


def test_a_minion_forging_anothers_tag_is_kept_under_its_own_verified_id():
    event = core.classify(
        "salt/beacon/hv2/vmpower/lifecycle/stopped", fire_master_path("evil", {**LIFE, "id": "hv2"}), 2000.0
    )
    assert (event.minion, event.authenticated, event.forged) == ("evil", True, True)


def test_a_resync_event():
    event = core.classify(
        "salt/beacon/hv1/vmpower/resync", {"reason": "overflow", "lost": 7, "id": "hv1"}, 5.0
    )
    assert (event.kind, event.minion, event.reason, event.at) == ("resync", "hv1", "overflow", 5.0)


def test_a_reconcile_return_is_kept_with_its_decision_and_reason():
    data = {
        "fun": "vmpower.reconcile",
        "id": "hv1",
        "jid": "1",
        "success": True,
        "retcode": 0,
        "return": {
            "uuid": UUID.upper(),
            "name": "web1",
            "action": "power_off",
            "reason": "the guest shut down",
            "transition": "stopped",
        },
    }
    event = core.classify("salt/job/1/ret/hv1", data, 9.0)
    assert (event.kind, event.minion, event.authenticated) == ("reconcile", "hv1", True)
    assert (event.uuid, event.transition, event.reason) == (UUID, "stopped", "the guest shut down")


def test_a_sync_return_keeps_a_summary_not_the_whole_listing():
    ret = {
        "host": "hv1",
        "checked": 3,
        "updated": 1,
        "took": 0.25,
        "actions": [
            {
                "uuid": UUID,
                "name": "web1",
                "action": "power_off",
                "reason": "r",
                "result": "ok",
                "vm_state": "stopped",
            }
        ],
        "skipped": [{"uuid": "x"}, {"uuid": "y"}],
        "warnings": [],
    }
    event = core.classify("salt/job/2/ret/hv1", {"fun": "vmpower.sync", "id": "hv1", "return": ret}, 9.0)
    assert event.kind == "sync"
    kept = event.data["return"]
    assert (kept["checked"], kept["updated"], kept["skipped"], kept["took"]) == (3, 1, 2, 0.25)
    assert kept["actions"] == [
        {"uuid": UUID, "name": "web1", "action": "power_off", "reason": "r", "result": "ok"}
    ]
    assert event.reason == "checked 3, updated 1, 1 action(s), 2 skipped"


def test_a_failed_sync_is_kept_as_a_failure():
    event = core.classify(
        "salt/job/2/ret/hv1",
        {
            "fun": "vmpower.sync",
            "id": "hv1",
            "retcode": 1,
            "success": False,
            "return": "vmpower.sync: store gone",
        },
        9.0,
    )
    assert event.data["success"] is False and event.data["return"]["ok"] is False
    assert "store gone" in event.reason


@pytest.mark.parametrize(
    "tag, data",
    [
        ("salt/job/1/ret/hv1", {"fun": "test.ping", "return": True}),
        ("salt/auth", {"id": "hv1"}),
        ("salt/beacon/hv1/diskusage/", {"/": 99}),
        (None, {}),
        ("salt/job/1/new", {"fun": "vmpower.sync"}),
    ],
)
def test_events_that_are_not_vmpowers_are_ignored(tag, data):
    assert core.classify(tag, data, 1.0) is None


@pytest.mark.parametrize(
    "tag, data, message",
    [
        ("salt/beacon/hv1/vmpower/lifecycle/stopped", "text", "must be a mapping"),
        ("salt/beacon/hv1/vmpower/lifecycle/exploded", LIFE, "unknown transition 'exploded'"),
        ("salt/beacon/hv1/vmpower/lifecycle/stopped", {**LIFE, "uuid": "nope"}, "is not a UUID"),
        (
            "salt/beacon/hv1/vmpower/lifecycle/stopped",
            {**LIFE, "uuid": None},
            "uuid must be a non-empty string",
        ),
        ("salt/beacon/hv1/vmpower/lifecycle/stopped", {**LIFE, "transition": "started"}, "not the tag's"),
        ("salt/beacon/hv1/vmpower/resync", {"reason": "overflow", "lost": -1}, "lost must be a count"),
        ("salt/beacon/hv1/vmpower/resync", {"lost": 1}, "reason must be a non-empty string"),
        ("salt/beacon/hv1/vmpower/whatever", {}, "not a vmpower event"),
    ],
)
def test_malformed_vmpower_events_are_refused_with_a_reason(tag, data, message):
    with pytest.raises(core.Malformed, match=message):
        core.classify(tag, data, 1.0)


def test_a_batch_keeps_the_good_and_counts_the_malformed():
    batch = [
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/stopped", "data": LIFE},
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/stopped", "data": {**LIFE, "uuid": 5}},
        "not even a mapping",
        {"tag": "salt/job/1/ret/hv1", "data": {"fun": "test.ping"}},
        {"tag": "salt/beacon/hv2/vmpower/resync", "data": {"reason": "connected", "lost": 0}},
    ]
    kept, skipped = core.split_batch(batch, 1.0)
    assert [e.kind for e in kept] == ["lifecycle", "resync"]
    assert len(skipped) == 2


# --- what a report says --------------------------------------------------------------------
@pytest.mark.parametrize(
    "vm_state, power_state, disagrees",
    [
        ("active", "running", False),
        ("active", "shutdown", True),
        ("active", "crashed", True),
        ("active", "paused", True),
        ("active", "suspended", True),
        ("active", "nostate", True),
        ("stopped", "shutdown", False),
        ("stopped", "crashed", False),
        ("stopped", "nostate", False),
        ("stopped", "running", True),
        ("stopped", "paused", True),
        ("stopped", "suspended", True),
        ("paused", "paused", False),
        ("paused", "running", True),
        ("paused", "shutdown", True),
        ("suspended", "suspended", False),
        ("suspended", "shutdown", False),
        ("suspended", "running", True),
        ("deleted", "nostate", False),
        ("deleted", "shutdown", False),
        ("deleted", "running", True),
        ("error", "running", False),
        ("error", "shutdown", False),
        ("building", "running", False),
        ("rescued", "shutdown", False),
        ("resized", "paused", False),
        ("shelved", "running", False),
    ],
)
def test_disagreement_cell_by_cell(vm_state, power_state, disagrees):
    why = core.disagreement(vm_state, power_state)
    assert bool(why) is disagrees
    if disagrees:
        assert why == f"vm_state {vm_state} but power_state {power_state}"


@pytest.mark.parametrize(
    "task_state, age, stuck",
    [
        ("", 10_000, False),
        ("powering-off", 899, False),
        ("powering-off", 900, True),
        ("maintenance", 5000, True),
    ],
)
def test_stuck(task_state, age, stuck):
    assert bool(core.stuck(task_state, 1000.0, 1000.0 + age, 900)) is stuck


def record(**kw):
    return {
        "uuid": UUID,
        "name": "web1",
        "host": "hv1",
        "vm_state": "active",
        "power_state": "running",
        "task_state": "",
        "updated_at": 100.0,
        **kw,
    }


def test_a_vm_row_and_its_filters():
    row = core.vm_row(
        record(power_state="shutdown"),
        {"reason": "guest shut down", "at": 5},
        {"transition": "stopped", "reason": "guest_shutdown"},
        200.0,
        900,
    )
    assert row["disagreement"] and not row["error"] and not row["stuck"]
    assert (
        row["last_change"]["reason"] == "guest shut down" and row["last_event"]["reason"] == "guest_shutdown"
    )
    assert core.keep(row, core.Filters())
    assert core.keep(row, core.Filters(hosts=("hv1",), state="shutdown", disagreement=True))
    assert core.keep(row, core.Filters(state="active"))
    assert not core.keep(row, core.Filters(hosts=("hv2",)))
    assert not core.keep(row, core.Filters(state="stopped"))
    assert not core.keep(row, core.Filters(error=True))
    assert not core.keep(row, core.Filters(stuck=True))


def test_filters_from_the_command_line():
    assert core.parse_filters(host="hv1, hv2") == core.Filters(hosts=("hv1", "hv2"))
    assert core.parse_filters(host=["hv1"], disagreement="true").disagreement is True
    with pytest.raises(ConfigError, match="state must be a vm_state or power_state"):
        core.parse_filters(state="sleepy")
    with pytest.raises(ConfigError, match="disagreement must be true or false"):
        core.parse_filters(disagreement="maybe")
    with pytest.raises(ConfigError, match="host must be a minion id"):
        core.parse_filters(host=5)


@pytest.mark.parametrize(
    "seen, problems",
    [
        ({}, ["never synced"]),
        ({"last_sync_at": 1000.0 - 1200}, []),  # exactly 2 x sync_interval: still in time
        ({"last_sync_at": 1000.0 - 1201}, ["not synced for 1201 s (> 2 x sync_interval 600 s)"]),
        ({"last_sync_at": 999.0, "loop": {"connected": False}}, ["event loop disconnected"]),
        ({"last_sync_at": 999.0, "loop": {"connected": True}}, []),
        ({"last_sync_at": 999.0, "loop": {"connected": None}}, []),  # no beacon: nobody knows
    ],
)
def test_host_problems(seen, problems):
    assert core.host_row("hv1", seen, 3, 1000.0, 600)["problems"] == problems


def test_a_host_asked_directly_is_not_reported_as_never_synced():
    assert core.host_row("hv1", {}, 3, 1000.0, 600, sync_known=False)["problems"] == []


def test_summary_counts():
    rows = [
        core.vm_row(record(), None, None, 0, 900),
        core.vm_row(record(uuid="b", vm_state="error", power_state="shutdown"), None, None, 0, 900),
    ]
    hosts = [core.host_row("hv1", {}, 2, 0, 600)]
    found = core.summary(rows, hosts)
    assert found["vms"] == 2 and found["error"] == 1 and found["disagreeing"] == 0
    assert found["by_vm_state"] == {"active": 1, "error": 1}
    assert found["hosts_with_problems"] == ["hv1"]


def test_loop_summary():
    status = {
        "pid": 1,
        "thread_alive": True,
        "updated_at": 5.0,
        "watchers": {
            "vmpower": {"connected": True, "events_seen": 4, "dropped": 1, "reconnects": 2, "queue_depth": 0}
        },
    }
    assert core.loop_summary(status) == {
        "connected": True,
        "events_seen": 4,
        "dropped": 1,
        "reconnects": 2,
        "queue_depth": 0,
        "updated_at": 5.0,
    }
    status["watchers"]["other"] = {"connected": False}
    assert core.loop_summary(status)["connected"] is False
    assert (
        core.loop_summary({**status, "thread_alive": False, "watchers": {"v": {"connected": True}}})[
            "connected"
        ]
        is False
    )
    assert core.loop_summary({"error": "no event loop status"}) == {
        "connected": None,
        "error": "no event loop status",
    }
    assert core.loop_summary(None) == {"connected": None}


# --- settings ------------------------------------------------------------------------------
def test_fleet_settings():
    assert core.parse_fleet_settings(None).store_location() == core.DEFAULT_FLEET_STORE
    given = core.parse_fleet_settings({"store": "/srv/f.sqlite", "retention_days": 7, "sync_interval": 60})
    assert (given.store_location(), given.retention_days, given.sync_interval) == ("/srv/f.sqlite", 7.0, 60.0)
    with pytest.raises(ConfigError, match="vmpower:retention_days must be a number of 0 or more"):
        core.parse_fleet_settings({"retention_days": "a month"})
    with pytest.raises(ConfigError, match="vmpower:store must be"):
        core.parse_fleet_settings({"store": 5})
    with pytest.raises(ConfigError, match="vmpower must be a mapping"):
        core.parse_fleet_settings([1])


@pytest.mark.parametrize(
    "raw, interval, expected", [(None, 600, 60), (None, 100, 10), (None, 5, 0), (0, 600, 0), (30, 600, 30)]
)
def test_sync_splay(raw, interval, expected):
    assert core.sync_splay(raw, interval) == expected


@pytest.mark.parametrize(
    "raw, message",
    [
        (-1, "whole number of seconds"),
        ("5", "whole number of seconds"),
        (True, "whole number"),
        (600, "must be less than vmpower:sync_interval"),
    ],
)
def test_bad_sync_splay(raw, message):
    with pytest.raises(ConfigError, match=message):
        core.sync_splay(raw, 600)


def test_metrics_file():
    assert core.metrics_file(None) == ""
    assert core.metrics_file("/var/lib/prometheus/node-exporter/vmpower.prom").endswith(".prom")
    for bad in ("relative.prom", "/tmp/vmpower.txt", 5):
        with pytest.raises(
            ConfigError, match="vmpower:metrics_file must be an absolute path ending in .prom"
        ):
            core.metrics_file(bad)
