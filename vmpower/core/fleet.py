"""The fleet's view, decided purely: which bus events are vmpower's and who sent them, what a
fleet report says about each VM and each host, and the master-side settings.

No Salt, no database: the returner and the runner (``vmpower/fleet.py``) read and write, and
ask this module what the data means.

Who vouches for an event. Nothing on the master's bus says which minion made the master fire
an event: a minion's beacon batch (``events`` in its ``_minion_event`` load) fires any tag it
likes (``salt/job/<jid>/ret/<another minion>`` included) with any data, exactly as the master
fires a job return it took over the request channel. Salt also builds job returns for any
minion id out of one minion's ``_syndic_return`` (and, on 3008, its ``resource_id``). Salt's
own ``minion_sign_messages`` signature does not survive the trip either: a minion's job
process hands its return to the minion's main process over the minion's event bus, which
stamps ``_stamp`` into the load before it is signed, and the master's bus overwrites
``_stamp``. What no other minion can make is a signature by a minion's key over the return
itself, so vmpower's ``sync`` and ``reconcile`` seal their results (``seal_message``, under
``SEAL``) with the minion's Salt key, and:

- a fact about minion M is a job return whose tag and ``id`` name M and whose return carries
  M's seal, as the master's key for M verifies it (``signed_by(M, message, signature)``, which
  the returner asks of the master's ``pki_dir``);
- anything else is kept as a claim (``authenticated=False``), under the sender it claims (the
  ``id`` of an ``event.send``-shaped load, else the tag's ``<minion id>``), and marked
  ``forged`` where the tag, the load and the data name different minions. Beacon events are
  always claims: they only trigger the reactor, whose sealed returns are the facts.

Only facts say that a host synced and how its event loop is (``FleetStore.add``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vmpower.core.model import Transition, drifting
from vmpower.core.settings import UUID_RE, ConfigError

# What the fleet store keeps, by kind.
LIFECYCLE, RESYNC, RECONCILE, SYNC, JOB = "lifecycle", "resync", "reconcile", "sync", "job"
KINDS = (LIFECYCLE, RESYNC, RECONCILE, SYNC, JOB)

_BEACON_TAG = re.compile(r"^salt/beacon/(?P<minion>[^/]+)/vmpower/(?P<rest>.+)$")
_JOB_RET_TAG = re.compile(r"^salt/job/(?P<jid>[^/]+)/ret/(?P<minion>[^/]+)$")
_TRANSITIONS = frozenset(t.value for t in Transition)

DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_STUCK_AFTER = 900.0  # a task_state older than this (seconds) is reported stuck
DEFAULT_FLEET_STORE = "/var/lib/vmpower/fleet.sqlite"
# A host with no sync the master could vouch for (see the module docstring), and what to do.
NO_SYNC = "no authenticated sync (no sealed vmpower.sync return from this minion reached the master)"
# The key of a job's return under which vmpower's module puts its seal: {"at", "sig"}.
SEAL = "vmpower_seal"
SEAL_ALGORITHM = "PKCS1v15-SHA224"  # one that Salt 3006 and 3008 both sign and verify with


@dataclasses.dataclass(frozen=True)
class FleetEvent:
    """One vmpower event or job result, as the fleet store keeps it.

    ``minion`` is the sender (see the module docstring); ``authenticated`` says whether the
    master's key for it vouches for the event (a fact) or it is the sender's claim. ``data`` is
    the event's own data, kept whole as ``data_json``. An event that a store cannot keep
    (a key of its data that is not a string, a NUL character in a text) raises Malformed.
    """

    at: float
    minion: str
    kind: str
    tag: str
    authenticated: bool
    uuid: str = ""
    name: str = ""
    transition: str = ""
    reason: str = ""
    forged: bool = False
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_json: str = ""

    def __post_init__(self) -> None:
        for field in ("minion", "tag", "uuid", "name", "transition", "reason"):
            if "\x00" in getattr(self, field):
                # PostgreSQL's text cannot hold it: the whole batch's write would fail.
                raise Malformed(f"{self.tag!r}: its {field} holds a NUL character")
        if not self.data_json:
            object.__setattr__(self, "data_json", _encoded(self.tag, self.data))


class Malformed(ValueError):
    """A vmpower event that cannot be kept as it is; the message says what is wrong."""


def _encoded(tag: str, data: Mapping) -> str:
    """``data`` as the store keeps it (JSON); Malformed naming a key that is not a string."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:  # not recursive: a deeply nested event must not blow the returner's stack
        value, path = stack.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise Malformed(f"{tag!r}: the key {key!r} of its data{path and ' at ' + path} is not a string")
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
    try:
        return json.dumps(data, default=str, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise Malformed(f"{tag!r}: its data cannot be kept as JSON: {exc}") from exc


def seal_message(minion: str, ret: Mapping, at: float) -> bytes:
    """What a minion signs of its job's return ``ret`` (the seal left out): canonical JSON,
    the same after Salt's msgpack round trips, of who, when and what."""
    body = {k: v for k, v in ret.items() if k != SEAL}
    return json.dumps(
        {"minion": minion, "at": at, "return": body}, sort_keys=True, separators=(",", ":"), default=str
    ).encode()


# Whether ``signature`` is ``minion``'s over ``message``, as the master's key for that minion
# verifies it. The returner asks the master (vmpower.fleet.signature_check).
SignedBy = Callable[[str, bytes, str], bool]


def unsigned(minion: str, message: bytes, signature: str) -> bool:  # pylint: disable=unused-argument
    """The ``SignedBy`` of a master that verifies nothing: every event is a claim."""
    return False


def sealed_at(minion: str, data: Mapping, signed_by: SignedBy) -> float | None:
    """When ``minion`` sealed the return in a job return's ``data``; None unless its seal
    verifies (a claim)."""
    ret = data.get("return")
    seal = ret.get(SEAL) if isinstance(ret, Mapping) else None
    if not isinstance(seal, Mapping) or not _number(seal.get("at")) or not isinstance(seal.get("sig"), str):
        return None
    try:
        message = seal_message(minion, ret, seal["at"])
    except (TypeError, ValueError, RecursionError):
        return None
    return float(seal["at"]) if signed_by(minion, message, seal["sig"]) is True else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(data: Mapping, key: str, what: str, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise Malformed(f"{what}: {key} must be a non-empty string, not {value!r}")
    return value


def _sender(tag_minion: str, data: Mapping) -> tuple[str, Mapping, bool]:
    """``(minion, payload, forged)`` of a beacon-tag event in either shape: an ``event.send``
    load (its ``id`` is the sender it claims, its event under ``data``) or a beacon's data as
    it is. Either shape is only a claim."""
    inner = data.get("data")
    if data.get("cmd") == "_minion_event" and isinstance(inner, Mapping) and isinstance(data.get("id"), str):
        sender, payload = data["id"], inner
    else:
        sender, payload = tag_minion, data
    forged = sender != tag_minion or payload.get("id", sender) != sender
    return sender, payload, forged


def classify(tag: Any, data: Any, received_at: float, signed_by: SignedBy = unsigned) -> FleetEvent | None:
    """The fleet store's entry for one bus event; None if it is not vmpower's.

    ``signed_by`` checks a job return's seal (module docstring): only a sealed return is kept
    as a fact, at the time it was sealed (never later than it was received). Raises Malformed for a vmpower tag whose data is unusable (the
    returner skips and counts it).
    """
    if not isinstance(tag, str):
        return None
    match = _BEACON_TAG.match(tag)
    if match:
        if not isinstance(data, Mapping):
            raise Malformed(f"{tag}: the event's data must be a mapping, not {type(data).__name__}")
        minion, payload, forged = _sender(match.group("minion"), data)
        authenticated = False
        rest = match.group("rest")
        if rest.startswith("lifecycle/"):
            return _lifecycle(
                tag, rest[len("lifecycle/") :], payload, minion, authenticated, forged, received_at
            )
        if rest == "resync":
            return _resync(tag, payload, minion, authenticated, forged, received_at)
        raise Malformed(f"{tag}: not a vmpower event (lifecycle/<transition> or resync)")
    match = _JOB_RET_TAG.match(tag)
    if match:
        if not isinstance(data, Mapping) or not str(data.get("fun", "")).startswith("vmpower."):
            return None  # not a vmpower job: none of our business
        minion = match.group("minion")
        # The master names a return's sender twice, in the tag and as ``id``, from one load.
        forged = data.get("id") != minion
        at = None if forged else sealed_at(minion, data, signed_by)
        if at is None:
            return job_return(tag, minion, data, received_at, False, forged)
        # A replayed old seal must not make a host look freshly synced.
        return job_return(tag, minion, data, min(at, received_at), True, forged)
    return None


def _at(payload: Mapping, received_at: float) -> float:
    stamp = payload.get("timestamp")
    return float(stamp) if _number(stamp) and stamp > 0 else received_at


def _lifecycle(tag, transition, payload, minion, authenticated, forged, received_at) -> FleetEvent:
    if transition not in _TRANSITIONS:
        raise Malformed(f"{tag}: unknown transition {transition!r}; known: {', '.join(sorted(_TRANSITIONS))}")
    uuid = _text(payload, "uuid", tag)
    if not UUID_RE.match(uuid):
        raise Malformed(f"{tag}: uuid {uuid!r} is not a UUID")
    if payload.get("transition", transition) != transition:
        raise Malformed(f"{tag}: the data's transition {payload.get('transition')!r} is not the tag's")
    return FleetEvent(
        _at(payload, received_at),
        minion,
        LIFECYCLE,
        tag,
        authenticated,
        uuid=uuid.lower(),
        name=_text(payload, "name", tag, required=False),
        transition=transition,
        reason=_text(payload, "reason", tag, required=False),
        forged=forged,
        data=dict(payload),
    )


def _resync(tag, payload, minion, authenticated, forged, received_at) -> FleetEvent:
    reason = _text(payload, "reason", tag)
    lost = payload.get("lost", 0)
    if not _number(lost) or lost < 0:
        raise Malformed(f"{tag}: lost must be a count of events, not {lost!r}")
    return FleetEvent(
        received_at, minion, RESYNC, tag, authenticated, reason=reason, forged=forged, data=dict(payload)
    )


def job_return(
    tag: str, minion: str, data: Mapping, received_at: float, authenticated: bool = True, forged: bool = False
) -> FleetEvent:
    """A vmpower job's return (the reactor's reconcile and sync, or any other vmpower.* job);
    ``authenticated`` as ``classify`` decided it (a minion keeping its own result: True).

    A job that failed (its return is the error text) is kept as what happened, not refused.
    """
    fun = data["fun"]
    ret = data.get("return")
    success = bool(data.get("success", True)) and data.get("retcode", 0) in (0, None)
    kept = {"fun": fun, "jid": data.get("jid", ""), "success": success, "return": ret}
    if fun == "vmpower.reconcile":
        if isinstance(ret, Mapping):
            uuid = str(ret.get("uuid") or "").lower()
            return FleetEvent(
                received_at,
                minion,
                RECONCILE,
                tag,
                authenticated,
                uuid=uuid,
                name=str(ret.get("name") or ""),
                transition=str(ret.get("transition") or ""),
                reason=str(ret.get("reason") or ""),
                forged=forged,
                data=kept,
            )
        return FleetEvent(
            received_at, minion, RECONCILE, tag, authenticated, reason=str(ret), forged=forged, data=kept
        )
    if fun == "vmpower.sync":
        return FleetEvent(
            received_at,
            minion,
            SYNC,
            tag,
            authenticated,
            reason=sync_summary(ret)["summary"],
            forged=forged,
            data={**kept, "return": sync_summary(ret)},
        )
    return FleetEvent(received_at, minion, JOB, tag, authenticated, reason=fun, forged=forged, data=kept)


def sync_summary(ret: Any) -> dict[str, Any]:
    """What the fleet keeps of a sync's return: counts, how long it took, and its actions
    (each with its reason), never the whole listing of skipped VMs."""
    if not isinstance(ret, Mapping):
        return {"ok": False, "error": str(ret), "summary": f"failed: {ret}"}
    actions = [a for a in ret.get("actions") or () if isinstance(a, Mapping)]
    took = ret.get("took") if _number(ret.get("took")) else None
    counts = {key: ret.get(key) if _number(ret.get(key)) else 0 for key in ("checked", "updated")}
    skipped = len(ret.get("skipped") or ())
    summary = (
        f"checked {counts['checked']}, updated {counts['updated']}, "
        f"{len(actions)} action(s), {skipped} skipped"
    )
    return {
        "ok": True,
        **counts,
        "skipped": skipped,
        "took": took,
        "summary": summary,
        "actions": [{k: a.get(k) for k in ("uuid", "name", "action", "reason", "result")} for a in actions],
        **({"event_loop": ret["event_loop"]} if isinstance(ret.get("event_loop"), Mapping) else {}),
    }


# ---------------------------------------------------------------------------------------------
# What a report says
# ---------------------------------------------------------------------------------------------
# The power states in which a VM of each vm_state is as intended (Nova's meaning of vm_state).
# vm_states that are someone else's business (building, error...) agree with anything.
FILTER_STATES = (
    "active",
    "stopped",
    "paused",
    "suspended",
    "building",
    "rescued",
    "resized",
    "error",
    "shelved",
    "deleted",
    "running",
    "shutdown",
    "crashed",
    "nostate",
)


def disagreement(vm_state: str, power_state: str) -> str:
    """Why a VM's recorded intent and its power state disagree, or "" if they do not."""
    if not drifting(vm_state, power_state):
        return ""
    return f"vm_state {vm_state} but power_state {power_state}"


def stuck(task_state: str, updated_at: float, now: float, stuck_after: float) -> str:
    """Why a VM's task_state looks stuck (set, and unchanged for ``stuck_after`` s), or ""."""
    if task_state and now - updated_at >= stuck_after:
        return f"task_state {task_state} for {now - updated_at:.0f} s"
    return ""


@dataclasses.dataclass(frozen=True)
class Filters:
    """What a report is narrowed to; empty means everything."""

    hosts: tuple[str, ...] = ()
    state: str = ""
    disagreement: bool = False
    error: bool = False
    stuck: bool = False


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{what} must be true or false, not {value!r}")


def parse_filters(
    host: Any = None, state: Any = None, disagreement: Any = False, error: Any = False, stuck: Any = False
) -> Filters:
    """The report's filters from the command line, each checked, with a message naming it."""
    if host in (None, ""):
        hosts: tuple[str, ...] = ()
    elif isinstance(host, str):
        hosts = tuple(h.strip() for h in host.split(",") if h.strip())
    elif isinstance(host, (list, tuple)) and all(isinstance(h, str) for h in host):
        hosts = tuple(host)
    else:
        raise ConfigError(f"host must be a minion id or a comma-separated list of them, not {host!r}")
    if state in (None, ""):
        state = ""
    elif not isinstance(state, str) or state not in FILTER_STATES:
        raise ConfigError(
            f"state must be a vm_state or power_state ({', '.join(FILTER_STATES)}), not {state!r}"
        )
    return Filters(
        hosts, state, _bool(disagreement, "disagreement"), _bool(error, "error"), _bool(stuck, "stuck")
    )


def vm_row(
    record: Mapping,
    last_change: Mapping | None,
    last_event: Mapping | None,
    now: float,
    stuck_after: float,
) -> dict[str, Any]:
    """One VM of the report: the record, the last change and why, what is wrong with it."""
    return row_of(
        tuple(record.get(key) for key in RECORD_FIELDS), last_change, last_event, now, stuck_after
    )


RECORD_FIELDS = ("uuid", "name", "host", "vm_state", "power_state", "task_state", "updated_at")
_DISAGREEMENTS: dict[tuple[Any, Any], str] = {}  # a handful of state pairs, decided once each
_NONE: Mapping = {}


def row_of(
    record: Sequence, last_change: Mapping | None, last_event: Mapping | None, now: float,
    stuck_after: float,
) -> dict[str, Any]:
    """``vm_row`` of a record given as a tuple in ``RECORD_FIELDS`` order: a report of the
    whole fleet builds 50,000 of them, so the work per row is kept to the least."""
    uuid, name, host, vm_state, power_state, task_state, updated_at = record
    pair = (vm_state, power_state)
    why = _DISAGREEMENTS.get(pair)
    if why is None:
        why = _DISAGREEMENTS[pair] = disagreement(vm_state, power_state)
    return {
        "uuid": uuid, "name": name, "host": host, "vm_state": vm_state, "power_state": power_state,
        "task_state": task_state, "updated_at": updated_at, "disagreement": why,
        "error": vm_state == "error",
        "stuck": stuck(task_state, float(updated_at or 0), now, stuck_after) if task_state else "",
        "last_change": last_change or _NONE, "last_event": last_event or _NONE,
    }


def keep(row: Mapping, filters: Filters) -> bool:
    """Whether a report row passes the filters (all of them, when several are given)."""
    if filters.hosts and row["host"] not in filters.hosts:
        return False
    if filters.state and filters.state not in (row["vm_state"], row["power_state"]):
        return False
    if filters.disagreement and not row["disagreement"]:
        return False
    if filters.error and not row["error"]:
        return False
    return not (filters.stuck and not row["stuck"])


def host_row(
    minion: str, seen: Mapping, records: int, now: float, sync_interval: float, sync_known: bool = True
) -> dict[str, Any]:
    """One host of the report: when it last synced, whether that is too long ago
    (2 x ``sync_interval``), and whether its event loop is connected, as far as anyone knows.

    ``seen`` is what the fleet store (or the minion itself) said about it: ``last_sync_at``,
    ``last_sync_took``, ``last_sync`` (the summary), ``loop`` (the event loop's status as the
    minion last reported it), ``last_resync_at`` / ``last_resync_reason``. ``sync_known``
    is False when nobody kept the host's syncs (a report asked of the minions themselves).
    """
    last_sync_at = float(seen.get("last_sync_at") or 0)
    loop = seen.get("loop") or {}
    connected = loop.get("connected") if isinstance(loop, Mapping) else None
    row = {
        "host": minion,
        "records": records,
        "last_sync_at": last_sync_at or None,
        "last_sync_age": round(now - last_sync_at, 1) if last_sync_at else None,
        "last_sync_took": seen.get("last_sync_took"),
        "last_sync": seen.get("last_sync") or {},
        "event_loop_connected": connected,
        "last_resync": (
            {"at": seen.get("last_resync_at"), "reason": seen.get("last_resync_reason")}
            if seen.get("last_resync_at")
            else {}
        ),
    }
    problems = []
    if not last_sync_at:
        if sync_known:
            problems.append(NO_SYNC)
    elif now - last_sync_at > 2 * sync_interval:
        problems.append(
            f"not synced for {now - last_sync_at:.0f} s (> 2 x sync_interval {sync_interval:g} s)"
        )
    if connected is False:
        problems.append("event loop disconnected")
    row["problems"] = problems
    return row


def summary(rows: Iterable[Mapping], hosts: Sequence[Mapping]) -> dict[str, Any]:
    """Counts for the top of a report."""
    pairs: dict[tuple[Any, Any], int] = {}
    total = disagreeing = errors = stuck_ = 0
    for row in rows:
        total += 1
        pair = (row["vm_state"], row["power_state"])
        pairs[pair] = pairs.get(pair, 0) + 1
        if row["stuck"]:
            stuck_ += 1
    by_vm_state: dict[Any, int] = {}
    by_power_state: dict[Any, int] = {}
    for (vm_state, power_state), count in pairs.items():
        by_vm_state[vm_state] = by_vm_state.get(vm_state, 0) + count
        by_power_state[power_state] = by_power_state.get(power_state, 0) + count
        if disagreement(vm_state, power_state):
            disagreeing += count
        if vm_state == "error":
            errors += count
    return {
        "vms": total,
        "by_vm_state": by_vm_state,
        "by_power_state": by_power_state,
        "disagreeing": disagreeing,
        "error": errors,
        "stuck": stuck_,
        "hosts": len(hosts),
        "hosts_with_problems": sorted(h["host"] for h in hosts if h["problems"]),
    }


def drift_row(host: str, entry: Mapping, drift_since: float | None, plan: Mapping | None,
              plan_error: str, now: float) -> dict[str, Any]:
    """One VM of the drift report: ``entry`` is its ``vmpower.records`` row (the record beside
    the live state), ``drift_since`` when its record began to disagree (None: its record does
    not say, e.g. a change no job has seen yet), and ``plan`` what a dry-run reconcile of it
    decided now (``action``, ``reason``, ``retry_at`` or ``retry_in``), or ``plan_error`` why
    there is none."""
    record = entry.get("record") or {}
    if plan is None:
        will, when = "nothing for now", f"unknown: {plan_error}"
    elif plan.get("skipped"):
        will, when = f"nothing: {plan.get('reason', '')}", "never, while that holds"
    elif plan.get("action", "none") != "none":
        will, when = f"{plan['action']}: {plan.get('reason', '')}", "at the next reconcile or sync"
    else:
        will = f"nothing yet: {plan.get('reason', '')}"
        when = "at the next reconcile or sync"
    again = None if plan is None else plan.get("retry_at") or (
        now + plan["retry_in"] if _number(plan.get("retry_in")) else None)
    if again:
        when = f"decided again at {again:.0f} (in {max(0.0, again - now):.0f} s)"
    return {
        "host": host,
        "uuid": entry.get("uuid"),
        "name": entry.get("name"),
        "vm_state": record.get("vm_state", "(no record)"),
        "recorded_power_state": record.get("power_state"),
        "power_state": (entry.get("live") or {}).get("power_state"),
        "disagreement": entry.get("disagreement", ""),
        "since": drift_since,
        "for": round(now - drift_since, 1) if drift_since else None,
        "will": will,
        "when": when,
    }


def host_view(loop: Mapping, metrics: Mapping | None, last_sync_at: float | None,
              sync_interval: float, now: float, heartbeat: float) -> list[str]:
    """Why a host's own view of its VMs is unknown or old (nothing: it is current): its event
    loop cannot ask libvirt, its metrics file is not being written, or it has not synced
    within 2 x ``sync_interval``. ``loop`` is ``loop_summary`` with ``loop_counters``."""
    problems = []
    if loop.get("connected") is False:
        since = loop.get("unknown_since")
        problems.append("event loop disconnected" + (f" for {now - since:.0f} s" if since else ""))
    elif loop.get("connected") is None:
        problems.append("no vmpower beacon runs (no event loop)")
    if metrics and metrics.get("path"):
        if metrics.get("error"):
            problems.append(f"metrics not written: {metrics['error']}")
        elif not metrics.get("last_write") or now - metrics["last_write"] > 2 * heartbeat:
            problems.append("metrics file stale")
    if not last_sync_at:
        problems.append("no sync known")
    elif now - last_sync_at > 2 * sync_interval:
        problems.append(f"not synced for {now - last_sync_at:.0f} s (> 2 x sync_interval "
                        f"{sync_interval:g} s)")
    return problems


# ---------------------------------------------------------------------------------------------
# Settings of the master's side (``vmpower:`` in the master config) and the minion's extras
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FleetSettings:
    """``store``: the fleet store (a SQLite path or a PostgreSQL DSN; "" for the default SQLite
    file on the master); ``retention_days``: how long events are kept (0: forever);
    ``sync_interval``: the fleet's, for the "not synced within 2 x sync_interval" check;
    ``stuck_after``: seconds after which a task_state is reported stuck."""

    store: str = ""
    retention_days: float = DEFAULT_RETENTION_DAYS
    sync_interval: float = 600.0
    stuck_after: float = DEFAULT_STUCK_AFTER

    def store_location(self) -> str:
        return self.store or DEFAULT_FLEET_STORE


def _nonnegative(raw: Mapping, key: str, default: float) -> float:
    value = raw.get(key, default)
    if value is None:
        return default
    if not _number(value) or value < 0:
        raise ConfigError(f"vmpower:{key} must be a number of 0 or more, not {value!r}")
    return float(value)


def parse_fleet_settings(raw: Any) -> FleetSettings:
    """``vmpower:`` of the master's config, for the returner and the runner."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"vmpower must be a mapping, not {type(raw).__name__}")
    store = raw.get("store") or ""
    if not isinstance(store, str):
        raise ConfigError(f"vmpower:store must be a SQLite file path or a postgresql:// DSN, not {store!r}")
    interval = _nonnegative(raw, "sync_interval", 600.0)
    if interval <= 0:
        raise ConfigError("vmpower:sync_interval must be more than 0")
    return FleetSettings(
        store=store,
        retention_days=_nonnegative(raw, "retention_days", DEFAULT_RETENTION_DAYS),
        sync_interval=interval,
        stuck_after=_nonnegative(raw, "stuck_after", DEFAULT_STUCK_AFTER),
    )


def sync_splay(raw: Any, sync_interval: int) -> int:
    """``vmpower:sync_splay``: up to how many seconds Salt's scheduler delays each periodic sync
    at random, so that a fleet's hosts do not all hit one database in the same second.

    Default: a tenth of ``sync_interval``, at most 60 s. 0 turns it off.
    """
    if raw is None:
        return min(60, sync_interval // 10)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ConfigError(f"vmpower:sync_splay must be a whole number of seconds (0 or more), not {raw!r}")
    if raw >= sync_interval:
        raise ConfigError(
            f"vmpower:sync_splay ({raw}) must be less than vmpower:sync_interval ({sync_interval})"
        )
    return raw


def metrics_file(raw: Any) -> str:
    """``vmpower:metrics_file``: where the minion writes its Prometheus text file (for
    node_exporter's textfile collector: a ``.prom`` file in its directory); "" for none."""
    if raw in (None, ""):
        return ""
    if not isinstance(raw, str) or not raw.startswith("/") or not raw.endswith(".prom"):
        raise ConfigError(
            f"vmpower:metrics_file must be an absolute path ending in .prom "
            f"(node_exporter's textfile collector reads only those), not {raw!r}"
        )
    return raw


DEFAULT_METRICS_VM_LIMIT = 1000  # VMs of one host with series of their own in the metrics file


def metrics_vm_limit(raw: Any) -> int:
    """``vmpower:metrics_vm_limit``: how many VMs a host may have before its metrics file
    keeps per-host counts only (each VM costs some 25 series)."""
    if raw in (None, ""):
        return DEFAULT_METRICS_VM_LIMIT
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ConfigError(f"vmpower:metrics_vm_limit must be a whole number of VMs, 0 or more, "
                          f"not {raw!r}")
    return raw


def task_since(task_owner: str, updated_at: float) -> float:
    """When a record's task_state was set: its owner's ``since`` (``vmpower.hostinfo``), or
    the record's last write when the owner does not say."""
    try:
        since = json.loads(task_owner).get("since") if task_owner else None
    except (ValueError, AttributeError):
        since = None
    if isinstance(since, bool) or not isinstance(since, (int, float)):
        return float(updated_at or 0.0)
    return float(since)


def split_batch(
    events: Sequence[Any], received_at: float, signed_by: SignedBy = unsigned
) -> tuple[list[FleetEvent], list[str]]:
    """A batch of ``{tag, data}`` from the master's event_return: the vmpower events to keep,
    and why each malformed one was skipped. Nothing malformed stops the rest."""
    kept: list[FleetEvent] = []
    skipped: list[str] = []
    for item in events or ():
        if not isinstance(item, Mapping):
            skipped.append(f"an event must be a mapping of tag and data, not {type(item).__name__}")
            continue
        try:
            event = classify(item.get("tag"), item.get("data"), received_at, signed_by)
        except Malformed as exc:
            skipped.append(str(exc))
            continue
        except (
            TypeError,
            ValueError,
            KeyError,
            AttributeError,
            RecursionError,
        ) as exc:  # odd shapes: skip, never lose the rest
            skipped.append(f"{item.get('tag')!r}: {type(exc).__name__}: {exc}")
            continue
        if event is not None:
            kept.append(event)
    return kept, skipped


def loop_summary(status: Any) -> dict[str, Any]:
    """The event loop's health in one line per host, from the status file the minion process
    writes (``vmpower.eventloop``): connected only if every watcher is, summed counters.
    ``connected`` is None when nobody knows (no beacon in that minion, an unreadable file)."""
    if (
        not isinstance(status, Mapping)
        or not isinstance(status.get("watchers"), Mapping)
        or not status["watchers"]
    ):
        error = status.get("error") if isinstance(status, Mapping) else None
        return {"connected": None, **({"error": str(error)} if error else {})}
    watchers = [w for w in status["watchers"].values() if isinstance(w, Mapping)]
    summed = {
        key: sum(int(w.get(key) or 0) for w in watchers)
        for key in ("events_seen", "dropped", "reconnects", "queue_depth")
    }
    return {
        "connected": bool(watchers)
        and all(w.get("connected") is True for w in watchers)
        and status.get("thread_alive", True) is not False,
        **summed,
        "updated_at": status.get("updated_at"),
    }


def loop_counters(status: Any) -> dict[str, Any]:
    """The loop's labelled counters summed over its watchers (``transitions``: power changes
    seen, by transition; ``resyncs``: by reason), and ``unknown_since``: since when (wall
    clock) libvirt cannot be asked, the earliest change of state of a watcher that is not
    connected; None while every watcher is, and when no beacon runs (nobody knows)."""
    if not isinstance(status, Mapping) or not isinstance(status.get("watchers"), Mapping):
        return {"transitions": {}, "resyncs": {}, "unknown_since": None}
    watchers = [w for w in status["watchers"].values() if isinstance(w, Mapping)]
    counted: dict[str, dict[str, int]] = {"transitions": {}, "resyncs": {}}
    for watcher in watchers:
        for key, into in counted.items():
            counts = watcher.get(key)
            for label, count in (counts.items() if isinstance(counts, Mapping) else ()):
                if isinstance(count, int) and not isinstance(count, bool):
                    into[str(label)] = into.get(str(label), 0) + count
    down = [w.get("state_since") for w in watchers if w.get("connected") is not True]
    down = [since for since in down if isinstance(since, (int, float)) and not isinstance(since, bool)]
    if watchers and status.get("thread_alive", True) is False and not down:
        down = [status.get("updated_at") or 0.0]
    return {**counted, "unknown_since": float(min(down)) if down else None}
