"""The journal of what a host's beacon observed (vmpower.journal, on a real SQLite file) and
what a reconcile believes of it (vmpower.core.journal, pure), cell by cell."""

import dataclasses
import os
import sqlite3
import time

import pytest

from vmpower.core.journal import GAP, Observation, believe
from vmpower.core.mapping import EVENT_STARTED
from vmpower.core.model import Transition
from vmpower.core.settings import BeaconSettings
from vmpower.eventloop import Watcher
from vmpower.journal import KEEP, Journal

from .conftest import TEST_URI

BOOT, URI, UUID = "boot-1", "qemu:///system", "u-1"
CLOCK = 1000.0


def row(transition=Transition.STOPPED, uuid=UUID, reason="guest_shutdown", at=CLOCK - 15,
        boot_id=BOOT, uri=URI, seq=0):
    return Observation(seq, boot_id, uri, uuid, transition, reason, at, 1_800_000_000.0 + at)


def gap(reason="reconnected", at=CLOCK - 1):
    return row(GAP, "", reason, at)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "vmpower" / "journal.sqlite")


# What is believed (pure).
def test_the_latest_observation_of_the_domain_in_this_boot_is_believed():
    entry = row(seq=7)
    assert believe(7, UUID, entry, None, BOOT, URI, CLOCK).observation == entry


@pytest.mark.parametrize("seq,entry,later,why", [
    (None, None, None, "no seq"),
    (7, None, None, "seq 7 is not in this host's journal"),
    (7, row(seq=7, uuid="u-2"), None, "not observed for this domain"),
    (7, dataclasses.replace(gap(), seq=7), None, "not observed for this domain"),
    (7, row(seq=7, boot_id="boot-0"), None, "in another boot"),
    (7, row(seq=7, uri="test:///default"), None, "observed on test:///default"),
    (7, row(seq=7, at=CLOCK + 1), None, "later than this host's clock"),
    (7, row(seq=7), row(Transition.STARTED, seq=9), "a later event of this domain (started, seq 9)"),
    (7, row(seq=7), gap("burst"), "a gap in the beacon's watch (burst)"),
])
def test_anything_else_is_believed_in_nothing(seq, entry, later, why):
    belief = believe(seq, UUID, entry, later, BOOT, URI, CLOCK)
    assert belief.observation is None and why in belief.why


def test_a_host_without_a_boot_id_believes_nothing():
    assert believe(7, UUID, row(seq=7, boot_id=""), None, "", URI, CLOCK).observation is None


# The journal on disk.
def test_rows_are_numbered_after_the_last_one_and_read_back(path):
    with Journal(path, boot_id=lambda: BOOT) as journal:
        first = journal.append([gap("connected"), row(Transition.STARTED, reason="booted")])
        assert first == [1, 2]
        assert journal.append([row()], after=10) == [11]  # after the process's own last number
        assert journal.append([row(uuid="u-2")]) == [12]
        assert journal.last_seq() == 12
        entry, later = journal.read(2, UUID)
        assert (entry.transition, entry.reason, entry.uuid) == (Transition.STARTED, "booted", UUID)
        assert later.seq == 11  # the same domain's next row, not another domain's
        assert journal.read(11, UUID)[1] is None
    # Another process (a new minion) goes on from there.
    with Journal(path, boot_id=lambda: BOOT) as again:
        assert again.append([row()]) == [13]


def test_a_gap_is_the_next_word_for_every_domain_on_its_uri(path):
    with Journal(path, boot_id=lambda: BOOT) as journal:
        [seq] = journal.append([row()])
        journal.append([row(GAP, "", "reconnected", uri="test:///default")])  # another libvirt
        assert journal.read(seq, UUID)[1] is None
        journal.append([gap("overflow")])
        assert journal.read(seq, UUID)[1].is_gap


def test_a_new_journal_begins_with_a_gap(path):
    with Journal(path, boot_id=lambda: BOOT) as journal:
        [seq] = journal.append([row()])
        assert seq == 2 and journal.read(1, "")[0].is_gap


def test_a_reader_never_creates_the_journal(path):
    with Journal(path) as reader:
        assert reader.read(1, UUID) == (None, None) and reader.last_seq() == 0
    assert not os.path.exists(path)


def test_a_journal_removed_under_its_writer_starts_again_with_a_gap(path):
    with Journal(path, boot_id=lambda: BOOT) as journal:
        journal.append([gap("connected"), row()])
        os.unlink(path)  # saltutil.clear_cache
        [seq] = journal.append([row(Transition.STARTED)], after=2)
        assert seq == 4
        with Journal(path) as reader:
            assert reader.read(3, "")[0].is_gap and reader.read(4, UUID)[0] is not None


def test_the_journal_keeps_the_newest_rows(path, monkeypatch):
    monkeypatch.setattr("vmpower.journal.KEEP", 5)
    with Journal(path, boot_id=lambda: BOOT) as journal:
        for _ in range(4):
            journal.append([gap(), row(), row()])
        db = sqlite3.connect(path)
        assert [seq for (seq,) in db.execute("SELECT seq FROM observed ORDER BY seq")] == list(range(8, 13))
        db.close()
    assert KEEP >= 10_000


def test_a_word_this_version_does_not_know_is_believed_in_nothing(path):
    with Journal(path, boot_id=lambda: BOOT) as journal:
        [seq] = journal.append([row(transition="hibernated")])
        entry, _ = journal.read(seq, UUID)
        assert entry.is_gap
        assert believe(seq, UUID, entry, None, BOOT, URI, CLOCK).observation is None


# The beacon's side: a watcher on libvirt's test driver journals what it fires, and each gap.
class FakeMonotonic:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def watcher_of():
    made = []

    def make(journal, **settings):
        mono = FakeMonotonic()
        watcher = Watcher(BeaconSettings(uri=TEST_URI, **settings), monotonic=mono,
                          journal=journal, boot_id=lambda: BOOT)
        made.append(watcher)
        watcher.mono = mono
        watcher.fired = []
        return watcher

    yield make
    for watcher in made:
        watcher.retire()


def gaps(path):
    """The reasons of the journal's gaps, in order."""
    db = sqlite3.connect(path)
    try:
        return [reason for (reason,) in db.execute(
            "SELECT reason FROM observed WHERE transition = 'gap' ORDER BY seq")]
    finally:
        db.close()


def drain_until(watcher, condition):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert watcher.settle(30)
        watcher.fired.extend(watcher.drain())
        if condition(watcher.fired):
            return watcher.fired
        time.sleep(0.002)
    pytest.fail(f"not fired: {watcher.fired}")


def test_the_watcher_journals_what_it_fires_and_each_gap(path, watcher_of, testdriver):
    watcher = watcher_of(Journal(path, boot_id=lambda: BOOT), stop_grace=0, burst_limit=3)
    drain_until(watcher, lambda fired: fired)
    dom = testdriver.define("journaled")
    uuid = dom.UUIDString()
    [started] = [e for e in drain_until(watcher, lambda f: any(e.get("uuid") == uuid for e in f))
                 if e.get("uuid") == uuid]
    with Journal(path) as reader:
        entry, later = reader.read(started["seq"], uuid)
        assert (entry.transition, entry.reason, entry.boot_id, entry.monotonic) == (
            Transition.STARTED, "booted", BOOT, 100.0)
        assert later is None and gaps(path)[0] == "connected"
        for _ in range(5):  # a storm in one second: the burst's gap is journaled as it begins
            watcher.lifecycle_callback(None, dom, EVENT_STARTED, 0, None)
        assert watcher.settle(30)
        assert reader.read(started["seq"], uuid)[1].transition is Transition.STARTED
        assert reader.read(reader.last_seq(), "")[0].reason == "burst"
        watcher.mono.now += 10
        drain_until(watcher, lambda f: any(e.get("reason") == "burst" for e in f))
        watcher.close()  # Salt closes the beacon: the connection's end is a gap too
        assert watcher.settle(30)
        last = reader.last_seq()
        assert reader.read(last, "")[0].reason == "disconnected"


def test_a_journal_that_cannot_be_written_still_lets_every_event_out(tmp_path, watcher_of,
                                                                     testdriver):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    watcher = watcher_of(Journal(str(blocker / "journal.sqlite")), stop_grace=0)
    drain_until(watcher, lambda fired: fired)
    first = testdriver.define("first")
    second = testdriver.define("second")
    fired = drain_until(watcher, lambda f: {e.get("uuid") for e in f} >= {first.UUIDString(),
                                                                        second.UUIDString()})
    seqs = [e["seq"] for e in fired if e["tag"] != "resync"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and all(seqs)
    assert watcher.health()["failures"]["journal"] >= 1


def test_latest_is_the_last_row_of_a_domain_and_says_if_a_gap_came_after(journal):
    from vmpower.core.journal import GAP, Observation
    from vmpower.core.model import Transition

    def row(uuid, transition, reason):
        return Observation(0, "boot-1", "test:///default", uuid, transition, reason, 1.0, 2.0)

    assert journal.latest("u-1", "test:///default") == (None, False)
    journal.append([row("u-1", Transition.STARTED, "booted"), row("u-1", Transition.STOPPED, "migrated"),
                    row("u-2", Transition.STOPPED, "shutdown")])
    latest, gap_after = journal.latest("u-1", "test:///default")
    assert (latest.transition, latest.reason, gap_after) == (Transition.STOPPED, "migrated", False)
    assert journal.latest("u-1", "qemu:///system") == (None, False)
    journal.append([row("", GAP, "reconnected")])
    assert journal.latest("u-1", "test:///default")[1] is True


def test_a_journaled_event_keeps_the_monotonic_time_of_its_callback(path, testdriver):
    import threading

    given: dict[str, set] = {}
    now = [100.0]

    def mono():
        now[0] += 0.001  # every reading new, and remembered by the thread it was given to
        given.setdefault(threading.current_thread().name, set()).add(now[0])
        return now[0]

    watcher = Watcher(BeaconSettings(uri=TEST_URI, stop_grace=0), monotonic=mono,
                      journal=Journal(path, boot_id=lambda: BOOT), boot_id=lambda: BOOT)
    watcher.fired = []
    try:
        drain_until(watcher, lambda fired: fired)
        dom = testdriver.define("stamped", start=False)
        caller = threading.Thread(target=watcher.lifecycle_callback, name="libvirt-like",
                                  args=(None, dom, EVENT_STARTED, 0, None))
        caller.start()
        caller.join()
        uuid = dom.UUIDString()
        [started] = [e for e in drain_until(watcher, lambda f: any(e.get("uuid") == uuid for e in f))
                     if e.get("uuid") == uuid]
        with Journal(path) as reader:
            entry, _later = reader.read(started["seq"], uuid)
        assert entry.monotonic in given["libvirt-like"]
    finally:
        watcher.retire()
