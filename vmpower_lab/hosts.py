"""Several hypervisor hosts on one machine: one libvirtd per host, for live migration tests.

Each :class:`LabHost` is a ``virtlogd`` + ``libvirtd`` pair in mount and UTS namespaces of its
own, so it has its own hostname, ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt`` and ``/var/log/libvirt`` (bind mounts of directories under the host's
root ``R``) and its own ``host_uuid`` -- the one thing libvirt compares to refuse a migration
to "the same host". It is reached from the root namespace as
``qemu+unix:///system?socket=R/run/libvirt-sock``, with no TCP listener. Disks live on a path
no host bind-mounts (:attr:`TwoHostLab.disks`), so every host sees the same file.

Both daemons run under the lab's child subreaper (:mod:`vmpower_lab.reaper`), which also
enters the namespaces: the daemons, and the QEMU processes libvirtd forks away, become its
children, so a dead QEMU is reaped at once instead of whenever this machine's PID 1 gets to it
(that added 1.2-2.4 s to every stop, see /work/shared/REAL_LIBVIRT.md). It exits when it has
no child left; told to stop (SIGTERM, or the death of the process that started the host), it
stops every child first. So a host leaves no process behind, and its namespaces (and mounts)
go with its last process.

Guests migrate with ``VIR_MIGRATE_UNSAFE``: a local disk is not shared storage to libvirt.
:func:`migrate` does the call with the flags virsh would use.

Only the standard library is needed to import this module (``libvirt`` is imported inside the
functions that connect).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from typing_extensions import Self

from vmpower_lab import reaper

log = logging.getLogger(__name__)

HOST_DIRS = reaper.HOST_DIRS

#: libvirtd refuses 127.0.0.1 as a migration address ("the address of the local machine"), so
#: host N listens on 127.0.0.(N + 2); the whole 127/8 is loopback on Linux.
def migration_address(index: int) -> str:
    return f"127.0.0.{index + 2}"


#: Each host its own range of migration ports, above the default range of a libvirtd outside
#: the lab (49152-49215), so they never compete for one.
MIGRATION_PORT_BASE = 49300
MIGRATION_PORTS_PER_HOST = 20

# The QEMU settings of every lab host (the main lab's, plus what two hosts side by side need).
_QEMU_CONF = """\
# Written by vmpower_lab.hosts for lab host {name}.
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
security_driver = "none"
# No cgroups: two hosts would make the same cgroup names, and the source of a migration gets
# EBUSY when the domain ids on both sides match.
cgroup_controllers = [ ]
migration_address = "{address}"
migration_host = "{address}"
migration_port_min = {port_min}
migration_port_max = {port_max}
"""

_LIBVIRTD_CONF = """\
# Written by vmpower_lab.hosts for lab host {name}.
host_uuid = "{host_uuid}"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""


def wait_for_status_line(proc: subprocess.Popen, timeout: float) -> str:
    """The reaper's first line on stdout (``reaper: started`` or why not), or "" on timeout."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


# --- Hosts -----------------------------------------------------------------------------------
class LabHost:
    """One hypervisor host of the lab: its own libvirtd and virtlogd in their own namespaces.

    ``index`` picks its migration address (127.0.0.(index+2)) and port range. Nothing runs
    until :meth:`start`; :meth:`stop` ends every process it started, guests included.
    """

    def __init__(self, name: str, root: Path, index: int, timeout: float = 60.0,
                 parent_death: bool = True):
        self.name = name
        self.parent_death = parent_death
        self.root = Path(root)
        self.index = index
        self.timeout = timeout
        self.address = migration_address(index)
        self.port_min = MIGRATION_PORT_BASE + index * MIGRATION_PORTS_PER_HOST
        self.port_max = self.port_min + MIGRATION_PORTS_PER_HOST - 1
        self.host_uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"vmpower-lab:{self.root}"))
        self._supervisor: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"LabHost({self.name!r}, {str(self.root)!r})"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """How to reach this host's libvirtd from outside its namespaces (or from another)."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "libvirtd.log"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    def _pid_file(self, daemon: str) -> Path:
        # Not under run/: the daemons' default pid files (/run/<daemon>.pid) are outside the
        # bind mounts, so two hosts would write the same file.
        return self.root / f"{daemon}.pid"

    def daemon_pid(self, daemon: str) -> int | None:
        """The pid of this host's ``libvirtd`` or ``virtlogd``, if it runs."""
        try:
            pid = int(self._pid_file(daemon).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if reaper.alive(pid) else None

    def qemu_pid(self, domain_name: str) -> int:
        """The pid of the QEMU process running ``domain_name`` on this host."""
        return int((self.root / "run" / "qemu" / f"{domain_name}.pid").read_text().strip())

    def write_config(self) -> None:
        for sub in HOST_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "lib" / "qemu").mkdir(exist_ok=True)
        etc = self.root / "etc"
        values = {"name": self.name, "address": self.address, "port_min": self.port_min,
                  "port_max": self.port_max, "host_uuid": self.host_uuid}
        (etc / "qemu.conf").write_text(_QEMU_CONF.format(**values))
        (etc / "libvirtd.conf").write_text(_LIBVIRTD_CONF.format(**values))
        (etc / "virtlogd.conf").write_text("")

    def start(self) -> LabHost:
        """Start the host's daemons under their supervisor; wait until libvirtd answers."""
        if self.running():
            return self
        from vmpower_lab import lab  # the QEMU driver needs its account; the lab makes it

        lab.ensure_qemu_account()
        self.write_config()
        for target in HOST_DIRS.values():
            os.makedirs(target, exist_ok=True)  # mount points, in the root namespace
        for stale in (self.socket, self._pid_file("libvirtd"), self._pid_file("virtlogd")):
            stale.unlink(missing_ok=True)
        command = [
            sys.executable, reaper.SCRIPT, "--namespace", self.name, str(self.root),
            "--grace", str(self.timeout / 2), *(["--parent-death"] if self.parent_death else []),
            "--", "virtlogd", "-d", "-f", "/etc/libvirt/virtlogd.conf",
            "-p", str(self._pid_file("virtlogd")),
            "--", "libvirtd", "-d", "-f", "/etc/libvirt/libvirtd.conf",
            "-p", str(self._pid_file("libvirtd")),
        ]
        with open(self.supervisor_log, "ab") as errors:
            self._supervisor = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=errors, text=True,
                                                start_new_session=True)
        status = wait_for_status_line(self._supervisor, self.timeout)
        deadline = time.monotonic() + self.timeout
        while status != reaper.STARTED or not self.answers():
            if status != reaper.STARTED or self._supervisor.poll() is not None \
                    or time.monotonic() > deadline:
                tail = f"{status or 'no status'}\n{_tail(self.supervisor_log)}\n{_tail(self.log_path)}"
                self.stop()
                raise RuntimeError(f"lab host {self.name} did not answer on {self.uri} within "
                                   f"{self.timeout:.0f} s:\n{tail}")
            time.sleep(0.05)
        log.info("lab host %s answers on %s", self.name, self.uri)
        return self

    def restart_libvirtd(self) -> None:
        """Stop this host's libvirtd and start it again, its guests running on, as
        ``systemctl restart libvirtd`` does; wait until it answers. libvirtd reloads its
        domains from their files and forgets what it kept only in memory, such as why an
        inactive domain went off: one that had migrated away is then ``shut off (unknown)``."""
        pid = self.daemon_pid("libvirtd")
        if pid is None or not self.running():
            raise RuntimeError(f"lab host {self.name}: libvirtd is not running")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.timeout
        while reaper.alive(pid):  # the supervisor reaps it
            if time.monotonic() > deadline:
                raise RuntimeError(f"lab host {self.name}: libvirtd ({pid}) did not stop")
            time.sleep(0.05)
        self.socket.unlink(missing_ok=True)
        self._supervisor.send_signal(signal.SIGUSR1)  # the supervisor runs libvirtd again
        while not (self.daemon_pid("libvirtd") and self.answers()):
            if time.monotonic() > deadline or not self.running():
                raise RuntimeError(f"lab host {self.name}: libvirtd did not answer again on "
                                   f"{self.uri}:\n{_tail(self.log_path)}")
            time.sleep(0.05)
        log.info("lab host %s: libvirtd restarted", self.name)

    def running(self) -> bool:
        return self._supervisor is not None and self._supervisor.poll() is None

    def answers(self) -> bool:
        """Whether this host's libvirtd accepts a connection and answers."""
        if not self.socket.exists():
            return False
        try:
            import libvirt
        except ImportError:
            result = subprocess.run(["virsh", "-c", self.uri, "version"], check=False,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    timeout=self.timeout)
            return result.returncode == 0
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return False
        try:
            conn.getLibVersion()
            return True
        except libvirt.libvirtError:
            return False
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def processes(self) -> list[int]:
        """Every live process of this host: the supervisor and its children (the daemons and
        their QEMUs, which the subreaper adopted)."""
        if self._supervisor is None:
            return []
        pid = self._supervisor.pid
        found = [pid] if reaper.alive(pid) else []
        return found + [child for child in reaper.children(pid) if reaper.alive(child)]

    def stop(self) -> None:
        """Stop libvirtd, virtlogd and every guest of this host; wait until all have exited."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(self.timeout)
            except subprocess.TimeoutExpired:
                log.warning("lab host %s: supervisor did not exit in %.0f s; killing what is left",
                            self.name, self.timeout)
                for child in reaper.children(supervisor.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                supervisor.kill()
                supervisor.wait(self.timeout)
        if supervisor.stdout is not None:
            supervisor.stdout.close()
        log.info("lab host %s stopped", self.name)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TwoHostLab:
    """``count`` lab hosts (default two: ``hosta``, ``hostb``) sharing one disk directory.

    ``root`` defaults to a new directory under /tmp (short: the sockets' paths must fit
    AF_UNIX's 108 bytes), removed again by :meth:`stop` when the lab made it.
    """

    def __init__(self, root: Path | None = None, names: Sequence[str] = ("hosta", "hostb"),
                 timeout: float = 60.0):
        self._made_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="vmpl-"))
        self.disks = self.root / "disks"
        self.hosts: dict[str, LabHost] = {
            name: LabHost(name, self.root / name, index, timeout)
            for index, name in enumerate(names)
        }
        for host in self.hosts.values():
            if len(str(host.socket)) > 107:
                raise ValueError(f"socket path {host.socket} is longer than AF_UNIX allows "
                                 f"(107 bytes): give the lab a shorter root")

    def __getitem__(self, name: str) -> LabHost:
        return self.hosts[name]

    def __iter__(self) -> Iterator[LabHost]:
        return iter(self.hosts.values())

    def start(self) -> TwoHostLab:
        self.disks.mkdir(parents=True, exist_ok=True)
        try:
            # Started one after the other: each runs its QEMU capability probe on its own, and
            # two at once on two cores gain little while making start-up failures harder to read.
            for host in self:
                host.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for host in self:
            host.stop()
        if self._made_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def migrate(dom, dest_conn, undefine_source: bool = False, persistent: bool | None = None,
            live: bool = True):
    """Live-migrate ``dom`` to the host of ``dest_conn`` as ``virsh migrate --live --unsafe``
    would (``--persistent --undefinesource`` with ``undefine_source``); return the domain on
    the destination.

    ``persistent`` defaults to ``undefine_source``: virsh's ``--undefinesource`` is used with
    ``--persistent``, or the domain would be defined nowhere once it stops.
    """
    import libvirt

    if persistent is None:
        persistent = undefine_source
    flags = libvirt.VIR_MIGRATE_UNSAFE
    if live:
        flags |= libvirt.VIR_MIGRATE_LIVE
    if persistent:
        flags |= libvirt.VIR_MIGRATE_PERSIST_DEST
    if undefine_source:
        flags |= libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    return dom.migrate(dest_conn, flags, None, None, 0)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"
