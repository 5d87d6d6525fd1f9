"""The fleet from the master: what the ``vmpower`` returner keeps and what the ``vmpower``
runner reports, and the minion's ``vmpower.records``.

The Salt modules (``_returners/vmpower.py``, ``_runners/vmpower.py``) are thin: they hand Salt's
data to these functions. What an event means, who sent it and what a report row says are
decided in ``vmpower.core.fleet``; this module reads and writes the store and libvirt.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from vmpower.core import fleet as core
from vmpower.core.settings import ConfigError
from vmpower.store import Store, StoreError, open_store
from vmpower.store.events import FleetStore

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0  # seconds between two retention passes of one master process

_open: dict[str, FleetStore] = {}  # location -> the fleet store this process keeps open
_open_lock = threading.Lock()
_last_prune: dict[str, float] = {}


def fleet_settings(opts: Mapping) -> core.FleetSettings:
    """``vmpower:`` of the master's config (ConfigError naming the key if it is bad)."""
    return core.parse_fleet_settings(opts.get("vmpower"))


def open_fleet(location: str) -> FleetStore:
    """The fleet store at ``location``, opened once per process (the master's event_return
    process calls the returner for every batch of events)."""
    with _open_lock:
        fleet = _open.get(location)
        if fleet is None:
            fleet = _open[location] = FleetStore(open_store(location))
        return fleet


def forget(location: str) -> None:
    """Close and drop a fleet store that failed: the next call opens it afresh."""
    with _open_lock:
        fleet = _open.pop(location, None)
    if fleet is not None:
        try:
            fleet.store.close()
        except Exception:  # noqa: S110 (it failed already; closing is only tidying up)
            pass


# ---------------------------------------------------------------------------------------------
# The returner
# ---------------------------------------------------------------------------------------------
def keep_events(opts: Mapping, events: Sequence[Any]) -> dict[str, Any]:
    """``event_return``: keep every vmpower event of the batch in the fleet store.

    A malformed event is skipped, logged and counted; the rest are kept. An unreachable store
    is logged as an error naming it (the master's event_return process goes on, and the next
    batch tries again); it never raises, because Salt would only log a less clear message.
    """
    received = time.time()
    kept, skipped = core.split_batch(events, received, signature_check(opts))
    for why in skipped:
        log.warning("vmpower returner: skipped a malformed vmpower event: %s", why)
    result = {"kept": len(kept), "skipped": len(skipped), "error": None}
    if not kept and not skipped:
        return result
    try:
        settings = fleet_settings(opts)
    except ConfigError as exc:
        log.error("vmpower returner: %s; %d vmpower event(s) not kept", exc, len(kept))
        return {**result, "kept": 0, "error": str(exc)}
    location = settings.store_location()
    try:
        fleet = open_fleet(location)
        fleet.add(kept, len(skipped))
        if received - _last_prune.get(location, 0.0) >= PRUNE_EVERY:
            _last_prune[location] = received
            pruned = fleet.prune(settings.retention_days, received)
            if pruned:
                log.info(
                    "vmpower returner: %d event(s) older than %g days pruned from %s",
                    pruned,
                    settings.retention_days,
                    fleet.path,
                )
    except StoreError as exc:
        forget(location)
        log.error("vmpower returner: %d vmpower event(s) not kept: %s", len(kept), exc)
        return {**result, "kept": 0, "error": str(exc)}
    return result


def signature_check(opts: Mapping) -> core.SignedBy:
    """``core.SignedBy`` from the master's accepted minion keys (``pki_dir/minions/<id>``, Salt's
    default key store): whether a seal was made with the minion's key. Anything that cannot be
    checked is no signature."""
    import salt.crypt
    import salt.utils.verify

    keys = os.path.join(opts.get("pki_dir") or "", "minions")

    def signed_by(minion: str, message: bytes, signature: str) -> bool:
        try:
            if not salt.utils.verify.valid_id(opts, minion):
                return False
            key = salt.utils.verify.clean_join(keys, minion)
            if not os.path.isfile(key):
                return False
            raw = base64.b64decode(signature, validate=True)
            return salt.crypt.verify_signature(key, message, raw, algorithm=core.SEAL_ALGORITHM) is True
        except Exception as exc:  # pylint: disable=broad-except (an unchecked signature vouches for nothing)
            log.debug("vmpower returner: the seal of a return from %r cannot be checked: %s", minion, exc)
            return False

    return signed_by


def seal_key(opts: Mapping):
    """The minion's private key, as Salt's own memoised loader gives it (per key file and its
    modification time). Loading a key checks it, some 100 ms for 2,048 bits: the beacon loads it
    once in the minion's process, and every job forked from there signs with that copy."""
    import salt.crypt

    return salt.crypt.get_rsa_key(os.path.join(opts["pki_dir"], "minion.pem"), None)


def seal(opts: Mapping, ret: Any) -> Any:
    """``ret``, a vmpower job's result on the minion, with the minion's seal (``core.SEAL``):
    its Salt key's signature, by which the master's returner knows the result is this
    minion's. A result that cannot be sealed (no key, not a mapping) is returned as it is: the
    master then keeps it as a claim."""
    if not isinstance(ret, dict):
        return ret
    import salt.crypt

    minion = str(opts.get("id") or "")
    try:
        at = time.time()
        message = core.seal_message(minion, ret, at)
        key = seal_key(opts)
        sig = key.sign(message, salt.crypt.BaseKey.parse_padding_for_signing(core.SEAL_ALGORITHM)(),
                       salt.crypt.BaseKey.parse_hash(core.SEAL_ALGORITHM)())
    except Exception as exc:  # pylint: disable=broad-except (the result matters more than its seal)
        log.warning("vmpower: this result cannot be sealed, the master will keep it as a claim: %s", exc)
        return ret
    return {**ret, core.SEAL: {"at": at, "sig": base64.b64encode(sig).decode()}}


def keep_job_return(
    opts: Mapping, ret: Mapping, store_location: str, loop_status: Mapping | None = None
) -> dict[str, Any]:
    """The job returner (``--return vmpower``, or ``returner: vmpower`` of the periodic sync),
    on the minion: keep the job's result, for a sync its summary and this host's event loop
    health, in the minion's store (the fleet's, when the minions share one)."""
    minion = str(ret.get("id") or opts.get("id"))
    fun = str(ret.get("fun") or "")
    if not fun.startswith("vmpower."):
        return {"kept": 0, "reason": f"{fun or 'this job'} is not a vmpower job"}
    now = time.time()
    event = core.job_return(f"salt/job/{ret.get('jid', '')}/ret/{minion}", minion, ret, now)
    with fleet_at(store_location) as fleet:
        fleet.add([event])
        if loop_status is not None:
            fleet.host_status(minion, now, loop=core.loop_summary(loop_status))
    return {"kept": 1}


@contextlib.contextmanager
def fleet_at(location: str) -> Iterator[FleetStore]:
    """The fleet tables of the store at ``location``, open for the block only (a minion's job
    process: nothing is kept open across a fork)."""
    with open_store(location) as store:
        yield FleetStore(store)


# ---------------------------------------------------------------------------------------------
# The minion's records beside the live state
# ---------------------------------------------------------------------------------------------
def host_records(store: Store, hypervisor, host: str, target: str | None = None) -> list[dict[str, Any]]:
    """Each domain of this host (and each record this host owns) with its record beside its
    live state: recorded vm_state, power_state, task_state, owner, the last change and why.

    ``hypervisor`` is an open ``vmpower.hypervisor.Hypervisor``; ``target`` narrows it to one
    domain by name or UUID.
    """
    live = hypervisor.list_all()
    records = store.for_host(host)
    unowned = [uuid for uuid in live if uuid not in records]
    records.update(store.get_many(unowned) if unowned else {})
    uuids = sorted(set(live) | set(records))
    if target is not None:
        wanted = target.lower()
        uuids = [
            u for u in uuids if u == wanted or (live[u].name if u in live else records[u].name) == target
        ]
        if not uuids:
            raise StoreError(f"no domain and no record named {target!r} on {host}")
    changes = FleetStore.last_changes_of(store, uuids)
    rows = []
    for uuid in uuids:
        dom, record = live.get(uuid), records.get(uuid)
        live_power = dom.state.power_state.value if dom else "nostate"
        row: dict[str, Any] = {
            "uuid": uuid,
            "name": dom.name if dom else record.name,
            "defined": dom is not None,
            "live": {"power_state": live_power, "reason": dom.state.reason if dom else "undefined"},
            "record": None,
        }
        if record is not None:
            row["record"] = {
                "host": record.host,
                "vm_state": record.vm_state.value,
                "power_state": record.power_state.value,
                "task_state": record.task_state,
                "updated_at": record.updated_at,
                "version": record.version,
            }
            row["in_sync"] = record.power_state.value == live_power
            row["disagreement"] = core.disagreement(record.vm_state.value, live_power)
        else:
            row["in_sync"] = False
            row["disagreement"] = "no record yet (the next sync adopts it)"
        row["last_change"] = changes.get(uuid, {})
        rows.append(row)
    rows.sort(key=lambda r: r["name"])
    return rows


def host_drift(ops, hypervisor, loop_status: Any, now: float | None = None) -> dict[str, Any]:
    """This host's drift: every VM whose record and the hypervisor disagree, since when, and
    what vmpower will do about it and when, from a dry-run reconcile of each (which changes
    nothing); and ``problems``: why this host's own view is unknown or old, if it is.

    ``ops`` is the minion's ``HostOperations`` and ``hypervisor`` an open connection."""
    from vmpower import metrics
    from vmpower.core.model import Cause

    def drifting_record(record) -> bool:
        return bool(core.disagreement(record.vm_state.value, record.power_state.value))

    now = time.time() if now is None else now
    owned = ops.store.for_host(ops.host)
    drifting = []
    for entry in host_records(ops.store, hypervisor, ops.host):
        if not entry["disagreement"]:
            continue
        record = owned.get(entry["uuid"])
        plan, plan_error = None, ""
        try:
            plan = ops.reconcile(entry["uuid"], cause=Cause.SYNC, test=True)
        except Exception as exc:  # pylint: disable=broad-except
            plan_error = str(exc)  # a lock held by a long stop, libvirt gone: said, not hidden
        # The record's own drift began at drift_since (at the latest at its last write, in a
        # store older than that column); a change no job has recorded yet has no start known.
        since = ((record.drift_since or record.updated_at)
                 if record is not None and drifting_record(record) else None)
        drifting.append(core.drift_row(ops.host, entry, since, plan, plan_error, now))
    last_sync = None
    if ops.measurements is not None:
        tally = metrics.Tally(ops.measurements.path)
        tally.fold()
        last_sync = tally.last_sync
    loop = {**core.loop_summary(loop_status), **core.loop_counters(loop_status)}
    writer = loop_status.get("metrics") if isinstance(loop_status, Mapping) else None
    last_sync_at = last_sync["at"] if last_sync else None
    return {
        "host": ops.host,
        "drifting": drifting,
        "event_loop": loop,
        "metrics": writer,
        "last_sync_at": last_sync_at,
        "problems": core.host_view(loop, writer, last_sync_at, ops.settings.sync_interval, now,
                                   metrics.HEARTBEAT),
    }


def drift_from_minions(answers: Mapping[str, Any]) -> dict[str, Any]:
    """The fleet's drift from each minion's ``vmpower.drift``: the drifting VMs, longest first,
    and every host whose view is unknown (its problems, or that it did not answer)."""
    drifting, unknown = [], {}
    for minion, answer in sorted(answers.items()):
        if not isinstance(answer, Mapping) or not isinstance(answer.get("drifting"), list):
            unknown[minion] = [f"did not answer vmpower.drift: {answer}"]
            continue
        drifting.extend(answer["drifting"])
        if answer.get("problems"):
            unknown[minion] = list(answer["problems"])
    drifting.sort(key=lambda row: (-(row.get("for") or 0), row.get("host") or "", row.get("name") or ""))
    return {"source": "minions", "drifting": drifting, "unknown": unknown,
            "summary": {"drifting": len(drifting), "hosts": len(answers),
                        "hosts_unknown": sorted(unknown)}}


def drift_from_store(fleet: FleetStore, settings: core.FleetSettings,
                     now: float | None = None) -> dict[str, Any]:
    """The fleet's drift as the fleet store knows it: records whose vm_state and recorded
    power state disagree (what vmpower will do is each host's to say: ``source=minions``),
    and the hosts not synced within 2 x ``sync_interval`` or whose loop is disconnected."""
    now = time.time() if now is None else now
    found = report_from_store(fleet, core.Filters(disagreement=True), settings, now)
    drifting = [{
        "host": row["host"], "uuid": row["uuid"], "name": row["name"], "vm_state": row["vm_state"],
        "recorded_power_state": row["power_state"], "disagreement": row["disagreement"],
        "since": row["updated_at"] or None,  # at the latest: the store keeps the last write
        "for": round(now - row["updated_at"], 1) if row["updated_at"] else None,
        "will": "decided by the host's next reconcile or sync (source=minions says what)",
        "when": "at the host's next reconcile or sync"} for row in found["vms"]]
    drifting.sort(key=lambda row: -(row["for"] or 0))
    unknown = {host: row["problems"] for host, row in found["hosts"].items() if row["problems"]}
    return {"source": "store", "store": fleet.path, "drifting": drifting, "unknown": unknown,
            "summary": {"drifting": len(drifting), "hosts": len(found["hosts"]),
                        "hosts_unknown": sorted(unknown)}}


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------
def has_store(settings: core.FleetSettings) -> bool:
    """Whether there is a fleet store to read: one configured, or the default file exists."""
    return bool(settings.store) or os.path.exists(core.DEFAULT_FLEET_STORE)


def report_from_store(
    fleet: FleetStore, filters: core.Filters, settings: core.FleetSettings, now: float | None = None
) -> dict[str, Any]:
    """Every VM the fleet store knows, with its last change and last event, and every host."""
    now = time.time() if now is None else now
    changes, events = fleet.last_changes(), fleet.last_events()
    everything = filters == core.Filters()
    rows = []
    for record in fleet.record_rows():  # in host, name order
        uuid = record[0]
        row = core.row_of(record, changes.get(uuid), events.get(uuid), now, settings.stuck_after)
        if everything or core.keep(row, filters):
            rows.append(row)
    hosts = _host_rows(fleet.hosts(), fleet.records_per_host(), now, settings, filters)
    return {
        "source": "store",
        "store": fleet.path,
        "summary": core.summary(rows, hosts),
        "hosts": {h["host"]: h for h in hosts},
        "vms": rows,
        "counters": fleet.counters(),
    }


def _host_rows(
    seen: Mapping[str, Mapping],
    counts: Mapping[str, int],
    now: float,
    settings: core.FleetSettings,
    filters: core.Filters,
    sync_known: bool = True,
) -> list[dict[str, Any]]:
    names = sorted((set(seen) | set(counts)) - {""})
    if filters.hosts:
        names = [n for n in names if n in filters.hosts]
    return [
        core.host_row(n, seen.get(n, {}), counts.get(n, 0), now, settings.sync_interval, sync_known)
        for n in names
    ]


def report_from_minions(
    answers: Mapping[str, Mapping],
    filters: core.Filters,
    settings: core.FleetSettings,
    now: float | None = None,
) -> dict[str, Any]:
    """The report from what the minions answered: ``answers[minion]`` is
    ``{"vmpower.records": [...], "vmpower.status": {...}}`` (Salt's multi-function return), or
    an error text for a minion that failed."""
    now = time.time() if now is None else now
    rows, seen, counts, failed = [], {}, {}, {}
    for minion, answer in sorted(answers.items()):
        records = answer.get("vmpower.records") if isinstance(answer, Mapping) else None
        status = answer.get("vmpower.status") if isinstance(answer, Mapping) else None
        if not isinstance(records, list):
            failed[minion] = str(records if records is not None else answer)
            continue
        counts[minion] = 0
        for entry in records:
            record = entry.get("record") or {}
            if record.get("host", minion) != minion:
                continue  # another host owns it: that host reports it
            counts[minion] += 1
            flat = {
                "uuid": entry["uuid"],
                "name": entry["name"],
                "host": minion,
                "vm_state": record.get("vm_state", "(no record)"),
                "power_state": entry["live"]["power_state"],
                "task_state": record.get("task_state", ""),
                "updated_at": record.get("updated_at", 0),
            }
            row = core.vm_row(flat, entry.get("last_change"), None, now, settings.stuck_after)
            if core.keep(row, filters):
                rows.append(row)
        loop = status.get("event_loop") if isinstance(status, Mapping) else None
        seen[minion] = {"loop": core.loop_summary(loop)}
    rows.sort(key=lambda r: (r["host"], r["name"]))
    # A minion knows its event loop; when it last synced is what the fleet store knows.
    hosts = _host_rows(seen, counts, now, settings, filters, sync_known=False)
    return {
        "source": "minions",
        "summary": core.summary(rows, hosts),
        "hosts": {h["host"]: h for h in hosts},
        "vms": rows,
        "failed": failed,
    }


def history_from_store(fleet: FleetStore, name: str, host: str | None, limit: int) -> dict[str, Any]:
    """The audit entries and the bus events of one VM (by name or UUID; a name that several
    hosts use gives each), merged oldest first."""
    uuids = fleet.find_uuids(name, host)
    if not uuids:
        raise StoreError(
            f"the fleet store {fleet.path} knows no VM named {name!r}" + (f" on {host}" if host else "")
        )
    found = {}
    for uuid in uuids:
        entries = [
            {
                "at": e["at"],
                "source": "audit",
                "host": e["host"],
                "cause": e["cause"],
                "action": e["action"],
                "old": e["old"],
                "new": e["new"],
                "reason": e["reason"],
            }
            for e in fleet.store.history(uuid)
        ]
        entries += [
            {
                "at": e["at"],
                "source": e["kind"],
                "host": e["minion"],
                "transition": e["transition"],
                "reason": e["reason"],
                "authenticated": e["authenticated"],
                **({"forged": True} if e["forged"] else {}),
            }
            for e in fleet.events(uuid=uuid, limit=limit)
        ]
        entries.sort(key=lambda e: e["at"])
        found[uuid] = entries[-limit:]
    return found


def hosts_from_store(
    fleet: FleetStore, settings: core.FleetSettings, filters: core.Filters, now: float | None = None
) -> dict[str, Any]:
    now = time.time() if now is None else now
    hosts = _host_rows(fleet.hosts(), fleet.records_per_host(), now, settings, filters)
    return {"store": fleet.path, "hosts": {h["host"]: h for h in hosts}, "counters": fleet.counters()}


def progress(every: int, total: int, say: Callable[[str], None]) -> Callable[[int], None]:
    """A counter that tells ``say`` how far a walk over ``total`` minions has got, every
    ``every`` of them (and at the end), so a large fleet shows it is moving."""

    def step(done: int) -> None:
        if done == total or done % every == 0:
            say(f"vmpower: {done} of {total} minion(s) answered")

    return step


# ---------------------------------------------------------------------------------------------
# The minion's side: the job returner and the metrics file
# ---------------------------------------------------------------------------------------------
def minion_extras(opts: Mapping, pillar: Mapping | None = None) -> dict[str, Any]:
    """The minion's ``vmpower:metrics_file`` and ``vmpower:sync_splay`` (minion config and
    pillar merged, pillar winning, as for every vmpower setting)."""
    from vmpower import minion
    from vmpower.core.settings import parse_settings

    raw = minion.merged_settings(opts, pillar)
    current = parse_settings(raw)
    return {
        "settings": current,
        "metrics_file": core.metrics_file(raw.get("metrics_file")),
        "sync_splay": core.sync_splay(raw.get("sync_splay"), current.sync_interval),
        "store": minion.store_path(opts, current),
        "loop_status": minion.event_loop_status_path(opts),
    }


def minion_job_return(opts: Mapping, ret: Mapping) -> dict[str, Any]:
    """The ``vmpower`` returner on a minion: keep the job's result in the minion's store and,
    after a sync, write the metrics file if ``vmpower:metrics_file`` is set."""
    from vmpower.eventloop import read_status

    extras = minion_extras(opts)
    is_sync = ret.get("fun") == "vmpower.sync"
    loop = read_status(extras["loop_status"]) if is_sync else None
    done = keep_job_return(opts, ret, extras["store"], loop)
    if is_sync and extras["metrics_file"] and done.get("kept"):
        summary = core.sync_summary(ret.get("return"))
        done["metrics"] = write_minion_metrics(
            opts, extras, loop, {"at": time.time(), "took": summary.get("took")}
        )
    return done


def write_minion_metrics(
    opts: Mapping,
    extras: Mapping,
    loop: Any = None,
    last_sync: Mapping | None = None,
    path: str | None = None,
) -> dict[str, Any]:
    """Write this minion's metrics file (``path``, or ``vmpower:metrics_file``)."""
    from vmpower import metrics, minion
    from vmpower.eventloop import read_status
    from vmpower.measurements import measurements_path

    path = path or extras["metrics_file"]
    if not path:
        raise ConfigError(
            "no metrics file: set vmpower:metrics_file (e.g. "
            "/var/lib/prometheus/node-exporter/vmpower.prom) or give path="
        )
    path = core.metrics_file(path)
    if loop is None:
        loop = read_status(extras["loop_status"])
    raw = minion.merged_settings(opts)
    tally = metrics.Tally(measurements_path(opts["cachedir"]))
    tally.fold()  # the same numbers as the beacon's live file: both read the one log
    with fleet_at(extras["store"]) as fleet:
        if last_sync is None:
            seen = fleet.hosts().get(opts["id"], {})
            last_sync = {"at": seen.get("last_sync_at"), "took": seen.get("last_sync_took")}
        return metrics.write_for_host(path, fleet.store, opts["id"], loop, last_sync,
                                      vm_limit=core.metrics_vm_limit(raw.get("metrics_vm_limit")),
                                      sync_interval=extras["settings"].sync_interval, tally=tally)


def master_config(reactor_files: Mapping[str, str]) -> dict[str, Any]:
    """The master's configuration for vmpower, with the shipped reactor SLS files by path."""
    return {
        "reactor": [
            {"salt/beacon/*/vmpower/lifecycle/*": [reactor_files["lifecycle.sls"]]},
            {"salt/beacon/*/vmpower/resync": [reactor_files["resync.sls"]]},
            # A minion that (re)starts gets a sync too: its own start SLS if shipped.
            {"salt/minion/*/start": [reactor_files.get("start.sls", reactor_files["resync.sls"])]},
        ],
        "event_return": "vmpower",
        "vmpower": {"store": core.DEFAULT_FLEET_STORE, "retention_days": core.DEFAULT_RETENTION_DAYS},
    }
