"""The immediate path's shapes and the master link's bookkeeping (the real minion bus is in
tests/daemons/test_event_path.py and test_master_away.py)."""

from vmpower.core import reconnect
from vmpower.eventloop import delivery
from vmpower.eventloop.failures import Failures

OPTS = {"id": "host1"}


def test_events_look_exactly_like_the_beacons():
    items = [{"tag": "lifecycle/stopped", "uuid": "u", "transition": "stopped"},
             {"tag": "resync", "reason": "burst", "lost": 3}]
    assert delivery.beacon_events(OPTS, "vmpower", items) == [
        {"tag": "salt/beacon/host1/vmpower/lifecycle/stopped",
         "data": {"uuid": "u", "transition": "stopped", "id": "host1"}},
        {"tag": "salt/beacon/host1/vmpower/resync",
         "data": {"reason": "burst", "lost": 3, "id": "host1"}}]
    assert items[0]["tag"] == "lifecycle/stopped"  # the watcher's own data is left alone


def test_a_masterless_minion_has_no_immediate_path():
    assert delivery.masterless({"file_client": "local"})
    assert delivery.masterless({"local": True})
    assert not delivery.masterless({"file_client": "local", "use_master_when_local": True})
    assert not delivery.masterless({"file_client": "remote"})


class Clock:
    def __init__(self, at):
        self.at = at

    def __call__(self):
        return self.at

    def step(self, seconds):
        self.at += seconds


class Link:
    """A MasterLink (its thread not started) whose wall and monotonic clocks read ``at``."""

    def __init__(self):
        self.clock = Clock(0.0)
        self.backs = []
        self.link = delivery.MasterLink(OPTS, lambda: self.backs.append(1), Failures(),
                                        clock=self.clock, monotonic=self.clock,
                                        boot_id=lambda: "boot-1")

    def heard(self, tag, at, data=None):
        self.clock.at = at
        self.link._heard(tag, data)

    def announce(self, now):
        self.clock.at = now
        self.link._announce()

    def __getattr__(self, name):
        return getattr(self.link, name)


def link():
    made = Link()
    return made, made.backs


def started(at):
    return delivery.sync_started("boot-1", at, 1_800_000_000.0 + at)


def test_the_master_coming_back_is_announced_once():
    master, backs = link()
    master.heard("__master_connected", 1.0)  # all is well: nothing to announce
    master.announce(100.0)
    assert backs == [] and master.connected is True
    master.heard("__master_disconnected", 2.0)
    master.heard("__master_disconnected", 4.0)  # status.master repeats it while away
    master.announce(101.0)
    assert backs == [] and master.connected is False and master.changed_at == 2.0
    master.heard("__master_connected", 30.0)
    master.announce(130.0)
    master.announce(131.0)
    assert backs == [1] and master.reconnections == 1


def test_a_flapping_link_costs_one_resync_per_spacing():
    master, backs = link()
    now = 1000.0
    for _ in range(10):  # down and up every second
        master.heard("__master_disconnected", now)
        master.heard("__master_connected", now + 0.5)
        master.announce(now + 0.5)
        now += 1
    assert len(backs) == 1
    master.announce(now + reconnect.SPACING)  # the last return is announced, late
    assert len(backs) == 2


def test_a_disabled_or_deleted_beacon_is_not_live():
    live = {"beacons": {"vmpower": [{"uri": "qemu:///system"}]}}
    assert delivery.beacon_live(live, "vmpower")
    assert not delivery.beacon_live({"beacons": {"vmpower": [{"uri": "x"}, {"enabled": False}]}},
                                    "vmpower")  # beacons.disable_beacon
    assert not delivery.beacon_live({"beacons": {"enabled": False, "vmpower": []}}, "vmpower")
    assert not delivery.beacon_live({"beacons": {}}, "vmpower")  # beacons.delete
    assert delivery.beacon_live({"beacons": {}, "pillar": {"beacons": {"vmpower": []}}}, "vmpower")


def test_the_bus_says_not_now_for_a_disabled_beacon():
    bus = delivery.MinionBus({"id": "h", "beacons": {"vmpower": [{"enabled": False}]}}, "vmpower")
    assert bus([{"tag": "resync", "reason": "connected", "lost": 0}]) is None


def test_the_beacons_setting_salt_announces_wins_over_a_stale_copy_in_opts():
    # Salt 3006's loader gives a beacon a deep copy of the minion's opts: beacons.disable_beacon
    # changes the minion's setting, not that copy, and announces the new setting on the bus.
    master, _ = link()
    opts = {"id": "h", "beacons": {"vmpower": [{"uri": "qemu:///system"}]}}
    assert master.beacons is None
    master.heard("/salt/minion/minion_beacons_list_complete", 1.0,
                  {"beacons": {"vmpower": [{"enabled": False}]}})  # a listing changes nothing
    assert master.beacons is None
    disabled = {"vmpower": [{"uri": "qemu:///system"}, {"enabled": False}]}
    master.heard("/salt/minion/minion_beacon_disabled_complete", 2.0,
                  {"complete": True, "beacons": disabled})
    assert master.beacons == disabled
    master.heard("/salt/minion/minion_beacon_modify_complete", 3.0, {"beacons": "garbage"})
    assert master.beacons == disabled  # a malformed announcement is ignored
    bus = delivery.MinionBus(opts, "vmpower", beacons=lambda: master.beacons)
    assert delivery.beacon_live(opts, "vmpower")
    assert not delivery.beacon_live(opts, "vmpower", master.beacons)
    assert bus([{"tag": "resync", "reason": "connected", "lost": 0}]) is None
    master.heard("/salt/minion/minion_beacon_enabled_complete", 4.0,
                  {"beacons": {"vmpower": [{"uri": "qemu:///system"}, {"enabled": True}]}})
    assert delivery.beacon_live(opts, "vmpower", master.beacons)
    master.heard("/salt/minion/minion_beacon_delete_complete", 5.0, {"beacons": {}})
    assert not delivery.beacon_live(opts, "vmpower", master.beacons)


def test_a_resync_no_sync_answered_is_fired_again_and_a_sync_stops_that():
    master, backs = link()
    master.heard("__master_disconnected", 100.0)
    master.heard("__master_connected", 130.0)
    master.announce(130.0)
    assert backs == [1]
    master.announce(130.0 + reconnect.ANSWER_WAIT)  # the resync or its job was lost
    assert backs == [1, 1]
    master.heard(delivery.SYNC_STARTED, 150.0, started(120.0))  # began before: no answer
    master.heard(delivery.SYNC_STARTED, 150.0, {"monotonic": "soon", "boot_id": "boot-1"})  # malformed: ignored
    master.announce(145.0 + 2 * reconnect.ANSWER_WAIT)
    assert len(backs) == 3
    master.heard(delivery.SYNC_STARTED, 176.0, started(175.5))  # the reactor's sync
    master.announce(1000.0)
    assert len(backs) == 3 and master.health()["resyncs_unanswered"] == 0


def test_signing_in_again_after_a_loss_is_the_master_back():
    # Salt 3006.29 reconnects by signing in again, with no __master_connected.
    master, backs = link()
    master.heard(delivery.AUTHENTICATED, 1.0, {"key": [], "creds": {}})  # the first sign-in
    master.announce(1.0)
    assert backs == [] and master.connected is None
    master.heard("__master_disconnected", 10.0)
    master.heard(delivery.AUTHENTICATED, 40.0, {"key": [], "creds": {}})
    master.announce(40.0)
    assert backs == [1] and master.connected is True and master.reconnections == 1
    master.heard("__master_connected", 42.0)  # 3008 says it too: the same return
    master.heard(delivery.AUTHENTICATED, 43.0, {})
    master.announce(43.0)
    assert backs == [1] and master.reconnections == 1


def test_a_backward_wall_step_does_not_silence_the_master_links_resync():
    wall, mono = Clock(1_800_000_000.0), Clock(500.0)
    backs = []
    master = delivery.MasterLink(OPTS, lambda: backs.append(wall()), Failures(), clock=wall,
                                 monotonic=mono, boot_id=lambda: "boot-1")
    master._heard("__master_disconnected")
    mono.step(30)
    wall.step(30)
    master._heard("__master_connected")
    master._announce()
    assert len(backs) == 1 and master.changed_at == wall()  # people read the wall clock
    wall.step(-3600)  # NTP steps the wall clock back an hour
    mono.step(60)  # the master goes away again a minute later...
    wall.step(60)
    master._heard("__master_disconnected")
    mono.step(60)  # ... and comes back
    wall.step(60)
    master._heard("__master_connected")
    master._announce()
    assert len(backs) == 2, "the second outage got no resync"


def test_only_a_sync_of_this_boot_started_after_the_resync_answers_it():
    wall, mono = Clock(1_800_000_000.0), Clock(500.0)
    backs = []
    master = delivery.MasterLink(OPTS, lambda: backs.append(1), Failures(), clock=wall,
                                 monotonic=mono, boot_id=lambda: "boot-1")
    master._heard("__master_disconnected")
    mono.step(30)
    master._heard("__master_connected")
    master._announce()
    assert backs == [1]
    mono.step(1)
    wall.step(-3600)  # a sync started after the resync, by a wall clock stepped back meanwhile
    master._heard(delivery.SYNC_STARTED, {"started": wall(), "monotonic": mono() - 5,
                                          "boot_id": "boot-1"})  # began before: no answer
    master._heard(delivery.SYNC_STARTED, {"started": wall(), "monotonic": mono(),
                                          "boot_id": "boot-0"})  # another boot's clock
    master._heard(delivery.SYNC_STARTED, {"started": wall()})  # no monotonic time: cannot tell
    mono.step(reconnect.ANSWER_WAIT)
    master._announce()
    assert backs == [1, 1]  # unanswered: asked again
    master._heard(delivery.SYNC_STARTED, {"started": wall(), "monotonic": mono(),
                                          "boot_id": "boot-1"})
    mono.step(1000)
    master._announce()
    assert backs == [1, 1]
