"""libvirt's event loop thread and ``fork()``: a forked child never inherits a libvirt lock held.

A Salt minion forks a process for every job. When the minion also runs libvirt's event loop
(the vmpower beacon does, on a thread), a fork can happen while that thread is inside libvirt
holding one of its locks (the event loop's own, GLib's main context, a connection's). The
child gets a copy of the lock, held by a thread that does not exist in the child, and its first
libvirt call that needs it (opening a connection registers its socket in the event loop; every
RPC updates that registration) waits forever. A ``vmpower.reconcile`` forked right after an
automatic restart and a pillar refresh is the typical case: the beacon's loop thread is then
busy with the restart's events and its reconnection, and the job hangs.

``run_iteration()`` is one iteration of the loop, run by the loop's thread
(``vmpower.eventloop``). A fork first asks the thread to leave libvirt (it wakes the loop with a
timer and waits for the iteration to end) and holds it outside until the fork is done, so the
child is made while no thread of this process is inside libvirt. The cost is one wake-up of
the loop per fork.

The process's other vmpower threads (a watcher appending to the journal, the status thread
writing the live metrics) take locks that a job needs as well: SQLite's (a child opening the
same file finds the parent's lock state, and may find its mutex held) and Python's import
locks (a child importing a module that another thread was importing waits forever). Their work
runs inside ``no_fork_inside()``: a fork waits for it to end, and none begins while a fork is
being made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

try:
    import libvirt
except ImportError:  # pragma: no cover - nothing to guard without libvirt
    libvirt = None

log = logging.getLogger(__name__)

#: How long a fork waits for the loop thread to leave libvirt and the other threads to end their
#: sections; past it, the fork goes ahead (a minion that cannot fork is worse) and says so.
FORK_WAIT = 10.0

_cond = threading.Condition()
_forks_pending = 0  # forks waiting for, or being made while, the loop thread stays out
_in_libvirt = False  # the loop thread is inside virEventRunDefaultImpl
_loop_started = False  # this process has started the loop's thread (loop_thread_starts)
_loop_ident: int | None = None  # the loop thread's ident, once it has run an iteration
_wake_timer: int | None = None  # a libvirt timer, disabled except to wake the loop for a fork
_sections = 0  # threads inside no_fork_inside()
# Whether the fork this thread is making counts in _forks_pending. Other threads run between
# a fork's before and after hooks, so the loop may start in between: the after hook undoes
# what its own before hook did, not what the state says now.
_this_fork = threading.local()
_this_thread = threading.local()  # .depth: how many no_fork_inside() this thread is in


@contextlib.contextmanager
def no_fork_inside() -> Iterator[None]:
    """Run the block while this process does not fork: a fork begun meanwhile waits for the
    block to end (at most ``FORK_WAIT``), and the block waits for a fork being made. For the
    work of vmpower's own threads that holds locks a forked job would need (SQLite, imports).
    Nested blocks, and a fork from inside one, do not wait for themselves."""
    global _sections
    depth = getattr(_this_thread, "depth", 0)
    if depth == 0:
        with _cond:
            while _forks_pending:
                _cond.wait()
            _sections += 1
    _this_thread.depth = depth + 1
    try:
        yield
    finally:
        _this_thread.depth = depth
        if depth == 0:
            with _cond:
                _sections -= 1
                _cond.notify_all()


def loop_thread_starts() -> None:
    """Say that this process is starting the loop's thread. From here on every fork keeps the
    thread out of libvirt, also before its first iteration (a fork made while the new thread
    waits to be scheduled is not told apart from one made before it existed)."""
    global _loop_started
    with _cond:
        _loop_started = True


def _rest(timer: int, _opaque) -> None:
    libvirt.virEventUpdateTimeout(timer, -1)


def run_iteration() -> None:
    """One iteration of libvirt's default event loop (``virEventRunDefaultImpl``), never while
    this process forks. Only the one thread that runs the loop calls it."""
    global _in_libvirt, _loop_ident, _wake_timer
    with _cond:
        while _forks_pending:
            _cond.wait()
        if _wake_timer is None:
            _wake_timer = libvirt.virEventAddTimeout(-1, _rest, None)
        _loop_ident = threading.get_ident()
        _in_libvirt = True
    try:
        libvirt.virEventRunDefaultImpl()
    finally:
        with _cond:
            _in_libvirt = False
            _cond.notify_all()


def _before_fork() -> None:
    global _forks_pending
    _this_fork.counted = False
    if threading.get_ident() == _loop_ident or getattr(_this_thread, "depth", 0):
        return  # a fork from inside a libvirt callback or a section: it cannot wait for itself
    with _cond:
        if not _loop_started and not _sections:
            return  # nothing of vmpower's runs beside this thread
        _forks_pending += 1
        _this_fork.counted = True
        if _in_libvirt and _wake_timer is not None:
            # The loop may sit in poll() with no timeout: a due timer ends the iteration.
            libvirt.virEventUpdateTimeout(_wake_timer, 0)
        if not _cond.wait_for(lambda: not _in_libvirt and not _sections, FORK_WAIT):
            log.warning("vmpower: %s within %gs; forking anyway (the child may find a lock held)",
                        "libvirt's event loop thread did not leave libvirt" if _in_libvirt
                        else "vmpower's threads did not leave SQLite or an import", FORK_WAIT)


def _after_fork_in_parent() -> None:
    global _forks_pending
    if not getattr(_this_fork, "counted", False):
        return
    with _cond:
        _forks_pending -= 1
        _cond.notify_all()


def _after_fork_in_child() -> None:
    # The loop thread is not copied: nothing here runs the loop, and nothing waits for it. Of the
    # sections, only the forking thread's own (if it forked inside one) goes on in the child.
    global _cond, _forks_pending, _in_libvirt, _loop_started, _loop_ident, _this_fork, _sections
    _cond = threading.Condition()
    _forks_pending, _in_libvirt, _loop_started, _loop_ident = 0, False, False, None
    _sections = 1 if getattr(_this_thread, "depth", 0) else 0
    _this_fork = threading.local()


def loop_runs_here() -> bool:
    """Whether this process has started the loop's thread (a forked child has not, whatever it
    inherited)."""
    return _loop_started


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
