"""No silent gap on the master's side: a real salt-master is away for 30 s while a
real guest shuts down; when it is back, the minion's vmpower beacon fires a
``master_reconnected`` resync, the reactor answers it with a sync, and the record is right.

The minion runs as the README tells operators to configure it: ``master_alive_interval`` set
(without it a ZeroMQ minion never notices that its master went away) and its ``publish_port``
the master's (``status.master`` checks that port). Two set-ups: ``master_tries: -1`` on
Salt 3006 (the minion keeps trying the lost master), and Salt's default ``master_tries`` under
Salt's keepalive parent, as a service runs the minion. The session's master is stopped and started again in place; it answers again before
each test ends.
Asserted: the resync and the record, long before the periodic sync could make it right; with
vmpower's default ``stop_grace``, how soon after the master's return (``stop_grace`` + 5 s at
most, by the contract) is printed.
"""

import contextlib
import json
import time
from pathlib import Path

import psutil
import pytest
from pytestshellutils.exceptions import FactoryTimeout

from vmpower_lab import lab

from .helpers import (
    DEFAULT_URI,
    SALT_MAJOR,
    beacon_config,
    history,
    salt_call,
    salt_cmd,
    start_and_settle,
    vm_record,
    wait_for_event,
    wait_for_job_return,
    wait_for_start_syncs,
    wait_until,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

AWAY = 30  # seconds the master is down
MINION_ID = "vmpower-minion-m"
MINION_ID_KEPT_ALIVE = "vmpower-minion-k"
MINION_ID_GRACE = "vmpower-minion-g"
GRACE = 15  # vmpower's default stop_grace (Nova's)


def test_a_guest_that_stops_while_the_master_is_away_is_recorded_once_it_is_back(
        salt_master, minion_factory, libvirt_daemon, event_listener, make_guest):
    overrides = {"master_alive_interval": 2, "publish_port": salt_master.config["publish_port"]}
    if SALT_MAJOR == 3006:
        # Salt 3006.29 gives up on a lost master after one try and restarts the minion (the
        # next test); with -1 the same minion process keeps trying until the master is back.
        overrides["master_tries"] = -1
    since = time.time()
    with minion_factory.started(MINION_ID, uri=DEFAULT_URI,
                                vmpower={"sync_interval": 3600, "stop_timeout": 30, "stop_grace": 2},
                                beacons={"vmpower": beacon_config(uri=DEFAULT_URI, stop_grace=2)},
                                overrides=overrides) as minion:
        guest, back = _stop_a_guest_while_the_master_is_away(salt_master, minion,
                                                             event_listener, make_guest, since)
        try:
            resync = wait_for_event(event_listener, f"salt/beacon/{MINION_ID}/vmpower/resync",
                                    back, 120, daemon_id=salt_master.id,
                                    match=lambda data: data["reason"] == "master_reconnected")
        except pytest.fail.Exception:
            _unless_salt_never_signed_in_again(salt_master, [minion.id])
            raise
        assert resync == {"reason": "master_reconnected", "lost": 0, "id": MINION_ID}
        _the_record_is_stopped(salt_master, minion, event_listener, guest, back)
        status = salt_call(minion, "vmpower.status")["event_loop"]
        assert status["master"]["reconnections"] >= 1 and status["master"]["connected"] is True
        everyone_answers(salt_master)


# Far longer than stop_grace + 5 s, far shorter than the periodic sync (3600 s): only a retry
# or a resync's sync can make the record right within it.
RIGHT_WITHOUT_THE_PERIODIC_SYNC = 120


def test_with_the_default_grace_the_record_is_right_within_stop_grace_and_5_s_of_the_return(
        salt_master, minion_factory, libvirt_daemon, event_listener, make_guest, pillar_tree):
    """The live case, with vmpower's default stop_grace (15 s) and the periodic sync an hour
    away. As on a host that has run a while, the minion's pillar has a ``schedule`` (empty
    here) and the minion has had a retry before (a sync found a VM off within its grace).
    Then, with every job done, the master goes away and a guest shuts itself down; its
    STOPPED, fired once the grace is over, is dropped by Salt. The master's return brings a
    sync (the beacon's ``master_reconnected`` resync, through the reactor), the first job to
    see the guest off. The record must be right within ``stop_grace`` + 5 s of the master's
    return, whichever path makes it so: that sync (the beacon saw the guest go off long
    before, and journaled it) or a retry once a grace is over, which must not depend on
    Salt's scheduler (it may refuse the call after a reconnect). The test fails if the record
    waits for the periodic sync; the time it took is printed."""
    overrides = {"master_alive_interval": 2, "publish_port": salt_master.config["publish_port"]}
    if SALT_MAJOR == 3006:
        overrides["master_tries"] = -1  # as in the first test
    since = time.time()
    with contextlib.ExitStack() as stack:
        pillar_tree.set(MINION_ID_GRACE, {"schedule": {}})
        stack.callback(pillar_tree.clear, MINION_ID_GRACE)
        minion = stack.enter_context(minion_factory.started(
            MINION_ID_GRACE, uri=DEFAULT_URI,
            vmpower={"sync_interval": 3600, "stop_timeout": 30, "stop_grace": GRACE},
            beacons={"vmpower": beacon_config(uri=DEFAULT_URI, stop_grace=GRACE)},
            overrides=overrides))
        wait_for_start_syncs(event_listener, salt_master.id, minion.id, since)

        # A retry before the outage: a sync finds a VM off within its grace.
        earlier, earlier_dom = make_guest("acpi", "-earlier", start=False)
        start_and_settle(salt_master, minion, event_listener, earlier, earlier_dom)
        earlier_dom.destroy()
        assert "retry_at" in salt_call(minion, "vmpower.sync")
        wait_until(lambda: (r := vm_record(minion, earlier.uuid)) and r["vm_state"] == "stopped",
                   60, lambda: f"the earlier VM to be stopped: {vm_record(minion, earlier.uuid)}")

        guest, dom = make_guest("acpi", start=False)
        start_and_settle(salt_master, minion, event_listener, guest, dom)
        # ACPI power button: the guest powers itself off, nobody hears it
        back = _guest_goes_off_while_the_master_is_away(salt_master, minion, guest, dom,
                                                        dom.shutdown)
        started = time.time()  # the master answers again (started, as factories checks)

        def right():
            record = vm_record(minion, guest.uuid)
            return record if record and (record["vm_state"], record["power_state"]) == (
                "stopped", "shutdown") else None
        # Bounded only by what no retry could explain: the periodic sync is an hour away. How
        # soon it is right (stop_grace + 5 s at most, by the rules) is printed, not asserted:
        # it is Salt's reconnect and reactor latency on this machine as much as vmpower's.
        record = wait_until(right, RIGHT_WITHOUT_THE_PERIODIC_SYNC,
                            lambda: f"the record to say stopped and shutdown after the "
                                    f"master's return: {vm_record(minion, guest.uuid)}")
        right_at = time.time()
        # What Salt said of the link is printed, not waited on: Salt 3006 has announced its
        # master back (__master_connected) while the master was still away. The beacon then
        # asks its resync again until a sync answers it, so the record does not depend on it.
        link = wait_until(lambda: (m := _master_link(minion)).get("connected") is True and m,
                          30, lambda: f"the beacon to have heard of the master's return: "
                                      f"{_master_link(minion)}")
        entries = [e for e in history(minion, guest.uuid) if e["at"] >= back]
        print(f"the master answered {started - back:.1f} s after it was started again, the "
              f"record was right {right_at - started:.1f} s after that (at most; polled), by "
              f"{[(e['cause'], e['action'], e['reason']) for e in entries]}; Salt announced "
              f"the master back {link['since'] - back:+.1f} s from its restart")
        assert record["task_state"] == "", record
        everyone_answers(salt_master)


def _master_link(minion) -> dict:
    """The minion's link to its master as its vmpower beacon last wrote it (``connected``,
    ``since``: when that last changed, epoch seconds)."""
    path = Path(minion.config["cachedir"]) / "vmpower" / "eventloop.json"
    try:
        return json.loads(path.read_text()).get("master") or {}
    except (OSError, ValueError, AttributeError):
        return {}


#: Why the next test may end as an expected failure on Salt 3006, and only then.
SALT_3006_NEVER_CAME_BACK = (
    "Salt 3006.29 with the default master_tries: once its master was gone, the minion never "
    "answered it again (it waits for good in its sign-in, 'Connecting to master. Attempt 1 of "
    "1', neither restarting nor reconnecting; seen with and without vmpower's beacon). Hence "
    "master_tries: -1 on 3006 (docs/configuration.md)")


def test_a_minion_that_restarts_itself_after_losing_its_master_records_the_change(
        salt_master, minion_factory, libvirt_daemon, event_listener, make_guest):
    """Salt's default ``master_tries`` (1) and the minion run as its service runs it, under
    Salt's keepalive parent, which starts the minion again when it exits to be restarted.
    Whichever way the minion comes back, its beacon asks for a sync and the record is right."""
    overrides = {"master_alive_interval": 2, "publish_port": salt_master.config["publish_port"]}
    since = time.time()
    with minion_factory.started(MINION_ID_KEPT_ALIVE, uri=DEFAULT_URI, keepalive=True,
                                vmpower={"sync_interval": 3600, "stop_timeout": 30, "stop_grace": 2},
                                beacons={"vmpower": beacon_config(uri=DEFAULT_URI, stop_grace=2)},
                                overrides=overrides) as minion:
        before = _minion_processes(minion)
        guest, back = _stop_a_guest_while_the_master_is_away(salt_master, minion,
                                                             event_listener, make_guest, since)
        # Whichever way the minion came back (a new process on 3006), its beacon asks for a
        # sync: "connected" from a new process, "master_reconnected" from the old one.
        try:
            wait_for_event(event_listener, f"salt/beacon/{MINION_ID_KEPT_ALIVE}/vmpower/resync",
                           back, 180, daemon_id=salt_master.id,
                           match=lambda data: data["reason"] in ("connected", "master_reconnected"))
        except pytest.fail.Exception:
            # Not vmpower's doing only if Salt never brought the minion back to its master.
            if SALT_MAJOR == 3006 and not _answers(salt_master, minion):
                pytest.xfail(SALT_3006_NEVER_CAME_BACK)
            _unless_salt_never_signed_in_again(salt_master, [minion.id])
            raise
        _the_record_is_stopped(salt_master, minion, event_listener, guest, back)
        restarted = not before & _minion_processes(minion)
        print(f"the minion process {'restarted' if restarted else 'stayed and reconnected'}")
        everyone_answers(salt_master)


def _answers(salt_master, minion) -> bool:
    """Whether ``minion`` answers its master (``test.ping``): Salt's own part of coming back."""
    try:
        returns = salt_cmd(salt_master, minion.id, "test.ping", check=False, cli_timeout=30,
                           expect=())
    except FactoryTimeout:
        return False
    return (returns or {}).get(minion.id) is True


def _minion_processes(minion) -> set:
    """The pids of the minion's processes below its keepalive parent."""
    parent = psutil.Process(minion.pid)
    return {child.pid for child in parent.children(recursive=False)}


def _stop_a_guest_while_the_master_is_away(salt_master, minion, event_listener, make_guest,
                                           since):
    """Once the minion's beacon has connected and its first sync is over: start a guest that
    powers itself off a few seconds after boot, and keep the master away for ``AWAY`` seconds
    while it does. Returns the guest and the time the master was started again."""
    wait_for_start_syncs(event_listener, salt_master.id, minion.id, since)
    guest, dom = make_guest("selfstop", start=False)
    assert salt_call(minion, "vmpower.start", guest.name)["vm_state"] == "active"

    # The guest powers itself off a few seconds after boot, with nobody to hear it.
    return guest, _guest_goes_off_while_the_master_is_away(salt_master, minion, guest, dom)


def _guest_goes_off_while_the_master_is_away(salt_master, minion, guest, dom,
                                             stop=lambda: None) -> float:
    """Stop the master; ``stop()`` the guest (or let it stop by itself) and see it shut off
    while no job can run; start the master again once it has been away ``AWAY`` seconds.
    Returns when it was started again (epoch seconds)."""
    salt_master.terminate()
    away = time.monotonic()
    try:
        stop()
        assert lab.wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF) == \
            libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
        assert vm_record(minion, guest.uuid)["vm_state"] == "active"  # no job ran
        time.sleep(max(0.0, AWAY - (time.monotonic() - away)))  # the outage itself
    finally:
        back = time.time()
        salt_master.start()
    return back


def _the_record_is_stopped(salt_master, minion, event_listener, guest, back):
    """The reactor's sync for the minion's resync returned, and the record says the guest is
    stopped and shut down (a retry after stop_grace may be the one that acts)."""
    wait_for_job_return(event_listener, salt_master.id, minion.id, "vmpower.sync", back, 120)
    record = wait_until(lambda: (r := vm_record(minion, guest.uuid)) and
                        r["vm_state"] == "stopped" and r, 60,
                        lambda: f"the record to be stopped: {vm_record(minion, guest.uuid)}")
    assert record["power_state"] == "shutdown"


def everyone_answers(salt_master):
    """The session's other minions noticed nothing (no master_alive_interval): wait until each
    answers the restarted master again, so that later tests find them as they were."""
    keys = salt_master.salt_key_cli().run("-L", "--out=json").data or {}
    expected = set(keys.get("minions", []))

    answering: set = set()

    def answered():
        try:
            returns = salt_cmd(salt_master, "*", "test.ping", check=False, cli_timeout=10)
        except FactoryTimeout:
            return False  # the salt CLI itself did not finish in time: ask again
        answering.clear()
        answering.update(mid for mid, ret in returns.items() if ret is True)
        return expected <= answering
    try:
        wait_until(answered, 180, f"every minion ({sorted(expected)}) to answer the master again",
                   interval=2)
    except pytest.fail.Exception:
        _unless_salt_never_signed_in_again(salt_master, sorted(expected - answering))
        raise


SALT_SIGN_IN_DIED = (
    "Salt's minion never signed in to its restarted master again: its AsyncAuth._authenticate "
    "task died with asyncio.InvalidStateError (set_exception on a future already done, "
    "salt/crypt.py), and from then on the minion only times out and reconnects. Seen on Salt "
    "3008.4; not vmpower's part (its log: {logs})")


def _unless_salt_never_signed_in_again(salt_master, minion_ids) -> None:
    """Mark the test an expected failure if every minion of ``minion_ids`` (the ones that did
    not come back) shows, in its own log, Salt's sign-in task dying; otherwise return, and the
    caller's failure stands."""
    salt_root = Path(salt_master.config["root_dir"]).parent  # each daemon's root is <root>/<id>
    logs = [salt_root / mid / "logs" / "minion.log" for mid in minion_ids]
    if logs and all(_sign_in_died(log) for log in logs):
        pytest.xfail(SALT_SIGN_IN_DIED.format(logs=", ".join(map(str, logs))))


def _sign_in_died(log: Path) -> bool:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return "InvalidStateError" in text and "in _authenticate" in text
