"""The event loop's status file: written by the minion process, read by job processes.

Job processes are forked by the minion and run no event loop of their own, so the loop's
health reaches ``vmpower.status`` through a small JSON file. A thread of vmpower's own
rewrites it (atomically, and only when something changed) once a second: the writer must not
be a watcher's thread, which may hang in a libvirt call for as long as libvirtd does, and not
the minion's loop either.
"""

from __future__ import annotations

import json
import os
import tempfile


def write_json(path: str, data: dict) -> None:
    """Replace ``path`` in one step, so a reader never sees half a file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eventloop-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_status(path: str) -> dict:
    """The event loop's status as the minion process last wrote it (for job processes)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {"error": f"no event loop status at {path}: the vmpower beacon has not run "
                         f"in this minion"}
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read the event loop status at {path}: {exc}"}
