"""A local libvirt lab: a real libvirtd and tiny real QEMU guests.

Used by vmpower's end-to-end tests, its demo and its benchmarks. It needs root, the Debian
packages ``libvirt-daemon``, ``libvirt-daemon-driver-qemu``, ``libvirt-clients`` and
``qemu-system-x86``, and no systemd: :class:`LibvirtDaemon` starts ``virtlogd`` and ``libvirtd``
itself.

The guests need no OS image. Each boots a 512-byte, hand-assembled boot sector from its own
1 MiB raw disk (see :func:`boot_sector`), so a guest can really power itself off over ACPI --
the guest-initiated shutdown vmpower exists to notice -- or really ignore a shutdown request.

Only the standard library is needed to import this module; ``libvirt`` is imported inside the
functions that take a connection or a URI.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from vmpower_lab import reaper

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
DEFAULT_WORKDIR = Path("/var/lib/vmpower-lab")
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd.log")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_RUN_DIR = Path("/run/libvirt/qemu")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")

GUEST_KINDS = ("acpi", "stubborn", "selfstop", "panic", "selfpanic")

#: Guests that crash through the pvpanic ISA device at this port (``<panic model='isa'>``):
#: libvirt then reports CRASHED/PANICKED and handles it as the domain's ``<on_crash>`` says.
PANIC_KINDS = ("panic", "selfpanic")
PVPANIC_PORT = 0x505

# Every boot sector writes this at guest-physical READY_ADDRESS once it runs (for "acpi": once
# the power-button event is enabled). A power-button press that arrives earlier is dropped by
# QEMU, so callers wait for this marker (see wait_guest_ready) before asking for a shutdown.
READY_MARKER = b"VMPW"
READY_ADDRESS = 0x500  # First free byte of real-mode memory after the BIOS data area.

# Debian builds libvirt's QEMU driver with this default user and group. The driver looks both up
# when it initialises, before reading qemu.conf, and refuses to start if they are missing; the
# libvirt-daemon-system package would create them.
QEMU_ACCOUNT = "libvirt-qemu"

# qemu.conf settings the lab needs: QEMU and swtpm run as root, so guest images may live anywhere
# and no account's permissions matter; security_driver "none" keeps AppArmor/SELinux out of it.
_QEMU_CONF_SETTINGS = {
    "user": '"root"',
    "group": '"root"',
    "swtpm_user": '"root"',
    "swtpm_group": '"root"',
    "security_driver": '"none"',
}
_CONF_BEGIN = "# BEGIN vmpower lab settings (written by vmpower_lab.lab; safe to remove)"
_CONF_END = "# END vmpower lab settings"
# Prefix for conflicting settings elsewhere in the file, which are commented out because libvirt
# uses the first occurrence of a key.
_CONF_DISABLED = "#vmpower-lab# "


class LibvirtDaemon:
    """Start and stop a local ``virtlogd`` + ``libvirtd`` pair without systemd.

    ``stop()`` only stops the daemons this object started (unless ``force=True``), so using it
    on a machine where libvirtd already runs leaves that libvirtd alone. Also a context manager:
    ``with LibvirtDaemon() as daemon: ...`` starts on entry and stops on exit.
    """

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        timeout: float = 30.0,
        qemu_conf: Path = QEMU_CONF,
        log_path: Path = LIBVIRTD_LOG,
    ):
        """Describe the daemon; nothing is started until :meth:`start`.

        ``timeout`` bounds each wait: for libvirtd to answer, and for a stopped process to exit.
        """
        self.uri = uri
        self.timeout = timeout
        self.qemu_conf = Path(qemu_conf)
        self.log_path = Path(log_path)
        self.started_libvirtd = False
        self.started_virtlogd = False

    def __enter__(self) -> LibvirtDaemon:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LibvirtDaemon:
        """Start virtlogd and libvirtd unless already running; wait until libvirtd answers.

        Raises RuntimeError, quoting the end of libvirtd's log, if it does not answer within
        ``timeout`` seconds.
        """
        for directory in ("/var/log/libvirt", "/run/libvirt", "/var/lib/libvirt/qemu"):
            os.makedirs(directory, exist_ok=True)
        ensure_qemu_account()
        conf_changed = configure_qemu_conf(self.qemu_conf)

        if not _pids("virtlogd"):
            log.info("starting virtlogd")
            _start_reaped(["virtlogd", "-d"], self.timeout)
            self.started_virtlogd = True
            # libvirtd only connects to virtlogd when a domain starts; waiting for the socket
            # here means a domain started right after start() cannot race virtlogd's startup.
            _wait_until(VIRTLOGD_SOCKET.exists, self.timeout, "virtlogd socket")

        if _pids("libvirtd"):
            if conf_changed:
                log.warning("libvirtd already runs, so it has not read the new %s", self.qemu_conf)
        else:
            log.info("starting libvirtd")
            env = dict(os.environ)
            # Pin the log file: without systemd or a tty libvirtd's default output depends on
            # how it was built, and the error message below quotes this file.
            env.setdefault("LIBVIRT_LOG_OUTPUTS", f"3:file:{self.log_path}")
            _start_reaped(["libvirtd", "-d"], self.timeout, env)
            self.started_libvirtd = True

        deadline = time.monotonic() + self.timeout
        while not self.answers():
            if time.monotonic() > deadline or not _pids("libvirtd"):
                raise RuntimeError(
                    f"libvirtd did not answer on {self.uri} within {self.timeout:.0f} s; "
                    f"end of {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.2)
        log.info("libvirtd answers on %s", self.uri)
        return self

    def stop(self, force: bool = False) -> None:
        """Stop libvirtd, then virtlogd, but only those this object started unless ``force``.

        Each gets SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds. Running
        guests are not stopped: their QEMU processes do not belong to libvirtd.
        """
        if force or self.started_libvirtd:
            _terminate("libvirtd", self.timeout)
            self.started_libvirtd = False
        if force or self.started_virtlogd:
            _terminate("virtlogd", self.timeout)
            self.started_virtlogd = False
        for supervisor in list(_REAPERS):  # those left with no daemon and no guest have exited
            if supervisor.poll() is not None:
                _REAPERS.remove(supervisor)

    def kill(self) -> None:
        """SIGKILL libvirtd (only libvirtd, not virtlogd nor guests) to simulate a crash."""
        for pid in _pids("libvirtd"):
            log.info("killing libvirtd (pid %d)", pid)
            _signal(pid, signal.SIGKILL)
        _wait_until(lambda: not _pids("libvirtd"), self.timeout, "libvirtd to die")

    def restart(self, kill: bool = False) -> LibvirtDaemon:
        """Stop libvirtd (SIGTERM, or SIGKILL if ``kill``) and start it again.

        Running guests keep running under QEMU; the new libvirtd reattaches to them.
        """
        if kill:
            self.kill()
        else:
            _terminate("libvirtd", self.timeout)
        return self.start()

    def is_running(self) -> bool:
        """Whether a libvirtd process exists (it may not answer yet; see :meth:`answers`)."""
        return bool(_pids("libvirtd"))

    def answers(self) -> bool:
        """Whether ``virsh -c URI version`` succeeds, i.e. libvirtd and its driver are up."""
        try:
            result = subprocess.run(
                ["virsh", "-c", self.uri, "version"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False  # A daemon that accepts but never replies is not up either.
        return result.returncode == 0


#: The reapers started so far, kept so each is waited for once it exits (no zombie, and no
#: "still running" warning from a Popen collected early).
_REAPERS: list[subprocess.Popen] = []


def _start_reaped(command: list[str], timeout: float, env: dict | None = None) -> None:
    """Run a daemon's start command under a child subreaper of this process
    (:mod:`vmpower_lab.reaper`), so that the daemon and the QEMU processes it forks away are
    reaped as they exit, not whenever PID 1 gets to it (1.2-2.4 s on every destroy or guest
    shutdown here). The reaper outlives this process if need be, as the daemons do.

    Raises RuntimeError when the command fails, as ``subprocess.run(check=True)`` did.
    """
    from vmpower_lab import reaper

    for old in list(_REAPERS):
        if old.poll() is not None:
            _REAPERS.remove(old)
    proc = subprocess.Popen([sys.executable, reaper.SCRIPT, "--", *command], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    _REAPERS.append(proc)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    status = proc.stdout.readline().strip() if ready else f"no answer within {timeout:.0f} s"
    proc.stdout.close()
    if status != reaper.STARTED:
        raise RuntimeError(f"{' '.join(command)} did not start: {status}")


def ensure_qemu_account(name: str = QEMU_ACCOUNT) -> bool:
    """Create the system group and user ``name`` if missing; return whether anything was made.

    The QEMU driver only needs them to exist: with the lab's qemu.conf, QEMU runs as root.
    """
    changed = False
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True)
        changed = True
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd", "--system", "--gid", name, "--no-create-home",
                "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin",
                "--comment", "libvirt QEMU (created by vmpower_lab.lab)", name,
            ],
            check=True,
        )  # fmt: skip
        changed = True
    if changed:
        log.info("created system account %s for libvirt's QEMU driver", name)
    return changed


def configure_qemu_conf(path: Path = QEMU_CONF) -> bool:
    """Make ``path`` hold the settings the lab needs; return whether the file changed.

    The settings go in a block between marker comments, replaced in place on later calls, so
    running this again changes nothing. Conflicting settings of the same keys elsewhere in the
    file are commented out with a ``#vmpower-lab#`` prefix.
    """
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    kept: list[str] = []
    inside_block = False
    for line in old.splitlines():
        if line == _CONF_BEGIN:
            inside_block = True
        elif line == _CONF_END:
            inside_block = False
        elif not inside_block:
            key = re.match(r"\s*(\w+)\s*=", line)
            if key and key.group(1) in _QEMU_CONF_SETTINGS:
                line = _CONF_DISABLED + line
            kept.append(line)
    block = [_CONF_BEGIN]
    block += [f"{key} = {value}" for key, value in _QEMU_CONF_SETTINGS.items()]
    block.append(_CONF_END)
    new = "\n".join(kept + block) + "\n"
    if new == old:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    log.info("wrote vmpower lab settings to %s", path)
    return True


def _pids(name: str) -> list[int]:
    """Pids of live (not zombie) processes named exactly ``name`` in this mount namespace.

    A libvirtd of a lab host (``vmpower_lab.hosts``) runs in a mount namespace of its own with
    its own /run/libvirt: it is not this machine's libvirtd, and must not be taken for it.
    """
    result = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
    return [int(pid) for pid in result.stdout.split()
            # The daemons fork away from us: once they exit they stay zombies until
            # init reaps them, and pgrep still lists them.
            if reaper.alive(int(pid)) and _same_mount_namespace(int(pid))]


def _same_mount_namespace(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False  # gone meanwhile


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # It exited meanwhile, which is what we wanted.


def _terminate(name: str, timeout: float) -> None:
    """SIGTERM every process named ``name``, wait for them to exit, SIGKILL what remains."""
    pids = _pids(name)
    if not pids:
        return
    log.info("stopping %s (pid %s)", name, ", ".join(map(str, pids)))
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    try:
        _wait_until(lambda: not _pids(name), timeout, f"{name} to exit")
    except TimeoutError:
        log.warning("%s ignored SIGTERM for %.0f s; sending SIGKILL", name, timeout)
        for pid in _pids(name):
            _signal(pid, signal.SIGKILL)
        _wait_until(lambda: not _pids(name), timeout, f"{name} to die")


def _wait_until(condition, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``condition`` until true; raise TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read: {exc})"


# --- Boot sectors ----------------------------------------------------------------------------
#
# 16-bit real-mode code, loaded by SeaBIOS at 0000:7C00. Each instruction is listed with its
# bytes; relative jumps count from the end of the jump instruction. I/O ports 0x600/0x602/0x604
# are the PIIX4 PM1 status/enable/control registers at the PM base SeaBIOS programs on the `pc`
# machine. A guest that waits does so in `hlt`, woken by the BIOS timer (IRQ 0, 18.2 Hz): a
# guest spinning on a port read keeps a host core busy under TCG, and a suite runs many guests.
# The SCI (IRQ 9 on the slave PIC) is masked, so a pressed power button never reaches SeaBIOS.

_SET_DS_0 = [
    (b"\x31\xc0", "xor ax, ax"),
    (b"\x8e\xd8", "mov ds, ax             ; DS = 0 so [disp16] is a physical address"),
]
_STACK_BELOW_US = [
    (b"\x8e\xd0", "mov ss, ax"),
    (b"\xbc\x00\x7c", "mov sp, 0x7C00         ; stack below us for the timer interrupt"),
]
_WRITE_READY_MARKER = [
    (b"\xc7\x06\x00\x05\x56\x4d", "mov word [0x500], 0x4D56  ; 'VM'"),
    (b"\xc7\x06\x02\x05\x50\x57", "mov word [0x502], 0x5750  ; 'PW': READY_MARKER"),
]
_POWER_OFF = [
    (b"\xba\x04\x06", "mov dx, 0x604          ; PM1 control"),
    (b"\xb8\x00\x20", "mov ax, 0x2000         ; SLP_EN, SLP_TYP 0 = soft off"),
    (b"\xef", "out dx, ax             ; QEMU powers the machine off here"),
]
# pvpanic (QEMU's ISA panic device, port 0x505): writing bit 0 (PANICKED) is a guest kernel
# panic as far as QEMU and libvirt are concerned.
_PANIC = [
    (b"\xba\x05\x05", "mov dx, 0x505          ; pvpanic ISA port"),
    (b"\xb0\x01", "mov al, 1              ; PVPANIC_PANICKED"),
    (b"\xee", "out dx, al             ; QEMU reports GUEST_PANICKED here"),
]
_HALT_FOREVER = [
    (b"\xf4", "halt: hlt"),
    (b"\xeb\xfd", "jmp halt               ; -3"),
]

_BOOT_CODE = {
    # Shut down on the ACPI power button, as a cooperative OS does on `virsh shutdown`.
    "acpi": [
        (b"\xfa", "cli"),
        *_SET_DS_0,
        *_STACK_BELOW_US,
        (b"\xe4\xa1", "in al, 0xA1            ; slave PIC mask"),
        (b"\x0c\x02", "or al, 0x02            ; IRQ 9, the SCI"),
        (b"\xe6\xa1", "out 0xA1, al"),
        (b"\xba\x02\x06", "mov dx, 0x602          ; PM1 enable"),
        (b"\xb8\x00\x01", "mov ax, 0x0100         ; PWRBTN_EN"),
        (b"\xef", "out dx, ax"),
        *_WRITE_READY_MARKER,
        # Only poll the real PM base: an undecoded port reads 0xFFFF, bit 8 included.
        (b"\xba\x00\x06", "mov dx, 0x600          ; PM1 status"),
        (b"\xfb", "sti                    ; the timer wakes the hlt"),
        (b"\xf4", "wait: hlt"),
        (b"\xed", "in ax, dx"),
        (b"\xa9\x00\x01", "test ax, 0x0100        ; PWRBTN_STS"),
        (b"\x74\xf9", "jz wait                ; -7"),
        (b"\xfa", "cli"),
        *_POWER_OFF,
        *_HALT_FOREVER,
    ],
    # Ignore ACPI entirely: halt with interrupts off, so only `virsh destroy` stops it.
    "stubborn": [
        (b"\xfa", "cli"),
        *_SET_DS_0,
        *_WRITE_READY_MARKER,
        *_HALT_FOREVER,
    ],
    # Power off about 2 s after boot, unasked. The delay counts the BIOS timer ticks (18.2 Hz,
    # IRQ 0, dword at 0000:046C), which follow the host clock under TCG as well as KVM.
    "selfstop": [
        (b"\xfa", "cli"),
        *_SET_DS_0,
        *_STACK_BELOW_US,
        *_WRITE_READY_MARKER,
        (b"\x8b\x1e\x6c\x04", "mov bx, [0x46C]        ; ticks at start"),
        (b"\xfb", "sti                    ; let the BIOS count ticks"),
        (b"\xf4", "wait: hlt              ; sleep until the next interrupt"),
        (b"\xa1\x6c\x04", "mov ax, [0x46C]"),
        (b"\x29\xd8", "sub ax, bx             ; ticks elapsed, wrap-safe"),
        (b"\x83\xf8\x24", "cmp ax, 36             ; about 2 s"),
        (b"\x72\xf5", "jb wait                ; -11"),
        (b"\xfa", "cli"),
        *_POWER_OFF,
        *_HALT_FOREVER,
    ],
}
# Crash (pvpanic) where "acpi" and "selfstop" power off: on the ACPI power button, so a test
# says when ("panic"); about 2 s after boot, unasked ("selfpanic"). Same code up to there.
_BOOT_CODE["panic"] = [*_BOOT_CODE["acpi"][:-len(_POWER_OFF) - len(_HALT_FOREVER)], *_PANIC,
                       *_HALT_FOREVER]
_BOOT_CODE["selfpanic"] = [*_BOOT_CODE["selfstop"][:-len(_POWER_OFF) - len(_HALT_FOREVER)],
                           *_PANIC, *_HALT_FOREVER]


def boot_sector(kind: str) -> bytes:
    """The 512-byte MBR for a guest of ``kind`` (one of :data:`GUEST_KINDS`).

    - ``acpi`` powers off when the ACPI power button is pressed (``virsh shutdown``);
    - ``stubborn`` ignores ACPI, so only ``virsh destroy`` stops it;
    - ``selfstop`` powers itself off about two seconds after boot, with no outside request;
    - ``panic`` panics (pvpanic) when the ACPI power button is pressed;
    - ``selfpanic`` panics about two seconds after boot, unasked.

    Each writes :data:`READY_MARKER` at :data:`READY_ADDRESS` once it is running.
    """
    try:
        code = b"".join(instruction for instruction, _ in _BOOT_CODE[kind])
    except KeyError:
        raise ValueError(f"unknown guest kind {kind!r}; expected one of {GUEST_KINDS}") from None
    return code.ljust(510, b"\0") + b"\x55\xaa"


# --- Guests ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Guest:
    """A lab guest as defined in libvirt."""

    name: str
    uuid: str
    kind: str
    image: Path


_DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>{on_crash}</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={image}/>
      <target dev='hda' bus='ide'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>{panic}
  </devices>
</domain>
"""

IMAGE_SIZE = 1024 * 1024

#: What libvirt may do when a guest crashes (the domain's ``<on_crash>``).
ON_CRASH = ("destroy", "restart", "preserve", "rename-restart", "coredump-destroy",
            "coredump-restart")
_PANIC_DEVICE = """
    <panic model='isa'>
      <address type='isa' iobase='0x505'/>
    </panic>"""


def _connect(conn_or_uri):
    """Return ``(connection, owned)``: a new connection for a URI, or the one given."""
    if isinstance(conn_or_uri, str):
        import libvirt

        return libvirt.open(conn_or_uri), True
    return conn_or_uri, False


def define_guest(
    conn_or_uri=DEFAULT_URI,
    name: str = "vmpower-lab-guest",
    kind: str = "acpi",
    workdir: Path = DEFAULT_WORKDIR,
    memory_mib: int = 32,
    start: bool = True,
    on_crash: str = "destroy",
) -> Guest:
    """Define a persistent guest of ``kind`` (see :func:`boot_sector`), and start it if asked.

    Its disk is ``workdir/<name>.img``, a 1 MiB raw image holding the boot sector; each guest
    gets its own because QEMU locks a writable image. The domain is TCG (type ``qemu``, works
    without /dev/kvm), machine ``pc``, 1 vCPU, ACPI, no network and no graphics; it is destroyed
    on power-off, and on crash as ``on_crash`` says (default ``destroy``; ``preserve`` leaves
    it ``crashed``). Guests of :data:`PANIC_KINDS` get the pvpanic device they write to.
    ``conn_or_uri`` is a libvirt connection or a URI.
    """
    if on_crash not in ON_CRASH:
        raise ValueError(f"unknown on_crash {on_crash!r}; expected one of {ON_CRASH}")
    sector = boot_sector(kind)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / f"{name}.img"
    with open(image, "wb") as f:
        f.write(sector)
        f.truncate(IMAGE_SIZE)

    domain_xml = _DOMAIN_XML.format(
        name=escape(name), memory_mib=int(memory_mib), image=quoteattr(str(image.resolve())),
        on_crash=on_crash, panic=_PANIC_DEVICE if kind in PANIC_KINDS else "",
    )
    conn, owned = _connect(conn_or_uri)
    try:
        dom = conn.defineXML(domain_xml)
        if start:
            dom.create()
        guest = Guest(name=dom.name(), uuid=dom.UUIDString(), kind=kind, image=image)
    finally:
        if owned:
            conn.close()
    log.info("defined guest %s (%s, %s)%s", guest.name, kind, guest.uuid, " and started" if start else "")
    return guest


def guest_ready(dom) -> bool:
    """Whether the running domain ``dom``'s boot sector has written :data:`READY_MARKER`.

    Reads guest memory through libvirt, so ``dom`` must be running.
    """
    import libvirt

    peek = dom.memoryPeek(READY_ADDRESS, len(READY_MARKER), libvirt.VIR_MEMORY_PHYSICAL)
    return peek == READY_MARKER


def wait_guest_ready(dom, timeout: float = 60.0) -> None:
    """Wait until ``dom``'s boot sector runs (for ``acpi`` guests: listens to the button).

    Raises TimeoutError after ``timeout`` seconds.
    """
    _wait_until(lambda: guest_ready(dom), timeout, f"guest {dom.name()} to boot", interval=0.05)


def wait_for_state(dom, state: int, timeout: float = 60.0) -> int:
    """Poll until ``dom`` is in ``state`` (a ``VIR_DOMAIN_*`` state); return the state's reason.

    Raises TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        current, reason = dom.state()
        if current == state:
            return reason
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{dom.name()} is in state {current} (reason {reason}), not {state}, "
                f"after {timeout:.0f} s"
            )
        time.sleep(0.05)


def remove_guests(conn_or_uri=DEFAULT_URI, prefix: str = "vmpower-lab-") -> list[str]:
    """Destroy and undefine every domain whose name starts with ``prefix``; return the names.

    Also deletes each one's disk image, if it is one :func:`define_guest` made (named
    ``<domain name>.img``); other disks are left alone.
    """
    import libvirt

    if not prefix:
        raise ValueError("refusing to remove every domain: prefix is empty")
    conn, owned = _connect(conn_or_uri)
    removed = []
    try:
        for dom in conn.listAllDomains():
            name = dom.name()
            if not name.startswith(prefix):
                continue
            images = _disk_files(dom.XMLDesc(0))
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError as exc:
                # It may stop or vanish between listing and removal; anything else is real.
                if exc.get_error_code() not in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise
            for image in images:
                if image.name == f"{name}.img":
                    image.unlink(missing_ok=True)
            removed.append(name)
    finally:
        if owned:
            conn.close()
    if removed:
        log.info("removed guests %s", ", ".join(removed))
    return removed


def _disk_files(domain_xml: str) -> list[Path]:
    root = ET.fromstring(domain_xml)
    return [Path(src.get("file")) for src in root.findall("./devices/disk/source[@file]")]


def qemu_pid(name: str) -> int:
    """The pid of the QEMU process running domain ``name`` (from libvirt's pid file).

    Raises FileNotFoundError if the domain is not running.
    """
    return int((QEMU_RUN_DIR / f"{name}.pid").read_text().strip())


def have_lab_prerequisites() -> str | None:
    """None if this machine can run the lab, else a reason why not (for skipping tests)."""
    if os.geteuid() != 0:
        return "the libvirt lab needs root"
    for tool in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None
