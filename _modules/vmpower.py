"""
Keep the recorded power state of libvirt VMs true to the hypervisor, and act on it.

vmpower records every domain of this minion (vm_state, power_state, task_state) and applies
Nova's power-state rules when the record and libvirt disagree. Settings come from minion
config or pillar under ``vmpower:`` (pillar wins):

.. code-block:: yaml

    vmpower:
      uri: qemu:///system        # libvirt URI
      stop_timeout: 60           # graceful shutdown before power-off, seconds
      sync_interval: 600         # the periodic safety-net sync, seconds
      stop_grace: 15             # no path acts on a VM that went off less than this ago
      instances:
        web1:
          vm_state: active       # pinned: restarted after a guest shutdown or crash
        db1:
          task_state: maintenance  # hands off while set
        app1:
          on_host_shutdown: ignore  # (default) a host's shutdown is not the operator's intent

A decision that must be taken again later (a grace or a restart back-off running) is retried
on time: the result says ``retry_at`` (epoch seconds, for people), and the job hands the
minion's vmpower beacon the wake-up, on the host's monotonic clock; when it falls due the
beacon fires a ``retry`` resync, which the reactor answers with a ``vmpower.sync``.
"""

import logging
import time

from salt.exceptions import CommandExecutionError

if __name__ == "vmpower":
    # Salt puts this file's directory on sys.path while it loads it, so before the library is
    # synced ``import vmpower`` finds this file. Refused, it stays out of sys.modules, and the
    # library imports once it is there instead of this file for the rest of the process.
    raise ModuleNotFoundError(f"No module named 'vmpower' ({__file__} is a Salt module)",
                              name="vmpower", path=__file__)

try:
    from vmpower import loader, minion
    from vmpower.core import arguments
    from vmpower.core.settings import ConfigError
    from vmpower.hypervisor import HAS_LIBVIRT

    IMPORT_ERROR = None
except ImportError as exc:  # reported by __virtual__
    IMPORT_ERROR = exc

log = logging.getLogger(__name__)

__virtualname__ = "vmpower"


def __virtual__():
    if IMPORT_ERROR is not None:
        return False, (f"vmpower: the vmpower library cannot be imported: {IMPORT_ERROR}"
                       f"{_restart_hint()}")
    if not HAS_LIBVIRT:
        return False, "vmpower: the libvirt Python bindings (libvirt-python) are not installed"
    return __virtualname__


def _restart_hint():
    """Why new module files may not import: the minion still runs an older library."""
    try:
        from vmpower import loader as running  # the old library's, if the minion has one

        versions = running.library_versions(__opts__.get("extension_modules"))
    except (ImportError, AttributeError):  # no library, or an old one without library_versions
        return ""
    return f"; {versions['restart']}" if versions.get("restart_needed") else ""


def _run(operation, *args, **kwargs):
    """Run one HostOperations method with this minion's settings, store and identity.

    vmpower's own errors become CommandExecutionError with their message, so ``salt-call``
    prints what was wrong and exits non-zero.
    """
    try:
        with minion.operations(__opts__, __pillar__) as ops:
            return getattr(ops, operation)(*args, **kwargs)
    except minion.ERRORS as exc:
        raise CommandExecutionError(f"vmpower.{operation}: {exc}") from exc


def _announce_sync():
    """Say on the minion's own bus that a sync starts: it answers the beacon's
    ``master_reconnected`` resync, which is fired again until one does (never raised)."""
    from vmpower.eventloop.delivery import SYNC_STARTED, masterless, sync_started
    from vmpower.hostinfo import boot_id

    if masterless(__opts__):
        return
    try:
        # The monotonic clock with the boot id: a wall clock stepped back would make this
        # sync look older than the resync it answers.
        __salt__["event.fire"](sync_started(boot_id(), time.monotonic(), time.time()), SYNC_STARTED)
    except Exception as exc:  # pylint: disable=broad-except
        log.debug("vmpower: could not announce the sync on the minion's bus: %s", exc)


def _sealed(result):
    """The result with this minion's seal, by which the master believes it is this minion's."""
    from vmpower.fleet import seal

    return seal(__opts__, result)


def _check(check, *args):
    try:
        return check(*args)
    except ConfigError as exc:
        raise CommandExecutionError(str(exc)) from exc


def get_info(name):
    """
    Return the power state, memory (KiB), vCPUs and CPU time (ns) of one domain.

    name
        The domain's name or UUID.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.get_info web1
    """
    return _run("get_info", _check(arguments.target, name))


def list_instances():
    """
    Return the names of every domain on this host.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.list_instances
    """
    return _run("list_instances")


def get_num_instances():
    """
    Return how many domains this host has.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.get_num_instances
    """
    return len(_run("list_instances"))


def stop(name, timeout=None, force=False):
    """
    Shut a domain down and record it as stopped.

    The guest is asked to shut down (ACPI); if it is still running after ``timeout`` seconds
    (default ``vmpower:stop_timeout``, 60) it is powered off. ``task_state`` is
    ``powering-off`` meanwhile, so events and syncs leave it alone.

    name
        The domain's name or UUID.
    timeout
        Seconds to wait for the guest before powering it off.
    force
        Power off at once, without asking the guest.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.stop web1
        salt '*' vmpower.stop web1 timeout=10
        salt '*' vmpower.stop web1 force=True
    """
    return _run("stop", _check(arguments.target, name),
                timeout=_check(arguments.seconds, timeout, "timeout"),
                force=_check(arguments.flag, force, "force"))


def start(name):
    """
    Start a domain and record it as active.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.start web1
    """
    return _run("start", _check(arguments.target, name))


def _test(test):
    """``test=True`` on the command line, else the minion's own ``test`` setting."""
    if test is None:
        return bool(__opts__.get("test", False))
    return _check(arguments.flag, test, "test")


def reconcile(uuid, transition=None, reason=None, test=None, seq=None):
    """
    Decide about one domain on its live state, as a lifecycle event asks.

    The event is only a trigger, never a fact: Salt does not authenticate the minion id in a
    beacon's tag, and anyone can run this by hand. What this minion's own beacon journaled as
    the event ``seq`` (its transition, libvirt's reason, when libvirt called back) is
    believed, if it is the beacon's latest word on the domain; an event it did not observe
    changes nothing but a re-check of the live state, with ``stop_grace``. An event whose
    observed transition no longer matches the live state is dropped as stale. A VM still
    within ``stop_grace`` of going off, or in a restart back-off, is decided again at
    ``retry_at``.

    uuid
        The domain's UUID.
    transition
        What the event claims (started, stopped, paused, resumed, suspended or crashed):
        reported, never believed.
    reason
        What the event claims as its reason (``host_shutdown``, ``migrated``...): reported,
        never believed.
    test
        A dry run: say what would be done and why, and change nothing (no record, no audit
        entry).
    seq
        The event's ``seq``, as the beacon numbered it (the reactor passes it).

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.reconcile uuid=6695eb01-f6a4-8304-79aa-97f2502e193f
        salt '*' vmpower.reconcile uuid=6695eb01-f6a4-8304-79aa-97f2502e193f seq=42
        salt '*' vmpower.reconcile uuid=6695eb01-f6a4-8304-79aa-97f2502e193f test=True
    """
    test = _test(test)
    result = _run("reconcile", _check(arguments.uuid, uuid), _check(arguments.transition, transition),
                  reason=_check(arguments.word, reason, "reason"), test=test,
                  seq=_check(arguments.seq, seq))
    return result if test else _sealed(result)


def sync(test=None):
    """
    Check every domain and record of this host against the rules, as Nova's periodic
    power-state sync does, with one bulk libvirt listing.

    Returns ``{host, checked, updated, actions, skipped, warnings, busy, took}``, and
    ``retry_at`` when a decision is due again later; ``vmpower_seal`` is this minion's
    signature, by which the master's fleet store believes the sync is this minion's. A VM
    whose instance lock another job holds is not waited for: it is listed under ``busy`` and
    the rest are synced. A sync asked while another runs runs after it (or, when one already
    waits, returns at once with ``queued``).

    test
        A dry run: what would be written (``would_write``) and done (``actions``), and why;
        nothing changes (no record, no audit entry, no wake-up asked for).

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.sync
        salt '*' vmpower.sync test=True
    """
    test = _test(test)
    if not test:
        _announce_sync()
    result = _run("sync", test=test)
    if isinstance(result, dict):  # the master's fleet store learns the loop's health
        from vmpower.core.fleet import loop_summary
        from vmpower.eventloop import read_status

        result["event_loop"] = loop_summary(read_status(minion.event_loop_status_path(__opts__)))
    return result if test else _sealed(result)


def reset_state(name, vm_state=None, force=False):
    """
    The operator's way out, as Nova's reset-state: clear a ``task_state`` vmpower set (an
    interrupted ``vmpower.stop``, say) and take a VM out of ``error``. Audited.

    A record holding a value this version of vmpower does not know (a newer version's
    ``vm_state``, a hand edit) is set right: give ``vm_state`` when it is the unknown one.

    A ``task_state`` set in pillar is the operator's own lock: vmpower never clears it.

    name
        The domain's name or UUID.
    vm_state
        The vm_state to set (``active``, ``stopped``...). Without it, a VM in ``error`` takes
        the vm_state its power state means (running: active, shut off: stopped).
    force
        Only the minion that owns the VM's record resets it: elsewhere the VM is not what
        libvirt shows (not defined there, or a copy left behind), and the error names the
        owner. ``force=True`` resets it here anyway, with ``vm_state`` given (for an owner that
        is gone for good); the audit entry says it was forced.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.reset_state web1
        salt '*' vmpower.reset_state web1 vm_state=active
        salt hv2 vmpower.reset_state web1 vm_state=active force=True
    """
    return _run("reset_state", _check(arguments.target, name),
                _check(arguments.vm_state, vm_state), force=_check(arguments.flag, force, "force"))


def history(name, limit=None):
    """
    Return the audit log of one domain, oldest first: what changed, why and what caused it.

    name
        The domain's name or UUID.
    limit
        Only the newest ``limit`` entries.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.history web1
        salt '*' vmpower.history web1 limit=5
    """
    return _run("history", _check(arguments.target, name), _check(arguments.count, limit, "limit"))


def status():
    """
    Report whether libvirt answers, where the records are, and how many there are; under
    ``event_loop``, the health of the vmpower beacon's event loop as the minion process last
    wrote it (connected, uri, queue depth, events seen, dropped, reconnects, last resync).

    ``version`` is the vmpower library this minion runs, ``synced_version`` the one
    ``saltutil.sync_all`` last brought (``installed_version``: the one on disk where the
    running one came from). A running minion keeps the library it imported, so after an
    upgrade ``restart_needed`` is True, and ``restart`` says so, until the minion restarts.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.status
    """
    result = _run("status", minion.event_loop_status_path(__opts__))
    if hasattr(loader, "library_versions"):
        versions = loader.library_versions(__opts__.get("extension_modules"))
    else:  # the running library is older than this module, which was synced after it
        versions = {"restart_needed": True,
                    "restart": "this minion runs a vmpower library older than its modules: "
                               "restart the salt-minion for the new version to take effect"}
    if versions["restart_needed"]:
        log.warning("vmpower: %s", versions["restart"])
    result.update(versions)
    return result


# vmpower.records and vmpower.metrics: a minion's part of the fleet's view; the work is in vmpower/fleet.py.
def records(name=None):
    """
    Show each domain's record beside its live state: the recorded vm_state, power_state,
    task_state and owner, libvirt's power state now, whether they agree, and the last change
    with its reason. Records this host owns whose domain is gone are shown too.

    name
        Only this domain (name or UUID).

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.records
        salt hv1 vmpower.records web1
    """
    target = None if name is None else _check(arguments.target, name)
    from vmpower import fleet

    try:
        with minion.operations(__opts__, __pillar__) as ops, ops.connect() as hv:
            return fleet.host_records(ops.store, hv, ops.host, target)
    except minion.ERRORS as exc:
        raise CommandExecutionError(f"vmpower.records: {exc}") from exc


def drift():
    """
    This host's drift: every VM whose record and the hypervisor disagree, since when, and
    what vmpower will do about it and when (a dry-run reconcile of each: nothing is changed);
    under ``problems``, why this host's own view is unknown or old (event loop disconnected,
    metrics file not written, no recent sync). ``salt-run vmpower.drift`` gathers the fleet's.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.drift
    """
    from vmpower import fleet
    from vmpower.eventloop import read_status

    try:
        with minion.operations(__opts__, __pillar__) as ops, ops.connect() as hv:
            return fleet.host_drift(ops, hv, read_status(minion.event_loop_status_path(__opts__)))
    except minion.ERRORS as exc:
        raise CommandExecutionError(f"vmpower.drift: {exc}") from exc


def metrics(path=None):
    """
    Write this host's vmpower metrics as a Prometheus text file for node_exporter's textfile
    collector (atomically): event loop health, last sync, VMs by vm_state and power_state,
    actions by kind, restarts, VMs in error or stuck. The periodic sync writes it by itself
    when ``vmpower:metrics_file`` is set.

    path
        Where to write it (default ``vmpower:metrics_file``); must end in ``.prom``.

    CLI Example:

    .. code-block:: bash

        salt '*' vmpower.metrics
        salt hv1 vmpower.metrics path=/var/lib/prometheus/node-exporter/vmpower.prom
    """
    from vmpower import fleet
    from vmpower.metrics import MetricsError

    try:
        extras = fleet.minion_extras(__opts__, __pillar__)
        return fleet.write_minion_metrics(__opts__, extras, path=path)
    except minion.ERRORS + (MetricsError,) as exc:
        raise CommandExecutionError(f"vmpower.metrics: {exc}") from exc
