"""The main job, on embedded defaults: a real salt-master and salt-minion, a real libvirtd and a
few real QEMU guests, the vmpower beacon and reactor, and SQLite records.

It shows, live, a guest shutting itself down and being recorded as stopped, a stopped VM started
behind vmpower's back being powered off, and ``salt '*' vmpower.sync``. Everything it starts
lives under one work directory and is stopped at the end, whatever happens.
Run it with ``bash scripts/demo.sh`` (which installs what it needs first).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import libvirt

from vmpower import lab

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
URI = lab.DEFAULT_URI
PREFIX = "vmpower-demo-"
MINION_ID = "vmpower-demo-minion"
PORTS = {"publish_port": 14505, "ret_port": 14506}


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(text: str) -> None:
    print(textwrap.indent(text.rstrip(), "   "), flush=True)


class Salt:
    """A private salt-master and salt-minion under ``workdir``, on loopback ports of their own."""

    def __init__(self, workdir: Path, minion_extra: dict, master_extra: dict):
        self.conf = workdir / "conf"
        self.root = workdir / "root"
        self.conf.mkdir(parents=True)
        self.root.mkdir(parents=True)
        common = {"root_dir": str(self.root), "user": "root", "log_level_logfile": "info"}
        master = {**common, "interface": "127.0.0.1", **PORTS, "auto_accept": True,
                  "file_roots": {"base": [str(REPO)]},
                  "pillar_roots": {"base": [str(workdir / "pillar")]}, **master_extra}
        minion = {**common, "id": MINION_ID, "master": "127.0.0.1",
                  "master_port": PORTS["ret_port"], **minion_extra}
        (workdir / "pillar").mkdir()
        (self.conf / "master").write_text(json.dumps(master, indent=2))
        (self.conf / "minion").write_text(json.dumps(minion, indent=2))
        self.daemons = []

    def start(self) -> None:
        for name in ("salt-master", "salt-minion"):
            log = open(self.root / f"{name}.out", "ab")
            self.daemons.append(subprocess.Popen([str(BIN / name), "-c", str(self.conf)],
                                                 stdout=log, stderr=subprocess.STDOUT))
            if name == "salt-master":
                time.sleep(2)  # let the master bind before the minion knocks
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.run("test.ping", quiet=True, timeout=5).get(MINION_ID) is True:
                return
            time.sleep(1)
        raise RuntimeError("the minion did not answer the master within 120 s; see "
                           f"{self.root}/salt-*.out and {self.root}/var/log/salt/")

    def run(self, function: str, *args: str, quiet: bool = False, timeout: int = 120) -> dict:
        """``salt <minion> function args``: print the command and its answer, return the JSON."""
        command = ["salt", "-c", str(self.conf), "--out=json", "--static", f"-t{timeout}",
                   MINION_ID, function, *args]
        if not quiet:
            print(f"   $ salt {MINION_ID} {function} {' '.join(args)}", flush=True)
        done = subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True)
        try:
            answer = json.loads(done.stdout or "{}")
        except json.JSONDecodeError:
            answer = {"error": done.stdout + done.stderr}
        if not quiet:
            show(json.dumps(answer.get(MINION_ID, answer), indent=2))
        return answer

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        # Salt's worker processes are children of the daemons; make sure none outlives them.
        subprocess.run(["pkill", "-9", "-f", str(self.conf)], check=False)


def wait(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def record_of(salt: Salt, name: str) -> dict:
    history = salt.run("vmpower.history", name, quiet=True).get(MINION_ID) or []
    return history[-1] if history else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/vmpower-demo")
    options = parser.parse_args()
    workdir = Path(options.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    say("Starting a real libvirtd")
    daemon = lab.LibvirtDaemon(URI).start()
    salt = None
    try:
        lab.remove_guests(URI, PREFIX)
        conn = libvirt.open(URI)
        say("Defining three tiny QEMU guests (32 MiB, no OS: a boot sector each)")
        web = lab.define_guest(conn, PREFIX + "web", "acpi", workdir / "guests")
        batch = lab.define_guest(conn, PREFIX + "batch", "selfstop", workdir / "guests", start=False)
        db = lab.define_guest(conn, PREFIX + "db", "acpi", workdir / "guests", start=False)
        show("web   runs and powers off when ACPI asks it to\n"
             "batch powers itself off two seconds after it boots, with nobody asking\n"
             "db    is defined but stopped")

        say("Starting a real salt-master and salt-minion (vmpower loaded through its entry point)")
        salt = Salt(workdir, minion_extra={"vmpower": {"uri": URI, "stop_timeout": 20}},
                    master_extra={})
        salt.start()
        show(f"master and minion up; minion id {MINION_ID}")

        say("The first sync adopts every guest: running -> active, shut off -> stopped")
        salt.run("vmpower.sync")
        salt.run("vmpower.get_info", web.name)

        say("vmpower.stop: graceful ACPI shutdown, power-off only after the timeout")
        lab.wait_guest_ready(conn.lookupByName(web.name))
        salt.run("vmpower.stop", web.name, "timeout=30")

        say("A guest shuts itself down: the next sync records it as stopped")
        salt.run("vmpower.start", batch.name)
        wait(lambda: not conn.lookupByName(batch.name).isActive(), 60, "batch to power off")
        show(f"{batch.name} powered itself off")
        salt.run("vmpower.sync")

        say("A stopped VM started behind vmpower's back is powered off by the sync")
        conn.lookupByName(db.name).create()
        show(f"$ virsh start {db.name}   (behind vmpower's back)")
        salt.run("vmpower.sync")

        say("The audit log says what happened and why")
        salt.run("vmpower.history", batch.name, "limit=2")
        conn.close()
        say("Done")
        return 0
    finally:
        say("Cleaning up: stopping Salt, removing the guests, stopping libvirtd")
        if salt is not None:
            salt.stop()
        lab.remove_guests(URI, PREFIX)
        daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
