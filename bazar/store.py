"""One replica's durable state: a SQLite file holding the service's tables, the
ordered write log, the results of applied requests (for idempotency) and the
replication metadata (promised epoch, snapshot base).

A write is applied to the tables and appended to the log in one transaction, so the
log and the state can never disagree after a crash. SQLite runs in WAL mode with
synchronous=NORMAL: a committed transaction survives the death of the process
(kill -9), which is the failure the store is built for; a power cut may lose the
last transactions, which the other replicas still hold.

Calls are synchronous on the reactor thread: each one is a few hundred microseconds
on a small database, and running them in order on one thread is what keeps the
primary's ordering trivially right.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Protocol

from attrs import frozen

from bazar.web import HTTPError, dumps, loads


@frozen
class Entry:
    """One write in the log: its position, the epoch of the primary that ordered it,
    and the operation (a JSON object with an "op" name and a "rid" request id)."""

    seq: int
    epoch: int
    op: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "epoch": self.epoch, "op": self.op}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Entry":
        return cls(seq=int(data["seq"]), epoch=int(data["epoch"]), op=data["op"])


@frozen
class Outcome:
    """What a write did: its result for the client, the log position that holds it,
    and the cache keys it changed (for invalidation)."""

    result: dict[str, Any]
    seq: int
    keys: tuple[str, ...]
    new: bool  # False when the request id had already been applied


class OpError(HTTPError):
    """An operation that cannot apply (unknown id, out of stock): nothing is logged."""


class StateMachine(Protocol):
    """A service's deterministic state: the same entries in the same order give the
    same tables on every replica."""

    tables: tuple[str, ...]

    def create(self, db: sqlite3.Connection) -> None: ...

    def apply(self, db: sqlite3.Connection, op: dict[str, Any], seq: int) -> tuple[dict[str, Any], tuple[str, ...]]: ...


class Store:
    def __init__(self, path: str, machine: StateMachine):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.machine = machine
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS log "
                            "(seq INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, op TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS requests "
                            "(rid TEXT PRIMARY KEY, seq INTEGER NOT NULL, result TEXT NOT NULL, keys TEXT NOT NULL)")
            machine.create(self.db)
        self.base_seq = self._meta("base_seq")
        self.base_epoch = self._meta("base_epoch")
        self.promised = self._meta("promised")
        row = self.db.execute("SELECT seq, epoch FROM log ORDER BY seq DESC LIMIT 1").fetchone()
        self.last_seq: int = int(row[0]) if row else self.base_seq
        self.last_epoch: int = int(row[1]) if row else self.base_epoch

    # -- metadata -------------------------------------------------------------
    def _meta(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def promise(self, epoch: int) -> None:
        """Never again accept writes or votes from an epoch below this one."""
        if epoch > self.promised:
            with self.db:
                self._set_meta("promised", epoch)
            self.promised = epoch

    # -- writes ---------------------------------------------------------------
    def execute(self, op: dict[str, Any], epoch: int) -> Outcome:
        """Primary side: apply a new operation at the next position of the log, or
        return the recorded outcome when its request id was applied before."""
        rid = op["rid"]
        row = self.db.execute("SELECT seq, result, keys FROM requests WHERE rid = ?", (rid,)).fetchone()
        if row:
            return Outcome(loads(row[1]), row[0], tuple(loads(row[2])), new=False)
        seq = self.last_seq + 1
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result, keys = self.machine.apply(self.db, op, seq)
            self._record(Entry(seq, epoch, op), result, keys)
        except (KeyError, TypeError, ValueError, OverflowError, sqlite3.IntegrityError) as exc:
            # malformed values (a constraint of the tables, an integer SQLite cannot hold)
            self.db.execute("ROLLBACK")
            raise OpError(400, f"malformed operation: {exc.__class__.__name__}") from None
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.last_seq, self.last_epoch = seq, epoch
        return Outcome(result, seq, keys, new=True)

    def _record(self, entry: Entry, result: dict[str, Any], keys: tuple[str, ...]) -> None:
        self.db.execute("INSERT INTO log (seq, epoch, op) VALUES (?, ?, ?)",
                        (entry.seq, entry.epoch, dumps(entry.op).decode()))
        self.db.execute("INSERT OR REPLACE INTO requests (rid, seq, result, keys) VALUES (?, ?, ?, ?)",
                        (entry.op["rid"], entry.seq, dumps(result).decode(), dumps(list(keys)).decode()))

    def append(self, entries: list[Entry]) -> list[Outcome]:
        """Backup side: apply entries that directly follow the log, in one transaction."""
        outcomes: list[Outcome] = []
        if not entries:
            return outcomes
        self.db.execute("BEGIN IMMEDIATE")
        try:
            seq = self.last_seq
            for entry in entries:
                if entry.seq != seq + 1:
                    raise ValueError(f"entry {entry.seq} does not follow {seq}")
                result, keys = self.machine.apply(self.db, entry.op, entry.seq)
                self._record(entry, result, keys)
                outcomes.append(Outcome(result, entry.seq, keys, new=True))
                seq = entry.seq
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.last_seq, self.last_epoch = entries[-1].seq, entries[-1].epoch
        return outcomes

    # -- reading the log ------------------------------------------------------
    def epoch_at(self, seq: int) -> int | None:
        """The epoch of the entry at `seq`, or None when this log does not hold it."""
        if seq == self.base_seq:
            return self.base_epoch
        if seq < self.base_seq or seq > self.last_seq:
            return None
        row = self.db.execute("SELECT epoch FROM log WHERE seq = ?", (seq,)).fetchone()
        return int(row[0]) if row else None

    def entries_after(self, seq: int, limit: int = 500) -> list[Entry]:
        rows = self.db.execute("SELECT seq, epoch, op FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
                               (seq, limit)).fetchall()
        return [Entry(s, e, loads(o)) for s, e, o in rows]

    # -- snapshots ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything a replica needs to continue from this log's last entry."""
        tables = {}
        for table in self.machine.tables + ("requests",):
            cursor = self.db.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
            tables[table] = {"columns": [c[0] for c in cursor.description], "rows": cursor.fetchall()}
        return {"seq": self.last_seq, "epoch": self.last_epoch, "tables": tables}

    def install(self, snap: dict[str, Any]) -> None:
        """Replace this replica's state and log by a snapshot of another replica."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM log")
            for table in self.machine.tables + ("requests",):
                data = snap["tables"][table]
                columns = data["columns"]
                self.db.execute(f"DELETE FROM {table}")  # noqa: S608
                marks = ", ".join("?" for _ in columns)
                self.db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
                                    [tuple(r) for r in data["rows"]])
            self._set_meta("base_seq", int(snap["seq"]))
            self._set_meta("base_epoch", int(snap["epoch"]))
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.base_seq = self.last_seq = int(snap["seq"])
        self.base_epoch = self.last_epoch = int(snap["epoch"])

    def close(self) -> None:
        self.db.close()
