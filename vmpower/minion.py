"""How a Salt minion's modules get their HostOperations: settings, store and identity.

The execution module and the state module both come through here, so the place of the store,
the merging of minion config with pillar and the errors Salt shows are decided once.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Mapping

from vmpower.core.settings import ConfigError, Settings, parse_settings
from vmpower.hypervisor import HypervisorError
from vmpower.operations import HostOperations, OperationError
from vmpower.store import Store, StoreError

# Everything vmpower raises on purpose; its message is meant for the operator as it is.
ERRORS = (ConfigError, StoreError, HypervisorError, OperationError)


def settings(config_get: Callable) -> Settings:
    """``vmpower:`` from minion config, grains and pillar, merged (pillar wins)."""
    return parse_settings(config_get("vmpower", default={}, merge="recurse"))


def store_path(opts: Mapping, current: Settings) -> str:
    return current.store or os.path.join(opts["cachedir"], "vmpower", "records.sqlite")


def event_loop_status_path(opts: Mapping) -> str:
    return os.path.join(opts["cachedir"], "vmpower", "eventloop.json")


@contextlib.contextmanager
def operations(opts: Mapping, config_get: Callable) -> Iterator[HostOperations]:
    """HostOperations for this minion, with its store open for the length of the block."""
    current = settings(config_get)
    with Store(store_path(opts, current)) as store:
        yield HostOperations(current, opts["id"], store)
