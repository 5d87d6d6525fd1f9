"""vmpower's settings from minion config and pillar (``vmpower:``), validated.

Errors name the exact key and what was wrong. A bad global setting stops the whole call; a bad
``instances:<vm>`` entry only takes that VM out of vmpower's hands (it is reported as skipped).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vmpower.core.model import VmState, parse_enum

DEFAULT_URI = "qemu:///system"
DEFAULT_STOP_TIMEOUT = 60.0  # Nova's shutdown_timeout default
DEFAULT_SYNC_INTERVAL = 600  # Nova's sync_power_state_interval default
DEFAULT_RESTART_LIMIT = 5
DEFAULT_RESTART_BACKOFF = 10.0
MAX_RESTART_BACKOFF = 600.0
DEFAULT_STOP_GRACE = 15.0  # Nova's hard-coded delay before it believes a VM went off

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


class ConfigError(ValueError):
    """Configuration or pillar that vmpower cannot act on; the message says what and where."""


class OnGuestShutdown(str, enum.Enum):
    STOP = "stop"
    RESTART = "restart"
    IGNORE = "ignore"


class OnCrash(str, enum.Enum):
    STOP = "stop"
    RESTART = "restart"


class OnHostShutdown(str, enum.Enum):
    """What a shutdown the host asked for means (libvirt-guests, ``virsh shutdown``, a reboot).

    ``ignore`` (default): record the power state, keep vm_state, never act, so the VM is in
    sync again when libvirt-guests or autostart brings it back (Nova bug 1444630: the host's
    own shutdown is not the operator's intent). ``stop``: take it as the operator's intent,
    as a guest shutdown under ``on_guest_shutdown: stop`` is (vm_state=stopped).
    """

    IGNORE = "ignore"
    STOP = "stop"


@dataclasses.dataclass(frozen=True)
class InstancePolicy:
    """Pillar ``vmpower:instances:<name or uuid>``: the operator's word on one VM."""

    vm_state: VmState | None = None
    task_state: str = ""
    managed: bool = True
    on_guest_shutdown: OnGuestShutdown = OnGuestShutdown.STOP
    on_crash: OnCrash = OnCrash.STOP
    on_host_shutdown: OnHostShutdown = OnHostShutdown.IGNORE


DEFAULT_POLICY = InstancePolicy()


@dataclasses.dataclass(frozen=True)
class Settings:
    uri: str = DEFAULT_URI
    store: str = ""  # empty: SQLite in the minion's cachedir
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    sync_interval: int = DEFAULT_SYNC_INTERVAL
    restart_limit: int = DEFAULT_RESTART_LIMIT
    restart_backoff: float = DEFAULT_RESTART_BACKOFF
    stop_grace: float = DEFAULT_STOP_GRACE
    # ``vmpower:instances``, by instance key (``instance_key``: a UUID in libvirt's spelling,
    # or a name as written): the policy of each key's entries, or why they are bad, and the
    # entries as written, for a VM named by two keys (its UUID and its name).
    instances: Mapping[str, InstancePolicy] = dataclasses.field(default_factory=dict)
    instance_errors: Mapping[str, str] = dataclasses.field(default_factory=dict)
    instance_entries: Mapping[str, tuple[tuple[str, Any], ...]] = dataclasses.field(
        default_factory=dict)
    mode: str = "enforce"  # vmpower:mode: enforce, or observe (record and report, never act)
    # The policies of VMs named by two keys, combined once per Settings (a sync asks per VM).
    _combined: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def policy_for(self, uuid: str, name: str) -> tuple[InstancePolicy, str | None]:
        """The policy for one domain: every ``vmpower:instances`` entry that names it, by its
        UUID in any spelling or by its name, combined (``combine_entries``).

        Returns ``(policy, error)``; when ``error`` is set the pillar for this VM is bad, or
        two of its entries disagree, and nothing may be done to it.
        """
        if not self.instances and not self.instance_errors:
            return DEFAULT_POLICY, None  # the common case, asked once per VM by every sync
        entries = self.instance_entries
        if uuid not in entries and _maybe_other_spelling(uuid):
            uuid = instance_key(uuid)
        if name not in entries and _maybe_other_spelling(name):
            name = instance_key(name)
        by_uuid, by_name = uuid in entries, name in entries and name != uuid
        if by_uuid and by_name:
            pair = (uuid, name)
            combined = self._combined.get(pair)
            if combined is None:
                combined = self._combined[pair] = combine_entries(entries[uuid] + entries[name])
            return combined
        key = uuid if by_uuid else name if by_name else None
        if key is None:
            return DEFAULT_POLICY, None
        if key in self.instance_errors:
            return DEFAULT_POLICY, self.instance_errors[key]
        return self.instances[key], None

    def restart_delay(self, restarts_so_far: int) -> float:
        """Seconds to wait before the next automatic restart: none for the first, then doubling."""
        if restarts_so_far <= 0:
            return 0.0
        return min(self.restart_backoff * 2 ** (restarts_so_far - 1), MAX_RESTART_BACKOFF)


def _number(raw: Mapping, key: str, default, kind, minimum, where: str = "vmpower") -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}:{key} must be a number, not {value!r}")
    if kind is int and value != int(value):
        raise ConfigError(f"{where}:{key} must be a whole number, not {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}:{key} must be at least {minimum}, not {value!r}")
    return kind(value)


def _string(raw: Mapping, key: str, default: str, where: str = "vmpower") -> str:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}:{key} must be a non-empty string, not {value!r}")
    return value


POSTGRES_SCHEMES = ("postgresql", "postgres")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_KEYWORD_DSN_RE = re.compile(r"^\s*(host|hostaddr|dbname|user|port|service)\s*=")


def store_scheme(store: str) -> str | None:
    """The scheme of a DSN (``postgresql`` for ``postgresql://...``), lowercased; None for a path."""
    match = _SCHEME_RE.match(store)
    return match.group(1).lower() if match else None


def _store(raw: Mapping) -> str:
    """A SQLite file path, or a PostgreSQL DSN; empty for SQLite in the minion's cachedir."""
    if raw.get("store") in (None, ""):
        return ""
    store = _string(raw, "store", "")
    scheme = store_scheme(store)
    if scheme is not None and scheme not in POSTGRES_SCHEMES:
        # A DSN must not be mistaken for a file name.
        raise ConfigError(f"vmpower:store must be the path of a SQLite file or a postgresql:// DSN; "
                          f"{scheme}:// stores are not supported")
    if scheme is None and _KEYWORD_DSN_RE.match(store):
        raise ConfigError("vmpower:store: write a PostgreSQL connection as a URI, "
                          "postgresql://user@host/dbname, not as keyword=value pairs")
    return store


INSTANCE_KEYS = ("vm_state", "task_state", "managed", "on_guest_shutdown", "on_crash",
                 "on_host_shutdown")


def parse_instance(key: str, raw: Any, where: str | None = None) -> InstancePolicy:
    """Validate one ``vmpower:instances:<key>`` entry; ``where`` names it in errors instead
    (entries of one VM merged)."""
    where = where or f"vmpower:instances:{key}"
    if raw is None:
        return DEFAULT_POLICY
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, not {type(raw).__name__}")
    unknown = sorted(set(raw) - set(INSTANCE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(INSTANCE_KEYS)}")
    try:
        vm_state = None if raw.get("vm_state") is None else parse_enum(
            VmState, raw["vm_state"], f"{where}:vm_state")
        on_guest_shutdown = parse_enum(OnGuestShutdown, raw.get("on_guest_shutdown", "stop"),
                                       f"{where}:on_guest_shutdown")
        on_crash = parse_enum(OnCrash, raw.get("on_crash", "stop"), f"{where}:on_crash")
        on_host_shutdown = parse_enum(OnHostShutdown, raw.get("on_host_shutdown", "ignore"),
                                      f"{where}:on_host_shutdown")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    task_state = raw.get("task_state") or ""
    if not isinstance(task_state, str):
        raise ConfigError(f"{where}:task_state must be a string, not {task_state!r}")
    managed = raw.get("managed", True)
    if not isinstance(managed, bool):
        raise ConfigError(f"{where}:managed must be true or false, not {managed!r}")
    if vm_state is VmState.ACTIVE:
        # A VM pinned active must run: restarting it is the pin's meaning, not a policy.
        for field, value in (("on_guest_shutdown", raw.get("on_guest_shutdown")),
                             ("on_crash", raw.get("on_crash"))):
            if value not in (None, "restart"):
                raise ConfigError(f"{where}: vm_state active means the VM is restarted, "
                                  f"so {field}: {value} contradicts it")
        if on_host_shutdown is OnHostShutdown.STOP:
            # Pinned active: a host's shutdown never makes it stopped; the host brings it back.
            raise ConfigError(f"{where}: vm_state active means the VM must run, so "
                              f"on_host_shutdown: stop contradicts it")
        on_guest_shutdown, on_crash = OnGuestShutdown.RESTART, OnCrash.RESTART
    return InstancePolicy(vm_state, task_state, managed, on_guest_shutdown, on_crash,
                          on_host_shutdown)


def instance_key(key: str) -> str:
    """The key under which a ``vmpower:instances`` entry is filed: a UUID in libvirt's spelling
    (lower case, dashed), however it was written; a name as it is."""
    if UUID_RE.match(key.strip()):
        return normalize_uuid(key)
    return key


def _maybe_other_spelling(key: str) -> bool:
    """Whether ``key`` may be a UUID in another spelling than libvirt's: 32 characters, or 36
    not all lower case. A sync asks it for every VM's UUID and name: a length and a case
    test, where a regular expression would cost several times more."""
    return len(key) == 32 or (len(key) == 36 and not key.islower())


def _unset(field: str, value: Any) -> bool:
    # What parse_instance reads as not given: null, and an empty task_state (no lock).
    return value is None or (field == "task_state" and not value)


def combine_entries(entries: Sequence[tuple[str, Any]]) -> tuple[InstancePolicy, str | None]:
    """One VM's policy from the ``vmpower:instances`` entries that name it, as
    ``(key as written, entry)`` pairs: ``(policy, error)`` as ``Settings.policy_for`` gives it.

    A bad entry makes the VM's pillar bad, whichever key it is under. Entries that agree are
    merged key by key, so a lock (``task_state``) in either holds. Entries that give one
    setting two values leave the VM out of vmpower's hands, with an error naming both keys:
    vmpower cannot tell which the operator meant.
    """
    policies, errors = [], []
    for key, raw in entries:
        try:
            policies.append(parse_instance(key, raw))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        return DEFAULT_POLICY, "; ".join(errors)
    if len(entries) == 1:
        return policies[0], None
    merged: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    conflicts = []
    for key, raw in entries:
        for field, value in (raw or {}).items():
            if _unset(field, value):
                continue
            if field not in merged:
                merged[field], given_by[field] = value, key
            elif merged[field] != value:
                conflicts.append(f"{field} is {merged[field]} under vmpower:instances:"
                                 f"{given_by[field]} but {value} under vmpower:instances:{key}")
    named = [f"vmpower:instances:{key}" for key, _ in entries]
    where = f"{', '.join(named[:-1])} and {named[-1]}"
    if conflicts:
        return DEFAULT_POLICY, (f"{where} name the same VM and disagree: {'; '.join(conflicts)}; "
                                f"nothing is done to it until they agree")
    try:
        return parse_instance(where, merged, where), None
    except ConfigError as exc:
        return DEFAULT_POLICY, f"{exc} (merged, as they name the same VM)"


def merge(*layers: Any) -> Any:
    """Layers of ``vmpower:`` settings merged key by key, the last layer winning.

    Minion config first, then pillar: pillar is where operators say what they want per VM.
    A layer that is not a mapping replaces what came before, so its error is still reported.
    """
    merged: Any = None
    for layer in layers:
        if layer is None:
            continue
        if isinstance(merged, Mapping) and isinstance(layer, Mapping):
            merged = {**merged, **{key: merge(merged.get(key), value) for key, value in layer.items()}}
        else:
            merged = layer
    return merged


def _settings_mapping(raw: Mapping | None) -> Mapping:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"vmpower must be a mapping, not {type(raw).__name__}")
    return raw


def stop_grace(raw: Mapping | None) -> float:
    """``vmpower:stop_grace`` of the merged settings, validated as ``parse_settings`` does, and
    nothing else read (the beacon asks for it at every tick)."""
    return _number(_settings_mapping(raw), "stop_grace", DEFAULT_STOP_GRACE, float, 0)


def parse_settings(raw: Mapping | None) -> Settings:
    """Validate the merged ``vmpower:`` settings; raise ConfigError on a bad global key."""
    raw = _settings_mapping(raw)
    instances_raw = raw.get("instances") or {}
    if not isinstance(instances_raw, Mapping):
        raise ConfigError(f"vmpower:instances must be a mapping of VM name or UUID to settings, "
                          f"not {type(instances_raw).__name__}")
    # Every spelling of one UUID is filed under the same key, and its entries are combined.
    entries: dict[str, list[tuple[str, Any]]] = {}
    for key, value in instances_raw.items():
        key = str(key)
        entries.setdefault(instance_key(key), []).append((key, value))
    instances: dict[str, InstancePolicy] = {}
    errors: dict[str, str] = {}
    for key, written in entries.items():
        policy, error = combine_entries(written)
        if error is None:
            instances[key] = policy
        else:
            errors[key] = error
    return Settings(
        uri=_string(raw, "uri", DEFAULT_URI),
        store=_store(raw),
        stop_timeout=_number(raw, "stop_timeout", DEFAULT_STOP_TIMEOUT, float, 0),
        sync_interval=_number(raw, "sync_interval", DEFAULT_SYNC_INTERVAL, int, 1),
        restart_limit=_number(raw, "restart_limit", DEFAULT_RESTART_LIMIT, int, 0),
        restart_backoff=_number(raw, "restart_backoff", DEFAULT_RESTART_BACKOFF, float, 0),
        stop_grace=stop_grace(raw),
        instances=instances,
        instance_errors=errors,
        instance_entries={key: tuple(written) for key, written in entries.items()},
        mode=_mode(raw.get("mode")),
    )


def _mode(raw: Any) -> str:
    from vmpower.core.conduct import parse_mode  # vmpower:mode; conduct imports this module

    return parse_mode(raw)


def normalize_uuid(value: Any) -> str:
    """A UUID in libvirt's canonical dashed lowercase form, or ConfigError naming the value."""
    if not isinstance(value, str) or not UUID_RE.match(value.strip()):
        raise ConfigError(f"{value!r} is not a UUID (expected 8-4-4-4-12 hexadecimal digits)")
    digits = value.strip().replace("-", "").lower()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


# The beacon's configuration (``beacons:vmpower``), as Salt passes it to validate() and beacon()
# once the beacon's shell has turned Salt's list of one-key mappings into one mapping.
# (DEFAULT_STOP_GRACE, at the top, is the beacon's default too: vmpower:stop_grace.)
DEFAULT_QUEUE_SIZE = 10000
DEFAULT_KEEPALIVE_INTERVAL = 5
DEFAULT_KEEPALIVE_COUNT = 3
# More lifecycle events than this within one second are a storm: one resync (reason burst)
# answers them instead of one job each. A host booting 20 VMs at once still gets per-VM events.
DEFAULT_BURST_LIMIT = 40
BEACON_KEYS = ("uri", "stop_grace", "queue_size", "keepalive", "immediate", "burst_limit")
KEEPALIVE_KEYS = ("interval", "count")
# Keys Salt itself reads from, or adds to, every beacon's configuration.
SALT_BEACON_KEYS = ("enabled", "interval", "disable_during_state_run", "run_once", "beacon_module",
                    "_beacon_name")


@dataclasses.dataclass(frozen=True)
class BeaconSettings:
    """The ``vmpower`` beacon's configuration; ``name`` is the beacon's name in Salt's config.

    ``stop_grace`` None means the beacon has none of its own: ``vmpower:stop_grace`` applies.
    ``immediate``: fire events through the minion's event bus as they happen (False: only
    through ``beacon()``'s tick). ``interval`` is Salt's own key (seconds between runs).
    """

    name: str = "vmpower"
    uri: str = DEFAULT_URI
    stop_grace: float | None = None
    queue_size: int = DEFAULT_QUEUE_SIZE
    keepalive_interval: int = DEFAULT_KEEPALIVE_INTERVAL
    keepalive_count: int = DEFAULT_KEEPALIVE_COUNT
    immediate: bool = True
    burst_limit: int = DEFAULT_BURST_LIMIT
    interval: float = 0.0

    def grace(self, default: float = DEFAULT_STOP_GRACE) -> float:
        """The STOPPED grace in effect: the beacon's own, else ``default`` (vmpower:stop_grace)."""
        return default if self.stop_grace is None else self.stop_grace


def _mapping(raw: Any, where: str, expected: str) -> Mapping:
    if isinstance(raw, Mapping):
        return raw
    raise ConfigError(f"{where} must be {expected}, not {raw!r}")


def _known_keys(raw: Mapping, known: tuple[str, ...], where: str, allowed: tuple[str, ...] = ()) -> None:
    unknown = sorted(str(key) for key in raw if key not in known and key not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")


def _keepalive(value: Any, where: str) -> tuple[int, int]:
    where = f"{where}:keepalive"
    if value is None:
        return DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_COUNT
    if isinstance(value, (list, tuple)) and len(value) == 2 \
            and not any(isinstance(item, Mapping) for item in value):
        value = dict(zip(KEEPALIVE_KEYS, value))  # the [interval, count] pair
    raw = _mapping(value, where, "a mapping of interval and count, or a list [interval, count]")
    _known_keys(raw, KEEPALIVE_KEYS, where)
    return (_number(raw, "interval", DEFAULT_KEEPALIVE_INTERVAL, int, 1, where),
            _number(raw, "count", DEFAULT_KEEPALIVE_COUNT, int, 0, where))


def _flag(raw: Mapping, key: str, default: bool, where: str) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}:{key} must be true or false, not {value!r}")
    return value


def parse_beacon_config(raw: Any) -> BeaconSettings:
    """Validate the ``vmpower`` beacon's configuration; raise ConfigError naming the bad key.

    ``raw`` is one mapping (the beacon's shell merges Salt's list of one-key mappings with
    Salt's own list_to_dict first). Salt's own keys (``interval``, ``disable_during_state_run``...)
    are allowed and left to Salt.
    """
    raw = _mapping({} if raw is None else raw, "beacons:vmpower",
                   "a list of mappings (" + ", ".join(BEACON_KEYS) + ")")
    name = str(raw.get("_beacon_name") or "vmpower")
    where = f"beacons:{name}"
    _known_keys(raw, BEACON_KEYS, where, SALT_BEACON_KEYS)
    interval, count = _keepalive(raw.get("keepalive"), where)
    stop_grace = None if raw.get("stop_grace") is None else _number(
        raw, "stop_grace", DEFAULT_STOP_GRACE, float, 0, where)
    return BeaconSettings(
        name=name,
        uri=_string(raw, "uri", DEFAULT_URI, where),
        stop_grace=stop_grace,
        queue_size=_number(raw, "queue_size", DEFAULT_QUEUE_SIZE, int, 1, where),
        keepalive_interval=interval,
        keepalive_count=count,
        immediate=_flag(raw, "immediate", True, where),
        burst_limit=_number(raw, "burst_limit", DEFAULT_BURST_LIMIT, int, 0, where),
        # Salt's key: the beacon runs at most every interval seconds; it paces the idle check.
        interval=_number(raw, "interval", 0, float, 0, where),
    )
