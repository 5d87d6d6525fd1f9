"""The one place vmpower talks to libvirt for reading and acting on domains.

Every connection is opened for one job and closed when it ends, errors included. libvirt's
default error handler (which prints every error to stderr) is replaced once: errors still
arrive as exceptions, and vmpower reports them in its own words.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, NamedTuple, Optional

from vmpower.core.mapping import live_state
from vmpower.core.model import GONE, LiveState

try:
    import libvirt
except ImportError:  # pragma: no cover - reported by the Salt modules' __virtual__
    libvirt = None

log = logging.getLogger(__name__)

HAS_LIBVIRT = libvirt is not None
if HAS_LIBVIRT:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

POLL_INTERVAL = 0.1


class HypervisorError(RuntimeError):
    """libvirt refused or failed; the message names the URI and the domain."""


class UnknownDomain(HypervisorError):
    """No domain has that name or UUID on this host."""


class LiveDomain(NamedTuple):
    """A domain as listed just now (a tuple: a sync builds one per domain)."""

    uuid: str
    name: str
    state: LiveState


def _error(exc: Exception) -> str:
    return exc.get_error_message() if hasattr(exc, "get_error_message") else str(exc)


class Hypervisor:
    """A libvirt connection for the length of a ``with`` block."""

    def __init__(self, uri: str):
        self.uri = uri
        self._conn = None
        self._handles: Dict[str, object] = {}  # uuid -> virDomain, from the last listing

    def __enter__(self) -> "Hypervisor":
        if not HAS_LIBVIRT:
            raise HypervisorError("the libvirt Python bindings (libvirt-python) are not installed")
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to libvirt at {self.uri}: {_error(exc)}") from exc
        return self

    def __exit__(self, *exc) -> None:
        conn, self._conn = self._conn, None
        self._handles = {}
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError as close_exc:
                log.debug("closing the libvirt connection to %s failed: %s", self.uri, close_exc)

    # Reading
    def list_all(self) -> Dict[str, LiveDomain]:
        """Every domain on the host with its state, from one bulk call."""
        try:
            stats = self._conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list domains at {self.uri}: {_error(exc)}") from exc
        domains = {}
        for dom, values in stats:
            uuid = dom.UUIDString()
            self._handles[uuid] = dom  # a sync acts on a few of them: no second lookup
            domains[uuid] = LiveDomain(uuid, dom.name(),
                                       live_state(values["state.state"], values["state.reason"]))
        return domains

    def lookup(self, name_or_uuid: str):
        """The libvirt domain with that UUID or name, or UnknownDomain."""
        if name_or_uuid in self._handles:
            return self._handles[name_or_uuid]
        for finder in (self._conn.lookupByUUIDString, self._conn.lookupByName):
            try:
                return finder(name_or_uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN,
                                                libvirt.VIR_ERR_INVALID_ARG):
                    raise HypervisorError(f"cannot look up {name_or_uuid!r} at {self.uri}: "
                                          f"{_error(exc)}") from exc
        raise UnknownDomain(f"no domain named or with UUID {name_or_uuid!r} at {self.uri}")

    def find(self, uuid: str) -> Optional[LiveDomain]:
        """The domain with that UUID and its state read now, uncached; None if it is gone."""
        try:
            dom = self.lookup(uuid)
        except UnknownDomain:
            return None
        return LiveDomain(dom.UUIDString(), dom.name(), self._state(dom))

    def _state(self, dom) -> LiveState:
        try:
            return live_state(*dom.state())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return GONE
            raise HypervisorError(f"cannot read the state of {dom.name()} at {self.uri}: "
                                  f"{_error(exc)}") from exc

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

    # Acting
    def _call(self, dom, verb: str, method, *args) -> None:
        try:
            method(*args)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot {verb} {dom.name()} at {self.uri}: {_error(exc)}") from exc

    def power_off(self, uuid: str) -> bool:
        """Make sure the domain is fully off; True if it had to be powered off."""
        dom = self.lookup(uuid)
        if not dom.isActive():
            return False
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if dom.isActive():  # it may have gone off by itself in the meantime
                raise HypervisorError(f"cannot power off {dom.name()} at {self.uri}: "
                                      f"{_error(exc)}") from exc
        return True

    def shutdown(self, uuid: str, timeout: float) -> bool:
        """Ask the guest to shut down (ACPI) and wait up to ``timeout`` seconds.

        Returns True if it went off by itself, False if it was still running at the end
        (the caller decides whether to power it off).
        """
        dom = self.lookup(uuid)
        if not dom.isActive():
            return True
        self._call(dom, "shut down", dom.shutdown)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dom.isActive():
                return True
            time.sleep(POLL_INTERVAL)
        return not dom.isActive()

    def start(self, uuid: str) -> bool:
        """Start the domain; True if it was not running."""
        dom = self.lookup(uuid)
        if dom.isActive():
            return False
        self._call(dom, "start", dom.create)
        return True

    def state(self, uuid: str) -> LiveState:
        """The domain's state read now; NOSTATE if it no longer exists."""
        found = self.find(uuid)
        return found.state if found else GONE
