"""
Declare whether VMs should run, and converge them: ``vmpower.running`` and ``vmpower.stopped``.

The intent is written to vmpower's records (``vm_state``) exactly as ``vmpower.start`` and
``vmpower.stop`` would, so events and syncs keep the VM that way afterwards. ``name`` may be a
glob matched against this host's domain names.

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

try:
    from vmpower import minion
    from vmpower.core import arguments
    from vmpower.core.model import Cause
    from vmpower.core.settings import ConfigError

    IMPORT_ERROR = None
except ImportError as exc:  # reported by __virtual__
    IMPORT_ERROR = exc

log = logging.getLogger(__name__)

__virtualname__ = "vmpower"

OFF = ("shutdown", "crashed", "nostate")


def __virtual__():
    if IMPORT_ERROR is not None:
        return False, f"vmpower: the vmpower library cannot be imported: {IMPORT_ERROR}"
    if "vmpower.sync" not in __salt__:
        return False, "vmpower: the vmpower execution module is not available"
    return __virtualname__


def _converge(name, wanted, satisfied, act):
    """Shared body of both states: match, compare, then act on each VM (or report, test=True)."""
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    try:
        pattern = arguments.target(name)
        with minion.operations(__opts__, __pillar__) as ops:
            matched = [vm for vm in ops.overview() if fnmatch.fnmatchcase(vm["name"], pattern)
                       or vm["uuid"] == pattern.lower()]
            if not matched:
                is_glob = any(c in pattern for c in "*?[")
                ret["result"] = is_glob
                ret["comment"] = f"No domain on this host matches {pattern!r}"
                return ret
            todo = [vm for vm in matched if not satisfied(vm)]
            done = sorted(vm["name"] for vm in matched if satisfied(vm))
            comments = [f"{', '.join(done)} already {wanted}"] if done else []
            for vm in todo:
                old = {"vm_state": vm["vm_state"], "power_state": vm["power_state"]}
                if __opts__["test"]:
                    ret["changes"][vm["name"]] = {"old": old, "new": f"would be {wanted}"}
                    continue
                result = act(ops, vm["uuid"])
                ret["changes"][vm["name"]] = {
                    "old": old,
                    "new": {"vm_state": result["vm_state"], "power_state": result["power_state"]}}
                comments.append(f"{vm['name']}: {result['result']}")
    except (ConfigError,) + minion.ERRORS as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    if __opts__["test"] and ret["changes"]:
        ret["result"] = None
        comments.append(f"{', '.join(sorted(ret['changes']))} would be made {wanted}")
    ret["comment"] = "; ".join(comments)
    return ret


def running(name):
    """
    Make sure the domains matching ``name`` are running and recorded ``vm_state=active``.

    name
        A domain name, UUID or glob (``web*``).
    """
    return _converge(
        name, "running",
        lambda vm: vm["vm_state"] == "active" and vm["power_state"] == "running",
        lambda ops, uuid: ops.start(uuid, cause=Cause.STATE))


def stopped(name, timeout=None, force=False):
    """
    Make sure the domains matching ``name`` are off and recorded ``vm_state=stopped``.

    name
        A domain name, UUID or glob.
    timeout
        Seconds to wait for a graceful shutdown before powering off (default
        ``vmpower:stop_timeout``).
    force
        Power off at once.
    """
    try:
        timeout = arguments.seconds(timeout, "timeout")
        force = arguments.flag(force, "force")
    except ConfigError as exc:
        return {"name": name, "changes": {}, "result": False, "comment": str(exc)}
    return _converge(
        name, "stopped",
        lambda vm: vm["vm_state"] == "stopped" and vm["power_state"] in OFF,
        lambda ops, uuid: ops.stop(uuid, timeout=timeout, force=force, cause=Cause.STATE))
