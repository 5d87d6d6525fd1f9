"""The ``salt.loader`` entry point: where a pip-installed vmpower keeps its Salt modules.

An installed wheel carries ``_modules``, ``_beacons`` and ``_states`` inside this package
(``setup.cfg`` maps them); an editable or source checkout has them beside it. Either way they
are the same files that a file_roots install syncs with ``saltutil.sync_all``.

``library_versions`` tells a running minion's library from the one on disk after an upgrade.
"""

from __future__ import annotations

import os
import re

_HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = {"modules": "_modules", "beacons": "_beacons", "states": "_states",
         "returners": "_returners", "runners": "_runners"}


def _directory(kind: str, source: str = "") -> str:
    installed = os.path.join(_HERE, "salt", kind)
    if os.path.isdir(installed):
        return installed
    return os.path.join(os.path.dirname(_HERE), source or KINDS[kind])


def get_loader_dirs() -> dict:
    """Salt calls this for the directories of each kind of module vmpower provides."""
    return {kind: [_directory(kind)] for kind in KINDS}


def reactor_files() -> dict:
    """The reactor SLS files this installation ships (``_reactor``; in a wheel,
    ``vmpower/salt/reactor``), by name: what a pip-installed master's ``reactor:`` names."""
    directory = _directory("reactor", "_reactor")
    return {name: os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if name.endswith(".sls")}


# An upgrade through file_roots replaces the files under <extension_modules>/utils/vmpower, but
# a running minion keeps the library it imported in sys.modules (its beacon and event loop use
# it). Reloading it in place is not safe (libvirt's event loop can be registered only once per
# process, and the old beacon keeps running old code), so status says plainly when the files
# on disk are newer than the code that runs.
_VERSION_LINE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def _version_in(init_file: str) -> str | None:
    """The ``__version__`` written in a vmpower ``__init__.py``, read as text (never imported),
    or None if there is no such file."""
    try:
        with open(init_file, encoding="utf-8") as handle:
            found = _VERSION_LINE.search(handle.read())
    except OSError:
        return None
    return found.group(1) if found else "unknown"


def library_versions(extension_modules: str | None) -> dict:
    """The vmpower library this process runs next to the one synced to this minion.

    ``version`` is the library in ``sys.modules`` (what runs), ``synced_version`` the one in
    ``<extension_modules>/utils/vmpower`` (what ``saltutil.sync_all`` last brought; None if
    nothing was synced), ``installed_version`` the one now on disk where the running library
    was imported from (a pip upgrade changes it). ``restart_needed`` is True when the files on
    disk hold another version than the one running; ``restart`` then says so in words.
    """
    import vmpower  # the one in sys.modules: what this process really runs

    running = vmpower.__version__
    running_from = os.path.dirname(os.path.abspath(vmpower.__file__))
    synced_dir = os.path.join(extension_modules, "utils", "vmpower") if extension_modules else None
    synced = _version_in(os.path.join(synced_dir, "__init__.py")) if synced_dir else None
    installed = _version_in(os.path.join(running_from, "__init__.py"))
    result = {"version": running, "running_from": running_from, "synced_version": synced,
              "installed_version": installed, "restart_needed": False}
    on_disk = [("synced", synced)]
    if synced_dir is None or os.path.abspath(synced_dir) != running_from:
        on_disk.append(("installed", installed))  # else it is the synced one, said once
    stale = [f"{what} {version}" for what, version in on_disk if version is not None and version != running]
    if stale:
        result["restart_needed"] = True
        result["restart"] = (f"this minion runs vmpower {running}, but {' and '.join(stale)}: "
                             f"restart the salt-minion for the new version to take effect")
    return result
