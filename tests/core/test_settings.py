"""Settings and arguments: good input parses, bad input is refused naming what is wrong."""

import re

import pytest

from vmpower.core import arguments
from vmpower.core.model import Transition, VmState
from vmpower.core.settings import (
    ConfigError,
    InstancePolicy,
    OnCrash,
    OnGuestShutdown,
    OnHostShutdown,
    Settings,
    merge,
    normalize_uuid,
    parse_settings,
)


def test_defaults():
    settings = parse_settings(None)
    assert settings == Settings()
    assert (settings.uri, settings.stop_timeout, settings.sync_interval) == ("qemu:///system", 60.0, 600)


def test_a_full_configuration():
    settings = parse_settings({
        "uri": "test:///default", "store": "/tmp/x.sqlite", "stop_timeout": 5, "sync_interval": 30,
        "restart_limit": 2, "restart_backoff": 1.5,
        "instances": {"web1": {"vm_state": "active"}, "db1": {"task_state": "maintenance"},
                      "lab": {"managed": False, "on_guest_shutdown": "ignore", "on_crash": "restart"}}})
    assert settings.stop_timeout == 5.0 and settings.restart_backoff == 1.5
    web1, _ = settings.policy_for("uuid-of-web1", "web1")
    assert web1.vm_state is VmState.ACTIVE
    assert (web1.on_guest_shutdown, web1.on_crash) == (OnGuestShutdown.RESTART, OnCrash.RESTART)
    lab, error = settings.policy_for("uuid-of-lab", "lab")
    assert error is None and lab.managed is False and lab.on_guest_shutdown is OnGuestShutdown.IGNORE


UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # as libvirt gives it: lower case, dashed


@pytest.mark.parametrize("key", [UUID, UUID.upper(), UUID.replace("-", ""),
                                 UUID.upper().replace("-", ""), "6695EB01-f6a4-8304-79AA-97f2502e193f"])
def test_a_uuid_key_in_any_spelling_names_the_vm(key):
    settings = parse_settings({"instances": {key: {"task_state": "maintenance"}}})
    policy, error = settings.policy_for(UUID, "web1")
    assert error is None and policy.task_state == "maintenance"
    assert settings.policy_for("0b6d0e1c-0000-4000-8000-000000000001", "web2") == (InstancePolicy(), None)


@pytest.mark.parametrize("key", [UUID, UUID.upper(), UUID.replace("-", "")])
def test_entries_under_the_name_and_the_uuid_that_agree_are_merged(key):
    settings = parse_settings({"instances": {
        "web1": {"vm_state": "stopped", "on_host_shutdown": "stop"},
        key: {"vm_state": "stopped", "managed": False}}})
    policy, error = settings.policy_for(UUID, "web1")
    assert error is None
    assert (policy.vm_state, policy.managed, policy.on_host_shutdown) == (
        VmState.STOPPED, False, OnHostShutdown.STOP)


@pytest.mark.parametrize("key", [UUID, UUID.upper()])
@pytest.mark.parametrize("name_entry,uuid_entry", [
    ({"task_state": "maintenance"}, {"managed": False}),
    ({"managed": False}, {"task_state": "maintenance"}),
    ({"task_state": "maintenance"}, {"vm_state": "stopped"}),
    ({"vm_state": "stopped", "task_state": "maintenance"}, {"vm_state": "stopped"}),
])
def test_a_lock_under_either_key_holds(name_entry, uuid_entry, key):
    settings = parse_settings({"instances": {"web1": name_entry, key: uuid_entry}})
    policy, error = settings.policy_for(UUID, "web1")
    assert error is None and policy.task_state == "maintenance"


@pytest.mark.parametrize("entries,keys,what", [
    ({"web1": {"vm_state": "active"}, UUID: {"vm_state": "stopped"}},
     ("web1", UUID), "vm_state"),
    ({"web1": {"on_guest_shutdown": "ignore"}, UUID.upper(): {"on_guest_shutdown": "restart"}},
     ("web1", UUID.upper()), "on_guest_shutdown"),
    ({UUID.upper(): {"vm_state": "active"}, UUID.replace("-", ""): {"vm_state": "stopped"}},
     (UUID.upper(), UUID.replace("-", "")), "vm_state"),
    ({"web1": {"task_state": "maintenance"}, UUID: {"task_state": "backup"}},
     ("web1", UUID), "task_state"),
    # Each fine alone; together a pinned-active VM that is stopped when it crashes.
    ({"web1": {"vm_state": "active"}, UUID: {"on_crash": "stop"}},
     ("web1", UUID), "contradicts"),
])
def test_entries_that_conflict_take_the_vm_out_of_vmpowers_hands(entries, keys, what):
    settings = parse_settings({"instances": {**entries, "web2": {"vm_state": "stopped"}}})
    _, error = settings.policy_for(UUID, "web1")
    assert error is not None and what in error, error
    for key in keys:
        assert f"vmpower:instances:{key}" in error, error
    other, error2 = settings.policy_for("0b6d0e1c-0000-4000-8000-000000000001", "web2")
    assert error2 is None and other.vm_state is VmState.STOPPED


@pytest.mark.parametrize("entries,bad", [
    ({"web1": {"vm_state": "sideways"}, UUID: {"vm_state": "active"}}, "web1"),
    ({"web1": {"vm_state": "active"}, UUID.upper(): {"colour": "blue"}}, UUID.upper()),
    ({"web1": "active", UUID: None}, "web1"),
])
def test_a_bad_entry_under_either_key_is_reported(entries, bad):
    settings = parse_settings({"instances": entries})
    _, error = settings.policy_for(UUID, "web1")
    assert error is not None and f"vmpower:instances:{bad}" in error, error


@pytest.mark.parametrize("raw,message", [
    ([1, 2], "vmpower must be a mapping"),
    ({"uri": 5}, "vmpower:uri must be a non-empty string"),
    ({"uri": ""}, "vmpower:uri must be a non-empty string"),
    ({"stop_timeout": "soon"}, "vmpower:stop_timeout must be a number"),
    ({"stop_timeout": -1}, "vmpower:stop_timeout must be at least 0"),
    ({"stop_timeout": True}, "vmpower:stop_timeout must be a number"),
    ({"sync_interval": 1.5}, "vmpower:sync_interval must be a whole number"),
    ({"sync_interval": 0}, "vmpower:sync_interval must be at least 1"),
    ({"restart_limit": -2}, "vmpower:restart_limit must be at least 0"),
    ({"instances": ["web1"]}, "vmpower:instances must be a mapping"),
    ({"store": 3}, "vmpower:store must be a non-empty string"),
    ({"store": "mysql://db/vmpower"},
     "vmpower:store must be the path of a SQLite file or a postgresql:// DSN; mysql:// stores"),
    ({"store": "sqlite:///tmp/x.sqlite"}, "sqlite:// stores are not supported"),
    ({"store": "host=db dbname=vmpower"}, "write a PostgreSQL connection as a URI"),
])
def test_bad_global_settings_are_refused_by_name(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_settings(raw)


@pytest.mark.parametrize("store", ["/var/cache/salt/minion/vmpower/records.sqlite",
                                   "postgresql://vmpower@db.example.org/vmpower",
                                   "postgres://vmpower:secret@db:5433/vmpower?sslmode=require",
                                   "PostgreSQL://db/vmpower"])
def test_the_store_is_a_sqlite_path_or_a_postgresql_dsn(store):
    assert parse_settings({"store": store}).store == store


@pytest.mark.parametrize("entry,message", [
    ("active", "vmpower:instances:vm1 must be a mapping"),
    ({"vm_state": "running"}, "vmpower:instances:vm1:vm_state must be one of active, stopped"),
    ({"on_guest_shutdown": "explode"}, "on_guest_shutdown must be one of stop, restart, ignore"),
    ({"on_crash": "ignore"}, "vmpower:instances:vm1:on_crash must be one of stop, restart"),
    ({"managed": "no"}, "vmpower:instances:vm1:managed must be true or false"),
    ({"task_state": 7}, "vmpower:instances:vm1:task_state must be a string"),
    ({"colour": "blue"}, "unknown key\\(s\\) colour"),
    ({"vm_state": "active", "on_guest_shutdown": "stop"}, "contradicts"),
])
def test_a_bad_instance_entry_only_affects_that_vm(entry, message):
    settings = parse_settings({"instances": {"vm1": entry, "vm2": {"vm_state": "stopped"}}})
    _, error = settings.policy_for("u1", "vm1")
    assert error is not None
    assert re.search(message, error), error
    policy, error2 = settings.policy_for("u2", "vm2")
    assert error2 is None and policy.vm_state is VmState.STOPPED


def test_restart_delay_doubles_and_is_capped():
    settings = Settings(restart_backoff=10)
    assert [settings.restart_delay(n) for n in range(5)] == [0, 10, 20, 40, 80]
    assert settings.restart_delay(30) == 600


@pytest.mark.parametrize("value,expected", [
    ("6695EB01-F6A4-8304-79AA-97F2502E193F", "6695eb01-f6a4-8304-79aa-97f2502e193f"),
    ("6695eb01f6a4830479aa97f2502e193f", "6695eb01-f6a4-8304-79aa-97f2502e193f"),
])
def test_uuids_are_normalised(value, expected):
    assert normalize_uuid(value) == expected


@pytest.mark.parametrize("value", ["web1", "", None, 12, "6695eb01-f6a4-8304-79aa-97f2502e193"])
def test_malformed_uuids_are_refused(value):
    with pytest.raises(ConfigError, match="is not a UUID"):
        normalize_uuid(value)


class TestArguments:
    @pytest.mark.parametrize("value", [None, "", "  ", True, ["web1"], {"a": 1}])
    def test_target(self, value):
        with pytest.raises(ConfigError, match="name must be a domain name or UUID"):
            arguments.target(value)

    def test_target_accepts_names_and_numbers(self):
        assert arguments.target(" web1 ") == "web1" and arguments.target(42) == "42"

    @pytest.mark.parametrize("value", ["10", -1, True, float("nan")])
    def test_seconds(self, value):
        with pytest.raises(ConfigError, match="timeout must be a number of seconds"):
            arguments.seconds(value, "timeout")

    @pytest.mark.parametrize("value", ["yes", 1, None])
    def test_flag(self, value):
        with pytest.raises(ConfigError, match="force must be true or false"):
            arguments.flag(value, "force")

    def test_transition(self):
        assert arguments.transition("stopped") is Transition.STOPPED
        assert arguments.transition(None) is None
        with pytest.raises(ConfigError, match="transition must be one of started, stopped"):
            arguments.transition("exploded")

    @pytest.mark.parametrize("value", [0, "5", True, 2.5])
    def test_count(self, value):
        with pytest.raises(ConfigError, match="limit must be a whole number"):
            arguments.count(value, "limit")


def test_pillar_is_merged_over_minion_config_key_by_key():
    config = {"uri": "qemu:///system", "stop_timeout": 5, "instances": {"web1": {"managed": False}}}
    pillar = {"uri": "test:///default", "instances": {"web1": {"vm_state": "stopped"}, "db": {}}}
    assert merge(config, pillar) == {
        "uri": "test:///default", "stop_timeout": 5,
        "instances": {"web1": {"managed": False, "vm_state": "stopped"}, "db": {}}}
    assert merge(None, pillar) == pillar and merge(config, None) == config
    assert merge("broken", pillar) == pillar and merge(config, "broken") == "broken"
