"""Dry runs and observe mode, decided in the core (vmpower/core/conduct.py), cell by cell."""

import pytest

from vmpower.core.conduct import ENFORCE, OBSERVE, Conduct, conduct, observed_reason, parse_mode
from vmpower.core.settings import ConfigError


@pytest.mark.parametrize("action, mode, test, expected", [
    ("none", ENFORCE, False, Conduct(True, True, True)),
    ("power_off", ENFORCE, False, Conduct(True, True, True)),
    ("start", ENFORCE, False, Conduct(True, True, True)),
    ("none", OBSERVE, False, Conduct(True, True, True)),  # recording the truth is not acting
    ("power_off", OBSERVE, False, Conduct(False, True, True, "observe mode: would power off; not done")),
    ("start", OBSERVE, False, Conduct(False, True, True, "observe mode: would start; not done")),
    ("none", ENFORCE, True, Conduct(False, False, False, "test: nothing written")),
    ("power_off", ENFORCE, True, Conduct(False, False, False, "test: would power off")),
    ("start", ENFORCE, True, Conduct(False, False, False, "test: would start")),
    ("none", OBSERVE, True, Conduct(False, False, False, "test: nothing written")),
    ("power_off", OBSERVE, True, Conduct(False, False, False, "test: would power off")),
])
def test_conduct_cell_by_cell(action, mode, test, expected):
    assert conduct(action, mode, test) == expected


def test_observed_reason():
    assert observed_reason("power_off", "vm_state stopped but it runs") == \
        "observe mode: would power off: vm_state stopped but it runs"


def test_parse_mode():
    assert parse_mode(None) == parse_mode("") == ENFORCE
    assert parse_mode("observe") == OBSERVE
    with pytest.raises(ConfigError, match="vmpower:mode must be one of enforce, observe, not 'watch'"):
        parse_mode("watch")
