"""libvirt's default event implementation and the one native thread that runs it.

libvirt delivers events (and runs its keepalive and timers) only while some thread calls
``virEventRunDefaultImpl()``. The implementation must be registered before the first
connection that should deliver events is opened, and can never be unregistered, so it is
registered at most once per process and its thread is shared by every watcher, whatever Salt
does to the beacon.
"""

from __future__ import annotations

import os
import threading
import time

# Importing vmpower.hypervisor also installs vmpower's libvirt error handler: libvirt's
# default one prints every error to stderr, so each failed reconnection attempt would reach
# the minion's log.
from vmpower import forksafe
from vmpower.hypervisor import HAS_LIBVIRT  # noqa: F401

try:
    import libvirt
except ImportError:  # pragma: no cover - reported by the beacon's __virtual__
    libvirt = None

THREAD_NAME = "vmpower-libvirt-events"
LOOP_ERROR_PAUSE = 1.0

# _start_lock guards the registration and the thread's start; the status reads _thread and
# loop_errors (written by the event thread only) without it.
_start_lock = threading.Lock()
_registered_pid: int | None = None
_thread: threading.Thread | None = None
loop_errors = 0


def _run_forever() -> None:
    global loop_errors
    while True:
        try:
            forksafe.run_iteration()  # virEventRunDefaultImpl, never while the process forks
        except Exception:  # every watcher depends on this loop: it must outlive a failed iteration
            loop_errors += 1
            time.sleep(LOOP_ERROR_PAUSE)  # neither a busy loop nor a log storm from this thread


def ensure_running() -> threading.Thread:
    """Register libvirt's default event implementation and start its thread, once per process.

    Call it before opening a connection that should deliver events.
    """
    global _registered_pid, _thread
    with _start_lock:
        if _registered_pid is None:
            libvirt.virEventRegisterDefaultImpl()
            _registered_pid = os.getpid()
        elif _registered_pid != os.getpid():
            # A forked child has the parent's libvirt state but not its thread; running a second
            # loop over that inherited state would compete with the parent's.
            raise RuntimeError(f"libvirt's event loop belongs to process {_registered_pid}; "
                               f"a forked process cannot run it")
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run_forever, name=THREAD_NAME, daemon=True)
            forksafe.loop_thread_starts()
            _thread.start()
        return _thread


def thread_alive() -> bool:
    thread = _thread
    return bool(thread and thread.is_alive())
