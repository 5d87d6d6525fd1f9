"""The one place vmpower talks to libvirt for reading and acting on domains.

Every connection is opened for one job and closed when it ends, errors included. libvirt's
default error handler (which prints every error to stderr) is replaced once: errors still
arrive as exceptions, and vmpower reports them in its own words.

Every libvirt call is bounded and says what it waited for. A libvirt client only notices a
libvirtd that stopped answering (hung, or stopped) through keepalive, and keepalive runs only
in a process that runs libvirt's event loop. So:

- A process that can run the loop (``vmpower.eventloop.ensure_running``: salt-call, a minion
  without the beacon, the tests) runs it, and its connections send keepalives: a call to a hung
  libvirtd fails after about ``KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1)`` seconds.
- A Salt job process forked from a minion that runs the beacon inherits that loop's state but
  not its thread, and may not run it (the parent's sockets are registered in it). There, the
  calls run on a thread of their own and the caller waits ``call_timeout`` seconds at most; and
  since libvirtd drops a connection whose keepalives go unanswered for about 30 s, a
  connection idle for ``IDLE_REOPEN`` seconds is opened afresh before its next call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple
from xml.etree import ElementTree

from vmpower.core.mapping import live_state
from vmpower.core.model import GONE, LiveState
from vmpower.core.settings import UUID_RE

if TYPE_CHECKING:  # typing.Self is Python 3.11's; typing_extensions is no runtime dependency
    from typing_extensions import Self

try:
    import libvirt
except ImportError:  # pragma: no cover - reported by the Salt modules' __virtual__
    libvirt = None

log = logging.getLogger(__name__)

HAS_LIBVIRT = libvirt is not None
if HAS_LIBVIRT:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

POLL_INTERVAL = 0.1
#: The longest any one libvirt call may take before vmpower gives up on it: above libvirt's own
#: bounds (a domain job waits 30 s for another; a destroy waits some 15 s for QEMU to die).
CALL_TIMEOUT = 60.0
#: Client keepalive where this process runs the event loop: a ping after 5 s of silence, the
#: connection given up after 3 unanswered ones.
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
#: Where keepalive cannot be answered (see above), reconnect after this long without a call.
IDLE_REOPEN = 15.0


class HypervisorError(RuntimeError):
    """libvirt refused or failed; the message names the URI and the domain."""


class UnknownDomain(HypervisorError):
    """No domain has that name or UUID on this host."""


class LibvirtTimeout(HypervisorError):
    """libvirt did not answer within the time allowed; the message says what was asked."""


class LiveDomain(NamedTuple):
    """A domain as listed just now (a tuple: a sync builds one per domain)."""

    uuid: str
    name: str
    state: LiveState


def _error(exc: Exception) -> str:
    return exc.get_error_message() if hasattr(exc, "get_error_message") else str(exc)


def _live_domains(stats, handles: dict | None = None) -> dict[str, LiveDomain]:
    """``getAllDomainStats`` / ``domainListGetStats`` with VIR_DOMAIN_STATS_STATE, by UUID;
    each domain's handle also into ``handles``, if given. ``stats`` is emptied as it is read:
    a large listing is not held twice over (its entries and the domains made of them)."""
    domains = {}
    for i, (dom, values) in enumerate(stats):
        stats[i] = None
        uuid = dom.UUIDString()
        if handles is not None:
            handles[uuid] = dom
        domains[uuid] = LiveDomain(uuid, dom.name(),
                                   live_state(values["state.state"], values["state.reason"]))
    return domains


def run_event_loop() -> bool:
    """Run libvirt's event loop in this process, once (vmpower.eventloop owns it); True if it
    runs here, False in a process forked from the one that runs it (it cannot run twice)."""
    if not HAS_LIBVIRT:
        return False
    from vmpower.eventloop import ensure_running  # imports this module: not at the top

    try:
        ensure_running()
    except RuntimeError as exc:
        log.debug("vmpower: no libvirt event loop of this process's own: %s", exc)
        return False
    return True


class _Caller:
    """A daemon thread that makes one connection's libvirt calls, so that the caller can stop
    waiting for one that does not return (a daemon thread never holds up the process's exit)."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            function, args, outcome, done = job
            try:
                outcome.append((True, function(*args)))
            except BaseException as exc:
                outcome.append((False, exc))
            done.set()

    def call(self, timeout: float, function: Callable, *args):
        """``function(*args)`` on the thread; TimeoutError after ``timeout`` seconds."""
        outcome: list = []
        done = threading.Event()
        self._jobs.put((function, args, outcome, done))
        if not done.wait(timeout):
            raise TimeoutError
        ok, value = outcome[0]
        if ok:
            return value
        raise value

    def call_each(self, timeout: float, run: Callable, function: Callable, items: Sequence):
        """``function(item)`` for each of ``items`` on the thread, one after the other, handed
        over once; ``run(batch)`` runs the batch there (``_Batch.run``, or it wrapped). Each
        call may take ``timeout`` seconds, counted from when it began (the first from now).

        Returns the outcome of each call made, ``(True, value)`` or ``(False, exception)``,
        and whether the call after them did not return in time: then no later one is begun,
        even if that call returns after all. A BaseException raised by a call ends the batch
        and is raised here."""
        batch = _Batch(function, items)
        outcome: list = []
        done = threading.Event()
        self._jobs.put((run, (batch,), outcome, done))
        wait = timeout
        while not done.wait(wait):
            with batch.lock:
                waited = time.monotonic() - batch.since
                if waited >= timeout:
                    batch.given_up = True
                    return list(batch.outcomes), True
                wait = timeout - waited
        ok, value = outcome[0]
        if not ok:
            raise value
        return batch.outcomes, False

    def stop(self) -> None:
        self._jobs.put(None)


class _Batch:
    """Calls made one after the other on a ``_Caller``'s thread, each timed on its own."""

    def __init__(self, function: Callable, items: Sequence):
        self.function = function
        self.items = items
        self.outcomes: list[tuple[bool, object]] = []
        self.lock = threading.Lock()  # the caller gives up only between begun and done
        self.since = time.monotonic()  # when the call under way began
        self.given_up = False

    def run(self) -> None:
        """On the caller's thread: each call, unless the caller has given up on the batch."""
        for item in self.items:
            with self.lock:
                if self.given_up:
                    return
                self.since = time.monotonic()
            try:
                outcome = (True, self.function(item))
            except Exception as exc:  # this item's outcome, not the batch's
                outcome = (False, exc)
            with self.lock:
                self.outcomes.append(outcome)


def _bounded(what: str):
    """Make a Hypervisor method a bounded call on its connection's thread (see the module
    docstring); ``what`` (formatted with the call's first argument) names it in the error."""
    def wrap(method):
        def bounded(self, *args, **kwargs):
            return self._bounded_call(what.format(*args), method, self, *args, **kwargs)
        bounded.__name__, bounded.__doc__ = method.__name__, method.__doc__
        return bounded
    return wrap


class Hypervisor:
    """A libvirt connection for the length of a ``with`` block; every call bounded by
    ``call_timeout`` seconds (see the module docstring)."""

    def __init__(self, uri: str, call_timeout: float = CALL_TIMEOUT):
        self.uri = uri
        self.call_timeout = call_timeout
        self._conn = None
        self._handles: dict[str, object] = {}  # uuid -> virDomain, from the last listing
        self._caller: _Caller | None = None
        self._stuck: str | None = None  # the call that never returned, if one did not
        self._own_loop = False
        self._last_call = 0.0

    def __enter__(self) -> Self:
        if not HAS_LIBVIRT:
            raise HypervisorError("the libvirt Python bindings (libvirt-python) are not installed")
        # Before the connection is opened: a connection opened without an event loop never
        # gets keepalive.
        self._own_loop = run_event_loop()
        self._caller = _Caller(f"vmpower-libvirt {self.uri}")
        try:
            self._bounded_call("connect", self._open)
        except BaseException:
            self._caller.stop()
            raise
        return self

    def _open(self) -> None:
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to libvirt at {self.uri}: {_error(exc)}") from exc
        if self._own_loop:
            try:
                self._conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            except libvirt.libvirtError as exc:  # drivers inside the client (test:///) have no peer
                log.debug("vmpower: no keepalive on %s: %s", self.uri, _error(exc))
        self._last_call = time.monotonic()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._handles = {}
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError as close_exc:
                log.debug("closing the libvirt connection to %s failed: %s", self.uri, close_exc)

    def __exit__(self, *exc) -> None:
        caller = self._caller
        if caller is None:
            return
        try:
            # Closed on the caller thread before it is let go: with the thread already gone
            # the close was refused and the connection (and every listed handle) outlived the job.
            if self._stuck is None:
                self._bounded_call("close the connection", self._close)
        except HypervisorError as close_exc:  # the job's own outcome matters more
            log.warning("vmpower: %s", close_exc)
        finally:
            self._caller = None
            caller.stop()

    def _bounded_call(self, what: str, function: Callable, *args, **kwargs):
        """``function(*args, **kwargs)`` on the connection's thread, waited for at most
        ``call_timeout`` seconds; a call that never returns leaves the connection unusable."""
        if self._caller is None:
            raise HypervisorError(f"no connection to libvirt at {self.uri}: use Hypervisor in a with block")
        if threading.current_thread() is self._caller.thread:
            return function(*args, **kwargs)  # a bounded method calling another
        if self._stuck is not None:
            raise LibvirtTimeout(f"libvirt at {self.uri} is still busy with '{self._stuck}', "
                                 f"which did not return: cannot {what}")
        try:
            return self._caller.call(self.call_timeout, self._call_fresh, function, args, kwargs)
        except TimeoutError:
            self._stuck = what
            raise LibvirtTimeout(f"libvirt at {self.uri} did not answer within "
                                 f"{self.call_timeout:g}s (to {what}): libvirtd, or the domain's "
                                 f"QEMU, is not responding") from None

    def _bounded_each(self, what: Callable[[object], str], function: Callable,
                      items: Sequence) -> list[tuple[bool, object]]:
        """``function(item)`` for each of ``items`` on the connection's thread, handed over
        once rather than once each, each call bounded by ``call_timeout`` seconds on its own;
        ``what(item)`` names a call in an error.

        Returns each item's outcome, in order: ``(True, value)``, or ``(False, exception)``
        for one that raised. A call that does not return in time is a LibvirtTimeout, leaves
        the connection unusable (as in ``_bounded_call``), and the items after it are not
        tried: each is a LibvirtTimeout saying so. Nothing is done for an empty batch."""
        if not items:
            return []
        if self._caller is None:
            raise HypervisorError(f"no connection to libvirt at {self.uri}: use Hypervisor in a with block")
        if threading.current_thread() is self._caller.thread:
            batch = _Batch(function, items)
            batch.run()
            return batch.outcomes
        if self._stuck is None:
            def run(batch: _Batch) -> None:
                self._call_fresh(batch.run, (), {})
            outcomes, timed_out = self._caller.call_each(self.call_timeout, run, function, items)
            if not timed_out:
                return outcomes
            item = items[len(outcomes)]
            self._stuck = what(item)
            outcomes.append((False, LibvirtTimeout(
                f"libvirt at {self.uri} did not answer within {self.call_timeout:g}s (to "
                f"{what(item)}): libvirtd, or the domain's QEMU, is not responding")))
        else:
            outcomes = []
        for item in items[len(outcomes):]:
            outcomes.append((False, LibvirtTimeout(
                f"libvirt at {self.uri} is still busy with '{self._stuck}', which did not "
                f"return: cannot {what(item)}")))
        return outcomes

    def _call_fresh(self, function: Callable, args: tuple, kwargs: dict):
        """On the connection's thread: reopen a connection idle for long where keepalive cannot
        be answered (libvirtd will have dropped it), then call."""
        if (not self._own_loop and self._conn is not None
                and getattr(function, "__func__", None) is not Hypervisor._close
                and time.monotonic() - self._last_call > IDLE_REOPEN):
            log.debug("vmpower: reopening the connection to %s after %.0fs idle", self.uri,
                      time.monotonic() - self._last_call)
            self._close()
            self._open()
        try:
            return function(*args, **kwargs)
        finally:
            self._last_call = time.monotonic()

    # Reading
    @_bounded('list the domains')
    def list_all(self) -> dict[str, LiveDomain]:
        """Every domain on the host with its state, from one bulk call."""
        try:
            stats = self._conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list domains at {self.uri}: {_error(exc)}") from exc
        # A sync acts on a few of them: no second lookup, and their states read again in bulk.
        return _live_domains(stats, self._handles)

    @_bounded('look up {0}')
    def lookup(self, name_or_uuid: str):
        """The libvirt domain with that UUID or name, or UnknownDomain.

        What the text is decides how it is looked up: only text shaped like a UUID is tried as
        one (and then as a name, since a name may look like a UUID). An error code never
        decides it: libvirt keeps its last error per thread, and any libvirt call in between
        (a virDomainFree run by the garbage collector) resets it, so it can read as None.
        """
        if name_or_uuid in self._handles:
            return self._handles[name_or_uuid]
        if UUID_RE.match(name_or_uuid):
            dom = self._find_by(self._conn.lookupByUUIDString, name_or_uuid)
            if dom is not None:
                return dom
        dom = self._find_by(self._conn.lookupByName, name_or_uuid)
        if dom is None:
            raise UnknownDomain(f"no domain named or with UUID {name_or_uuid!r} at {self.uri}")
        return dom

    def _find_by(self, finder, key: str):
        """``finder(key)``, or None when libvirt says there is no such domain."""
        try:
            return finder(key)
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            if code is not None:
                raise HypervisorError(f"cannot look up {key!r} at {self.uri}: {_error(exc)}") from exc
        # The reason was lost (see lookup): the listing says for certain whether it exists.
        as_uuid = key.replace("-", "").lower()
        for dom in self._list_all_domains():
            if dom.name() == key or dom.UUIDString().replace("-", "") == as_uuid:
                return dom
        return None

    def _list_all_domains(self) -> list:
        try:
            return self._conn.listAllDomains()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list domains at {self.uri}: {_error(exc)}") from exc

    @_bounded('read the state of {0}')
    def find(self, uuid: str) -> LiveDomain | None:
        """The domain with that UUID and its state read now, uncached; None if it is gone."""
        try:
            dom = self.lookup(uuid)
        except UnknownDomain:
            return None
        return LiveDomain(dom.UUIDString(), dom.name(), self._state(dom))

    @_bounded('read the states of the domains to act on')
    def find_listed(self, uuids) -> dict[str, LiveDomain | None]:
        """``find`` for those of ``uuids`` that the last listing gave, read now (uncached) in
        one bulk call instead of a round trip each; the others are left out (``find`` them).
        Empty if the bulk call fails (a domain undefined since fails it as a whole)."""
        handles = [self._handles[uuid] for uuid in uuids if uuid in self._handles]
        if not handles:
            return {}
        try:
            stats = self._conn.domainListGetStats(handles, libvirt.VIR_DOMAIN_STATS_STATE)
        except libvirt.libvirtError as exc:
            log.debug("vmpower: no bulk state read at %s (reading one by one): %s", self.uri,
                      _error(exc))
            return {}
        return _live_domains(stats)

    def _state(self, dom) -> LiveState:
        try:
            return live_state(*dom.state())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return GONE
            raise HypervisorError(f"cannot read the state of {dom.name()} at {self.uri}: "
                                  f"{_error(exc)}") from exc

    @_bounded('read {0}')
    def info(self, name_or_uuid: str) -> dict:
        """Power state, memory (KiB), vCPUs and CPU time (ns), as libvirt gives them."""
        dom = self.lookup(name_or_uuid)
        try:
            state, max_mem, mem, num_cpu, cpu_time = dom.info()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot read {dom.name()} at {self.uri}: {_error(exc)}") from exc
        return {"uuid": dom.UUIDString(), "name": dom.name(),
                "power_state": live_state(state, 0).power_state.value,
                "max_mem": max_mem, "mem": mem, "num_cpu": num_cpu, "cpu_time": cpu_time}

    # What the rules need, read only when they need it
    @_bounded('read the XML of {0}')
    def on_crash(self, uuid: str) -> str:
        """The domain's ``<on_crash>`` action (``destroy``, libvirt's default, when its XML has
        none; ``preserve``, ``restart``, ``coredump-destroy``...); "" when it cannot be read."""
        try:
            xml = self.lookup(uuid).XMLDesc(0)
        except (HypervisorError, libvirt.libvirtError) as exc:
            log.warning("vmpower: cannot read the <on_crash> of %s at %s: %s", uuid, self.uri,
                        _error(exc))
            return ""
        try:
            found = ElementTree.fromstring(xml).find("on_crash")
        except ElementTree.ParseError as exc:
            log.warning("vmpower: the XML of %s at %s does not parse: %s", uuid, self.uri, exc)
            return ""
        return (found.text or "").strip() if found is not None else "destroy"

    @_bounded('read the job of {0}')
    def migration_job(self, uuid: str) -> bool | None:
        """Whether libvirt runs a migration of the domain now, incoming or outgoing (its
        current job's operation); False when it has no job (or the driver has no jobs, as the
        test driver); None when it cannot be told."""
        try:
            stats = self.lookup(uuid).jobStats()
        except UnknownDomain:
            return False
        except (HypervisorError, libvirt.libvirtError) as exc:
            code = exc.get_error_code() if isinstance(exc, libvirt.libvirtError) else None
            if code in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_NO_DOMAIN,
                        libvirt.VIR_ERR_OPERATION_INVALID):
                return False
            log.warning("vmpower: cannot read the job of %s at %s: %s", uuid, self.uri, _error(exc))
            return None
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return False
        operation = stats.get("operation")
        if operation is None:
            return None  # a job libvirt does not name: cannot tell it is not a migration
        return operation in (libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN,
                             libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT)

    def migration_jobs(self, uuids: Sequence[str]) -> dict[str, bool | None]:
        """``migration_job`` of each domain, handed to the connection's thread once for them
        all, each call bounded on its own. A domain whose job cannot be told is None, as in
        ``migration_job``; a call that does not return in time raises LibvirtTimeout, as one
        call would (no domain of the batch can then be acted on: its check is missing)."""
        jobs: dict[str, bool | None] = {}
        for uuid, (ok, value) in zip(uuids, self._bounded_each(
                lambda uuid: f"read the job of {uuid}", self.migration_job, uuids)):
            if not ok:
                if isinstance(value, LibvirtTimeout):
                    raise value
                log.warning("vmpower: cannot read the job of %s at %s: %s", uuid, self.uri, value)
                value = None
            jobs[uuid] = value
        return jobs

    @_bounded('list the autostarted domains')
    def autostart_set(self) -> set[str] | None:
        """The UUIDs of the domains libvirt starts when it starts, in one bulk call; None when
        libvirt cannot list them."""
        try:
            domains = self._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)
        except libvirt.libvirtError as exc:
            log.warning("vmpower: cannot list the autostarted domains at %s: %s", self.uri,
                        _error(exc))
            return None
        return {dom.UUIDString() for dom in domains}

    # Acting
    def _call(self, dom, verb: str, method, *args) -> None:
        try:
            method(*args)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot {verb} {dom.name()} at {self.uri}: {_error(exc)}") from exc

    @_bounded('power off {0}')
    def power_off(self, uuid: str) -> bool:
        """Make sure the domain is fully off; True if it had to be powered off.

        No state read first: the caller has just read it, and libvirt refuses to destroy a
        domain that is not running, so asking only when the destroy fails saves a round trip."""
        dom = self.lookup(uuid)
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if not self._running(dom):  # off already, or gone off by itself meanwhile
                return False
            raise HypervisorError(f"cannot power off {dom.name()} at {self.uri}: "
                                  f"{_error(exc)}") from exc
        return True

    def power_actions(self, actions: Sequence[tuple[str, str]]) -> dict[str, bool | Exception]:
        """Each ``(action, uuid)``: ``power_off`` or ``start`` (the action's name) the domain,
        handed to the connection's thread once for them all, each call bounded on its own.

        Each domain's result is its own: what ``power_off`` or ``start`` returned, or the
        exception its call raised. A call that does not return in time is a LibvirtTimeout,
        and the domains after it are not acted on: each is a LibvirtTimeout saying so."""
        verbs = {"power_off": "power off", "start": "start"}
        methods = {"power_off": self.power_off, "start": self.start}
        for action, _uuid in actions:
            if action not in methods:
                raise ValueError(f"not a power action: {action!r}")
        outcomes = self._bounded_each(lambda item: f"{verbs[item[0]]} {item[1]}",
                                      lambda item: methods[item[0]](item[1]), actions)
        return {uuid: value for (_action, uuid), (_ok, value) in zip(actions, outcomes)}

    @property
    def stuck(self) -> str | None:
        """The call that did not return in time, if one did not: the connection is unusable."""
        return self._stuck

    @staticmethod
    def _running(dom) -> bool:
        """``isActive()``, where a domain that no longer exists is not running."""
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise

    def shutdown(self, uuid: str, timeout: float) -> bool:
        """Ask the guest to shut down (ACPI) and wait up to ``timeout`` seconds.

        Returns True if it went off by itself, False if it was still running at the end
        (the caller decides whether to power it off).
        """
        dom = self.lookup(uuid)
        if not self._is_active(dom):
            return True
        self._bounded_call(f"shut down {uuid}", self._call, dom, "shut down", dom.shutdown)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._is_active(dom):
                return True
            time.sleep(POLL_INTERVAL)
        return not self._is_active(dom)

    def _is_active(self, dom) -> bool:
        return self._bounded_call(f"read the state of {dom.UUIDString()}", dom.isActive)

    @_bounded('start {0}')
    def start(self, uuid: str) -> bool:
        """Start the domain; True if it was not running."""
        dom = self.lookup(uuid)
        if dom.isActive():
            return False
        self._call(dom, "start", dom.create)
        return True

    @_bounded('read the state of {0}')
    def state(self, uuid: str) -> LiveState:
        """The domain's state read now; NOSTATE if it no longer exists."""
        found = self.find(uuid)
        return found.state if found else GONE
