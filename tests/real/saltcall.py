"""A real ``salt-call --local`` job process for the tests on the real libvirtd.

Where a test needs vmpower to run in a job process of its own (one it can kill with SIGKILL in
the middle of an operation, or one that holds an instance lock while the test syncs), it runs
``salt-call --local`` with a minion configuration of the test's own: the same minion id as
``load_minion`` ("loader-minion"), the same ``vmpower:`` settings (store included), and the
same pillar (written to a local pillar tree). vmpower comes through its ``salt.loader`` entry
point, as for a pip-installed minion.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

MINION_ID = "loader-minion"  # LoadedMinion's id: both are the same host to vmpower


class SaltCall:
    """``salt-call --local`` for one test: ``run(fun, *args, **kwargs)`` or ``spawn(...)``."""

    def __init__(self, root: Path, uri: str, pillar: dict | None = None, **vmpower):
        self.root = Path(root)
        self.conf = self.root / "conf"
        self.pillar_dir = self.root / "pillar"
        self.log_file = self.root / "salt-call.log"
        for directory in (self.conf, self.pillar_dir, self.root / "files"):
            directory.mkdir(parents=True, exist_ok=True)
        config = {
            "id": MINION_ID, "file_client": "local", "cachedir": str(self.root / "cache"),
            "pki_dir": str(self.root / "pki"), "log_file": str(self.log_file),
            "log_level_logfile": "debug", "pillar_roots": {"base": [str(self.pillar_dir)]},
            "file_roots": {"base": [str(self.root / "files")]},
            "vmpower": {"uri": uri, **vmpower},
        }
        (self.conf / "minion").write_text(yaml.safe_dump(config))
        self.set_pillar(pillar or {})
        self.salt_call = str(Path(sys.executable).with_name("salt-call"))

    def set_pillar(self, pillar: dict) -> None:
        """The whole pillar of the job processes started from now on."""
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump({"base": {"*": ["vmpower"]}}))
        (self.pillar_dir / "vmpower.sls").write_text(yaml.safe_dump(pillar))

    def command(self, fun: str, *args, **kwargs) -> list[str]:
        words = [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
                 for key, value in kwargs.items()]
        return [self.salt_call, "--local", "-c", str(self.conf), "--out", "json",
                "--retcode-passthrough", "-l", "quiet", fun, *map(str, args), *words]

    def spawn(self, fun: str, *args, **kwargs) -> subprocess.Popen:
        """Start the job process; the caller waits for it or kills it."""
        return subprocess.Popen(self.command(fun, *args, **kwargs), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def run(self, fun: str, *args, timeout: float = 300, **kwargs):
        """Run the job and return its ``local`` return; a failure raises with the output."""
        proc = self.spawn(fun, *args, **kwargs)
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"salt-call {fun} exited {proc.returncode}:\n{out}\n{err}")
        return json.loads(out)["local"]


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns something truthy; return it, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {value!r}")
        time.sleep(interval)
