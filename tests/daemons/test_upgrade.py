"""An upgrade through file_roots reaches a running minion, or ``vmpower.status`` says it has not.

A real salt-minion with no vmpower installed (the file_roots install path) and the vmpower
beacon configured, so that its main process imports the library, as every production minion
with the beacon does. The master then serves a changed library (``_utils/vmpower/__init__.py``
with another ``__version__``, from the first file root, which wins over the repository's);
``saltutil.sync_all`` brings it, and ``vmpower.status`` in the running minion reports the
version it runs next to the version synced, and that a restart is needed, until the minion is
restarted.
"""

from __future__ import annotations

import re
import shutil

import pytest

import vmpower

from .helpers import REPO_ROOT, TEST_URI, beacon_config, minion_return, salt_call, salt_cmd

MINION = "vmpower-upgrade"
NEW = f"{vmpower.__version__}+upgraded"


@pytest.fixture
def changed_library(state_tree):
    """``changed_library()`` makes the master serve ``_utils/vmpower/__init__.py`` with
    ``__version__ = NEW`` (the rest of the library stays the repository's); removed after."""
    target = state_tree / "_utils" / "vmpower" / "__init__.py"

    def change():
        text = (REPO_ROOT / "vmpower" / "__init__.py").read_text()
        changed, count = re.subn(r'^__version__ = "[^"]+"', f'__version__ = "{NEW}"', text,
                                 flags=re.MULTILINE)
        assert count == 1
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(changed)

    yield change
    shutil.rmtree(state_tree / "_utils", ignore_errors=True)


def _status(salt_master):
    return minion_return(salt_cmd(salt_master, MINION, "vmpower.status"), MINION)


def test_a_synced_upgrade_is_reported_until_the_minion_restarts(salt_master, minion_factory,
                                                                 changed_library):
    with minion_factory.started(MINION, uri=TEST_URI, entry_point=False,
                                beacons={"vmpower": beacon_config(uri=TEST_URI)}) as minion:
        synced = minion_return(salt_cmd(salt_master, MINION, "saltutil.sync_all"), MINION)
        assert any(name.startswith("utils.vmpower") for name in synced["utils"]), synced
        before = _status(salt_master)
        assert (before["version"], before["synced_version"], before["restart_needed"]) == (
            vmpower.__version__, vmpower.__version__, False), before
        assert before["running_from"].endswith("/extmods/utils/vmpower"), before

        changed_library()
        synced = minion_return(salt_cmd(salt_master, MINION, "saltutil.sync_all"), MINION)
        assert "utils.vmpower.__init__" in synced["utils"], synced
        after = _status(salt_master)
        assert (after["version"], after["synced_version"], after["restart_needed"]) == (
            vmpower.__version__, NEW, True), after
        assert after["restart"] == (f"this minion runs vmpower {vmpower.__version__}, but synced "
                                    f"{NEW}: restart the salt-minion for the "
                                    f"new version to take effect"), after
        # A new process (salt-call) imports the synced library: only the daemon is behind.
        fresh = salt_call(minion, "vmpower.status")
        assert (fresh["version"], fresh["restart_needed"]) == (NEW, False), fresh

        minion.terminate()
        minion.start()
        restarted = _status(salt_master)
        assert (restarted["version"], restarted["synced_version"], restarted["restart_needed"]) == (
            NEW, NEW, False), restarted
        assert "restart" not in restarted
