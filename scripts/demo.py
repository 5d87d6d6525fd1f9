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
import salt.config
import salt.utils.event

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
        # The master serves vmpower's Salt directories (the reactor SLS among them) from a
        # view of the repository, so it does not walk the virtual environment.
        files = workdir / "files"
        files.mkdir()
        for directory in ("_modules", "_beacons", "_states", "_utils", "_reactor"):
            (files / directory).symlink_to(REPO / directory)
        master = {**common, "interface": "127.0.0.1", **PORTS, "auto_accept": True,
                  "file_roots": {"base": [str(files)]},
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

    def run(self, function: str, *args: str, quiet: bool = False, timeout: int = 120,
            target: str = MINION_ID) -> dict:
        """``salt <target> function args``: print the command and its answer, return the JSON."""
        command = ["salt", "-c", str(self.conf), "--out=json", "--static", f"-t{timeout}",
                   target, function, *args]
        if not quiet:
            shown = f"'{target}'" if "*" in target else target
            print(f"   $ salt {shown} {function} {' '.join(args)}", flush=True)
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


class BusWatcher(threading.Thread):
    """Prints, as they happen, vmpower's events on the master's bus and the reactor's jobs."""

    def __init__(self, daemons: Salt):
        super().__init__(name="bus-watcher", daemon=True)
        opts = salt.config.master_config(str(daemons.conf / "master"))
        self.bus = salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True)
        self.started_at = time.monotonic()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            event = self.bus.get_event(wait=0.5, full=True)
            if event:
                self.show(event["tag"], event["data"])

    def show(self, tag: str, data: dict) -> None:
        clock = f"{time.monotonic() - self.started_at:7.2f}s"
        if "/vmpower/lifecycle/" in tag:
            print(f"   {clock} bus    {tag}  {data['name']}: {data['reason']} "
                  f"(libvirt {data['libvirt']['event']}/{data['libvirt']['detail']})", flush=True)
        elif tag.endswith("/vmpower/resync"):
            print(f"   {clock} bus    {tag}  reason={data['reason']} lost={data['lost']}", flush=True)
        elif "/ret/" in tag and data.get("fun") in ("vmpower.reconcile", "vmpower.sync"):
            ret = data.get("return")
            if not isinstance(ret, dict):
                print(f"   {clock} minion {data['fun']}: {ret}", flush=True)
            elif data["fun"] == "vmpower.sync":
                print(f"   {clock} minion vmpower.sync: checked {ret['checked']}, updated "
                      f"{ret['updated']}, {len(ret['actions'])} action(s)", flush=True)
            else:
                print(f"   {clock} minion vmpower.reconcile {ret.get('name', ret.get('uuid'))}: "
                      f"{ret.get('action')} -> {ret.get('result', '')}; {ret.get('reason')}",
                      flush=True)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.bus.destroy()


def wait(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def history(daemons: Salt, name: str) -> list:
    entries = daemons.run("vmpower.history", name, quiet=True).get(MINION_ID)
    return entries if isinstance(entries, list) else []


def recorded(daemons: Salt, name: str, action: str, cause: str, after: int) -> None:
    """Wait until the audit log of ``name`` has an ``action`` caused by ``cause`` past entry
    ``after``, and print it."""
    def found():
        return [e for e in history(daemons, name)[after:]
                if e["action"] == action and e["cause"] == cause]
    entry = wait(found, 90, f"{name}'s record to show a {action} caused by an {cause}")[0]
    changes = ", ".join(f"{key} {entry['old'].get(key)} -> {value}" for key, value in entry["new"].items())
    print(f"   record of {name} ({entry['action']}, caused by an {entry['cause']}): "
          f"{changes or 'back as it was'}; why: {entry['reason']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/vmpower-demo")
    parser.add_argument("--stop-grace", type=float, default=3.0,
                        help="the beacon's stop_grace, seconds (Nova's is 15)")
    options = parser.parse_args()
    workdir = Path(options.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    say("Starting a real libvirtd")
    daemon = lab.LibvirtDaemon(URI).start()
    salt = watcher = None
    try:
        lab.remove_guests(URI, PREFIX)
        conn = libvirt.open(URI)
        say("Defining three tiny QEMU guests (32 MiB, no OS: a boot sector each)")
        lab.define_guest(conn, PREFIX + "web", "acpi", workdir / "guests")
        batch = lab.define_guest(conn, PREFIX + "batch", "selfstop", workdir / "guests", start=False)
        db = lab.define_guest(conn, PREFIX + "db", "acpi", workdir / "guests", start=False)
        show("web   runs\n"
             "batch is stopped; once started it powers itself off after two seconds, unasked\n"
             "db    is stopped")

        say("Starting a real salt-master (with vmpower's reactor) and salt-minion (with its beacon)")
        reactor = [{"salt/beacon/*/vmpower/lifecycle/*": ["salt://_reactor/lifecycle.sls"]},
                   {"salt/beacon/*/vmpower/resync": ["salt://_reactor/resync.sls"]}]
        beacon = [{"uri": URI}, {"stop_grace": options.stop_grace}]
        salt = Salt(workdir, minion_extra={"vmpower": {"uri": URI, "stop_timeout": 20},
                                           "beacons": {"vmpower": beacon}},
                    master_extra={"reactor": reactor})
        salt.start()
        watcher = BusWatcher(salt)
        watcher.start()
        show(f"master and minion up (minion id {MINION_ID}); vmpower loaded through its entry point.\n"
             "Below, 'bus' lines are events on the master's bus as they arrive, 'minion' lines\n"
             "the jobs the reactor ran for them.")

        say("The beacon connected and fired a resync; the reactor answered with a full sync")
        wait(lambda: history(salt, db.name), 60, "the first sync")
        show("every guest adopted: running -> active, shut off -> stopped")

        say(f"A guest shuts itself down: {batch.name}")
        seen = len(history(salt, batch.name))
        salt.run("vmpower.start", batch.name)
        show(f"{batch.name} is running; nobody will ask it to stop")
        recorded(salt, batch.name, "power_off", "event", seen)

        say(f"A stopped VM started behind vmpower's back: virsh start {db.name}")
        seen = len(history(salt, db.name))
        conn.lookupByName(db.name).create()
        recorded(salt, db.name, "power_off", "event", seen)
        wait(lambda: not conn.lookupByName(db.name).isActive(), 30, f"{db.name} to be off")
        show(f"{db.name} is off again")

        say("The sweep from the master: salt '*' vmpower.sync")
        salt.run("vmpower.sync", target="*")

        say("The audit log of the guest that shut itself down")
        salt.run("vmpower.history", batch.name, "limit=3")

        say("The event loop's health")
        status = salt.run("vmpower.status", quiet=True).get(MINION_ID, {})
        show(json.dumps(status.get("event_loop", status), indent=2))
        conn.close()
        say("Done")
        return 0
    finally:
        say("Cleaning up: stopping Salt, removing the guests, stopping libvirtd")
        if watcher is not None:
            watcher.stop()
        if salt is not None:
            salt.stop()
        lab.remove_guests(URI, PREFIX)
        daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
