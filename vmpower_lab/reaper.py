"""A child subreaper for the lab's daemons: run as a script, it starts daemons and reaps them.

This machine's PID 1 reaps orphans only about every 1.2 s. libvirt sees a dead QEMU as alive
until its zombie is reaped, so every destroy or guest shutdown took 1.2-2.4 s longer than it
should, and a libvirtd start up to 8 s (see /work/shared/REAL_LIBVIRT.md). Started as
``python reaper.py [options] -- CMD [-- CMD ...]``, this process makes itself the child
subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), runs each CMD (daemons that fork into the
background: ``virtlogd -d``, ``libvirtd -d``), and then reaps every process orphaned below it
-- the daemons and the QEMU processes libvirtd forks away -- until none is left, when it exits.

It writes one line to stdout once the commands have run: ``reaper: started`` or
``reaper: failed: <command> exited <code>``. Options:

``--namespace HOSTNAME ROOT``
    first enter new mount and UTS namespaces: hostname HOSTNAME, and ROOT's subdirectories
    bind-mounted over libvirt's own (:data:`HOST_DIRS`), for a lab host of its own
    (``vmpower_lab.hosts``). The namespaces end with the last process in them.
``--parent-death``
    stop everything (as on SIGTERM) when the process that started this one dies. Only for a
    parent that keeps running in the thread that started it: the kernel signals the death of
    that thread, not of the whole process.
``--grace S``
    on SIGTERM, every child gets SIGTERM, and SIGKILL if still there S seconds later (10).

SIGUSR1 runs the last CMD again, in the same namespaces: after its daemon was stopped, that
starts it anew under this reaper (``LabHost.restart_libvirtd``: libvirtd restarted while its
guests run on, as ``systemctl restart libvirtd`` does).

Standard library only: it runs as a script, outside any package.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

# prctl(2) and unshare(2) constants (linux/prctl.h, linux/sched.h).
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000

#: The directories a lab host has of its own: ROOT's subdirectory -> where libvirt looks.
HOST_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}

SCRIPT = str(Path(__file__).resolve())
STARTED = "reaper: started"


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (zombies included), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def main(argv: list[str]) -> int:
    args = list(argv)
    hostname = root = None
    grace, parent_death = 10.0, False
    while args and args[0] != "--":
        option = args.pop(0)
        if option == "--namespace":
            hostname, root = args.pop(0), Path(args.pop(0))
        elif option == "--grace":
            grace = float(args.pop(0))
        elif option == "--parent-death":
            parent_death = True
        else:
            print(f"reaper: failed: unknown option {option!r}", flush=True)
            return 2
    commands: list[list[str]] = []
    for arg in args:
        if arg == "--":
            commands.append([])
        else:
            commands[-1].append(arg)

    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    stopping = []

    def kill_children(sig):
        for child in children(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    def on_term(_signum=None, _frame=None):
        if not stopping:
            stopping.append(True)
            kill_children(signal.SIGTERM)
            signal.alarm(max(1, round(grace)))

    def on_alarm(_signum, _frame):
        kill_children(signal.SIGKILL)
        signal.alarm(1)  # and again, for anything forked meanwhile

    def on_again(_signum, _frame):
        if commands and not stopping:
            subprocess.run(commands[-1], check=False, stdin=subprocess.DEVNULL, stdout=sys.stderr)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGUSR1, on_again)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the test run, not for us
    if parent_death:
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() == 1:
            return 1  # the parent died before the signal was armed

    if hostname is not None:
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWUTS)")
        # Private propagation: the bind mounts below stay in these namespaces.
        subprocess.run(["mount", "--make-rprivate", "/"], check=True)
        name = hostname.encode()
        _check(libc.sethostname(name, len(name)), "sethostname")
        for sub, target in HOST_DIRS.items():
            subprocess.run(["mount", "--bind", str(root / sub), target], check=True)

    status = 0
    for command in commands:
        # The commands' own output goes to our stderr: stdout carries only the status line.
        result = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, stdout=sys.stderr)
        if result.returncode != 0:
            print(f"reaper: failed: {' '.join(command)} exited {result.returncode}", flush=True)
            status = 1
            on_term()
            break
    else:
        print(STARTED, flush=True)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
