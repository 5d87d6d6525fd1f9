"""Dry runs and observe mode with real daemons: the session's salt-master and two
real salt-minions of this module on the real libvirtd with real QEMU guests, each with a store
of its own and no beacon (so nothing acts unless a test asks):

- ``vmp-dry-e``: vmpower as usual (``enforce``);
- ``vmp-dry-o``: ``vmpower:mode: observe``.

``test=True`` (``vmpower.sync`` and ``vmpower.reconcile`` from the master) says what would be
done and why, and changes nothing: every record and audit entry of the store is the same
before and after, and the guest is left as it was. Observe mode leaves running a VM that
rule 6 would power off, records the truth, and reports and audits what it would have done.
"""

import time

import pytest

from .conftest import NO_PERIODIC_SYNC
from .helpers import DEFAULT_URI, minion_return, read_only, read_record, salt_cmd, wait_for_job_return

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.real

ENFORCE, OBSERVE = "vmp-dry-e", "vmp-dry-o"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry-run")
    return {ENFORCE: str(root / "enforce.sqlite"), OBSERVE: str(root / "observe.sqlite")}


@pytest.fixture(scope="module")
def minions(minion_factory, libvirt_daemon, stores, salt_master, event_listener):
    """Both minions, handed out once the sync the reactor runs for each minion's start has
    returned: a late one would act on a test's guest between the test's steps."""
    before = time.time()
    quiet = {"sync_interval": NO_PERIODIC_SYNC}
    with minion_factory.started(ENFORCE, uri=DEFAULT_URI,
                                vmpower={**quiet, "store": stores[ENFORCE]}) as enforce, \
            minion_factory.started(OBSERVE, uri=DEFAULT_URI,
                                   vmpower={**quiet, "store": stores[OBSERVE], "mode": "observe"}) as observe:
        for minion_id in (ENFORCE, OBSERVE):
            wait_for_job_return(event_listener, salt_master.id, minion_id, "vmpower.sync", before)
        yield {ENFORCE: enforce, OBSERVE: observe}


def snapshot(path):
    """Every record and audit entry of a store, read past vmpower."""
    with read_only(path) as db:
        return ([tuple(row) for row in db.execute("SELECT * FROM instances ORDER BY uuid")],
                [tuple(row) for row in db.execute("SELECT * FROM audit ORDER BY id")])


def history(path, uuid):
    """The audit entries of one VM, read past vmpower (a failing assertion shows them)."""
    with read_only(path) as db:
        return [dict(row) for row in db.execute("SELECT * FROM audit WHERE uuid = ? ORDER BY id",
                                                 (uuid,))]


def running(dom):
    return dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_test_true_changes_nothing(salt_master, minions, stores, make_guest):
    guest, dom = make_guest("acpi", start=False)
    minion_return(salt_cmd(salt_master, ENFORCE, "vmpower.sync"), ENFORCE)  # adopted stopped
    assert read_record(stores[ENFORCE], guest.uuid)["vm_state"] == "stopped"
    dom.create()  # behind vmpower's back: rule 6 would power it off
    before = snapshot(stores[ENFORCE])

    summary = minion_return(salt_cmd(salt_master, ENFORCE, "vmpower.sync", "test=True"), ENFORCE)
    assert summary["test"] is True and summary["updated"] == 0, summary
    actions = [a for a in summary["actions"] if a["uuid"] == guest.uuid]
    assert len(actions) == 1, (summary, dom.state(), history(stores[ENFORCE], guest.uuid))
    [action] = actions
    assert (action["action"], action["result"]) == ("power_off", "test: would power off"), action
    assert action["reason"], action
    ret = minion_return(salt_cmd(salt_master, ENFORCE, "vmpower.reconcile", f"uuid={guest.uuid}",
                                 "transition=started", "test=True"), ENFORCE)
    assert (ret["action"], ret["result"], ret["test"]) == ("power_off", "test: would power off", True), ret
    # Nothing changed: not a record, not an audit entry, not the guest.
    assert snapshot(stores[ENFORCE]) == before
    assert running(dom)

    # The same for real does what the dry run said.
    done = minion_return(salt_cmd(salt_master, ENFORCE, "vmpower.sync"), ENFORCE)
    assert [a["action"] for a in done["actions"] if a["uuid"] == guest.uuid] == ["power_off"], done
    deadline = time.monotonic() + 60
    while running(dom) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(dom)


def test_observe_mode_leaves_a_vm_running_and_reports_what_it_would_have_done(
        salt_master, minions, stores, make_guest):
    guest, dom = make_guest("acpi", start=False)
    first = minion_return(salt_cmd(salt_master, OBSERVE, "vmpower.sync"), OBSERVE)
    assert first["mode"] == "observe", first
    assert read_record(stores[OBSERVE], guest.uuid)["vm_state"] == "stopped"  # recorded: adopted
    dom.create()  # rule 6 would power it off

    summary = minion_return(salt_cmd(salt_master, OBSERVE, "vmpower.sync"), OBSERVE)
    [action] = [a for a in summary["actions"] if a["uuid"] == guest.uuid]
    assert (action["action"], action["result"]) == ("power_off", "observe mode: would power off; not done")
    assert "stopped" in action["reason"], action
    assert running(dom)
    now = read_record(stores[OBSERVE], guest.uuid)
    assert (now["vm_state"], now["power_state"]) == ("stopped", "running"), now  # the truth, the intent kept
    history = minion_return(salt_cmd(salt_master, OBSERVE, "vmpower.history", guest.name), OBSERVE)
    assert history[-1]["action"] == "observe", history
    assert history[-1]["reason"].startswith("observe mode: would power off: "), history
    # The event path does not act either.
    ret = minion_return(salt_cmd(salt_master, OBSERVE, "vmpower.reconcile", f"uuid={guest.uuid}",
                                 "transition=started"), OBSERVE)
    assert ret["result"] == "observe mode: would power off; not done", ret
    assert running(dom)
