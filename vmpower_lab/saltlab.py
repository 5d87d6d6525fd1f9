"""A private salt-master and salt-minion on loopback ports, for the demo and the benchmarks.

The tests use pytest-salt-factories; the demo and the latency benchmark run outside pytest and
need the same two daemons with vmpower's reactor and beacon, started from nothing and stopped
without leaving a process behind. Everything lives under one work directory.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SALT_DIRECTORIES = ("_modules", "_beacons", "_states", "_utils", "_reactor")
# The reactor as the README tells operators to configure it.
REACTOR = [{"salt/beacon/*/vmpower/lifecycle/*": ["salt://_reactor/lifecycle.sls"]},
           {"salt/beacon/*/vmpower/resync": ["salt://_reactor/resync.sls"]},
           {"salt/minion/*/start": ["salt://_reactor/start.sls"]}]


class SaltLab:
    """A salt-master and one salt-minion (``minion_id``) under ``workdir``.

    ``ports`` are the master's publish and return ports. The master serves vmpower's Salt
    directories from a view of the repository (symlinks), so it never walks the virtualenv.
    """

    def __init__(self, workdir: Path, minion_id: str, minion: dict, master: dict,
                 ports: tuple = (14505, 14506)):
        self.minion_id = minion_id
        self.conf = workdir / "conf"
        self.root = workdir / "root"
        files = workdir / "files"
        for directory in (self.conf, self.root, files, workdir / "pillar"):
            directory.mkdir(parents=True)
        for name in SALT_DIRECTORIES:
            (files / name).symlink_to(REPO / name)
        common = {"root_dir": str(self.root), "user": "root", "log_level_logfile": "info"}
        master = {**common, "interface": "127.0.0.1", "publish_port": ports[0],
                  "ret_port": ports[1], "auto_accept": True, "file_roots": {"base": [str(files)]},
                  "pillar_roots": {"base": [str(workdir / "pillar")]}, **master}
        minion = {**common, "id": minion_id, "master": "127.0.0.1", "master_port": ports[1],
                  **minion}
        # The lab's records stay in the lab, never in the machine's default /var/lib/vmpower.
        minion["vmpower"] = {"store": str(self.root / "vmpower" / "records.sqlite"),
                             **(minion.get("vmpower") or {})}
        (self.conf / "master").write_text(json.dumps(master, indent=2))
        (self.conf / "minion").write_text(json.dumps(minion, indent=2))
        self._daemons: list = []

    def start(self, timeout: float = 120) -> None:
        """Start both daemons; return once the minion answers the master."""
        for name in ("salt-master", "salt-minion"):
            with open(self.root / f"{name}.out", "ab") as output:  # the daemon keeps its own copy
                self._daemons.append(subprocess.Popen([str(BIN / name), "-c", str(self.conf)],
                                                      stdout=output, stderr=subprocess.STDOUT))
            if name == "salt-master":
                time.sleep(2)  # let the master bind before the minion knocks
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.salt("test.ping", timeout=5).get(self.minion_id) is True:
                return
            time.sleep(1)
        raise RuntimeError(f"the minion did not answer the master within {timeout:.0f} s; see "
                           f"{self.root}/salt-*.out and {self.root}/var/log/salt/")

    def salt(self, function: str, *args: str, target: str | None = None,
             timeout: int = 120) -> dict:
        """``salt <target> <function> <args>`` from the master: ``{minion id: return}``."""
        command = [str(BIN / "salt"), "-c", str(self.conf), "--out=json", "--static",
                   f"-t{timeout}", target or self.minion_id, function, *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        try:
            return json.loads(done.stdout or "{}")
        except json.JSONDecodeError:
            return {"error": done.stdout + done.stderr}

    def returned(self, function: str, *args: str) -> object:
        """The minion's return of one function."""
        return self.salt(function, *args).get(self.minion_id)

    def stop(self) -> None:
        """Stop both daemons and every process they started."""
        for daemon in reversed(self._daemons):
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        # Salt's worker processes are the daemons' children; none may outlive them.
        subprocess.run(["pkill", "-9", "-f", str(self.conf)], check=False)


class MasterBus(threading.Thread):
    """Hands every event on the master's bus to ``on_event(tag, data, arrived)``, in a thread;
    ``arrived`` is the wall-clock time it was read."""

    def __init__(self, lab: SaltLab, on_event: Callable[[str, dict, float], None]):
        super().__init__(name="master-bus", daemon=True)
        import salt.config
        import salt.utils.event

        opts = salt.config.master_config(str(lab.conf / "master"))
        self._bus = salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True)
        self._on_event = on_event
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            event = self._bus.get_event(wait=0.2, full=True)
            if event:
                self._on_event(event["tag"], event["data"], time.time())

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)
        self._bus.destroy()
