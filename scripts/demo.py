"""The main job, on embedded defaults: a real salt-master and salt-minion, a real libvirtd and a
few real QEMU guests, the vmpower beacon and reactor, and SQLite records.

It shows, live, a guest shutting itself down and being recorded as stopped, a stopped VM started
behind vmpower's back being powered off, and ``salt '*' vmpower.sync``. Everything it starts
lives under one work directory and is stopped at the end, whatever happens.
Run it with ``bash scripts/demo.sh`` (which installs what it needs first).
"""

import argparse
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import libvirt

# The lab is a package of the repository, not of the installed vmpower: run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vmpower_lab import lab
from vmpower_lab.saltlab import REACTOR, MasterBus, SaltLab

URI = lab.DEFAULT_URI
PREFIX = "vmpower-demo-"
MINION_ID = "vmpower-demo-minion"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(text: str) -> None:
    print(textwrap.indent(text.rstrip(), "   "), flush=True)


class Narrator:
    """Prints, as they happen, vmpower's events on the master's bus and the reactor's jobs."""

    def __init__(self):
        self.started_at = time.monotonic()

    def __call__(self, tag: str, data: dict, _arrived: float) -> None:
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


def run(daemons: SaltLab, function: str, *args: str, target: str = MINION_ID):
    """``salt <target> function args`` from the master, shown with its answer."""
    shown = f"'{target}'" if "*" in target else target
    print(f"   $ salt {shown} {function} {' '.join(args)}", flush=True)
    answer = daemons.salt(function, *args, target=target)
    show(json.dumps(answer.get(MINION_ID, answer), indent=2))
    return answer.get(MINION_ID)


def wait(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def history(daemons: SaltLab, name: str) -> list:
    entries = daemons.returned("vmpower.history", name)
    return entries if isinstance(entries, list) else []


def recorded(daemons: SaltLab, name: str, action: str, cause: str, after: int) -> None:
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
    salt = bus = None
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
        beacon = [{"uri": URI}, {"stop_grace": options.stop_grace}]
        salt = SaltLab(workdir, MINION_ID, master={"reactor": REACTOR},
                       minion={"vmpower": {"uri": URI, "stop_timeout": 20},
                               "beacons": {"vmpower": beacon}})
        salt.start()
        bus = MasterBus(salt, Narrator())
        bus.start()
        show(f"master and minion up (minion id {MINION_ID}); vmpower loaded through its entry point.\n"
             "Below, 'bus' lines are events on the master's bus as they arrive, 'minion' lines\n"
             "the jobs the reactor ran for them.")

        say("The beacon connected and fired a resync; the reactor answered with a full sync")
        wait(lambda: history(salt, db.name), 60, "the first sync")
        show("every guest adopted: running -> active, shut off -> stopped")

        say(f"A guest shuts itself down: {batch.name}")
        seen = len(history(salt, batch.name))
        run(salt, "vmpower.start", batch.name)
        show(f"{batch.name} is running; nobody will ask it to stop")
        recorded(salt, batch.name, "power_off", "event", seen)

        say(f"A stopped VM started behind vmpower's back: virsh start {db.name}")
        seen = len(history(salt, db.name))
        conn.lookupByName(db.name).create()
        recorded(salt, db.name, "power_off", "event", seen)
        wait(lambda: not conn.lookupByName(db.name).isActive(), 30, f"{db.name} to be off")
        show(f"{db.name} is off again")

        say("The sweep from the master: salt '*' vmpower.sync")
        run(salt, "vmpower.sync", target="*")

        say("The audit log of the guest that shut itself down")
        run(salt, "vmpower.history", batch.name, "limit=3")

        say("The event loop's health")
        status = salt.returned("vmpower.status") or {}
        show(json.dumps(status.get("event_loop", status), indent=2))
        conn.close()
        say("Done")
        return 0
    finally:
        say("Cleaning up: stopping Salt, removing the guests, stopping libvirtd")
        if bus is not None:
            bus.stop()
        if salt is not None:
            salt.stop()
        lab.remove_guests(URI, PREFIX)
        daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
