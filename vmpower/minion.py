"""How a Salt minion's modules get their HostOperations: settings, store and identity.

The execution module and the state module both come through here, so the place of the store,
the merging of minion config with pillar and the errors Salt shows are decided once.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Mapping, Optional

from vmpower.core.settings import ConfigError, Settings, merge, parse_settings
from vmpower.hypervisor import HypervisorError
from vmpower.operations import HostOperations, OperationError
from vmpower.store import Store, StoreError

SYNC_JOB = "vmpower-sync"

# Everything vmpower raises on purpose; its message is meant for the operator as it is.
ERRORS = (ConfigError, StoreError, HypervisorError, OperationError)


def settings(opts: Mapping, pillar: Optional[Mapping] = None) -> Settings:
    """``vmpower:`` from minion config and pillar, merged key by key; pillar wins.

    (Salt's ``config.get`` with ``merge`` lets the minion config win, the other way round.)
    ``pillar`` defaults to the minion's own copy in ``opts``, as a beacon sees it.
    """
    if pillar is None:
        pillar = opts.get("pillar") or {}
    return parse_settings(merge(opts.get("vmpower"), pillar.get("vmpower")))


def store_path(opts: Mapping, current: Settings) -> str:
    """Where this minion's records are: ``vmpower:store`` (a SQLite file or a PostgreSQL DSN
    shared by the fleet), by default SQLite in the minion's cachedir."""
    return current.store or os.path.join(opts["cachedir"], "vmpower", "records.sqlite")


def event_loop_status_path(opts: Mapping) -> str:
    return os.path.join(opts["cachedir"], "vmpower", "eventloop.json")


@contextlib.contextmanager
def operations(opts: Mapping, pillar: Mapping) -> Iterator[HostOperations]:
    """HostOperations for this minion, with its store open for the length of the block."""
    current = settings(opts, pillar)
    with Store(store_path(opts, current)) as store:
        yield HostOperations(current, opts["id"], store)


def sync_schedule(current: Settings, splay: int = 0) -> dict:
    """The Salt scheduler job that runs the safety-net sync every ``sync_interval`` seconds.

    Shaped as the minion's ``manage_schedule`` event wants it (what ``schedule.add`` sends);
    not persisted, because the beacon adds it again in every new minion process. ``splay``
    (``vmpower:sync_splay``) delays each run by up to that many seconds at random, so that a
    fleet's hosts do not all hit one database at once; its result goes through the ``vmpower``
    returner (the sync's summary and the metrics file, issue 10).
    """
    job = {"function": "vmpower.sync", "seconds": current.sync_interval, "maxrunning": 1,
           "enabled": True, "jid_include": True, "returner": "vmpower"}
    if splay:
        job["splay"] = splay
    return {"func": "add", "schedule": {SYNC_JOB: job}, "persist": False}


_scheduled_interval: Optional[tuple] = None  # what this process last asked the scheduler for


def keep_sync_scheduled(opts: Mapping, fire_event: Callable[[dict, str], object]) -> None:
    """Ask the minion's scheduler for the periodic sync, unless it has the same job already.

    Called by the beacon whenever its loop (re)connects, so a changed ``sync_interval`` is
    taken up at the next beacons refresh. ``fire_event`` must not wait for an answer: the
    minion's loop, which handles the request, is the one running the beacon.
    """
    global _scheduled_interval
    from vmpower.core.fleet import sync_splay

    current = settings(opts)
    raw = merge(opts.get("vmpower"), (opts.get("pillar") or {}).get("vmpower")) or {}
    splay = sync_splay(raw.get("sync_splay"), current.sync_interval)
    if (current.sync_interval, splay) != _scheduled_interval:
        fire_event(sync_schedule(current, splay), "manage_schedule")
        _scheduled_interval = (current.sync_interval, splay)
