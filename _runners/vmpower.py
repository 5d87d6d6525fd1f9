"""
The fleet's view from the master: every VM, every host, and what happened to them.

Reads the fleet store (``vmpower:store`` of the master's config, or the default
``/var/lib/vmpower/fleet.sqlite`` if it exists: see the ``vmpower`` returner) when there is
one, otherwise asks the minions (``vmpower.records`` and ``vmpower.status``); ``source=store``
or ``source=minions`` chooses. Output goes through Salt's outputters (``--out=json``...).
"""

import logging

if __name__ == "vmpower":
    # Salt puts this file's directory on sys.path while it loads it, so before the library is
    # synced ``import vmpower`` finds this file. Refused, it stays out of sys.modules, and the
    # library imports once it is there instead of this file for the rest of the process.
    raise ModuleNotFoundError(f"No module named 'vmpower' ({__file__} is a Salt module)",
                              name="vmpower", path=__file__)

try:
    import salt.client
    from salt.exceptions import SaltInvocationError

    from vmpower import fleet, loader
    from vmpower.core import fleet as core
    from vmpower.core.settings import ConfigError
    from vmpower.store import StoreError

    IMPORT_ERROR = None
except ImportError as exc:  # reported by __virtual__
    IMPORT_ERROR = exc

log = logging.getLogger(__name__)

__virtualname__ = "vmpower"

SOURCES = ("auto", "store", "minions")
PROGRESS_EVERY = 10  # minions between two progress lines when asking the minions


def __virtual__():
    if IMPORT_ERROR is not None:
        return False, f"vmpower runner: the vmpower library cannot be imported: {IMPORT_ERROR}"
    return __virtualname__


def _settings(**given):
    try:
        settings = fleet.fleet_settings(__opts__)
        if given.get("sync_interval") is not None or given.get("stuck_after") is not None:
            settings = core.parse_fleet_settings(
                {
                    "store": settings.store,
                    "retention_days": settings.retention_days,
                    "sync_interval": given.get("sync_interval") or settings.sync_interval,
                    "stuck_after": settings.stuck_after
                    if given.get("stuck_after") is None
                    else given["stuck_after"],
                }
            )
        return settings
    except ConfigError as exc:
        raise SaltInvocationError(f"vmpower: {exc}") from exc


def _source(source, settings):
    if source not in SOURCES:
        raise SaltInvocationError(f"vmpower: source must be one of {', '.join(SOURCES)}, not {source!r}")
    if source == "auto":
        return "store" if fleet.has_store(settings) else "minions"
    return source


def _fleet(settings):
    try:
        return fleet.open_fleet(settings.store_location())
    except StoreError as exc:
        fleet.forget(settings.store_location())
        raise SaltInvocationError(f"vmpower: the fleet store cannot be read: {exc}") from exc


def _filters(**given):
    try:
        return core.parse_filters(**given)
    except ConfigError as exc:
        raise SaltInvocationError(f"vmpower: {exc}") from exc


def _say(message):
    event = globals().get("__jid_event__")
    if event is not None:
        event.fire_event({"message": message}, "progress")
    else:
        log.info("%s", message)


def _ask_minions(tgt, tgt_type, timeout):
    """``vmpower.records`` and ``vmpower.status`` of every targeted minion, in one job,
    with a progress line every ``PROGRESS_EVERY`` answers."""
    client = salt.client.get_local_client(__opts__["conf_file"])
    answers = {}
    for chunk in client.cmd_iter(
        tgt,
        ["vmpower.records", "vmpower.status"],
        [[], []],
        tgt_type=tgt_type,
        timeout=timeout or __opts__.get("timeout", 30),
    ):
        for minion, data in chunk.items():
            answers[minion] = data.get("ret") if isinstance(data, dict) else data
        if len(answers) % PROGRESS_EVERY == 0:
            _say(f"vmpower: {len(answers)} minion(s) answered")
    _say(f"vmpower: {len(answers)} minion(s) answered in all")
    return answers


def report(
    host=None,
    state=None,
    disagreement=False,
    error=False,
    stuck=False,
    source="auto",
    tgt="*",
    tgt_type="glob",
    timeout=None,
    sync_interval=None,
    stuck_after=None,
):
    """
    Every VM of the fleet: its owner, vm_state, power_state, task_state and its last change
    with the reason; every host, with the hosts that have not synced within
    2 x ``vmpower:sync_interval`` or whose event loop is disconnected under ``problems``.

    host
        Only these minions (a minion id, or a comma-separated list).
    state
        Only VMs in this vm_state or power_state (``active``, ``stopped``, ``running``...).
    disagreement
        Only VMs whose power_state is not what their vm_state means.
    error
        Only VMs in vm_state ``error``.
    stuck
        Only VMs whose task_state has not changed for ``stuck_after`` seconds (900).
    source
        ``store`` (the fleet store), ``minions`` (ask them), or ``auto`` (the store if there is one).
    tgt, tgt_type, timeout
        Which minions to ask, when asking them.

    CLI Example:

    .. code-block:: bash

        salt-run vmpower.report
        salt-run vmpower.report disagreement=True
        salt-run vmpower.report host=hv1,hv2 state=stopped --out=json
        salt-run vmpower.report source=minions tgt='hv*'
    """
    settings = _settings(sync_interval=sync_interval, stuck_after=stuck_after)
    filters = _filters(host=host, state=state, disagreement=disagreement, error=error, stuck=stuck)
    if _source(source, settings) == "store":
        try:
            return fleet.report_from_store(_fleet(settings), filters, settings)
        except StoreError as exc:
            fleet.forget(settings.store_location())
            raise SaltInvocationError(f"vmpower: the fleet store cannot be read: {exc}") from exc
    return fleet.report_from_minions(_ask_minions(tgt, tgt_type, timeout), filters, settings)


def history(name, host=None, limit=50, source="auto", timeout=None):
    """
    What happened to one VM: its audit entries and the vmpower events about it, oldest first.
    A name that several hosts use gives each (by UUID).

    name
        The VM's name or UUID.
    host
        Only the VM of this minion.
    limit
        The newest ``limit`` entries of each (50).

    CLI Example:

    .. code-block:: bash

        salt-run vmpower.history web1
        salt-run vmpower.history web1 host=hv1 limit=10
    """
    settings = _settings()
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise SaltInvocationError(f"vmpower: limit must be a whole number of at least 1, not {limit!r}")
    if _source(source, settings) == "store":
        try:
            return fleet.history_from_store(_fleet(settings), str(name), host, limit)
        except StoreError as exc:
            raise SaltInvocationError(f"vmpower: {exc}") from exc
    client = salt.client.get_local_client(__opts__["conf_file"])
    return client.cmd(
        host or "*",
        "vmpower.history",
        [str(name)],
        kwarg={"limit": limit},
        tgt_type="list" if host else "glob",
        timeout=timeout or __opts__.get("timeout", 30),
    )


def hosts(host=None, source="auto", tgt="*", tgt_type="glob", timeout=None, sync_interval=None):
    """
    Every host of the fleet: records, last sync (when, how long, what it did), event loop
    health, last resync, and ``problems`` (not synced within 2 x ``sync_interval``, event loop
    disconnected); with the store, how many events were kept and how many skipped as malformed.

    CLI Example:

    .. code-block:: bash

        salt-run vmpower.hosts
        salt-run vmpower.hosts source=minions --out=json
    """
    settings = _settings(sync_interval=sync_interval)
    filters = _filters(host=host)
    if _source(source, settings) == "store":
        try:
            return fleet.hosts_from_store(_fleet(settings), settings, filters)
        except StoreError as exc:
            fleet.forget(settings.store_location())
            raise SaltInvocationError(f"vmpower: the fleet store cannot be read: {exc}") from exc
    found = fleet.report_from_minions(_ask_minions(tgt, tgt_type, timeout), filters, settings)
    return {"hosts": found["hosts"], "failed": found["failed"]}


def drift(source="auto", tgt="*", tgt_type="glob", timeout=None, sync_interval=None):
    """
    Every VM of the fleet whose record and hypervisor disagree, for how long (longest first),
    and what vmpower will do about it and when; every host whose view is unknown (event loop
    disconnected, metrics file not written, not synced within 2 x ``sync_interval``, or no
    answer), with why.

    source
        ``minions`` (each runs ``vmpower.drift``: the live state, and a dry-run reconcile of
        each drifting VM that says what vmpower will do and when), ``store`` (the fleet store:
        the records that disagree, and the hosts it has not heard from), or ``auto`` (the
        minions).
    tgt, tgt_type, timeout
        Which minions to ask.

    CLI Example:

    .. code-block:: bash

        salt-run vmpower.drift
        salt-run vmpower.drift tgt='hv*' --out=json
        salt-run vmpower.drift source=store
    """
    settings = _settings(sync_interval=sync_interval)
    if source not in SOURCES:
        raise SaltInvocationError(f"vmpower: source must be one of {', '.join(SOURCES)}, not {source!r}")
    if source == "store":
        try:
            return fleet.drift_from_store(_fleet(settings), settings)
        except StoreError as exc:
            fleet.forget(settings.store_location())
            raise SaltInvocationError(f"vmpower: the fleet store cannot be read: {exc}") from exc
    client = salt.client.get_local_client(__opts__["conf_file"])
    answers = {}
    # expect_minions: a targeted minion that does not answer is listed, as a host unknown.
    for chunk in client.cmd_iter(tgt, "vmpower.drift", tgt_type=tgt_type, expect_minions=True,
                                 timeout=timeout or __opts__.get("timeout", 30)):
        for minion, data in chunk.items():
            answers[minion] = data.get("ret") if isinstance(data, dict) else data
    return fleet.drift_from_minions(answers)


def master_config():
    """
    The master configuration for a vmpower installed with pip: the reactor, with the paths of
    the SLS files this installation ships, and the returner.

    CLI Example:

    .. code-block:: bash

        salt-run vmpower.master_config --out=yaml > /etc/salt/master.d/vmpower.conf
    """
    return fleet.master_config(loader.reactor_files())
