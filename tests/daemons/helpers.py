"""Helpers for the tests that run real salt-master and salt-minion daemons.

Everything here works on the objects pytest-salt-factories 1.0.5 hands out: the ``SaltMaster``
and ``SaltMinion`` factories and the session's ``EventListener`` (``event_listener`` fixture),
which receives every event of the master's bus (and of each minion's own bus) through the
factories' ``pytest`` engine.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import time
import venv
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmpower_lab import lab

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The master's ``reactor`` setting, as the README tells users to configure it.
REACTOR = [
    {"salt/beacon/*/vmpower/lifecycle/*": ["salt://_reactor/lifecycle.sls"]},
    {"salt/beacon/*/vmpower/resync": ["salt://_reactor/resync.sls"]},
    {"salt/minion/*/start": ["salt://_reactor/start.sls"]},
]

DEFAULT_URI = "qemu:///system"
TEST_URI = "test:///default"

#: The Salt release under test (3006 LTS and 3008 are both tested; see scripts/setup.sh).
SALT_MAJOR = int(importlib.metadata.version("salt").split(".")[0])
#: ``pillar.get``'s ``unmask=True`` (new in 3008; 3006 masks nothing and refuses the keyword).
UNMASK = {"unmask": True} if SALT_MAJOR >= 3008 else {}


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------
def _as_datetime(after_ts) -> datetime.datetime:
    if isinstance(after_ts, datetime.datetime):
        return after_ts
    return datetime.datetime.fromtimestamp(float(after_ts), tz=datetime.timezone.utc)


def events_since(listener, after_ts, tag_pattern: str = "*", daemon_id: str | None = None):
    """The events (factories ``Event`` objects) whose tag matches ``tag_pattern``
    (fnmatch), stamped at or after ``after_ts`` (epoch seconds), oldest first."""
    after = _as_datetime(after_ts)
    found = [
        event for event in list(listener.store)
        if event.stamp >= after
        and (daemon_id is None or event.daemon_id == daemon_id)
        and fnmatch.fnmatchcase(event.tag, tag_pattern)
    ]
    return sorted(found, key=lambda event: event.stamp)


def wait_for_event(listener, tag_pattern: str, after_ts: float, timeout: float = 30, *,
                   daemon_id: str | None = None, match: Callable[[dict], bool] | None = None,
                   full: bool = False):
    """Wait for an event whose tag matches ``tag_pattern`` (fnmatch) stamped after ``after_ts``.

    ``after_ts`` is epoch seconds (take ``time.time()`` *before* causing the event).
    ``daemon_id`` limits it to events seen on one daemon's bus: pass ``salt_master.id`` for
    the master's bus (the default, None, accepts any daemon; a minion's ``event.send`` or
    beacon event is seen on the master bus *and* on the minion's own bus).
    ``match`` is an optional predicate on the event's data. Returns the oldest matching event's
    data (Salt's private ``_stamp`` etc. removed), or the factories ``Event`` itself with
    ``full=True`` (``.tag``, ``.stamp``, ``.daemon_id``, ``.data``, ``.full_data``).

    Fails the test with the list of the tags that did arrive since ``after_ts``.
    Note: the factories' engine forwards its queue once a second, so an event can reach the
    listener up to ~1 s after it was fired; use the event's stamp, not the arrival time, to
    measure latency.
    """
    deadline = time.monotonic() + timeout
    while True:
        for event in events_since(listener, after_ts, tag_pattern, daemon_id):
            if match is None or match(event.data):
                return event if full else event.data
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    arrived = [f"{e.daemon_id}: {e.tag}" for e in events_since(listener, after_ts)]
    where = f" on {daemon_id}" if daemon_id else ""
    what = " matching the predicate" if match else ""
    pytest.fail(
        f"no event {tag_pattern!r}{what}{where} within {timeout} s; "
        f"{len(arrived)} event(s) arrived since then:\n  " + "\n  ".join(arrived or ["(none)"]),
        pytrace=False,
    )


def wait_until(condition: Callable[[], Any], timeout: float, what,
               interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; fail the test
    naming ``what`` (a string, or a callable that describes the situation at the end) after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            description = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout} s waiting for {description}; "
                        f"last value: {value!r}", pytrace=False)
        time.sleep(interval)


def beacon_events(listener, minion_id: str, after_ts: float, uuid: str | None = None,
                  kind: str = "lifecycle/*", daemon_id: str | None = None) -> list:
    """The vmpower beacon events of ``minion_id`` since ``after_ts`` (``kind``: a tag tail
    such as ``lifecycle/*``, ``lifecycle/stopped`` or ``resync``), of one domain if ``uuid``."""
    return [event for event in events_since(listener, after_ts,
                                            f"salt/beacon/{minion_id}/vmpower/{kind}", daemon_id)
            if uuid is None or event.data.get("uuid") == uuid]


def wait_for_lifecycle(listener, master_id: str, minion_id: str, transition: str, uuid: str,
                       after_ts: float, timeout: float = 60):
    """Wait for ``salt/beacon/<minion>/vmpower/lifecycle/<transition>`` of domain ``uuid``
    on the master bus; returns the factories ``Event`` (``.data``, ``.stamp``)."""
    return wait_for_event(listener, f"salt/beacon/{minion_id}/vmpower/lifecycle/{transition}",
                          after_ts, timeout, daemon_id=master_id, full=True,
                          match=lambda data: data.get("uuid") == uuid)


def wait_for_job_return(listener, master_id: str, minion_id: str, fun: str, after_ts: float,
                        timeout: float = 60, match: Callable[[Any], bool] | None = None) -> dict:
    """Wait for the return of a ``fun`` job on ``minion_id`` on the master bus (jobs the
    reactor or the scheduler started included), optionally one whose return value passes
    ``match``; returns the return event's data (``fun``, ``return``, ``success``...)."""
    def wanted(data):
        return data.get("fun") == fun and (match is None or match(data.get("return")))
    return wait_for_event(listener, f"salt/job/*/ret/{minion_id}", after_ts, timeout,
                          daemon_id=master_id, match=wanted)


def wait_for_start_syncs(listener, master_id: str, minion_id: str, after_ts: float,
                         timeout: float = 90) -> None:
    """Wait until a beacon minion started after ``after_ts`` has settled: its beacon's
    ``connected`` resync is on the master bus, and both syncs the reactor runs for the start
    have returned (one for the start event, one for that resync). Until then a sync may be
    listing while a test defines a guest: it adopts the guest as stopped, as the rules say of
    a domain first seen off, and the reactor then powers it off once the test starts it."""
    wait_for_event(listener, f"salt/beacon/{minion_id}/vmpower/resync", after_ts, timeout,
                   daemon_id=master_id, match=lambda data: data.get("reason") == "connected")

    def both_returned():
        returns = [event for event in events_since(listener, after_ts,
                                                   f"salt/job/*/ret/{minion_id}", master_id)
                   if event.data.get("fun") == "vmpower.sync" and "schedule" not in event.data]
        return len(returns) >= 2
    wait_until(both_returned, timeout, f"the syncs for {minion_id}'s start and its resync")


def start_and_settle(salt_master, minion, event_listener, guest, dom):
    """Start ``guest`` through vmpower, and wait until its boot sector runs and the reactor's
    reconcile of its STARTED event has returned: no job of it is left running."""
    since = time.time()
    assert salt_call(minion, "vmpower.start", guest.name)["vm_state"] == "active"
    lab.wait_guest_ready(dom)
    wait_for_job_return(event_listener, salt_master.id, minion.id, "vmpower.reconcile", since,
                        match=lambda ret: isinstance(ret, dict) and ret.get("uuid") == guest.uuid)


# ---------------------------------------------------------------------------------------------
# Running Salt commands
# ---------------------------------------------------------------------------------------------
def _describe(result) -> str:
    return (f"returncode={result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}")


def salt_call(salt_minion, fun: str, *args, check: bool = True, cli_timeout: int = 120,
              **kwargs) -> Any:
    """Run ``salt-call fun args kwargs`` for ``salt_minion`` (a factories ``SaltMinion``) and
    return the function's JSON return. With ``check`` (default) a non-zero exit fails the
    test with the output; without, an output that is not JSON comes back as text (stdout and
    stderr: salt-call prints "'fun' is not available." on stderr and exits non-zero).
    Other keyword arguments go to the function as ``key=value`` (non-strings as JSON), so
    ``salt_call(m, "vmpower.stop", "web1", timeout=10)`` passes ``timeout`` to vmpower;
    ``cli_timeout`` bounds the whole command."""
    result = salt_minion.salt_call_cli(timeout=cli_timeout).run(fun, *args, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"salt-call {fun} on {salt_minion.id} failed: {_describe(result)}",
                    pytrace=False)
    if result.data is not None:
        return result.data
    return "\n".join(part for part in (result.stdout, result.stderr) if part)


def salt_cmd(salt_master, tgt: str, fun: str, *args, check: bool = True,
             cli_timeout: int = 120, expect: Iterable[str] | None = None,
             **kwargs) -> dict[str, Any]:
    """Run ``salt <tgt> fun args kwargs`` on the master; return ``{minion_id: return}``.

    ``expect`` lists minion ids that must have answered (defaults to ``[tgt]`` when ``tgt``
    is a plain minion id). With ``check``, a non-zero exit (some minion's function failed)
    fails the test with the output. ``cli_timeout`` is salt's ``--timeout`` (how long the
    master waits for returns); other keyword arguments go to the function.
    """
    result = salt_master.salt_cli(timeout=cli_timeout).run(fun, *args, minion_tgt=tgt, **kwargs)
    returns = _per_minion(result)
    if check and result.returncode != 0:
        pytest.fail(f"salt {tgt!r} {fun} failed: {_describe(result)}", pytrace=False)
    if expect is None and not re.search(r"[*?\[\],@]", tgt):
        expect = [tgt]
    missing = [mid for mid in (expect or ()) if mid not in returns]
    if missing:
        pytest.fail(f"salt {tgt!r} {fun}: no return from {missing}: {_describe(result)}",
                    pytrace=False)
    return returns


def _per_minion(result) -> dict[str, Any]:
    """factories unwraps the return of a single targeted minion; undo that, and parse the
    one-JSON-document-per-minion output ourselves so the shape never depends on ``tgt``."""
    returns: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    text, pos = (result.stdout or "").strip(), 0
    while pos < len(text):
        try:
            doc, end = decoder.raw_decode(text, pos)
        except ValueError:
            break
        if isinstance(doc, dict):
            returns.update(doc)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return returns


def minion_return(returns: dict[str, Any], minion_id: str) -> Any:
    """One minion's return from ``salt_cmd``'s dict, failing clearly when it is missing."""
    if minion_id not in returns:
        pytest.fail(f"no return from {minion_id}; got {sorted(returns)}", pytrace=False)
    return returns[minion_id]


def is_not_available(ret: Any, fun: str) -> bool:
    """True when a return says Salt has no such function (``'fun' is not available.``)."""
    return isinstance(ret, str) and f"'{fun}' is not available" in ret


def send_event(salt_minion, tag: str, data: dict) -> None:
    """``salt-call event.send`` from ``salt_minion``. On the master bus it arrives *wrapped*:
    ``{"id": <minion>, "cmd": "_minion_event", "data": <data>, "tag": <tag>}``."""
    if salt_call(salt_minion, "event.send", tag, data=data) is not True:
        pytest.fail(f"event.send {tag} from {salt_minion.id} failed", pytrace=False)


def fire_beacon_event(salt_minion, tag: str, data: dict) -> None:
    """Fire, from ``salt_minion``, an event shaped exactly as a beacon's: on the master bus
    its data is ``data`` itself (flat), as the reactor sees a real beacon event.

    This is how any minion can forge ``salt/beacon/<another minion>/vmpower/...``: it sends
    the master the same ``_minion_event`` load with an ``events`` list that beacons send
    (``event.fire_master`` with ``preload``). Include ``"id"`` in ``data`` to mimic a beacon,
    which always puts the minion id there.
    """
    preload = {"events": [{"tag": tag, "data": data}]}
    if salt_call(salt_minion, "event.fire_master", data=data, tag=tag,
                 preload=preload) is not True:
        pytest.fail(f"event.fire_master {tag} from {salt_minion.id} failed", pytrace=False)


# ---------------------------------------------------------------------------------------------
# Pillar
# ---------------------------------------------------------------------------------------------
class PillarTree:
    """A pillar tree (the master's ``pillar_roots: base``) with one SLS per minion.

    ``set(minion_id, data)`` writes ``vmpower_pillar/<minion>.sls`` and a ``top.sls`` that
    gives each minion its own file; ``refresh`` makes the running minion daemon reload it
    (``salt-call`` processes compile pillar afresh on every call anyway).
    """

    DIR = "vmpower_pillar"

    def __init__(self, root: Path):
        self.root = Path(root)
        self._data: dict[str, dict] = {}
        self._write_top()

    @staticmethod
    def _sls(minion_id: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", minion_id)

    def _write_top(self):
        top = {"base": {mid: [f"{self.DIR}.{self._sls(mid)}"] for mid in sorted(self._data)}}
        if not self._data:
            top = {"base": {}}
        (self.root / "top.sls").write_text(yaml.safe_dump(top, default_flow_style=False))

    def get(self, minion_id: str) -> dict:
        return copy.deepcopy(self._data.get(minion_id, {}))

    def set(self, minion_id: str, data: dict):
        """Replace the whole pillar of ``minion_id`` with ``data``."""
        directory = self.root / self.DIR
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{self._sls(minion_id)}.sls").write_text(
            yaml.safe_dump(data, default_flow_style=False))
        self._data[minion_id] = copy.deepcopy(data)
        self._write_top()

    def clear(self, minion_id: str | None = None):
        """Remove the pillar of one minion, or of every minion."""
        for mid in ([minion_id] if minion_id else list(self._data)):
            self._data.pop(mid, None)
            path = self.root / self.DIR / f"{self._sls(mid)}.sls"
            if path.exists():
                path.unlink()
        self._write_top()

    @staticmethod
    def refresh(salt_master, minion_id: str, timeout: int = 60):
        """``saltutil.refresh_pillar wait=True`` inside the minion daemon, then check it."""
        ret = salt_cmd(salt_master, minion_id, "saltutil.refresh_pillar", wait=True,
                       timeout=timeout, cli_timeout=timeout + 30)
        if minion_return(ret, minion_id) is not True:
            pytest.fail(f"refresh_pillar on {minion_id} returned {ret[minion_id]!r}",
                        pytrace=False)


def set_pillar(salt_master, pillar_tree: PillarTree, minion_id: str, data: dict,
               refresh: bool = True):
    """Write ``data`` as the whole pillar of ``minion_id`` and refresh the minion's pillar."""
    pillar_tree.set(minion_id, data)
    if refresh:
        pillar_tree.refresh(salt_master, minion_id)


# ---------------------------------------------------------------------------------------------
# vmpower's records
# ---------------------------------------------------------------------------------------------
def store_path(salt_minion) -> Path:
    """Where ``salt_minion``'s vmpower keeps its records: its ``vmpower:store``, which the
    harness sets for every minion (``MinionFactory.create``)."""
    return Path(salt_minion.config["vmpower"]["store"])


def vm_record(salt_minion, uuid: str) -> dict | None:
    """The record of domain ``uuid`` in ``salt_minion``'s store, read-only, or None.

    Read straight from the SQLite file, so a test can poll it cheaply; the audit log is read
    through Salt (``vmpower.history``)."""
    return read_record(store_path(salt_minion), uuid)


@contextlib.contextmanager
def read_only(store):
    """A read-only connection to the SQLite file at ``store`` (rows as ``sqlite3.Row``), read
    past vmpower; closed on exit."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()


def read_record(store, uuid: str) -> dict | None:
    """The record of domain ``uuid`` in the SQLite store at ``store``, read-only, or None."""
    if not os.path.exists(store):
        return None
    with read_only(store) as db:
        row = db.execute("SELECT * FROM instances WHERE uuid = ?", (uuid,)).fetchone()
    return dict(row) if row else None


def wait_for_record(salt_minion, uuid: str, timeout: float = 60, **expected) -> dict:
    """Wait until ``salt_minion``'s record of ``uuid`` has the ``expected`` field values;
    return it."""
    def matching():
        record = vm_record(salt_minion, uuid)
        if record and all(record.get(key) == value for key, value in expected.items()):
            return record
        return None
    return wait_until(matching, timeout, lambda: f"the record of {uuid} on {salt_minion.id} "
                      f"to have {expected}; it is {vm_record(salt_minion, uuid)!r}")


def history(salt_minion, target: str) -> list[dict]:
    """``vmpower.history <target>`` through ``salt-call`` on ``salt_minion``."""
    entries = salt_call(salt_minion, "vmpower.history", target)
    if not isinstance(entries, list):
        pytest.fail(f"vmpower.history {target} on {salt_minion.id}: {entries!r}", pytrace=False)
    return entries


def beacon_status(salt_minion, name: str = "vmpower") -> dict:
    """The vmpower beacon's health as the minion process last wrote it (what
    ``vmpower.status`` reports under ``event_loop``): connected, reconnects, last_resync..."""
    path = Path(salt_minion.config["cachedir"]) / "vmpower" / "eventloop.json"
    try:
        return json.loads(path.read_text())["watchers"][name]
    except (OSError, ValueError, KeyError):
        return {}


def refresh_pillar_and_settle(salt_master, pillar_tree: PillarTree, listener, salt_minion,
                              data: dict, timeout: float = 60) -> None:
    """``set_pillar`` on a minion that runs the vmpower beacon, then wait until what the
    refresh sets off is over.

    A pillar refresh rebuilds the minion's beacons (once or twice: Salt's ``pillar_refresh``
    refreshes modules, then compiles pillar, then refreshes beacons again). Each rebuild
    closes the vmpower beacon, which reconnects at its next run and fires a ``restarted``
    resync; the reactor answers each with ``vmpower.sync``. This waits for the beacon to be
    connected again after the last rebuild and for every ``vmpower.sync`` job published
    meanwhile to return, so that a test's next step is not raced by one of those syncs."""
    since = time.time()
    set_pillar(salt_master, pillar_tree, salt_minion.id, data)
    done = wait_for_event(listener, "*minion_pillar_refresh_complete", since, timeout,
                          daemon_id=salt_minion.id, full=True).stamp.timestamp()
    wait_until(lambda: (status := beacon_status(salt_minion)).get("connected")
               and (status.get("last_resync") or {}).get("at", 0) >= done, timeout,
               f"the vmpower beacon of {salt_minion.id} to reconnect after the pillar refresh")
    reconnected = beacon_status(salt_minion)["last_resync"]["at"]

    def syncs_over():
        jobs = [event for event in events_since(listener, since, "salt/job/*/new",
                                                salt_master.id)
                if event.data.get("fun") == "vmpower.sync"
                and salt_minion.id in (event.data.get("minions") or ())]
        if not any(job.stamp.timestamp() >= reconnected for job in jobs):
            return False  # the reactor has not answered the last resync yet
        return all(events_since(listener, since, f"salt/job/{job.data['jid']}/ret/{salt_minion.id}",
                                salt_master.id) for job in jobs)
    wait_until(syncs_over, timeout, f"the resync syncs on {salt_minion.id} to return")


# ---------------------------------------------------------------------------------------------
# Beacons
# ---------------------------------------------------------------------------------------------
def beacon_config(uri: str | None = None, stop_grace: float | None = None,
                  **more) -> list[dict]:
    """The vmpower beacon's configuration in Salt's list-of-dicts form, e.g.
    ``[{"uri": "test:///default"}, {"stop_grace": 2}]``; ``None`` values are left out."""
    items = {"uri": uri, "stop_grace": stop_grace, **more}
    return [{key: value} for key, value in items.items() if value is not None]


def add_beacon(salt_master, minion_id: str, config: list[dict], name: str = "vmpower",
               save: bool = False) -> dict:
    """Add a beacon to a running minion with ``beacons.add`` (validated by the beacon's
    ``validate``); ``save`` also writes it to the minion's ``minion.d/beacons.conf``."""
    ret = minion_return(
        salt_cmd(salt_master, minion_id, "beacons.add", name, json.dumps(config)), minion_id)
    if not (isinstance(ret, dict) and ret.get("result")):
        pytest.fail(f"beacons.add {name} on {minion_id} failed: {ret!r}", pytrace=False)
    if save:
        salt_cmd(salt_master, minion_id, "beacons.save")
    return ret


def delete_beacon(salt_master, minion_id: str, name: str = "vmpower", save: bool = False):
    """Remove a beacon from a running minion (``beacons.delete``)."""
    ret = minion_return(salt_cmd(salt_master, minion_id, "beacons.delete", name), minion_id)
    if save:
        salt_cmd(salt_master, minion_id, "beacons.save")
    return ret


# ---------------------------------------------------------------------------------------------
# The repository as a file root
# ---------------------------------------------------------------------------------------------
def repo_view(dest: Path, repo: Path = REPO_ROOT) -> Path:
    """A directory of symlinks to the repository's Salt directories: every top-level
    ``_<kind>`` directory (``_modules``, ``_beacons``, ``_states``, ``_utils``, ``_reactor``).

    As a file root it serves the same ``salt://_modules`` ... ``salt://_reactor`` as the
    repository root itself (live: they are the checkout's files, and ``_utils/vmpower`` still
    resolves to the library), but the master no longer walks ``.venv`` (~18,000 files) and
    ``bench/`` on every file listing: with factories' ``fileserver_list_cache_time: 0`` that
    walk took ~1.9 s per listing and ~20 s per ``saltutil.sync_all``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(Path(repo).iterdir()):
        if (entry.name.startswith("_") and not entry.name.startswith("__") and entry.is_dir()
                and not (dest / entry.name).exists()):
            (dest / entry.name).symlink_to(entry)
    return dest


# ---------------------------------------------------------------------------------------------
# A Python environment without vmpower (for the file_roots install path)
# ---------------------------------------------------------------------------------------------
def _vmpower_site_entries(site_packages: Path) -> set:
    """The top-level names in ``site_packages`` that belong to the installed vmpower
    distribution (its dist-info, package dir, editable finder and .pth), from its RECORD.

    Only distributions *in* ``site_packages`` count: under ``python -m pytest`` the repo root
    is on sys.path, and there ``vmpower.egg-info`` would be found first."""
    names = set()
    for dist in importlib.metadata.distributions(path=[str(site_packages)]):
        if (dist.metadata["Name"] or "").lower() != "vmpower":
            continue
        for path in dist.files or ():
            full = Path(dist.locate_file(path)).resolve()
            try:
                names.add(full.relative_to(site_packages.resolve()).parts[0])
            except ValueError:
                continue
        names.add(Path(dist._path).name)  # the .dist-info directory itself
    return names


def clean_environ(base: dict | None = None) -> dict:
    """The environment for a process that must not see the vmpower checkout."""
    env = dict(os.environ if base is None else base)
    for key in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE"):
        env.pop(key, None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


PROBE = """
import importlib.metadata, json, sys
eps = [str(ep) for ep in importlib.metadata.entry_points(group="salt.loader")]
try:
    import vmpower
    where = vmpower.__file__
except ImportError:
    where = None
import salt.version, libvirt, filelock
print(json.dumps({"entry_points": eps, "vmpower": where, "salt": str(salt.version.__version__),
                  "sys_path": sys.path}))
"""


def python_without_vmpower(dest: Path) -> Path:
    """Make a virtualenv at ``dest`` that has everything this test run's environment has
    (Salt, libvirt-python, salt-factories, ...) but not the vmpower distribution: no
    ``vmpower`` package, no ``salt.loader`` entry point. Returns its ``python``.

    It costs well under a second: no pip, the site-packages entries are symlinks to this
    environment's, minus vmpower's own (found through its RECORD, so it works for an
    editable install and a wheel alike). Checked with a probe before it is returned.
    """
    dest = Path(dest)
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(dest)
    python = dest / "bin" / "python"
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True, env=clean_environ()).strip())
    skip = _vmpower_site_entries(ours) | {"__pycache__"}
    for entry in ours.iterdir():
        if entry.name in skip or re.match(r"(__editable__[._])?vmpower", entry.name):
            continue
        target = theirs / entry.name
        if not target.exists():
            target.symlink_to(entry)
    probe = probe_python(python, cwd=dest)
    if probe["vmpower"] or any("vmpower" in ep for ep in probe["entry_points"]):
        raise RuntimeError(f"{python} still sees vmpower: {probe}")
    return python


def probe_python(python: Path, cwd: Path | None = None) -> dict:
    """What ``python`` sees: salt.loader entry points, where vmpower imports from (or None)."""
    out = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True,
                         env=clean_environ(), cwd=str(cwd or "/"), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"probe of {python} failed: {out.stderr}")
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------------------
# A Python environment with vmpower installed from a wheel (the pip install path)
# ---------------------------------------------------------------------------------------------
#: What a source distribution of vmpower holds: setup.cfg's packages and package_dir, and the
#: files its metadata reads.
SOURCE_FILES = ("setup.cfg", "pyproject.toml", "README.md")
SOURCE_DIRS = ("vmpower", "_modules", "_beacons", "_states", "_returners", "_runners", "_reactor")


def build_wheel(dest: Path, repo: Path = REPO_ROOT) -> Path:
    """``pip wheel --no-deps`` of the checkout, built from a copy of its source in ``dest``
    (a build writes ``build/`` and ``*.egg-info`` next to the source, which must not land in
    the checkout). pip builds it the standard way, in an isolated build environment, exactly
    as ``pip install .`` would. Returns the wheel."""
    dest = Path(dest)
    source = dest / "source"
    source.mkdir(parents=True)
    for name in SOURCE_FILES:
        shutil.copy2(repo / name, source / name)
    for name in SOURCE_DIRS:
        shutil.copytree(repo / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = dest / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, env=clean_environ(), cwd=str(dest), check=False)
    wheels = sorted(out.glob("vmpower-*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"pip wheel failed ({result.returncode}): {result.stdout}\n"
                           f"{result.stderr}")
    return wheels[0]


def python_with_wheel(dest: Path, wheel: Path) -> Path:
    """A fresh virtualenv at ``dest`` with everything this environment has but vmpower (see
    ``python_without_vmpower``), into which ``wheel`` is then installed for real with
    ``pip install --no-deps --no-index``: a non-editable install, files copied into its own
    site-packages. Returns its ``python``."""
    python = python_without_vmpower(dest)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", str(wheel)],
        capture_output=True, text=True, env=clean_environ(), cwd=str(dest), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip install {wheel.name} failed: {result.stdout}\n{result.stderr}")
    return python


LOADER_PROBE = """
import json, vmpower.loader
print(json.dumps(vmpower.loader.get_loader_dirs()))
"""


def loader_dirs(python: Path, cwd: Path) -> dict:
    """What vmpower's ``salt.loader`` entry point returns under ``python``."""
    out = subprocess.run([str(python), "-c", LOADER_PROBE], capture_output=True, text=True,
                         env=clean_environ(), cwd=str(cwd), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"loader probe of {python} failed: {out.stderr}")
    return json.loads(out.stdout)


__all__ = [
    "DEFAULT_URI",
    "REACTOR",
    "REPO_ROOT",
    "TEST_URI",
    "PillarTree",
    "add_beacon",
    "beacon_config",
    "beacon_events",
    "beacon_status",
    "build_wheel",
    "clean_environ",
    "delete_beacon",
    "events_since",
    "fire_beacon_event",
    "history",
    "is_not_available",
    "loader_dirs",
    "minion_return",
    "probe_python",
    "python_with_wheel",
    "python_without_vmpower",
    "refresh_pillar_and_settle",
    "repo_view",
    "salt_call",
    "salt_cmd",
    "send_event",
    "set_pillar",
    "store_path",
    "vm_record",
    "wait_for_event",
    "wait_for_job_return",
    "wait_for_lifecycle",
    "wait_for_record",
    "wait_until",
]
