"""The host's pending wake-up on the minion's own disk: written by jobs, read by the beacon.

``<cachedir>/vmpower/wakeup.json``, beside the journal: a reconcile or a sync whose decision
must be taken again later writes the wake-up it needs (``vmpower.core.wakeup`` says which one
is kept), under a lock beside it, since jobs run in processes of their own; the beacon, in the
minion process, reads it once a second and fires a ``retry`` resync when it falls due. The file
outlives the minion process, so a wake-up asked before a minion restart still comes after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os

from vmpower.core.wakeup import WakeUp, from_dict, keep

log = logging.getLogger(__name__)

WAKEUP_NAME = "wakeup.json"


def wakeup_path(cachedir: str) -> str:
    """Where the pending wake-up of the minion whose cachedir is ``cachedir`` is kept."""
    return os.path.join(cachedir, "vmpower", WAKEUP_NAME)


def read(path: str) -> WakeUp | None:
    """The pending wake-up at ``path``; None when there is none (or it cannot be read)."""
    try:
        with open(path) as handle:
            return from_dict(json.load(handle))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.debug("vmpower: cannot read the wake-up at %s: %s", path, exc)
        return None


class WakeUps:
    """A job's hand-over of its wake-up to the beacon, through the file at ``path``."""

    def __init__(self, path: str):
        self.path = path

    def update(self, boot_id: str, due: float | None, now: float,
               answered_before: float | None = None) -> WakeUp | None:
        """Ask for a sync at ``due`` on the monotonic clock of the boot ``boot_id`` (None:
        nothing), ``now`` being that clock now; ``answered_before``: a full sync that started
        then is over. Returns the wake-up kept. Raises OSError when the file cannot be written."""
        asked = None if due is None else WakeUp(due, boot_id, now)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for one small read and write
            pending = read(self.path)
            kept = keep(pending, asked, boot_id, answered_before)
            if kept == pending:
                return kept
            if kept is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                return None
            partial = f"{self.path}.{os.getpid()}.tmp"
            with open(partial, "w") as handle:
                json.dump(kept.as_dict(), handle)
            os.replace(partial, self.path)  # the beacon reads a whole file or the old one
        return kept
