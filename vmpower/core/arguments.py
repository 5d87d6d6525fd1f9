"""Checks for arguments that arrive from the command line, states and events.

Salt passes CLI arguments through YAML, so ``force=yes`` arrives as True and ``timeout=10`` as
10; anything else of the wrong type is refused with a message naming the argument.
"""

from __future__ import annotations

import math
from typing import Any

from vmpower.core.model import Transition, VmState, parse_enum
from vmpower.core.settings import ConfigError, normalize_uuid


def target(value: Any, what: str = "name") -> str:
    """A domain name or UUID."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ConfigError(f"{what} must be a domain name or UUID, not {value!r}")
    return str(value).strip()


def uuid(value: Any) -> str:
    return normalize_uuid(value)


def seconds(value: Any, what: str) -> float | None:
    """A non-negative number of seconds, or None for the default."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ConfigError(f"{what} must be a number of seconds (0 or more), not {value!r}")
    return float(value)


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, not {value!r}")
    return value


def count(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a whole number of at least 1, not {value!r}")
    return value


def transition(value: Any) -> Transition | None:
    if value is None or value == "":
        return None
    try:
        return parse_enum(Transition, value, "transition")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def seq(value: Any) -> int | None:
    """An event's ``seq``: a whole number of at least 1 (digits from the reactor), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"seq must be an event's sequence number (a whole number of at least "
                          f"1), not {value!r}")
    return value


def vm_state(value: Any) -> VmState | None:
    if value is None or value == "":
        return None
    try:
        return parse_enum(VmState, value, "vm_state")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def word(value: Any, what: str) -> str:
    """A short word such as an event's reason (``host_shutdown``); "" for none."""
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 64 or not value.replace("_", "").isalnum() \
            and value != "":
        raise ConfigError(f"{what} must be a word such as host_shutdown, not {value!r}")
    return value
