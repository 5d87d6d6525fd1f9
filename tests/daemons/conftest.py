"""Real salt-master and salt-minion daemons for vmpower's tests (pytest-salt-factories).

Everything lives under pytest's temporary directory. The session has one salt-master and, on
demand, two salt-minions (``vmpower-minion-1``, ``vmpower-minion-2``); tests that need a
minion of their own (other URI, beacons configured before start, no vmpower entry point, or
another Python) start one with ``minion_factory.started(...)``, which stops it and deletes its
key afterwards. The tests on the real libvirtd (``qemu:///system``, started through
``vmpower_lab.lab`` by the ``libvirt_daemon`` fixture shared with tests/real) of one module
share ``beacon_minion`` (``vmpower-minion-b``, the vmpower beacon in its minion config), and
name their guests ``vmpower-d-<test>-<kind>`` (``make_guest``).

The master serves ``file_roots: base: [<state tree>, <repo root>]`` so that ``salt://_modules``,
``salt://_beacons``, ``salt://_states``, ``salt://_utils`` and ``salt://_reactor`` are the
repository's own (the file_roots install path), reads pillar from a tree the tests write
(``pillar_tree``), and maps the vmpower beacon's events to the shipped reactor SLS files.
By default the repo root is served through ``helpers.repo_view`` (symlinks to the checkout's
``_modules``, ``_beacons``, ``_states``, ``_utils``, ``_reactor``: the same salt:// files, but
a file listing no longer walks ``.venv``, which made ``saltutil.sync_all`` take ~20 s);
``VMPOWER_FILE_ROOT=repo`` serves the checkout itself.

Minions keep Salt's default ``loop_interval: 1`` (salt-factories lowers it to 0.05; beacons
run once per loop, so the default is what users get).

Every test in this directory is marked ``daemons``.

Logs: each daemon writes a full debug log to ``<its root_dir>/logs/{master,minion}.log`` under
pytest's tmp dir; only records at ``VMPOWER_DAEMON_LOG_LEVEL`` (default ``warning``) and above
are forwarded into pytest's captured log (factories forwards everything at debug otherwise,
which buries a failure under tens of thousands of lines).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import salt.utils.dictupdate
from saltfactories.daemons.minion import SaltMinion

from .helpers import (
    DEFAULT_URI,
    REACTOR,
    REPO_ROOT,
    PillarTree,
    beacon_config,
    clean_environ,
    python_without_vmpower,
    repo_view,
    wait_for_start_syncs,
)

MASTER_ID = "vmpower-master"
MINION_1 = "vmpower-minion-1"
MINION_2 = "vmpower-minion-2"
#: The minion with the vmpower beacon on the real libvirtd (``beacon_minion``).
BEACON_MINION = "vmpower-minion-b"
#: stop_grace of ``beacon_minion``'s beacon: short, so a test waits little for a STOPPED, but
#: well above the gap between the STOPPED and STARTED of a hard reboot (destroy, then create:
#: a few tenths of a second here).
STOP_GRACE = 3
#: sync_interval of ``beacon_minion``: longer than the whole run, so that every change the
#: tests see on it was made by the event path (the safety net has its own test and minion).
NO_PERIODIC_SYNC = 3600
_HERE = Path(__file__).resolve().parent

#: Daemon log records at this level and above reach pytest's captured log.
DAEMON_LOG_LEVEL = os.environ.get("VMPOWER_DAEMON_LOG_LEVEL", "warning").lower()

#: Start-up times of the daemons this session, shown in pytest's terminal summary.
TIMINGS: list[str] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.daemons)


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("salt daemons (vmpower)")
        for line in TIMINGS:
            terminalreporter.write_line(line)


def _merge(base: dict, extra: dict | None) -> dict:
    merged = copy.deepcopy(base)
    if extra:
        salt.utils.dictupdate.update(merged, copy.deepcopy(extra))
    return merged


def master_config(extra: dict | None = None, file_root: Path = REPO_ROOT) -> dict:
    """The master overrides vmpower's tests use, with ``extra`` merged in; ``file_root`` is
    where ``salt://_modules`` etc. come from (the repo root, or a ``repo_view`` of it).

    factories merges lists in overrides *into* its defaults, so ``file_roots: base`` ends up
    ``[<factories' state tree>, <repo root>]`` and ``pillar_roots: base`` is factories' pillar
    tree, both under pytest's tmp dir.
    """
    return _merge({
        "file_roots": {"base": [str(file_root)]},
        "reactor": REACTOR,
        "timeout": 30,
        "pytest-master": {"log": {"level": DAEMON_LOG_LEVEL}},
    }, extra)


def minion_config(uri: str | None = DEFAULT_URI, vmpower: dict | None = None,
                  beacons: dict | None = None, extra: dict | None = None) -> dict:
    """The minion overrides: ``vmpower: {uri: ...}`` (left out if ``uri`` and ``vmpower`` are
    None), ``beacons`` if given, Salt's default ``loop_interval``, then ``extra`` merged in.

    Note that ``config.get(..., merge="recurse")`` lets minion config win over pillar, so a
    key set here cannot be changed through pillar.
    """
    config: dict = {"loop_interval": 1, "pytest-minion": {"log": {"level": DAEMON_LOG_LEVEL}}}
    section = dict(vmpower or {})
    if uri is not None:
        section.setdefault("uri", uri)
    if section:
        config["vmpower"] = section
    if beacons:
        config["beacons"] = copy.deepcopy(beacons)
    return _merge(config, extra)


def _our_processes(root: Path) -> list:
    """salt daemons still running whose command line mentions ``root``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.info["cmdline"] or ())
            if str(root) in cmdline and "salt" in cmdline:
                found.append(proc)
    return found


def _check_socket_room(root: Path, minion_id: str):
    """A minion's IPC sockets live in ``<root>/<id>/run/minion/minion_event_<10 hex>_pub.ipc``;
    AF_UNIX allows 107 bytes, and salt only says "AF_UNIX path too long" deep in its log."""
    path = root / minion_id / "run" / "minion" / "minion_event_0123456789_pull.ipc"
    if len(str(path)) > 107:
        pytest.fail(f"socket path for minion {minion_id!r} would be {len(str(path))} bytes "
                    f"(> 107): use a shorter id or a shorter --basetemp/TMPDIR ({path})")


# ---------------------------------------------------------------------------------------------
# Session: factories, master, pillar, state tree
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def salt_factories_config(tmp_path_factory):
    """Root every daemon under pytest's tmp dir (factories defaults to $TMPDIR)."""
    return {"root_dir": tmp_path_factory.mktemp("salt"), "start_timeout": 120}


@pytest.fixture(scope="session")
def vmpower_master_overrides() -> dict:
    """Extra master config for the session master; override this fixture to change it."""
    return {}


@pytest.fixture(scope="session")
def vmpower_minion_overrides() -> dict:
    """Extra minion config for every minion the session starts; override to change it."""
    return {}


@pytest.fixture(scope="session")
def vmpower_uri() -> str:
    """The libvirt URI written into the session minions' config (``VMPOWER_TEST_URI`` or
    ``qemu:///system``)."""
    return os.environ.get("VMPOWER_TEST_URI", DEFAULT_URI)


@pytest.fixture(scope="session")
def vmpower_file_root(tmp_path_factory) -> Path:
    """The file root that serves the repository (see the module docstring)."""
    if os.environ.get("VMPOWER_FILE_ROOT", "view") == "repo":
        return REPO_ROOT
    return repo_view(tmp_path_factory.mktemp("repo-view"))


@pytest.fixture(scope="session")
def salt_master(salt_factories, vmpower_master_overrides, vmpower_file_root):
    """The session's salt-master, started; stopped (and checked gone) at the end."""
    factory = salt_factories.salt_master_daemon(
        MASTER_ID, overrides=master_config(vmpower_master_overrides, vmpower_file_root))
    root = Path(factory.config["root_dir"])
    started = time.monotonic()
    with factory.started():
        TIMINGS.append(f"salt-master {factory.id}: started in {time.monotonic() - started:.1f} s")
        yield factory
        stopping = time.monotonic()
    TIMINGS.append(f"salt-master {factory.id}: stopped in {time.monotonic() - stopping:.1f} s")
    leftovers = _our_processes(Path(salt_factories.root_dir))
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if leftovers:
        pytest.fail(f"salt processes left behind under {root}: {[p.pid for p in leftovers]}")


@pytest.fixture(scope="session")
def state_tree(salt_master) -> Path:
    """The first ``file_roots: base`` directory (writable; the repo root comes after it)."""
    return Path(salt_master.config["file_roots"]["base"][0])


@pytest.fixture(scope="session")
def pillar_tree(salt_master) -> PillarTree:
    """The master's pillar tree: ``pillar_tree.set(minion_id, data)``, ``.clear(...)``,
    ``.refresh(salt_master, minion_id)`` (see ``helpers.set_pillar``)."""
    return PillarTree(Path(salt_master.config["pillar_roots"]["base"][0]))


@pytest.fixture(scope="session")
def salt_cli(salt_master):
    """The master's ``salt`` CLI (``salt_cli.run(fun, *args, minion_tgt=..., **kwargs)``)."""
    return salt_master.salt_cli(timeout=120)


@pytest.fixture(scope="session")
def salt_run_cli(salt_master):
    """The master's ``salt-run`` CLI."""
    return salt_master.salt_run_cli(timeout=120)


# ---------------------------------------------------------------------------------------------
# Minions
# ---------------------------------------------------------------------------------------------
class KeptAliveMinion(SaltMinion):
    """A salt-minion started as its service starts it: ``salt-minion`` runs the minion in a
    child process and starts a new child whenever one exits asking to be restarted, as Salt
    3006's minion does after it gave up on a lost master (``master_tries``). salt-factories
    passes ``--disable-keepalive``, which turns such a minion into one that is gone."""

    def get_script_args(self):
        return [arg for arg in super().get_script_args() if arg != "--disable-keepalive"]


class MinionFactory:
    """Starts salt-minions attached to the session master.

    ``started(minion_id, ...)`` is a context manager that yields a started factories
    ``SaltMinion`` and on exit stops it and deletes its key on the master (so later
    ``salt '*'`` commands do not wait for it).
    """

    def __init__(self, salt_factories, salt_master, default_uri: str, overrides: dict,
                 tmp_path_factory):
        self.salt_factories = salt_factories
        self.salt_master = salt_master
        self.default_uri = default_uri
        self.overrides = overrides
        self._tmp = tmp_path_factory
        self._plain_python: Path | None = None
        self._managers: dict = {}  # python executable -> (FactoriesManager, its root)

    def config(self, uri="default", vmpower=None, beacons=None, overrides=None) -> dict:
        uri = self.default_uri if uri == "default" else uri
        return minion_config(uri, vmpower, beacons, _merge(self.overrides, overrides))

    def python_without_vmpower(self) -> Path:
        """The session's Python with Salt and libvirt-python but not vmpower (made once)."""
        if self._plain_python is None:
            started = time.monotonic()
            self._plain_python = python_without_vmpower(self._tmp.mktemp("no-vmpower") / "venv")
            TIMINGS.append(f"python without vmpower: made in {time.monotonic() - started:.2f} s")
        return self._plain_python

    def _manager_for(self, python: Path):
        """A second factories manager whose daemons and CLIs run ``python``, with a clean
        environment and a working directory outside the checkout, so that what they import
        is only what that Python has installed. Returns ``(manager, root_dir)``."""
        key = str(python)
        if key not in self._managers:
            from saltfactories.manager import FactoriesManager

            main = self.salt_factories
            # Daemon roots stay beside the main manager's, with a one-letter name: their
            # sockets' paths must fit AF_UNIX's 108 bytes.
            root = Path(main.root_dir) / ("p" if not self._managers else f"p{len(self._managers)}")
            cwd = self._tmp.mktemp("cwd")
            manager = FactoriesManager(
                root_dir=root,
                log_server_host=main.log_server_host,
                log_server_port=main.log_server_port,
                log_server_level=main.log_server_level,
                event_listener=main.event_listener,
                stats_processes=main.stats_processes,
                python_executable=str(python),
                code_dir=None,  # the default puts our site-packages first on sys.path
                inject_sitecustomize=False,
                cwd=cwd,
                environ=clean_environ(main.environ),
                start_timeout=main.start_timeout,
                slow_stop=main.slow_stop,
            )
            self._managers[key] = (manager, root)
        return self._managers[key]

    def create(self, minion_id: str, *, uri="default", vmpower: dict | None = None,
               beacons: dict | None = None, overrides: dict | None = None,
               entry_point: bool = True, python: Path | None = None, keepalive: bool = False):
        """A minion factory, not started. ``uri`` (``None``: leave ``vmpower:uri`` out of the
        config), ``vmpower`` (more of the minion's ``vmpower:`` section), ``beacons`` (the
        minion's ``beacons:`` setting, e.g. ``{"vmpower": beacon_config(uri=...)}``),
        ``overrides`` (any other minion config), ``entry_point=False``: run it with a Python
        that has Salt and libvirt-python but not vmpower (file_roots install path);
        ``python``: run it with that Python (e.g. one with vmpower installed from a wheel);
        ``keepalive=True``: run it as its service does, under Salt's keepalive parent, which
        starts the minion again when it exits to be restarted (salt-factories turns that off)."""
        config = self.config(uri, vmpower, beacons, overrides)
        # Every minion keeps its records in a store of its own, outside its cachedir (as the
        # default /var/lib/vmpower is), unless the test names one (a fleet's DSN).
        config.setdefault("vmpower", {}).setdefault(
            "store", str(Path(self.salt_factories.root_dir) / "stores" / minion_id / "records.sqlite"))
        if python is None and not entry_point:
            python = self.python_without_vmpower()
        factory_class = KeptAliveMinion if keepalive else SaltMinion
        if python is None:
            _check_socket_room(Path(self.salt_factories.root_dir), minion_id)
            return self.salt_master.salt_minion_daemon(minion_id, overrides=config,
                                                       factory_class=factory_class)
        manager, root = self._manager_for(Path(python))
        _check_socket_room(root, minion_id)
        return manager.salt_minion_daemon(minion_id, master=self.salt_master, overrides=config,
                                          factory_class=factory_class)

    @contextlib.contextmanager
    def started(self, minion_id: str, **kwargs) -> Iterator:
        """``create(...)`` and start it; stop it and delete its key on exit."""
        factory = self.create(minion_id, **kwargs)
        began = time.monotonic()
        try:
            with factory.started():
                TIMINGS.append(f"salt-minion {minion_id}: started in "
                               f"{time.monotonic() - began:.1f} s")
                yield factory
                began = time.monotonic()
            TIMINGS.append(f"salt-minion {minion_id}: stopped in "
                           f"{time.monotonic() - began:.1f} s")
        finally:
            self.salt_master.salt_key_cli().run("--yes", "--delete", minion_id)


@pytest.fixture(scope="session")
def minion_factory(salt_factories, salt_master, vmpower_uri, vmpower_minion_overrides,
                   tmp_path_factory) -> MinionFactory:
    """Start extra minions: ``with minion_factory.started("id", uri=..., beacons=...) as m:``."""
    return MinionFactory(salt_factories, salt_master, vmpower_uri, vmpower_minion_overrides,
                         tmp_path_factory)


@pytest.fixture(scope="session")
def salt_minion(minion_factory):
    """``vmpower-minion-1``: vmpower through its entry point, ``vmpower:uri`` = ``vmpower_uri``."""
    with minion_factory.started(MINION_1) as minion:
        yield minion


@pytest.fixture(scope="session")
def salt_minion_2(minion_factory):
    """``vmpower-minion-2``, configured like ``vmpower-minion-1`` (the "two minions" tests)."""
    with minion_factory.started(MINION_2) as minion:
        yield minion


@pytest.fixture(scope="session")
def salt_call_cli(salt_minion):
    """``salt-call`` for ``vmpower-minion-1``."""
    return salt_minion.salt_call_cli(timeout=120)


# ---------------------------------------------------------------------------------------------
# The real libvirtd (fixtures shared with tests/real, in tests/conftest.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def guest_prefix() -> str:
    """Guests of the daemon tests are ``vmpower-d-<test>-<kind>`` (see ``make_guest``)."""
    return "vmpower-d-"


@pytest.fixture(scope="module")
def beacon_minion(minion_factory, salt_master, libvirt_daemon, event_listener, tmp_path_factory):
    """``vmpower-minion-b``: the vmpower beacon on the real libvirtd (``qemu:///system``),
    configured in its minion config as a user would, with ``stop_grace`` = ``STOP_GRACE`` and
    no periodic sync during the run. Shared by the tests of one module and torn down with it:
    it acts on every guest of the libvirtd, so one that lived on would act on the guests of
    the modules after it (a wake-up sync of its own adopts a guest a test has just defined as
    stopped, and its reactor then powers the guest off when the test starts it). Handed out
    once its beacon has connected (its ``connected`` resync is on the master bus) and the two
    syncs the reactor runs for it (one for the minion's start event, one for that resync) have
    returned: on a loaded machine the second can come seconds later, and a sync running
    during a test acts on its guests. Each module's has a store of its own."""
    before = time.time()
    store = tmp_path_factory.mktemp("beacon-minion") / "records.sqlite"
    with minion_factory.started(
            BEACON_MINION, uri=DEFAULT_URI,
            vmpower={"sync_interval": NO_PERIODIC_SYNC, "stop_timeout": 30, "store": str(store),
                     "stop_grace": STOP_GRACE},
            beacons={"vmpower": beacon_config(uri=DEFAULT_URI, stop_grace=STOP_GRACE)}) as minion:
        wait_for_start_syncs(event_listener, salt_master.id, BEACON_MINION, before)
        yield minion
