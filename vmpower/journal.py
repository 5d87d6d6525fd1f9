"""The beacon's journal on the minion's own disk: every lifecycle event it fires, by ``seq``,
and every gap in its watch (``vmpower.core.journal`` says what a reconcile believes of it).

SQLite in WAL mode at ``<cachedir>/vmpower/journal.sqlite``, beside the event loop's status
file: one journal per minion, written by the minion process's beacon on its watcher's thread
(once per round, in one transaction, before the round's events are fired) and read by the
reconcile jobs. It numbers the events: ``seq`` goes on from the journal's last one, so a new
minion process never reuses a number its predecessor journaled.

Crash-safe as a SQLite database is; ``synchronous=NORMAL``: a committed row survives the
process being killed, and a power loss may lose the last rows, but after one the host has a
new boot id, and no row of an earlier boot is believed anyway. Bounded: the newest ``KEEP``
rows are kept. If ``saltutil.clear_cache`` removes the file under the writer, the next write
starts a new one, which begins with a gap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from vmpower import hostinfo
from vmpower.core.journal import GAP, Observation
from vmpower.core.model import Transition

if TYPE_CHECKING:  # typing.Self is Python 3.11's; typing_extensions is no runtime dependency
    from typing_extensions import Self

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.sqlite"
KEEP = 20_000  # rows: many times the events a reconcile could still be waiting for
BUSY_WAIT = 5.0  # seconds a reader or the writer waits for the other's lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS observed (
    seq        INTEGER PRIMARY KEY,
    boot_id    TEXT NOT NULL,
    uri        TEXT NOT NULL,
    uuid       TEXT NOT NULL,
    transition TEXT NOT NULL,
    reason     TEXT NOT NULL,
    monotonic  REAL NOT NULL,
    timestamp  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS observed_by_domain ON observed (uri, uuid, seq);
"""
_COLUMNS = "seq, boot_id, uri, uuid, transition, reason, monotonic, timestamp"

JournalError = (sqlite3.Error, OSError)


def journal_path(cachedir: str) -> str:
    """Where the journal of the minion whose cachedir is ``cachedir`` lives."""
    return os.path.join(cachedir, "vmpower", JOURNAL_NAME)


class Journal:
    """The journal at ``path``: ``append`` for the beacon, ``read`` for reconcile, ``latest``
    for a sync.

    Opened lazily; a reader never creates the file (no journal: nothing observed). One
    connection per object, used by one thread at a time.
    """

    def __init__(self, path: str, boot_id: Callable[[], str] = hostinfo.boot_id):
        self.path = path
        self._boot_id = boot_id
        self._db: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._db is not None and create and self._moved():
            log.warning("vmpower: the journal %s was removed (saltutil.clear_cache?); starting "
                        "a new one", self.path)
            self.close()
        if self._db is None:
            if not create and not os.path.exists(self.path):
                return None
            if create:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_WAIT, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
            self._inode = self._stat()
        return self._db

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _moved(self) -> bool:
        return self._stat() != self._inode

    def append(self, entries: Sequence[Observation], after: int = 0) -> list[int]:
        """Journal ``entries`` in one transaction, numbered after both the journal's last
        ``seq`` and ``after`` (their own ``seq`` is ignored); returns their numbers, in order.
        A journal started afresh (or found removed) begins with a gap."""
        if not entries:
            return []
        fresh = self._db is None or self._moved()
        db = self._open(create=True)
        boot = self._boot_id()
        db.execute("BEGIN IMMEDIATE")
        try:
            last = db.execute("SELECT max(seq) FROM observed").fetchone()[0] or 0
            seq = max(last, after)
            rows = []
            if fresh and last == 0 and entries[0].transition != GAP:
                seq += 1  # nothing before it is known: what came before was not watched
                rows.append((seq, boot, entries[0].uri, "", GAP, "journal", entries[0].monotonic,
                             entries[0].timestamp))
            numbers = []
            for entry in entries:
                seq += 1
                numbers.append(seq)
                rows.append((seq, entry.boot_id, entry.uri, entry.uuid, _text(entry.transition),
                             entry.reason, entry.monotonic, entry.timestamp))
            db.executemany(f"INSERT INTO observed ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            db.execute("DELETE FROM observed WHERE seq <= ?", (seq - KEEP,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return numbers

    def last_seq(self) -> int:
        """The journal's last ``seq`` (0 when it has none, or there is no journal)."""
        db = self._open(create=False)
        if db is None:
            return 0
        return db.execute("SELECT max(seq) FROM observed").fetchone()[0] or 0

    def read(self, seq: int, uuid: str) -> tuple[Observation | None, Observation | None]:
        """The row ``seq``, and the first row after it for the same domain or a gap, on the
        same URI in the same boot (None for either when there is none)."""
        db = self._open(create=False)
        if db is None:
            return None, None
        row = db.execute(f"SELECT {_COLUMNS} FROM observed WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            return None, None
        entry = _observation(row)
        later = db.execute(
            f"SELECT {_COLUMNS} FROM observed WHERE seq > ? AND boot_id = ? AND uri = ? "
            f"AND uuid IN (?, '') ORDER BY seq LIMIT 1",
            (seq, entry.boot_id, entry.uri, entry.uuid)).fetchone()
        return entry, _observation(later) if later else None


    def latest(self, uuid: str, uri: str) -> tuple[Observation | None, bool]:
        """The journal's last row for the domain ``uuid`` on ``uri``, and whether a gap in the
        beacon's watch came after it (None, False when it has none, or there is no journal)."""
        db = self._open(create=False)
        if db is None:
            return None, False
        row = db.execute(f"SELECT {_COLUMNS} FROM observed WHERE uri = ? AND uuid = ? "
                         f"ORDER BY seq DESC LIMIT 1", (uri, uuid)).fetchone()
        if row is None:
            return None, False
        entry = _observation(row)
        gap = db.execute("SELECT 1 FROM observed WHERE seq > ? AND uuid = '' LIMIT 1",
                         (entry.seq,)).fetchone()
        return entry, gap is not None


def _text(transition: Transition | str) -> str:
    return transition.value if isinstance(transition, Transition) else str(transition)


def _observation(row: tuple) -> Observation:
    seq, boot_id, uri, uuid, transition, reason, monotonic, timestamp = row
    try:
        parsed: Transition | str = Transition(transition)
    except ValueError:  # a gap, or a word of a newer vmpower: a gap, which is believed in nothing
        parsed = GAP
    return Observation(seq, boot_id, uri, uuid, parsed, reason, monotonic, timestamp)
