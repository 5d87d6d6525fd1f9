"""
Fire libvirt's lifecycle events onto the Salt bus within about a second.

The beacon runs libvirt's event loop in the minion (one thread per process, whatever Salt does
to the beacon) and fires, for every power change of every domain:

- ``salt/beacon/<minion id>/vmpower/lifecycle/<transition>`` with ``uuid, name, transition,
  reason, libvirt: {event, detail}, timestamp, seq, uri``; ``transition`` is one of started,
  stopped, paused, resumed, suspended, crashed. A STOPPED is held back ``stop_grace`` seconds
  and dropped if the domain does anything else meanwhile (a hard reboot is only ``started``).
- ``salt/beacon/<minion id>/vmpower/resync`` with ``reason, lost`` after any gap in which events
  could have been missed: ``connected`` (first connection), ``reconnected`` (libvirtd came
  back), ``restarted`` (Salt closed and rebuilt the beacon), ``overflow`` (the queue dropped
  ``lost`` events). The shipped reactor answers it with ``vmpower.sync``.

Everything is optional:

.. code-block:: yaml

    beacons:
      vmpower:
        - uri: qemu:///system     # libvirt URI
        - stop_grace: 15          # seconds a STOPPED is held back (Nova hard-codes 15)
        - queue_size: 10000       # events kept between two beacon runs; the oldest go first
        - keepalive:              # libvirt keepalive: a ping every interval seconds,
            interval: 5           # the connection is dead after count unanswered pings
            count: 3

The loop's health (connected, queue depth, events seen, dropped, reconnects, last resync) is
reported by ``vmpower.status``. Whenever it (re)connects, the beacon also keeps a Salt scheduler
job, ``vmpower-sync``, running ``vmpower.sync`` every ``vmpower:sync_interval`` seconds (600 by
default): the safety net for anything the bus loses.
"""

import logging
import os
import sys

log = logging.getLogger(__name__)

__virtualname__ = "vmpower"

# The library is imported by __virtual__, not at the top of this file: while Salt executes this
# file its own directory is on sys.path, and there ``import vmpower`` finds this very file.
eventloop = minion = settings = None


def _import_library():
    global eventloop, minion, settings
    from vmpower import eventloop, minion
    from vmpower.core import settings


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


def validate(config):
    """
    Check the beacon's configuration; the message names the key that is wrong.
    """
    try:
        settings.parse_beacon_config(config)
    except settings.ConfigError as exc:
        return False, str(exc)
    return True, "Valid beacon configuration"


def beacon(config):
    """
    Return the lifecycle and resync events that happened since the last call.

    Never raises: Salt would turn an exception into an error event on every loop.
    """
    try:
        events = eventloop.event_loop().drain(settings.parse_beacon_config(config),
                                              minion.event_loop_status_path(__opts__))
    except Exception:  # pylint: disable=broad-except
        log.exception("vmpower beacon: no events this time")
        return []
    if any(event["tag"] == "resync" and event["reason"] != "overflow" for event in events):
        _schedule_sync()
    return events


def _schedule_sync():
    """Keep Salt's scheduler running ``vmpower.sync`` every ``vmpower:sync_interval`` seconds."""
    try:
        minion.keep_sync_scheduled(__opts__, __salt__["event.fire"])
    except Exception as exc:  # pylint: disable=broad-except
        log.error("vmpower beacon: cannot schedule the periodic sync: %s", exc)


def close(config):
    """
    Disconnect from libvirt when Salt closes the beacon; the event thread stays for the next
    run, which reconnects and fires a ``restarted`` resync.
    """
    try:
        eventloop.event_loop().close(settings.parse_beacon_config(config).name,
                                     minion.event_loop_status_path(__opts__))
    except Exception:  # pylint: disable=broad-except
        log.exception("vmpower beacon: closing failed")
