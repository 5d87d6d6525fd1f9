"""Facts about this host and this process that the rules need, read from /proc.

- ``boot_id()``: the kernel's random boot id, new at every boot. A monotonic clock reading
  (``Record.off_since``) or a process named in a ``task_owner`` belongs to one boot.
- ``process_owner(host)``: who this process is, as a ``task_owner`` JSON text: the host (the
  minion id), the boot, the pid and the pid's start time (so a reused pid is told apart), and
  since when (epoch seconds).
- ``host_stopping()``: whether systemd says the host is shutting down.
- ``owner_alive(task_owner, host)``: whether the process a ``task_owner`` names still runs.

Linux only (/proc); elsewhere ``boot_id()`` is "" and nothing about an owner can be told.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time

log = logging.getLogger(__name__)

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
# Exists only when systemd runs as the init system (what sd_booted(3) checks).
SYSTEMD_BOOTED_PATH = "/run/systemd/system"


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def boot_id() -> str:
    """This host's boot id ("" where the kernel has none: then no boot-bound value is trusted)."""
    return _read(BOOT_ID_PATH).strip()


def process_start_time(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (/proc/<pid>/stat field 22), as
    text; "" if there is no such process. Two processes that shared a pid in one boot never
    share a start time."""
    stat = _read(f"/proc/{int(pid)}/stat")
    # The command name (field 2) is in parentheses and may hold spaces and parentheses itself:
    # count the fields after its last ")". starttime is field 22, the 20th after it.
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20:
        return ""
    if fields[0] == "Z":  # a zombie has exited; only its exit status waits to be collected
        return ""
    return fields[19]


def process_owner(host: str, pid: int | None = None, since: float | None = None,
                  boot: str | None = None) -> str:
    """The ``task_owner`` JSON text naming this process (or ``pid``) on the minion ``host``,
    in this boot (or ``boot``, the boot id the caller already read)."""
    pid = os.getpid() if pid is None else int(pid)
    return json.dumps({"host": host, "boot_id": boot_id() if boot is None else boot, "pid": pid,
                       "start_time": process_start_time(pid),
                       "since": time.time() if since is None else since}, sort_keys=True)


def host_stopping() -> bool | None:
    """Whether this host is shutting down (systemd's state ``stopping``); None when it cannot
    be told (no systemd). libvirt-guests' ACPI shutdown of a guest looks like the guest's own
    to libvirt, so this is how a VM that goes off with its host is told apart."""
    if not os.path.isdir(SYSTEMD_BOOTED_PATH):
        return None  # what systemctl would say ("offline"), without a process per ask
    try:
        state = subprocess.run(["systemctl", "is-system-running"], capture_output=True,
                               text=True, timeout=2, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not state or state == "offline":
        return None
    return state == "stopping"


def owner_alive(task_owner: str, host: str | None = None) -> bool | None:
    """Whether the process that ``task_owner`` names still runs.

    True: it runs (same boot, the pid alive with the same start time). False: it is gone (the
    pid is dead or is another process now, or this host booted since it was written). None:
    it cannot be told: the text is not an owner, it names another minion than ``host``, or this
    host has no boot id. Pass ``host`` (this minion's id) whenever records may be another
    host's (a fleet store): without it the owner is taken to be this host's.
    """
    try:
        owner = json.loads(task_owner)
        pid = int(owner["pid"])
        written_boot = str(owner["boot_id"])
    except (ValueError, TypeError, KeyError):
        return None
    if host is not None and owner.get("host") != host:
        return None
    current = boot_id()
    if not current or not written_boot:
        return None
    if written_boot != current:
        return False  # this host rebooted: no process of that boot runs
    started = process_start_time(pid)
    if not started:
        return False
    return started == str(owner.get("start_time"))
