"""The ``salt.loader`` entry point: where a pip-installed vmpower keeps its Salt modules.

An installed wheel carries ``_modules``, ``_beacons`` and ``_states`` inside this package
(``setup.cfg`` maps them); an editable or source checkout has them beside it. Either way they
are the same files that a file_roots install syncs with ``saltutil.sync_all``.
"""

import os

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
