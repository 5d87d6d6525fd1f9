"""The fleet's pure core (vmpower/core/fleet.py): which bus events are vmpower's and who sent
them, what a report says of each VM and host, and the master-side settings; cell by cell."""

import json

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


def fire_master_path(sender, data, signer=None):
    """A load as the master fires it for ``event.send``/``fire_master`` (or as a beacon batch
    can forge it): ``id`` is the sender it claims; Salt's ``sig`` when ``signer`` signed it."""
    load = {"id": sender, "tag": "ignored", "data": data, "cmd": "_minion_event"}
    return {**load, "sig": f"signature of {signer}"} if signer else load


def signed(data, signer, at=1500.0):
    """A job return whose result ``signer`` sealed, as vmpower's module seals it."""
    ret = data["return"]
    message = core.seal_message(signer, ret, at).decode()
    return {**data, "return": {**ret, core.SEAL: {"at": at, "sig": f"{signer} signed {message}"}}}


def keys(minion, message, signature):
    """The master's keys, faked: a seal verifies with the key of the minion who made it, over
    what it signed."""
    return signature == f"{minion} signed {message.decode()}"


# --- classify: who vouches for an event ------------------------------------------------------
JOB = {"fun": "vmpower.sync", "jid": "1", "return": {"checked": 1}}
BEACON_TAG = "salt/beacon/hv1/vmpower/lifecycle/stopped"


@pytest.mark.parametrize(
    "tag, data, expected",
    [
        # A job return: a fact only when the minion its tag names sealed it.
        ("salt/job/1/ret/hv1", {**JOB, "id": "hv1"}, ("hv1", False, False)),
        ("salt/job/1/ret/hv1", signed({**JOB, "id": "hv1"}, "hv1"), ("hv1", True, False)),
        ("salt/job/1/ret/hv1", signed({**JOB, "id": "hv1"}, "evil"), ("hv1", False, False)),
        ("salt/job/1/ret/hv1", signed({**JOB, "id": "hv2"}, "hv2"), ("hv1", False, True)),
        ("salt/job/1/ret/hv1", signed(JOB, "hv1"), ("hv1", False, True)),
        ("salt/job/1/ret/hv1", {**JOB, "id": "hv1", "return": {"checked": 1, core.SEAL: None}},
         ("hv1", False, False)),
        # Salt's own signature (minion_sign_messages) vouches for nothing here.
        ("salt/job/1/ret/hv1", {**JOB, "id": "hv1", "sig": "signature of hv1"}, ("hv1", False, False)),
        # A beacon's data as it is: a claim under its tag's minion.
        (BEACON_TAG, beacon_path("hv1", LIFE), ("hv1", False, False)),
        (BEACON_TAG, LIFE, ("hv1", False, False)),
        (BEACON_TAG, beacon_path("hv1", LIFE, claimed="hv2"), ("hv1", False, True)),
        # An event.send load (or a batch's copy of one): a claim under its id, signed or not.
        (BEACON_TAG, fire_master_path("hv1", LIFE), ("hv1", False, False)),
        (BEACON_TAG, fire_master_path("hv1", LIFE, signer="hv1"), ("hv1", False, False)),
        (BEACON_TAG, fire_master_path("hv1", {**LIFE, "id": "hv2"}, signer="hv1"), ("hv1", False, True)),
        ("salt/beacon/hv2/vmpower/lifecycle/stopped", fire_master_path("evil", LIFE, "evil"),
         ("evil", False, True)),
        ("salt/beacon/hv2/vmpower/lifecycle/stopped", fire_master_path("hv2", LIFE), ("hv2", False, False)),
        (BEACON_TAG, {**fire_master_path("hv1", LIFE), "id": 7, **LIFE}, ("hv1", False, True)),
    ],
)
def test_who_vouches_for_an_event(tag, data, expected):
    event = core.classify(tag, data, 2000.0, keys)
    assert (event.minion, event.authenticated, event.forged) == expected


def test_without_the_masters_keys_everything_is_a_claim():
    data = signed({**JOB, "id": "hv1"}, "hv1")
    assert core.classify("salt/job/1/ret/hv1", data, 2000.0).authenticated is False


@pytest.mark.parametrize("answer", [1, "yes", None])
def test_only_a_plain_yes_from_the_keys_vouches(answer):
    event = core.classify("salt/job/1/ret/hv1", signed({**JOB, "id": "hv1"}, "hv1"), 1.0,
                          lambda minion, message, signature: answer)
    assert event.authenticated is False


def test_a_sealed_sync_is_a_fact_from_when_it_was_sealed():
    data = signed({**JOB, "id": "hv1"}, "hv1", at=1500.0)
    assert core.classify("salt/job/1/ret/hv1", data, 2000.0, keys).at == 1500.0  # a replay is old news
    assert core.classify("salt/job/1/ret/hv1", data, 1000.0, keys).at == 1000.0  # never ahead of the master


def test_a_seal_covers_the_whole_result():
    data = signed({**JOB, "id": "hv1"}, "hv1")
    tampered = {**data, "return": {**data["return"], "checked": 99}}
    assert core.classify("salt/job/1/ret/hv1", tampered, 2000.0, keys).authenticated is False


def test_a_beacon_path_lifecycle_event_keeps_what_libvirt_said():
    event = core.classify(BEACON_TAG, beacon_path("hv1", LIFE), 2000.0)
    assert event.kind == "lifecycle"
    assert (event.uuid, event.name, event.transition, event.reason) == (
        UUID,
        "web1",
        "stopped",
        "guest_shutdown",
    )
    assert event.at == 1000.5  # when libvirt called back, not when the master heard of it


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
    event = core.classify("salt/job/1/ret/hv1", signed(data, "hv1"), 9.0, keys)
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
        # What a store cannot keep: a key that is not a string, a NUL character (PostgreSQL).
        (BEACON_TAG, {**LIFE, 1: "one"}, "the key 1 of its data is not a string"),
        (BEACON_TAG, {**LIFE, "libvirt": {"detail": {(1, 2): 0}}}, r"the key \(1, 2\) of its data at libvirt.detail"),
        (BEACON_TAG, {**LIFE, "extra": [{}, {None: 1}]}, r"the key None of its data at extra\[1\] is not"),
        ("salt/job/1/ret/hv1", {**JOB, "id": "hv1", "return": {"checked": 1, "event_loop": {2: 1}}},
         "the key 2 of its data at return.event_loop"),
        (BEACON_TAG, {**LIFE, "reason": "guest\x00shutdown"}, "its reason holds a NUL character"),
        (BEACON_TAG, {**LIFE, "name": "web\x001"}, "its name holds a NUL character"),
        ("salt/beacon/hv\x001/vmpower/resync", {"reason": "overflow"}, "its minion holds a NUL character"),
        ("salt/job/1/ret/hv1", {**JOB, "id": "hv1", "fun": "vmpower.reconcile", "return": "bad\x00"},
         "its reason holds a NUL character"),
    ],
)
def test_malformed_vmpower_events_are_refused_with_a_reason(tag, data, message):
    with pytest.raises(core.Malformed, match=message):
        core.classify(tag, data, 1.0)


def test_a_batch_keeps_the_good_and_counts_the_malformed():
    deep: list = []
    for _ in range(100_000):  # deeper than Python's recursion limit
        deep = [deep]
    batch = [
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/stopped", "data": LIFE},
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/stopped", "data": {**LIFE, "uuid": 5}},
        "not even a mapping",
        {"tag": "salt/job/1/ret/hv1", "data": {"fun": "test.ping"}},
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/stopped", "data": {**LIFE, 1: "one"}},
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/stopped", "data": {**LIFE, "reason": "a\x00"}},
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/stopped", "data": {**LIFE, "deep": deep}},
        {"tag": "salt/job/1/ret/hv1", "data": signed({**JOB, "id": "hv1"}, "hv1")},
        {"tag": "salt/beacon/hv2/vmpower/resync", "data": {"reason": "connected", "lost": 0}},
    ]
    kept, skipped = core.split_batch(batch, 1.0, keys)
    assert [(e.kind, e.authenticated) for e in kept] == [("lifecycle", False), ("sync", True), ("resync", False)]
    assert len(skipped) == 5
    assert "cannot be kept as JSON" in skipped[4]


def test_an_event_is_kept_as_sorted_json():
    event = core.classify(BEACON_TAG, {**LIFE, "id": "hv1"}, 1.0)
    assert json.loads(event.data_json) == {**LIFE, "id": "hv1"}
    assert event.data_json == json.dumps({**LIFE, "id": "hv1"}, sort_keys=True)


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
        ({}, [core.NO_SYNC]),
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
