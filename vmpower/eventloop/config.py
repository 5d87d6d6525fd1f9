"""The beacon's configuration as Salt hands it over, made into the core's BeaconSettings.

Salt passes a beacon its configuration as a list of one-key mappings; Salt's own
``salt.utils.beacons.list_to_dict`` merges it (3006 and 3008 have it), and the core
(``vmpower.core.settings``) validates the mapping. The STOPPED grace in effect is the
beacon's own ``stop_grace``, else ``vmpower:stop_grace`` (minion config, then pillar), else
Nova's 15 s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmpower.core import settings as core


def as_mapping(config: Any) -> Any:
    """Salt's list of one-key mappings as one mapping (``keepalive`` too); anything else as is,
    for the core to refuse by name."""
    from salt.utils.beacons import list_to_dict

    if isinstance(config, (list, tuple)) and all(isinstance(item, Mapping) for item in config):
        config = list_to_dict(config)
    if isinstance(config, Mapping):
        keepalive = config.get("keepalive")
        if isinstance(keepalive, (list, tuple)) and keepalive \
                and all(isinstance(item, Mapping) for item in keepalive):
            config = {**config, "keepalive": list_to_dict(keepalive)}
    return config


def parse(config: Any) -> core.BeaconSettings:
    """Validate what Salt passes to ``validate()`` and ``beacon()``; ConfigError names the key."""
    return core.parse_beacon_config(as_mapping(config))


def stop_grace_default(opts: Mapping | None) -> float:
    """``vmpower:stop_grace`` for this minion (pillar over minion config), or the default."""
    if not opts:
        return core.DEFAULT_STOP_GRACE
    from vmpower import minion

    return core.stop_grace(minion.merged_settings(opts, keys=("stop_grace",)))
