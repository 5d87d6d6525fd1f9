"""
Fire libvirt's lifecycle events onto the Salt bus as they happen.

The beacon runs libvirt's event loop in the minion (one thread per process, whatever Salt does
to the beacon, and one thread per beacon for its connection: nothing that can block runs on
the minion's loop) and fires, for every power change of every domain, through the minion's
event bus as soon as libvirt calls back (``beacon()``'s tick is the fallback):

- ``salt/beacon/<minion id>/vmpower/lifecycle/<transition>`` with ``uuid, name, transition,
  reason, libvirt: {event, detail}, timestamp, seq, uri``; ``transition`` is one of started,
  stopped, paused, resumed, suspended, crashed. A STOPPED is held back ``stop_grace`` seconds
  and dropped if the domain does anything else meanwhile (a hard reboot is only ``started``).
- ``salt/beacon/<minion id>/vmpower/resync`` with ``reason, lost`` after any gap in which events
  could have been missed: ``connected`` (first connection), ``reconnected`` (libvirtd came
  back), ``restarted`` (Salt closed and rebuilt the beacon), ``overflow`` (the queue dropped
  ``lost`` events), ``master_reconnected`` (the minion's link to its master came back),
  ``burst`` (a storm of more than ``burst_limit`` events in a second: ``lost`` of them were
  not fired one by one), ``retry`` (a reconcile or sync handed over a decision due again
  later, through ``<cachedir>/vmpower/wakeup.json``, and it is due now). The shipped reactor
  answers it with ``vmpower.sync``.

Everything is optional:

.. code-block:: yaml

    beacons:
      vmpower:
        - uri: qemu:///system     # libvirt URI
        - stop_grace: 15          # seconds a STOPPED is held back (default: vmpower:stop_grace)
        - queue_size: 10000       # events kept between two beacon runs; the oldest go first
        - keepalive:              # libvirt keepalive: a ping every interval seconds,
            interval: 5           # the connection is dead after count unanswered pings
            count: 3
        - immediate: true         # false: events only at the beacon's tick
        - burst_limit: 40         # events per second before a storm becomes one resync

The loop's health (connected, queue depth, events seen, dropped, reconnects, last resync) is
reported by ``vmpower.status``. Whenever it (re)connects, the beacon also keeps a Salt scheduler
job, ``vmpower-sync``, running ``vmpower.sync`` every ``vmpower:sync_interval`` seconds (600 by
default): the safety net for anything the bus loses.
"""

import logging
import os
import sys

if __name__ == "vmpower":
    # Salt puts this file's directory on sys.path while it loads it, so before the library is
    # synced ``import vmpower`` finds this file. Refused, it stays out of sys.modules, and the
    # library imports once it is there instead of this file for the rest of the process.
    raise ModuleNotFoundError(f"No module named 'vmpower' ({__file__} is a Salt module)",
                              name="vmpower", path=__file__)

log = logging.getLogger(__name__)

__virtualname__ = "vmpower"

# The library is imported by __virtual__, not at the top of this file: while Salt executes this
# file its own directory is on sys.path, and there ``import vmpower`` finds this very file.
eventloop = minion = fleet = config = settings = None


def _import_library():
    global eventloop, minion, fleet, config, settings
    # arguments is the execution module's: imported here, in the minion's process, every job
    # forked from it finds it there instead of importing it again.
    from vmpower import eventloop, fleet, minion
    from vmpower.core import arguments, settings  # noqa: F401
    from vmpower.eventloop import config


def __virtual__():
    try:
        _import_library()
    except ImportError:
        # A file_roots install syncs the library to <extension_modules>/utils, which Salt puts
        # on sys.path for execution and state modules only, not for beacons.
        utils = os.path.join(__opts__.get("extension_modules") or "", "utils")
        if os.path.isdir(utils) and utils not in sys.path:
            sys.path.append(utils)
        try:
            _import_library()
        except ImportError as exc:
            return False, f"vmpower: the vmpower library cannot be imported: {exc}"
    if not eventloop.HAS_LIBVIRT:
        return False, "vmpower: the libvirt Python bindings (libvirt-python) are not installed"
    return __virtualname__


def validate(config_):
    """
    Check the beacon's configuration; the message names the key that is wrong.
    """
    try:
        config.parse(config_)
    except settings.ConfigError as exc:
        return False, str(exc)
    return True, "Valid beacon configuration"


_connections_seen = {}  # beacon name -> the watcher's connection count last time


def beacon(config_):
    """
    Return the events the immediate path could not deliver since the last call.

    Only looks up and swaps: connecting and everything else that can block runs on vmpower's
    own threads. Never raises: Salt would turn an exception into an error event on every loop.
    """
    try:
        current = config.parse(config_)
        grace = (config.stop_grace_default(__opts__) if current.stop_grace is None
                 else current.stop_grace)
        loop = eventloop.event_loop()
        events = loop.drain(current, minion.event_loop_status_path(__opts__), __opts__, grace)
        generation = loop.generation(current.name)
    except Exception:  # pylint: disable=broad-except
        log.exception("vmpower beacon: no events this time")
        return []
    if _connections_seen.get(current.name) != generation:
        _connections_seen[current.name] = generation
        _schedule_sync()
        _load_seal_key()
    return events


def _load_seal_key():
    """Load the minion's key here, in the minion's process, on the thread that forks the jobs:
    each vmpower job forked after it seals its result without loading the key again."""
    try:
        fleet.seal_key(__opts__)
    except Exception as exc:  # pylint: disable=broad-except (a job loads it itself then)
        log.debug("vmpower beacon: the minion's key is not loaded ahead of the jobs: %s", exc)


def _schedule_sync():
    """Keep Salt's scheduler running ``vmpower.sync`` every ``vmpower:sync_interval`` seconds."""
    try:
        minion.keep_sync_scheduled(__opts__, __salt__["event.fire"])
    except Exception as exc:  # pylint: disable=broad-except
        log.error("vmpower beacon: cannot schedule the periodic sync: %s", exc)


def close(config_):
    """
    Salt closes the beacon: vmpower's thread disconnects from libvirt; the next run connects
    again and fires a ``restarted`` resync.
    """
    try:
        eventloop.event_loop().close(config.parse(config_).name,
                                     minion.event_loop_status_path(__opts__))
    except Exception:  # pylint: disable=broad-except
        log.exception("vmpower beacon: closing failed")
