"""The beacon's configuration: Salt's list of mappings merged by Salt's own helper in the shell
(``vmpower.eventloop.config``), then validated by the pure core (``parse_beacon_config``)."""

import pytest

from vmpower.core.settings import DEFAULT_STOP_GRACE, BeaconSettings, ConfigError
from vmpower.eventloop.config import parse as parse_beacon_config


def test_everything_is_optional():
    assert parse_beacon_config([]) == BeaconSettings()
    assert parse_beacon_config(None) == BeaconSettings()
    defaults = BeaconSettings()
    assert (defaults.uri, defaults.stop_grace, defaults.queue_size) == ("qemu:///system", None, 10000)
    assert defaults.grace() == DEFAULT_STOP_GRACE == 15.0  # none of its own: vmpower:stop_grace
    assert defaults.grace(4) == 4 and BeaconSettings(stop_grace=0).grace(4) == 0
    assert (defaults.immediate, defaults.burst_limit) == (True, 40)
    assert (defaults.keepalive_interval, defaults.keepalive_count) == (5, 3)


def test_salts_list_of_mappings_is_merged():
    settings = parse_beacon_config([{"uri": "test:///default"}, {"stop_grace": 0},
                                    {"queue_size": 10}, {"keepalive": {"interval": 2, "count": 0}}])
    assert settings == BeaconSettings(uri="test:///default", stop_grace=0.0, queue_size=10,
                                      keepalive_interval=2, keepalive_count=0)


def test_a_plain_mapping_is_accepted_too():
    assert parse_beacon_config({"uri": "test:///default"}).uri == "test:///default"


@pytest.mark.parametrize("keepalive,expected", [
    ({"interval": 7}, (7, 3)),
    ([10, 1], (10, 1)),
    ([{"interval": 4}, {"count": 2}], (4, 2)),
    (None, (5, 3)),
])
def test_keepalive_as_a_mapping_a_pair_or_salts_list(keepalive, expected):
    settings = parse_beacon_config([{"keepalive": keepalive}])
    assert (settings.keepalive_interval, settings.keepalive_count) == expected


def test_salts_own_keys_are_left_to_salt_and_the_beacon_name_is_kept():
    settings = parse_beacon_config([{"interval": 5}, {"disable_during_state_run": True},
                                    {"enabled": True}, {"run_once": False},
                                    {"beacon_module": "vmpower"}, {"_beacon_name": "vmpower_lab"}])
    assert settings.name == "vmpower_lab"
    assert settings.interval == 5  # Salt's seconds between runs: the watcher's idle check uses it


def test_the_immediate_path_and_the_burst_limit_can_be_set():
    settings = parse_beacon_config([{"immediate": False}, {"burst_limit": 0}])
    assert (settings.immediate, settings.burst_limit) == (False, 0)


@pytest.mark.parametrize("config,message", [
    ("qemu:///system", "beacons:vmpower must be a list of mappings"),
    ([{"uri": "test:///default"}, "stop_grace"], "beacons:vmpower must be a list of mappings"),
    ([{"url": "qemu:///system"}], "beacons:vmpower: unknown key(s) url"),
    ([{"uri": ""}], "beacons:vmpower:uri must be a non-empty string"),
    ([{"uri": 5}], "beacons:vmpower:uri must be a non-empty string"),
    ([{"stop_grace": "15s"}], "beacons:vmpower:stop_grace must be a number"),
    ([{"stop_grace": -1}], "beacons:vmpower:stop_grace must be at least 0"),
    ([{"stop_grace": True}], "beacons:vmpower:stop_grace must be a number"),
    ([{"queue_size": 0}], "beacons:vmpower:queue_size must be at least 1"),
    ([{"queue_size": 2.5}], "beacons:vmpower:queue_size must be a whole number"),
    ([{"keepalive": 5}], "beacons:vmpower:keepalive must be a mapping of interval and count"),
    ([{"keepalive": [5]}], "beacons:vmpower:keepalive must be a mapping of interval and count"),
    ([{"keepalive": {"interval": 0}}], "beacons:vmpower:keepalive:interval must be at least 1"),
    ([{"keepalive": {"count": -1}}], "beacons:vmpower:keepalive:count must be at least 0"),
    ([{"keepalive": {"count": "3"}}], "beacons:vmpower:keepalive:count must be a number"),
    ([{"keepalive": {"timeout": 3}}], "beacons:vmpower:keepalive: unknown key(s) timeout"),
    ([{"_beacon_name": "lab"}, {"queue_size": -5}], "beacons:lab:queue_size must be at least 1"),
    ([{"immediate": "yes"}], "beacons:vmpower:immediate must be true or false"),
    ([{"burst_limit": -1}], "beacons:vmpower:burst_limit must be at least 0"),
    ([{"burst_limit": 1.5}], "beacons:vmpower:burst_limit must be a whole number"),
])
def test_bad_configuration_is_refused_naming_the_key(config, message):
    with pytest.raises(ConfigError) as caught:
        parse_beacon_config(config)
    assert message in str(caught.value)


def test_without_a_stop_grace_of_its_own_the_beacon_uses_vmpowers():
    from vmpower.eventloop.config import stop_grace_default

    assert stop_grace_default(None) == DEFAULT_STOP_GRACE
    assert stop_grace_default({"vmpower": {"stop_grace": 4}}) == 4.0
    assert stop_grace_default({"vmpower": {"stop_grace": 4}, "pillar": {"vmpower": {"stop_grace": 7}}}) == 7.0
    with pytest.raises(ConfigError, match="vmpower:stop_grace must be at least 0"):
        stop_grace_default({"vmpower": {"stop_grace": -1}})
    # Only stop_grace is merged: an instance's bad pillar is not the beacon's to report, but a
    # vmpower: that is not a mapping still is.
    assert stop_grace_default({"pillar": {"vmpower": {"stop_grace": 2, "instances": {"x": 3}}}}) == 2.0
    with pytest.raises(ConfigError, match="vmpower must be a mapping"):
        stop_grace_default({"vmpower": {"stop_grace": 4}, "pillar": {"vmpower": "oops"}})
