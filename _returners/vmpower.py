"""
Keep vmpower's events and job results in the fleet store.

On the master, as ``event_return``, it keeps every vmpower event of the master's bus
(lifecycle and resync events of the beacons, the results of the reactor's ``vmpower.reconcile``
and ``vmpower.sync`` jobs) in the fleet store, as a fact about a minion only when that minion
sealed its result with its key (docs/fleet.md), else as its sender's claim:
``vmpower:store`` of the master's config (a PostgreSQL DSN, shared with the minions'
records, or a SQLite file; by default ``/var/lib/vmpower/fleet.sqlite``). Events older than
``vmpower:retention_days`` (30 by default, 0 for ever) are pruned.

.. code-block:: yaml

    # /etc/salt/master.d/vmpower.conf
    event_return: vmpower
    vmpower:
      store: postgresql://vmpower@db.example.org/vmpower
      retention_days: 30

On a minion, as a job returner (``--return vmpower``, or ``returner: vmpower`` of the periodic
sync, which vmpower schedules so), it keeps the job's result in the minion's own store and,
after a sync, writes the metrics file when ``vmpower:metrics_file`` is set.

A malformed vmpower event is skipped, logged and counted (``salt-run vmpower.hosts``); an
unreachable store is logged as an error naming it, and the master goes on.
"""

import logging

if __name__ == "vmpower":
    # Salt puts this file's directory on sys.path while it loads it, so before the library is
    # synced ``import vmpower`` finds this file. Refused, it stays out of sys.modules, and the
    # library imports once it is there instead of this file for the rest of the process.
    raise ModuleNotFoundError(f"No module named 'vmpower' ({__file__} is a Salt module)",
                              name="vmpower", path=__file__)

try:
    import salt.utils.jid

    from vmpower import fleet
    from vmpower.core.settings import ConfigError
    from vmpower.store import StoreError

    IMPORT_ERROR = None
except ImportError as exc:  # reported by __virtual__
    IMPORT_ERROR = exc

log = logging.getLogger(__name__)

__virtualname__ = "vmpower"


def __virtual__():
    if IMPORT_ERROR is not None:
        return False, f"vmpower returner: the vmpower library cannot be imported: {IMPORT_ERROR}"
    return __virtualname__


def event_return(events):
    """
    Keep the vmpower events of a batch from the master's event bus in the fleet store.

    CLI Example:

    .. code-block:: bash

        # in the master's config, not called by hand
        event_return: vmpower
    """
    return fleet.keep_events(__opts__, events)


def returner(ret):
    """
    Keep a vmpower job's result (a sync's summary and this host's event loop health) in the
    minion's store; after a sync, write the metrics file if one is configured.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.sync --return vmpower
    """
    try:
        return fleet.minion_job_return(__opts__, ret)
    except (StoreError, ConfigError, RuntimeError) as exc:
        # A returner's exception only reaches the minion's log, as "returner raised": say it here.
        log.error(
            "vmpower returner: the result of %s (job %s) was not kept: %s",
            ret.get("fun"),
            ret.get("jid"),
            exc,
        )
        return {"kept": 0, "error": str(exc)}


def prep_jid(nocache=False, passed_jid=None):  # pylint: disable=unused-argument
    """
    A job id for a job that uses this returner: the one passed in, or a new one.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.sync --return vmpower
    """
    return passed_jid if passed_jid is not None else salt.utils.jid.gen_jid(__opts__)
