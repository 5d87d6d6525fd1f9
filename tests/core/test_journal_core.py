"""What this host's journal says of a domain's going off (``seen_off``): only a stop or crash
seen in this boot, on this URI, with nothing missed since."""

import pytest

from vmpower.core.journal import GAP, Observation, seen_off
from vmpower.core.model import Transition

BOOT, URI, UUID = "boot-1", "qemu:///system", "u-1"


def seen(transition=Transition.STOPPED, reason="shutdown", boot=BOOT, uri=URI):
    return Observation(7, boot, uri, UUID, transition, reason, 100.0, 1_800_000_000.0)


@pytest.mark.parametrize("transition", [Transition.STOPPED, Transition.CRASHED])
def test_a_stop_or_crash_seen_here_gives_its_reason(transition):
    assert seen_off(seen(transition, "migrated"), False, BOOT, URI) == "migrated"


@pytest.mark.parametrize("latest,gap_after", [
    (None, False),                                   # never seen
    (seen(), True),                                  # something may have come after, unseen
    (seen(boot="boot-0"), False),                    # another boot of this host
    (seen(uri="qemu+ssh://other/system"), False),    # another hypervisor
    (seen(Transition.STARTED, "booted"), False),     # its last word is that it started
    (seen(GAP, "reconnected"), False),
])
def test_anything_else_is_nothing_seen(latest, gap_after):
    assert seen_off(latest, gap_after, BOOT, URI) == ""


def test_seen_at_is_when_the_last_row_of_this_boot_and_uri_was_seen():
    from vmpower.core.journal import seen_at

    assert seen_at(seen(Transition.STARTED, "booted"), BOOT, URI) == 100.0
    assert seen_at(seen(boot="boot-0"), BOOT, URI) == 0.0
    assert seen_at(seen(uri="qemu+ssh://other/system"), BOOT, URI) == 0.0
    assert seen_at(None, BOOT, URI) == 0.0
