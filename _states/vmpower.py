"""
Declare whether VMs should run, and converge them: ``vmpower.running`` and ``vmpower.stopped``.

The intent is written to vmpower's records (``vm_state``) exactly as ``vmpower.start`` and
``vmpower.stop`` would, so events and syncs keep the VM that way afterwards. ``name`` may be a
glob matched against this host's domain names.

With ``test=True`` nothing is changed, and what the real run would do is predicted by the same
checks it makes: a VM that vmpower may not act on (pinned otherwise by pillar, locked by a
``task_state``, ``managed: false``, owned by another host) fails the state with the reason,
and ``changes`` has the same shape as a real run's.

.. code-block:: yaml

    web servers run:
      vmpower.running:
        - name: web*

    old-db:
      vmpower.stopped:
        - timeout: 120
"""

import fnmatch
import logging

if __name__ == "vmpower":
    # Salt puts this file's directory on sys.path while it loads it, so before the library is
    # synced ``import vmpower`` finds this file. Refused, it stays out of sys.modules, and the
    # library imports once it is there instead of this file for the rest of the process.
    raise ModuleNotFoundError(f"No module named 'vmpower' ({__file__} is a Salt module)",
                              name="vmpower", path=__file__)

try:
    from vmpower import minion
    from vmpower.core import arguments
    from vmpower.core.model import OFF_OR_GONE, Cause, PowerState, VmState
    from vmpower.core.settings import ConfigError

    IMPORT_ERROR = None
except ImportError as exc:  # reported by __virtual__
    IMPORT_ERROR = exc

log = logging.getLogger(__name__)

__virtualname__ = "vmpower"


def __virtual__():
    if IMPORT_ERROR is not None:
        return False, f"vmpower: the vmpower library cannot be imported: {IMPORT_ERROR}"
    if "vmpower.sync" not in __salt__:
        return False, "vmpower: the vmpower execution module is not available"
    return __virtualname__


def _is_glob(pattern):
    return any(c in pattern for c in "*?[")


def _converge(name, wanted, vm_state, expected, satisfied, act):
    """Shared body of both states: match, compare, then act on each VM (or predict, test=True).

    ``vm_state`` is the VmState the state records, ``expected`` the ``changes.new`` a
    successful run of one VM writes ({vm_state, power_state}): in test mode it is the
    prediction, so ``changes`` has one shape either way. A VM that cannot be made ``wanted``
    fails the state (it is named in the comment, with why); the others go on.
    """
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    test = __opts__["test"]
    try:
        pattern = arguments.target(name)
        with minion.operations(__opts__, __pillar__) as ops:
            matched = [vm for vm in ops.overview() if fnmatch.fnmatchcase(vm["name"], pattern)
                       or vm["uuid"] == pattern.lower()]
            if not matched:
                what = "the glob" if _is_glob(pattern) else "the name or UUID"
                ret["result"] = False
                ret["comment"] = f"No domain on this host matches {what} {pattern!r}"
                return ret
            todo = [vm for vm in matched if not satisfied(vm)]
            done = sorted(vm["name"] for vm in matched if satisfied(vm))
            comments = [f"{', '.join(done)} already {wanted}"] if done else []
            failed = []
            for vm in todo:
                old = {"vm_state": vm["vm_state"], "power_state": vm["power_state"]}
                if test:
                    refusal = ops.power_refusal(vm["uuid"], vm_state)
                    if refusal:
                        failed.append(f"{vm['name']} would not be made {wanted}: {refusal}")
                    else:
                        ret["changes"][vm["name"]] = {"old": old, "new": dict(expected)}
                    continue
                try:
                    result = act(ops, vm["uuid"])
                except minion.ERRORS as exc:  # this VM fails; the others are still converged
                    failed.append(f"{vm['name']}: {exc}")
                    continue
                ret["changes"][vm["name"]] = {
                    "old": old,
                    "new": {"vm_state": result["vm_state"], "power_state": result["power_state"]}}
                comments.append(f"{vm['name']}: {result['result']}")
    except (ConfigError,) + minion.ERRORS as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    if test and ret["changes"]:
        comments.append(f"{', '.join(sorted(ret['changes']))} would be made {wanted}")
    if failed:
        ret["result"] = False
        comments.extend(failed)
    elif test and ret["changes"]:
        ret["result"] = None
    ret["comment"] = "; ".join(comments)
    return ret


def running(name):
    """
    Make sure the domains matching ``name`` are running and recorded ``vm_state=active``.

    name
        A domain name, UUID or glob (``web*``). A glob that matches no domain fails.

    A domain vmpower may not start (pinned ``stopped`` by pillar, a ``task_state`` set,
    ``managed: false``, owned by another host) fails the state with the reason, in test mode
    too; the other matches are still started.

    .. code-block:: yaml

        web servers run:
          vmpower.running:
            - name: web*
    """
    return _converge(
        name, "running", VmState.ACTIVE, {"vm_state": "active", "power_state": "running"},
        lambda vm: vm["vm_state"] == "active" and vm["power_state"] == "running",
        lambda ops, uuid: ops.start(uuid, cause=Cause.STATE))


def stopped(name, timeout=None, force=False):
    """
    Make sure the domains matching ``name`` are off and recorded ``vm_state=stopped``.

    name
        A domain name, UUID or glob. A glob that matches no domain fails.
    timeout
        Seconds to wait for a graceful shutdown before powering off (default
        ``vmpower:stop_timeout``).
    force
        Power off at once.

    A domain vmpower may not stop (pinned ``active`` by pillar, a ``task_state`` set,
    ``managed: false``) fails the state with the reason, in test mode too.

    .. code-block:: yaml

        old-db:
          vmpower.stopped:
            - timeout: 120

        batch jobs off now:
          vmpower.stopped:
            - name: batch-*
            - force: true
    """
    try:
        timeout = arguments.seconds(timeout, "timeout")
        force = arguments.flag(force, "force")
    except ConfigError as exc:
        return {"name": name, "changes": {}, "result": False, "comment": str(exc)}
    return _converge(
        name, "stopped", VmState.STOPPED, {"vm_state": "stopped", "power_state": "shutdown"},
        lambda vm: vm["vm_state"] == "stopped" and PowerState(vm["power_state"]) in OFF_OR_GONE,
        lambda ops, uuid: ops.stop(uuid, timeout=timeout, force=force, cause=Cause.STATE))
