"""The device's telemetry queue: a bounded SQLite file that keeps every message until the hub says it
stored it (by sequence number), across broker outages, hub outages, kill -9 and power loss.

- **Durable**: WAL journal with ``synchronous=FULL``: a message is on disk when ``append`` returns
  (each interval's messages are one transaction, one fsync), and a kill -9 or a power cut loses
  nothing that was appended.
- **Sequence numbers** are assigned in the same transaction as the rows (``meta.next_seq``), so a
  number is never used twice, not even across a crash.
- **Bounded in bytes**: when the payloads held would pass ``max_bytes``, the oldest messages are
  dropped in that transaction and counted (``dropped``, kept in the file and reported). Below the
  bound nothing is dropped.
- **Shrinks back**: the file is created with ``auto_vacuum=INCREMENTAL``; once the queue drained
  (or a quarter of the file is free pages) the free pages are given back and the WAL is truncated,
  so a long outage does not leave a big file behind.

One thread uses a Spool (the agent's telemetry thread); it is not shared between threads.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MAX_BYTES", "Spool", "SpoolStats"]

#: The default bound of the payloads held: days of a few models' 10-second telemetry.
DEFAULT_MAX_BYTES = 16 << 20
#: Free space (bytes) in the file past which it is shrunk even while messages are queued.
_SHRINK_FREE_BYTES = 1 << 20


@dataclass(frozen=True)
class SpoolStats:
    messages: int
    bytes: int
    dropped: int
    file_bytes: int

    def as_dict(self) -> dict[str, int]:
        return {"messages": self.messages, "bytes": self.bytes, "dropped": self.dropped, "file_bytes": self.file_bytes}


class Spool:
    """Messages by sequence number, oldest first, in ``path`` (created with its folder)."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1024:
            msg = f"the telemetry queue bound must be at least 1024 bytes, not {max_bytes}"
            raise ValueError(msg)
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes on a new file: before any table
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA journal_size_limit=1048576")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY, created REAL NOT NULL, body BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', 1), ('dropped', 0)")
        held = self._db.execute("SELECT COALESCE(SUM(length(body)), 0), COUNT(*) FROM messages").fetchone()
        self._bytes, self._count = int(held[0]), int(held[1])
        self._dropped = self._meta("dropped")

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    # -- writing --------------------------------------------------------------------------------

    def append(self, makers: Sequence[Callable[[int], bytes]], created: float) -> list[int]:
        """Store one message per maker (called with its sequence number, it returns the payload),
        in one transaction; drop the oldest past the bound. Returns the numbers given."""
        if not makers:
            return []
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            first = self._meta("next_seq")
            seqs = list(range(first, first + len(makers)))
            rows = [(seq, created, make(seq)) for seq, make in zip(seqs, makers, strict=True)]
            db.executemany("INSERT INTO messages VALUES (?, ?, ?)", rows)
            db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (first + len(makers),))
            held = self._bytes + sum(len(r[2]) for r in rows)
            count = self._count + len(rows)
            dropped = 0
            while held > self.max_bytes and count > 0:
                # the oldest first, a few hundred at a time, until what is held fits again
                cut = db.execute("SELECT seq, length(body) FROM messages ORDER BY seq LIMIT 256").fetchall()
                keep_from = None
                for seq, size in cut:
                    if held <= self.max_bytes:
                        keep_from = seq
                        break
                    held -= size
                    count -= 1
                    dropped += 1
                last = cut[-1][0] + 1 if keep_from is None else keep_from
                db.execute("DELETE FROM messages WHERE seq < ?", (last,))
            if dropped:
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._bytes, self._count, self._dropped = held, count, self._dropped + dropped
        return seqs

    def ack(self, seqs: Iterable[int]) -> int:
        """Forget messages the hub stored; returns how many were still here."""
        wanted = sorted(set(seqs))
        if not wanted:
            return 0
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            gone = 0
            size = 0
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                marks = ",".join("?" * len(part))
                n, b = db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM messages WHERE seq IN ({marks})",  # noqa: S608 - placeholders only
                    part,
                ).fetchone()
                db.execute(f"DELETE FROM messages WHERE seq IN ({marks})", part)  # noqa: S608 - placeholders only
                gone += n
                size += b
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._count -= gone
        self._bytes -= size
        if gone:
            self._maybe_shrink()
        return gone

    def _maybe_shrink(self) -> None:
        page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0]) * page
        total = int(self._db.execute("PRAGMA page_count").fetchone()[0]) * page
        if free and (self._count == 0 or free >= _SHRINK_FREE_BYTES or free * 4 >= total):
            # one page per step, and a row of no columns per page: Python's execute() steps a
            # statement without columns once (one page freed); executescript() steps it to the end
            self._db.executescript("PRAGMA incremental_vacuum;")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- reading --------------------------------------------------------------------------------

    def oldest(self, limit: int, *, after: int = 0) -> list[tuple[int, bytes]]:
        """Up to ``limit`` messages with a sequence number over ``after``, oldest first."""
        rows = self._db.execute(
            "SELECT seq, body FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [(int(s), bytes(b)) for s, b in rows]

    def stats(self) -> SpoolStats:
        files = (self.path, self.path.with_name(self.path.name + "-wal"))
        size = sum(p.stat().st_size for p in files if p.exists())
        return SpoolStats(self._count, self._bytes, self._dropped, size)

    @property
    def next_seq(self) -> int:
        return self._meta("next_seq")

    def close(self) -> None:
        self._db.close()
