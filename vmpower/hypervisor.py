"""The one place vmpower talks to libvirt for reading and acting on domains.

Every connection is opened for one job and closed when it ends, errors included. libvirt's
default error handler (which prints every error to stderr) is replaced once: errors still
arrive as exceptions, and vmpower reports them in its own words.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, NamedTuple, Optional, Set
from xml.etree import ElementTree

from vmpower.core.mapping import live_state
from vmpower.core.model import GONE, LiveState
from vmpower.core.settings import UUID_RE

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

    # What the rules need, read only when they need it
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

    def migration_job(self, uuid: str) -> Optional[bool]:
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

    def autostart_set(self) -> Optional[Set[str]]:
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
