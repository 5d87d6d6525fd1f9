"""Fixtures shared by every test directory."""

import pytest
import salt._logging
import salt.config
import salt.loader


@pytest.fixture(autouse=True, scope="session")
def no_deferred_salt_console_log():
    """Importing Salt installs a temporary root log handler that keeps warnings until the process
    exits and then writes them to pytest's stderr, closed by then ("--- Logging error ---").
    A minion replaces it when it configures logging; the tests log warnings on purpose."""
    salt._logging.shutdown_temp_handler()


class LoadedMinion:
    """A minion's execution and state modules loaded by Salt's own loader, in this process."""

    def __init__(self, root, uri, pillar=None, test=False, **vmpower):
        opts = salt.config.minion_config(None)
        opts.update(id="loader-minion", file_client="local", cachedir=str(root / "cache"),
                    pki_dir=str(root / "pki"), extension_modules=str(root / "extmods"),
                    vmpower={"uri": uri, **vmpower}, pillar=pillar or {}, test=test)
        self.opts = opts
        utils = salt.loader.utils(opts)
        self.functions = salt.loader.minion_mods(opts, utils=utils)
        self._utils = utils

    @property
    def states(self):
        return salt.loader.states(self.opts, self.functions, self._utils,
                                  salt.loader.serializers(self.opts))

    @property
    def store_path(self):
        return f"{self.opts['cachedir']}/vmpower/records.sqlite"


@pytest.fixture
def load_minion(tmp_path):
    """``load_minion(uri, pillar=None, test=False, **vmpower_settings)`` -> LoadedMinion.

    Every call in one test shares the same cachedir, so records persist between loads.
    """
    def load(uri, pillar=None, test=False, **vmpower):
        return LoadedMinion(tmp_path, uri, pillar, test, **vmpower)
    return load
