"""How a Salt minion's modules get their HostOperations: settings, store and identity.

The execution module and the state module both come through here, so the place of the store,
the merging of minion config with pillar and the errors Salt shows are decided once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping

from vmpower.core.settings import ConfigError, Settings, merge, parse_settings
from vmpower.hypervisor import HypervisorError
from vmpower.journal import Journal, journal_path
from vmpower.measurements import Measurements, measurements_path
from vmpower.operations import HostOperations, OperationError
from vmpower.store import Store, StoreError, open_store
from vmpower.wakeup import WakeUps, wakeup_path

log = logging.getLogger(__name__)

SYNC_JOB = "vmpower-sync"

# Everything vmpower raises on purpose; its message is meant for the operator as it is.
ERRORS = (ConfigError, StoreError, HypervisorError, OperationError)


def settings(opts: Mapping, pillar: Mapping | None = None) -> Settings:
    """``vmpower:`` from minion config and pillar, merged key by key; pillar wins.

    (Salt's ``config.get`` with ``merge`` lets the minion config win, the other way round.)
    ``pillar`` defaults to the minion's own copy in ``opts``, as a beacon sees it.
    """
    return parse_settings(merged_settings(opts, pillar))


def merged_settings(opts: Mapping, pillar: Mapping | None = None, keys: tuple[str, ...] | None = None):
    """``vmpower:`` of minion config and pillar merged (pillar winning), not yet validated;
    ``{}`` when neither has one. ``keys``: merge only those top-level keys (the beacon's tick
    reads one, and merging every instance's pillar would cost it milliseconds a tick)."""
    if pillar is None:
        pillar = opts.get("pillar") or {}
    layers = [opts.get("vmpower"), pillar.get("vmpower")]
    if keys is not None:  # a layer that is not a mapping is kept whole: its error is reported
        layers = [{key: layer[key] for key in keys if key in layer} if isinstance(layer, Mapping)
                  else layer for layer in layers]
    merged = merge(*layers)
    return {} if merged is None else merged


#: Where the records are unless ``vmpower:store`` says otherwise: not in Salt's cachedir,
#: which ``saltutil.clear_cache`` empties under open connections.
STORE_DIR = "/var/lib/vmpower"
STORE_NAME = "records.sqlite"
DEFAULT_STORE = os.path.join(STORE_DIR, STORE_NAME)


def store_path(opts: Mapping, current: Settings) -> str:
    """Where this minion's records are: ``vmpower:store`` (a SQLite file or a PostgreSQL DSN
    shared by the fleet), by default SQLite at ``/var/lib/vmpower/records.sqlite``."""
    return current.store or DEFAULT_STORE


def legacy_store_path(opts: Mapping) -> str:
    """Where vmpower kept its records before: in the minion's cachedir."""
    return os.path.join(opts["cachedir"], "vmpower", STORE_NAME)


def carry_over(legacy: str, path: str) -> bool:
    """Move the SQLite store at ``legacy`` to ``path`` if ``path`` does not exist yet; True if
    it did. Its WAL is folded in (SQLite's online backup, so a consistent copy even while an
    old process still has it open); the copy appears at ``path`` in one rename, under a flock
    beside it, so two processes opening the store at once neither lose it nor copy it twice.
    The old file is renamed ``<legacy>.moved`` (its -wal and -shm removed), so that it is
    never carried over a second time. A legacy store that cannot be read is an error: starting
    afresh beside it would forget every pinned vm_state.
    """
    if os.path.exists(path) or not os.path.exists(legacy):
        return False
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(directory, f".{os.path.basename(path)}.carry-over.lock"),
                     os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot carry the vmpower store {legacy} over to {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for one copy of a small file at most
        if os.path.exists(path) or not os.path.exists(legacy):
            return False  # another process carried it over while this one waited
        partial = f"{path}.carry-over.tmp"
        try:
            source = sqlite3.connect(f"file:{legacy}?mode=ro", uri=True, timeout=30)
            try:
                target = sqlite3.connect(partial)
                try:
                    source.backup(target)
                finally:
                    target.close()
            finally:
                source.close()
            with open(partial, "rb+") as copied:
                os.fsync(copied.fileno())
            os.replace(partial, path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise StoreError(f"cannot carry the vmpower store {legacy} over to {path}: "
                             f"{exc}") from exc
        with contextlib.suppress(OSError):
            os.replace(legacy, legacy + ".moved")
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(legacy + suffix)
        log.warning("vmpower: carried the records over from %s to %s (Salt's cachedir is "
                    "emptied by saltutil.clear_cache); the old file is now %s.moved",
                    legacy, path, legacy)
        return True
    finally:
        os.close(fd)


def open_minion_store(opts: Mapping, current: Settings) -> Store:
    """This minion's store, open; the default one carried over from the cachedir first."""
    path = store_path(opts, current)
    if not current.store:
        carry_over(legacy_store_path(opts), path)
    return open_store(path)


def event_loop_status_path(opts: Mapping) -> str:
    return os.path.join(opts["cachedir"], "vmpower", "eventloop.json")


@contextlib.contextmanager
def operations(opts: Mapping, pillar: Mapping) -> Iterator[HostOperations]:
    """HostOperations for this minion, with its store open for the length of the block, the
    journal of what its beacon observed, the wake-up it hands its beacon, and the log of what
    it measured, for the metrics."""
    current = settings(opts, pillar)
    with open_minion_store(opts, current) as store, Journal(journal_path(opts["cachedir"])) as journal:
        yield HostOperations(current, opts["id"], store, journal=journal,
                             wakeups=WakeUps(wakeup_path(opts["cachedir"])),
                             measurements=Measurements(measurements_path(opts["cachedir"])))


def sync_schedule(current: Settings, splay: int = 0) -> dict:
    """The Salt scheduler job that runs the safety-net sync every ``sync_interval`` seconds.

    Shaped as the minion's ``manage_schedule`` event wants it (what ``schedule.add`` sends);
    not persisted, because the beacon adds it again in every new minion process. ``splay``
    (``vmpower:sync_splay``) delays each run by up to that many seconds at random, so that a
    fleet's hosts do not all hit one database at once; its result goes through the ``vmpower``
    returner (the sync's summary and the metrics file). Its first run is one interval after it
    is added, not at once (Salt's default for an interval job): the beacon adds it when it
    connects, and the reactor already syncs the host for that connection.
    """
    job = {"function": "vmpower.sync", "seconds": current.sync_interval, "maxrunning": 1,
           "enabled": True, "jid_include": True, "returner": "vmpower", "run_on_start": False}
    if splay:
        job["splay"] = splay
    return {"func": "add", "schedule": {SYNC_JOB: job}, "persist": False}


_scheduled_interval: tuple | None = None  # what this process last asked the scheduler for


def keep_sync_scheduled(opts: Mapping, fire_event: Callable[[dict, str], object]) -> None:
    """Ask the minion's scheduler for the periodic sync, unless it has the same job already.

    Called by the beacon whenever its loop (re)connects, so a changed ``sync_interval`` is
    taken up at the next beacons refresh. ``fire_event`` must not wait for an answer: the
    minion's loop, which handles the request, is the one running the beacon.
    """
    global _scheduled_interval
    from vmpower.core.fleet import sync_splay

    raw = merged_settings(opts)
    current = parse_settings(raw)
    splay = sync_splay(raw.get("sync_splay"), current.sync_interval)
    if (current.sync_interval, splay) != _scheduled_interval:
        fire_event(sync_schedule(current, splay), "manage_schedule")
        _scheduled_interval = (current.sync_interval, splay)
