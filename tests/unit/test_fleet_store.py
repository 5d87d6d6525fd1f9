"""The master's side on a real store (SQLite, and a real PostgreSQL server): the ``vmpower``
returner and runner as Salt's loader loads them (through the ``salt.loader`` entry point),
the fleet tables, a report of records and events, and bad input (an unreachable store, a
malformed event)."""

import base64
import logging
import os
import time

import pytest
import salt.config
import salt.loader
from salt.exceptions import SaltInvocationError

from vmpower import fleet
from vmpower.core.fleet import NO_SYNC
from vmpower.core.model import Cause, PowerState, Record, VmState
from vmpower.store import Change, open_store
from vmpower.store.events import FleetStore

U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"
U3 = "33333333-3333-3333-3333-333333333333"
UNREACHABLE = "postgresql://vmpower:pw@127.0.0.1:1/vmpower"


def master_opts(tmp_path, store, **vmpower):
    opts = salt.config.master_config(None)
    opts.update(
        cachedir=str(tmp_path / "mcache"),
        pki_dir=str(tmp_path / "mpki"),
        extension_modules=str(tmp_path / "mextmods"),
        sock_dir=str(tmp_path / "msock"),
        vmpower={"store": store, **vmpower},
    )
    return opts


@pytest.fixture
def returner(tmp_path, store_location):
    def load(store=store_location, **vmpower):
        return salt.loader.returners(master_opts(tmp_path, store, **vmpower), {})["vmpower.event_return"]

    return load


@pytest.fixture
def runner(tmp_path, store_location):
    def load(store=store_location, **vmpower):
        opts = master_opts(tmp_path, store, **vmpower)
        return salt.loader.runner(opts, utils=salt.loader.utils(opts))

    return load


def lifecycle(minion, uuid, transition, reason, name="web1", at=None):
    return {
        "tag": f"salt/beacon/{minion}/vmpower/lifecycle/{transition}",
        "data": {
            "uuid": uuid,
            "name": name,
            "transition": transition,
            "reason": reason,
            "libvirt": {"event": transition.upper(), "detail": "X"},
            "seq": 1,
            "timestamp": at or time.time(),
            "uri": "qemu:///system",
            "id": minion,
        },
    }


def sync_return(minion, took=0.5, actions=()):
    return {
        "tag": f"salt/job/1/ret/{minion}",
        "data": {
            "fun": "vmpower.sync",
            "id": minion,
            "jid": "1",
            "success": True,
            "retcode": 0,
            "return": {
                "host": minion,
                "checked": 2,
                "updated": 0,
                "took": took,
                "actions": list(actions),
                "skipped": [],
                "warnings": [],
            },
        },
    }


def write_records(location, *records):
    """Records as minions write them (with their audit entries) to the fleet's database."""
    with open_store(location) as store:
        changes = [Change(None, r, Cause.SYNC, "adopt", f"first seen {r.power_state.value}") for r in records]
        assert store.commit(changes, time.time()) == []


def rec(uuid, name, host, vm_state, power_state, **kw):
    return Record(
        uuid, name, host, VmState(vm_state), PowerState(power_state), version=1, updated_at=time.time(), **kw
    )


def test_the_returner_and_runner_come_through_the_entry_point(returner, runner):
    import inspect
    import os

    assert os.path.basename(os.path.dirname(inspect.getfile(returner().func))) == "_returners"
    functions = runner()
    for name in ("report", "history", "hosts", "master_config"):
        assert "CLI Example:" in inspect.getdoc(functions[f"vmpower.{name}"].func)


def test_event_return_keeps_vmpower_events_and_counts_the_malformed(returner, store_location, caplog):
    batch = [
        lifecycle("hv1", U1, "stopped", "guest_shutdown"),
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/stopped", "data": {"uuid": "garbage"}},
        {"tag": "salt/job/9/ret/hv1", "data": {"fun": "test.ping", "return": True}},
        {"tag": "salt/beacon/hv2/vmpower/resync", "data": {"reason": "reconnected", "lost": 0, "id": "hv2"}},
        sync_return("hv2"),
    ]
    with caplog.at_level(logging.WARNING):
        result = returner()(batch)
    assert result == {"kept": 3, "skipped": 1, "error": None}
    assert "skipped a malformed vmpower event" in caplog.text and "'garbage' is not a UUID" in caplog.text
    with open_store(store_location) as store:
        fleet = FleetStore(store)
        kinds = [(e["minion"], e["kind"]) for e in fleet.events()]
        assert kinds == [("hv1", "lifecycle"), ("hv2", "resync"), ("hv2", "sync")]
        assert fleet.counters() == {"events": 3, "malformed_events": 1}
        hosts = fleet.hosts()
        assert hosts["hv2"]["last_resync_reason"] == "reconnected"
        # Nobody signed the sync: kept as hv2's claim, it says nothing of when hv2 synced.
        assert hosts["hv2"]["last_sync_at"] == 0 and hosts["hv2"]["last_sync_took"] is None
        assert hosts["hv1"]["last_sync_at"] == 0


def test_retention_prunes_old_events(store_location):
    import dataclasses

    from vmpower.core.fleet import classify

    event = lifecycle("hv1", U1, "started", "booted", at=1.0)
    old = classify(event["tag"], event["data"], 1.0)
    with open_store(store_location) as store:
        fleet = FleetStore(store)
        fleet.add([old, dataclasses.replace(old, at=time.time())])
        assert fleet.prune(0) == 0  # 0 keeps everything
        assert fleet.prune(30) == 1
        assert len(fleet.events()) == 1


def test_an_unreachable_store_is_a_clear_error_and_the_returner_goes_on(returner, caplog, tmp_path):
    with caplog.at_level(logging.ERROR):
        result = returner(store=UNREACHABLE)([lifecycle("hv1", U1, "stopped", "guest_shutdown")])
    assert (
        result["kept"] == 0
        and "the vmpower store postgresql://vmpower:***@127.0.0.1:1/vmpower" in result["error"]
    )
    assert "vmpower returner: 1 vmpower event(s) not kept" in caplog.text
    assert "pw@" not in caplog.text
    # And a store that comes back is used again by the next batch.
    good = str(tmp_path / "fleet.sqlite")
    assert returner(store=good)([lifecycle("hv1", U1, "stopped", "guest_shutdown")])["kept"] == 1


def test_the_report_from_the_store(tmp_path, runner, returner, store_location):
    write_records(
        store_location,
        rec(U1, "web1", "hv1", "stopped", "shutdown"),
        rec(U2, "db1", "hv1", "stopped", "running"),
        rec(U3, "web1", "hv2", "active", "running", task_state="powering-off"),
    )
    returner()(
        [
            lifecycle("hv1", U1, "stopped", "guest_shutdown"),
            lifecycle("hv1", U2, "started", "booted"),
            sign(sync_return("hv1"), accept_key(tmp_path, "hv1")),
        ]
    )
    functions = runner()
    report = functions["vmpower.report"]()
    assert report["source"] == "store"
    rows = {(r["host"], r["name"]): r for r in report["vms"]}
    assert set(rows) == {("hv1", "web1"), ("hv1", "db1"), ("hv2", "web1")}
    web1 = rows[("hv1", "web1")]
    assert (web1["vm_state"], web1["power_state"], web1["disagreement"]) == ("stopped", "shutdown", "")
    assert web1["last_change"]["reason"] == "first seen shutdown"
    assert web1["last_event"]["reason"] == "guest_shutdown"
    assert rows[("hv1", "db1")]["disagreement"] == "vm_state stopped but power_state running"
    assert report["hosts"]["hv1"]["problems"] == []
    assert report["hosts"]["hv2"]["problems"] == [NO_SYNC]
    assert report["summary"]["vms"] == 3 and report["summary"]["disagreeing"] == 1

    only = functions["vmpower.report"](disagreement=True)
    assert [r["name"] for r in only["vms"]] == ["db1"]
    drift = functions["vmpower.drift"](source="store")
    assert [(r["host"], r["name"], r["disagreement"]) for r in drift["drifting"]] == [
        ("hv1", "db1", "vm_state stopped but power_state running")]
    assert drift["unknown"] == {"hv2": [NO_SYNC]}  # the store never heard hv2 sync
    with pytest.raises(SaltInvocationError, match="source must be one of"):
        functions["vmpower.drift"](source="tea-leaves")
    assert [r["host"] for r in functions["vmpower.report"](host="hv2")["vms"]] == ["hv2"]
    assert functions["vmpower.report"](stuck=True, stuck_after=0)["vms"][0]["uuid"] == U3
    assert functions["vmpower.report"](state="running")["summary"]["vms"] == 2
    with pytest.raises(SaltInvocationError, match="state must be a vm_state or power_state"):
        functions["vmpower.report"](state="sleepy")

    history = functions["vmpower.history"]("web1", host="hv1")
    assert list(history) == [U1]
    assert [e["source"] for e in history[U1]] == ["audit", "lifecycle"]
    assert set(functions["vmpower.history"]("web1")) == {U1, U3}  # one name, two hosts
    with pytest.raises(SaltInvocationError, match="knows no VM named 'nothing'"):
        functions["vmpower.history"]("nothing")

    hosts = functions["vmpower.hosts"]()
    assert set(hosts["hosts"]) == {"hv1", "hv2"} and hosts["counters"]["events"] == 3


def test_hosts_not_synced_in_time_and_with_the_loop_down(runner, store_location):
    with open_store(store_location) as store:
        fleet = FleetStore(store)
        fleet.host_status("hv1", time.time() - 10_000, sync={"took": 1.0})
        fleet.host_status("hv2", time.time(), sync={"took": 1.0}, loop={"connected": False})
    hosts = runner(sync_interval=600)["vmpower.hosts"]()["hosts"]
    assert hosts["hv1"]["problems"][0].startswith("not synced for")
    assert hosts["hv2"]["problems"] == ["event loop disconnected"]


def test_an_unreachable_store_in_the_runner_is_a_clear_error(runner):
    with pytest.raises(
        SaltInvocationError,
        match=r"fleet store cannot be read: the vmpower store "
        r"postgresql://vmpower:\*\*\*@127.0.0.1:1/vmpower",
    ):
        runner(store=UNREACHABLE)["vmpower.report"]()


def test_a_bad_source_is_refused(runner):
    with pytest.raises(SaltInvocationError, match="source must be one of auto, store, minions"):
        runner()["vmpower.report"](source="crystal-ball")


def test_master_config_names_shipped_reactor_files(runner):
    import os

    config = runner()["vmpower.master_config"]()
    paths = [path for entry in config["reactor"] for paths in entry.values() for path in paths]
    assert paths and all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    assert config["event_return"] == "vmpower"


def test_a_note_is_not_the_last_change(store_location):
    from vmpower.store import Note

    record = rec(U1, "web1", "hv1", "stopped", "shutdown")
    write_records(store_location, record)
    with open_store(store_location) as store:
        store.commit([], time.time(), [Note(record, Cause.EVENT, "dropped", "event started is stale"),
                                       Note(record, Cause.SYNC, "none", "paused: log only")])
        # A write of bookkeeping alone (no field of the record's diff changed) is no change either.
        later = record.replace(version=2, off_since=5.0)
        assert store.commit([Change(record, later, Cause.SYNC, "update", "in sync")], time.time()) == []
        assert FleetStore(store).last_changes()[U1]["action"] == "adopt"
        assert FleetStore.last_changes_of(store, [U1])[U1]["reason"] == "first seen shutdown"
        assert [e["action"] for e in store.history(U1)][-3:] == ["dropped", "none", "update"]  # history


# --- who vouches for an event --------------------------------------------------------------
def accept_key(tmp_path, minion):
    """A key pair for ``minion``, its public key accepted by the master (``pki_dir/minions``);
    the minion's ``pki_dir``, where its ``minion.pem`` is."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pki = tmp_path / "minion-pki" / minion
    pki.mkdir(parents=True)
    (pki / "minion.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    accepted = tmp_path / "mpki" / "minions"
    accepted.mkdir(parents=True, exist_ok=True)
    (accepted / minion).write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(pki)


def sign(event, minion_pki):
    """``event`` (a job return) with its result sealed as vmpower's module seals it on the
    minion whose ``pki_dir`` is ``minion_pki``, in the name of the return's ``id``."""
    opts = {"id": event["data"]["id"], "pki_dir": minion_pki}
    return {**event, "data": {**event["data"], "return": fleet.seal(opts, event["data"]["return"])}}


def test_only_a_return_its_minion_sealed_says_it_synced(tmp_path, returner, runner, store_location):
    hv1, evil = accept_key(tmp_path, "hv1"), accept_key(tmp_path, "evil")
    accept_key(tmp_path, "hv2")
    connected = {"connected": True, "watchers": {"qemu:///system": {"connected": True}}}

    def forged_sync(minion):
        event = sync_return(minion)
        event["data"]["return"]["event_loop"] = connected
        return event

    batch = [
        sign(sync_return("hv1", took=0.25), hv1),
        forged_sync("hv2"),  # from evil's beacon batch: the tag and data of a real return
        sign(forged_sync("hv2"), evil),  # sealed in hv2's name, with evil's key
        {"tag": "salt/beacon/hv2/vmpower/resync",  # shaped like an event.send load from hv2
         "data": {"cmd": "_minion_event", "id": "hv2", "tag": "salt/beacon/hv2/vmpower/resync",
                  "data": {"reason": "connected", "lost": 0, "id": "hv2"}}},
    ]
    assert returner()(batch) == {"kept": 4, "skipped": 0, "error": None}
    with open_store(store_location) as store:
        events = FleetStore(store).events()
    assert [(e["minion"], e["kind"], e["authenticated"]) for e in events] == [
        ("hv1", "sync", True), ("hv2", "sync", False), ("hv2", "sync", False), ("hv2", "resync", False)]
    functions = runner(sync_interval=600)
    for hosts in (functions["vmpower.hosts"]()["hosts"], functions["vmpower.report"]()["hosts"]):
        assert hosts["hv1"]["last_sync_took"] == 0.25 and hosts["hv1"]["problems"] == []
        assert hosts["hv2"]["last_sync_at"] is None and hosts["hv2"]["event_loop_connected"] is None
        assert hosts["hv2"]["problems"] == [NO_SYNC]


def test_the_minions_key_is_loaded_once_per_key_file_and_seals_as_salt_verifies(tmp_path):
    # Loading (and checking) a key costs some 100 ms: a process loads it once, and the jobs the
    # minion forks after its beacon loaded it inherit it. A new key file is loaded again.
    import salt.crypt

    from vmpower.core.fleet import SEAL, SEAL_ALGORITHM, seal_message

    pki = accept_key(tmp_path, "hv1")
    opts = {"id": "hv1", "pki_dir": pki}
    assert fleet.seal_key(opts) is fleet.seal_key(opts)
    first = fleet.seal_key(opts)
    sealed = fleet.seal(opts, {"host": "hv1"})
    message = seal_message("hv1", {"host": "hv1"}, sealed[SEAL]["at"])
    assert salt.crypt.verify_signature(str(tmp_path / "mpki" / "minions" / "hv1"), message,
                                       base64.b64decode(sealed[SEAL]["sig"]),
                                       algorithm=SEAL_ALGORITHM) is True
    key = os.path.join(pki, "minion.pem")
    os.utime(key, (1, 1))  # the key file replaced: its modification time changes
    assert fleet.seal_key(opts) is not first


def test_a_batch_with_an_event_no_store_can_keep_keeps_the_rest(returner, store_location, caplog):
    batch = [
        lifecycle("hv1", U1, "stopped", "guest_shutdown"),
        {"tag": "salt/beacon/hv1/vmpower/lifecycle/started",
         "data": {**lifecycle("hv1", U2, "started", "booted")["data"], 1: "a key that is no string"}},
        lifecycle("hv1", U3, "stopped", "guest\x00shutdown"),
        {"tag": "salt/beacon/hv\x002/vmpower/resync", "data": {"reason": "connected", "lost": 0}},
        {"tag": "salt/beacon/hv2/vmpower/resync", "data": {"reason": "connected", "lost": 0, "id": "hv2"}},
    ]
    with caplog.at_level(logging.WARNING):
        assert returner()(batch) == {"kept": 2, "skipped": 3, "error": None}
    assert "the key 1 of its data is not a string" in caplog.text
    assert "its reason holds a NUL character" in caplog.text
    with open_store(store_location) as store:
        fleet = FleetStore(store)
        assert [(e["minion"], e["uuid"]) for e in fleet.events()] == [("hv1", U1), ("hv2", "")]
        assert fleet.counters() == {"events": 2, "malformed_events": 3}
