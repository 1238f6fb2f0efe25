"""One replica's durable state, in one SQLite file: the Raft log and hard state
(term, vote, whether this replica may vote), the service's tables as of the last
applied entry, and the results of applied requests (for idempotency, §6.3).

- Writes made by the Raft core (`append`, `set_hard_state`, `set_voter`) and the
  application of committed entries (`apply`) go into one open transaction;
  `flush()` commits it. The caller flushes before it sends the messages that depend
  on those writes (§3.8), so one fsync covers everything one turn of the reactor
  wrote: group commit.
- SQLite runs in WAL mode with `synchronous=FULL`: a commit is on the disk (fsync of
  the WAL) when `flush()` returns, so acknowledged entries and promised votes
  survive a power cut, not only the death of the process.
- The tables only ever hold committed entries: an entry is applied when the leader
  says it is committed, never when it is appended. So anything read from a replica,
  primary or backup, is committed state, and two replicas at the same applied index
  hold the same tables.
- A file SQLite cannot open or that fails its integrity check is moved aside and a
  fresh one created: the replica then catches up from its peers as a learner.

Calls are synchronous on the reactor thread: a few hundred microseconds each, and in
order on one thread, which keeps the ordering trivially right.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import weakref
from typing import Any, Protocol

from attrs import frozen
from twisted.logger import Logger

from bazar.codec import dumps, loads
from bazar.errors import BazarError, Invalid, Unavailable, error_of_kind
from bazar.ops import Op
from bazar.replication.raft import Entry

log = Logger()

__all__ = ["Entry", "Outcome", "StateMachine", "Store", "fingerprint"]

# The layout of the file, in SQLite's user_version: 1 records an outcome by the kind
# of its error (bazar.errors) rather than by a number (0, the first layout).
LAYOUT = 1


@frozen
class Outcome:
    """What an applied write did: its result for the client (or the error it met),
    the log index that holds it, and the cache keys it changed (for invalidation)."""

    result: dict[str, Any]
    seq: int
    keys: tuple[str, ...]
    new: bool  # False when the request id had already been applied
    failed: str | None = None  # the kind of error (bazar.errors) the operation met when applied

    def error(self) -> BazarError | None:
        """The error the operation met, as it was raised when applied (None: it did what it said)."""
        if self.failed is None:
            return None
        return error_of_kind(self.failed, str(self.result.get("error", "")))

    def to_json(self) -> dict[str, Any]:
        """A successful outcome as a forwarded write's answer (a failed one is answered
        as its error)."""
        return {"result": self.result, "seq": self.seq, "keys": list(self.keys), "new": self.new}

    @classmethod
    def from_json(cls, data: Any) -> Outcome:
        try:
            result, seq, keys, new = data["result"], data["seq"], data["keys"], data["new"]
        except (KeyError, TypeError):
            raise Unavailable("a replica answered a write with a malformed answer") from None
        if not isinstance(result, dict) or type(seq) is not int or not isinstance(keys, list) \
                or not all(isinstance(k, str) for k in keys):
            raise Unavailable("a replica answered a write with a malformed answer")
        return cls(result, seq, tuple(keys), bool(new))


class StateMachine(Protocol):
    """A service's deterministic state: the same entries in the same order give the
    same tables on every replica. `apply` changes the tables or raises a BazarError
    (the operation is then an outcome that changed nothing). `tables` are its tables
    with an `id`; `state_tables`, every table a snapshot carries; `tried`, whether a
    write is run on the current state before it takes an entry (`Store.validate`): a
    machine whose `apply` refuses nothing that `parse` lets through needs no trial."""

    tables: tuple[str, ...]
    state_tables: tuple[str, ...]
    tried: bool

    def create(self, db: sqlite3.Connection) -> None: ...

    def parse(self, data: Any) -> Op: ...

    def apply(self, db: sqlite3.Connection, op: Op, seq: int) -> tuple[dict[str, Any], tuple[str, ...]]: ...


# Fields that may differ between two sendings of the same request (a retry stamps a
# new time): they are not part of what a request id stands for.
VOLATILE = frozenset({"rid", "created", "created_ts"})


TAIL = 4096  # entries kept in memory at the end of the log (`Store.entries` serves them without SQLite) ...
TAIL_BYTES = 4 * 1024 * 1024  # ... and about this many bytes of them as JSON: an import's entry is up to 64 KiB

# Request ids are kept for the service's next RETAIN_REQUESTS writes, then forgotten:
# checked at every EXPIRE_EVERY-th log index, as part of applying that entry, so every
# replica forgets the same ids at the same point of the log (a protocol constant: it
# must be the same on every replica).
RETAIN_REQUESTS = 50_000
EXPIRE_EVERY = 1_000
# The log is compacted once COMPACT_AFTER entries are applied past the last compaction,
# up to KEEP_ENTRIES before the applied index (a backup a little behind still gets
# entries, not a snapshot).
COMPACT_AFTER = 10_000
KEEP_ENTRIES = 2_000
# The WAL file is cut back to this size after a checkpoint (SQLite lets it grow to the
# largest transaction otherwise).
WAL_LIMIT = 16 * 1024 * 1024
SNAPSHOT_ROWS = 2_000  # rows of one table in one chunk of a snapshot

# What the tables themselves refuse (a CHECK constraint, an integer beyond 64 bits):
# the operation was malformed.
REFUSED_BY_TABLES = (OverflowError, sqlite3.IntegrityError)


def fingerprint(op: dict[str, Any]) -> str:
    """What a request id stands for: the operation, less its volatile fields."""
    stable = {k: v for k, v in op.items() if k not in VOLATILE}
    return hashlib.sha256(dumps(dict(sorted(stable.items())))).hexdigest()[:32]


class Store:
    """The `bazar.replication.raft.Log` of one replica, and its state machine."""

    def __init__(self, path: str, machine: StateMachine, *, synchronous: str = "FULL",
                 compact_after: int = COMPACT_AFTER, keep_entries: int = KEEP_ENTRIES):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.path = path
        self.machine = machine
        self.synchronous = synchronous
        self.compact_after = compact_after
        self.keep_entries = keep_entries
        self.healed = False
        try:
            self._open(synchronous)
        except sqlite3.OperationalError:
            raise  # locked, unreadable directory: not a corrupt file, nothing to heal
        except sqlite3.DatabaseError as exc:
            # Corrupt (or not a database at all): keep it for a post-mortem, start empty
            # and catch up from the peers as a learner.
            aside = f"{path}.corrupt-{time.time_ns()}"
            log.error("the store {path} is unreadable ({why}): moved to {aside}; rebuilding from the peers",
                      path=path, why=str(exc), aside=aside)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.replace(path + suffix, aside + suffix)
            self.healed = True
            self._open(synchronous)

    def _open(self, synchronous: str) -> None:
        # the file is the store's and nobody else's (SQLite gives its -wal and -shm files
        # the same mode): created 600, like secrets.json
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self.db = db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            db.execute(f"PRAGMA synchronous={synchronous}")
            self._mode = synchronous
            check = db.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
            with db:
                db.execute("CREATE TABLE IF NOT EXISTS raft_log "
                           "(idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, op TEXT)")
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
                db.execute("CREATE TABLE IF NOT EXISTS requests (rid TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
                           "fp TEXT NOT NULL, outcome TEXT NOT NULL, result TEXT NOT NULL, keys TEXT NOT NULL)")
                self._upgrade(db)
                self.machine.create(db)
                for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                          "AND name LIKE 'staged\\_%' ESCAPE '\\'").fetchall():
                    db.execute(f"DROP TABLE {name}")  # a snapshot that was never installed
            self.term = self._meta("term")
            vote = self._meta("vote")
            self.vote: int | None = vote if vote > 0 else None
            self.voter = bool(self._meta("voter"))
            self.applied = self._meta("applied")
            # the log: compacted up to snapshot_index (§5.1); _terms[i]: the term of
            # entry snapshot_index + i (index 0: the compacted prefix's last entry)
            self.snapshot_index = self._meta("snapshot_index")
            self._terms: list[int] = [self._meta("snapshot_term")]
            for (term,) in db.execute("SELECT term FROM raft_log WHERE idx > ? ORDER BY idx", (self.snapshot_index,)):
                self._terms.append(int(term))
        except BaseException:
            db.close()
            raise
        self._in_tx = False
        self._durable_tx = False
        self._tail: list[Entry] = []  # the last entries of the log, as appended (TAIL, TAIL_BYTES)
        self._tail_sizes: list[int] = []  # their sizes as JSON
        self._tail_bytes = 0
        self.readers: weakref.WeakSet[SnapshotReader] = weakref.WeakSet()  # open snapshot reads

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        """Bring a file of an earlier layout to LAYOUT (inside the opening transaction)."""
        (layout,) = db.execute("PRAGMA user_version").fetchone()
        if layout == 0:
            columns = [row[1] for row in db.execute("PRAGMA table_info(requests)")]
            if "status" in columns:  # outcomes recorded by number: 200 ok, 400, 404, 409
                kinds = {200: "", 400: "Invalid", 404: "NotFound", 409: "OutOfStock"}
                db.execute("ALTER TABLE requests RENAME TO requests_0")
                db.execute("CREATE TABLE requests (rid TEXT PRIMARY KEY, seq INTEGER NOT NULL, fp TEXT NOT NULL, "
                           "outcome TEXT NOT NULL, result TEXT NOT NULL, keys TEXT NOT NULL)")
                rows = db.execute("SELECT rid, seq, fp, status, result, keys FROM requests_0").fetchall()
                db.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?)",
                               [(r, q, f, kinds.get(st, "Conflict"), res, k) for r, q, f, st, res, k in rows])
                db.execute("DROP TABLE requests_0")
        if layout < LAYOUT:
            db.execute(f"PRAGMA user_version = {LAYOUT}")

    # -- transactions -----------------------------------------------------------------
    def _begin(self, durable: bool = True) -> None:
        """Open the transaction of this turn. The log and the hard state must reach the
        disk before the messages that depend on them leave (fsync at commit); applied
        tables need not: they are derived from the log and replayed after a power cut
        (a later fsync of the WAL also covers them)."""
        if self._in_tx and durable and not self._durable_tx:
            self.flush()
        if not self._in_tx:
            mode = "FULL" if durable and self.synchronous == "FULL" else "NORMAL"
            if mode != self._mode:
                self.db.execute(f"PRAGMA synchronous={mode}")
                self._mode = mode
            self.db.execute("BEGIN IMMEDIATE")
            self._in_tx = True
            self._durable_tx = durable

    def flush(self) -> None:
        """Commit what this turn wrote (one fsync when the log or hard state changed)."""
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def _meta(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int, durable: bool = True) -> None:
        self._begin(durable)
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # -- bazar.replication.raft.Log -----------------------------------------------------------------
    def set_hard_state(self, term: int, vote: int | None) -> None:
        if term != self.term:
            self._set_meta("term", term)
            self.term = term
        if vote != self.vote:
            self._set_meta("vote", vote or 0)
            self.vote = vote

    def set_voter(self) -> None:
        if not self.voter:
            self._set_meta("voter", 1)
            self.voter = True

    def last_index(self) -> int:
        return self.snapshot_index + len(self._terms) - 1

    def term_at(self, index: int) -> int | None:
        offset = index - self.snapshot_index
        if 0 <= offset < len(self._terms):
            return self._terms[offset]
        return None

    def entries(self, lo: int, hi: int) -> list[Entry]:
        lo = max(lo, 1)
        hi = min(hi, self.last_index() + 1)
        if lo >= hi:
            return []
        if lo <= self.snapshot_index:
            raise ValueError(f"entries from {lo} are compacted (up to {self.snapshot_index})")
        tail = self._tail
        if tail and lo >= tail[0].index and hi - 1 <= tail[-1].index:
            start = lo - tail[0].index
            return tail[start:start + hi - lo]
        rows = self.db.execute("SELECT idx, term, op FROM raft_log WHERE idx >= ? AND idx < ? ORDER BY idx",
                               (lo, hi)).fetchall()
        return [Entry(i, t, loads(o) if o is not None else None) for i, t, o in rows]

    def append(self, entries: list[Entry]) -> None:
        if not entries:
            return
        first = entries[0].index
        if not self.snapshot_index < first <= self.last_index() + 1:
            raise ValueError(f"entry {first} does not follow the log (last {self.last_index()})")
        if first <= self.applied:
            raise ValueError(f"entry {first} would replace an applied entry (applied {self.applied})")
        if any(b.index != a.index + 1 for a, b in zip(entries, entries[1:])):
            raise ValueError("entries to append must be consecutive")
        self._begin()
        if first <= self.last_index():
            self.db.execute("DELETE FROM raft_log WHERE idx >= ?", (first,))
            del self._terms[first - self.snapshot_index:]
        texts = [dumps(e.op).decode() if e.op is not None else None for e in entries]
        self.db.executemany("INSERT INTO raft_log (idx, term, op) VALUES (?, ?, ?)",
                            [(e.index, e.term, text) for e, text in zip(entries, texts)])
        self._terms.extend(e.term for e in entries)
        # the newest entries stay in memory: they are sent to the followers and applied soon
        tail, sizes = self._tail, self._tail_sizes
        if tail and tail[0].index <= first <= tail[-1].index + 1:
            cut = first - tail[0].index
            self._tail_bytes -= sum(sizes[cut:])
            del tail[cut:], sizes[cut:]
        else:
            tail.clear()
            sizes.clear()
            self._tail_bytes = 0
        tail.extend(entries)
        sizes.extend(len(text) if text is not None else 0 for text in texts)
        self._tail_bytes += sum(sizes[len(sizes) - len(entries):])
        over, drop, dropped = len(tail) - TAIL, 0, 0
        while drop < len(tail) - 1 and (drop < over or self._tail_bytes - dropped > TAIL_BYTES):
            dropped += sizes[drop]
            drop += 1
        if drop:
            self._tail_bytes -= dropped
            del tail[:drop], sizes[:drop]

    # -- compaction (§5.1) ---------------------------------------------------------------
    def compact(self, upto: int) -> bool:
        """Forget the log up to `upto`, an applied index: the tables hold what those
        entries did. Part of this turn's transaction (losing it in a crash only means
        compacting again)."""
        if not self.snapshot_index < upto <= min(self.applied, self.last_index()):
            return False
        term = self.term_at(upto)
        assert term is not None
        self._begin(durable=False)
        self.db.execute("DELETE FROM raft_log WHERE idx <= ?", (upto,))
        self._set_meta("snapshot_index", upto, durable=False)
        self._set_meta("snapshot_term", term, durable=False)
        del self._terms[:upto - self.snapshot_index]
        self.snapshot_index = upto
        gone = sum(1 for e in self._tail if e.index <= upto)
        self._tail_bytes -= sum(self._tail_sizes[:gone])
        del self._tail[:gone], self._tail_sizes[:gone]
        return True

    def compaction_due(self) -> int | None:
        """Where to compact now, if it is time (`compact_after` entries applied past the
        last compaction; `keep_entries` kept before the applied index)."""
        if self.applied - self.snapshot_index >= self.compact_after + self.keep_entries:
            return self.applied - self.keep_entries
        return None

    def snapshot_reader(self) -> SnapshotReader:
        """The state as of the last committed transaction, read in chunks over as many
        turns as the caller likes (a read transaction of its own keeps it consistent)."""
        reader = SnapshotReader(self.path, self.machine.state_tables + ("requests",))
        self.readers.add(reader)
        return reader

    def stage_snapshot(self, first: bool, tables: dict[str, list[list[Any]]]) -> None:
        """A chunk of a snapshot being installed, kept in staging tables of this file
        until `install_snapshot` (a crash meanwhile leaves the state as it was)."""
        names = self.machine.state_tables + ("requests",)
        unknown = set(tables) - set(names)
        if unknown:
            raise ValueError(f"a snapshot with an unknown table {sorted(unknown)[0]!r}")
        self._begin(durable=False)
        if first:
            for name in names:
                self.db.execute(f"DROP TABLE IF EXISTS staged_{name}")
                self.db.execute(f"CREATE TABLE staged_{name} AS SELECT * FROM {name} WHERE 0")
        for name, rows in tables.items():
            if rows:
                marks = ", ".join("?" * len(rows[0]))
                self.db.executemany(f"INSERT INTO staged_{name} VALUES ({marks})", rows)
        self.flush()

    def install_snapshot(self, index: int, term: int) -> None:
        """Replace the state with the staged snapshot as of `index` (of `term`), and the
        log with an empty one compacted up to there, in one durable transaction (§5.3)."""
        names = self.machine.state_tables + ("requests",)
        self.flush()
        self._begin()
        for name in names:
            self.db.execute(f"DELETE FROM {name}")
            self.db.execute(f"INSERT INTO {name} SELECT * FROM staged_{name}")
            self.db.execute(f"DROP TABLE staged_{name}")
        self.db.execute("DELETE FROM raft_log")
        for key, value in (("applied", index), ("snapshot_index", index), ("snapshot_term", term), ("seeded", 1)):
            self._set_meta(key, value)
        self.flush()
        self.applied = self.snapshot_index = index
        self._terms = [term]
        self._tail, self._tail_sizes, self._tail_bytes = [], [], 0

    def request_ids(self) -> int:
        """Rows of the request-id table (RETAIN_REQUESTS writes bound it), counted when
        asked: /metrics reads it at scrape time, nothing keeps it on the write path."""
        (rows,) = self.db.execute("SELECT COUNT(*) FROM requests").fetchone()
        return int(rows)

    @property
    def last_seq(self) -> int:
        """The index of the last applied (committed) entry: what this replica's tables hold."""
        return self.applied

    @property
    def pristine(self) -> bool:
        """Never took part in any election nor held any entry: a new replica, or one
        whose data directory was lost."""
        return self.term == 0 and self.last_index() == 0 and self.vote is None

    # -- the state machine --------------------------------------------------------------
    def recorded(self, op: dict[str, Any]) -> Outcome | None:
        """The outcome of an applied request with this id, if any (§6.3). A request id
        sent again with another operation is an error, never the other's result."""
        row = self.db.execute("SELECT seq, fp, outcome, result, keys FROM requests WHERE rid = ?",
                              (op["rid"],)).fetchone()
        if row is None:
            return None
        seq, fp, outcome, result, keys = row
        if fp != fingerprint(op):
            return Outcome({"error": "this request id (Idempotency-Key) was already used for a different operation"},
                           seq, (), new=False, failed="Conflict")
        return Outcome(loads(result), seq, tuple(loads(keys)), new=False, failed=outcome or None)

    def validate(self, op: dict[str, Any], refuse: tuple[type[BazarError], ...] = ()) -> None:
        """Refuse (Invalid) an operation that could never apply, whatever the state (a
        missing field, a value the tables refuse), before it takes a log entry: a
        trial run on the current state, always taken back. Errors of the kinds in
        `refuse` (NotFound) are refused too: the caller knows this state is current
        (a leader within its lease), so the refusal is a read of it and needs no entry."""
        parsed = self.machine.parse(op)
        if not self.machine.tried:
            return
        self._begin()
        self.db.execute("SAVEPOINT trial")
        try:
            self.machine.apply(self.db, parsed, self.applied + 1)
        except Invalid:
            raise
        except BazarError as exc:
            if isinstance(exc, refuse):
                raise
        except REFUSED_BY_TABLES as exc:
            raise Invalid(f"malformed operation: {exc.__class__.__name__}") from None
        finally:
            self.db.execute("ROLLBACK TO trial")
            self.db.execute("RELEASE trial")

    def apply(self, entry: Entry) -> Outcome:
        """Apply a committed entry (in order); its outcome. Failures of the operation
        are outcomes too (they change nothing), the same on every replica."""
        if entry.index != self.applied + 1:
            raise ValueError(f"entry {entry.index} applied out of order (applied {self.applied})")
        self._begin(durable=False)
        op = entry.op
        outcome = Outcome({}, entry.index, (), new=False)
        if op is not None:
            rid = op.get("rid") if isinstance(op, dict) else None
            previous = self.recorded(op) if isinstance(rid, str) else None
            outcome = previous if previous is not None else self._run(entry)
        self.applied = entry.index
        self._set_meta("applied", entry.index, durable=False)
        if entry.index % EXPIRE_EVERY == 0:
            self.db.execute("DELETE FROM requests WHERE seq <= ?", (entry.index - RETAIN_REQUESTS,))
        return outcome

    def _run(self, entry: Entry) -> Outcome:
        op = entry.op
        assert op is not None
        self.db.execute("SAVEPOINT op")
        failed: str | None = None
        try:
            result, keys = self.machine.apply(self.db, self.machine.parse(op), entry.index)
        except BazarError as exc:
            result, keys, failed = {"error": exc.message}, (), exc.kind
        except REFUSED_BY_TABLES as exc:
            result, keys, failed = {"error": f"malformed operation: {exc.__class__.__name__}"}, (), Invalid.__name__
        except BaseException:
            # a bug, not an outcome: take its changes back so that no flush commits half of it
            self.db.execute("ROLLBACK TO op")
            self.db.execute("RELEASE op")
            raise
        if failed is not None:
            self.db.execute("ROLLBACK TO op")
        self.db.execute("RELEASE op")
        rid = op.get("rid")
        if isinstance(rid, str) and failed != Invalid.__name__:
            # an Invalid operation is not recorded: its request id stays free
            self.db.execute("INSERT OR REPLACE INTO requests (rid, seq, fp, outcome, result, keys) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (rid, entry.index, fingerprint(op), failed or "", dumps(result).decode(),
                             dumps(list(keys)).decode()))
        return Outcome(result, entry.index, tuple(keys), new=True, failed=failed)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without committing what this turn wrote (as a process that dies does)."""
        for reader in list(self.readers):
            reader.close()
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.db.close()


FIRST_ROWID = -(2**63)  # below every rowid (book 0 has rowid 0)


class SnapshotReader:
    """A replica's state (the tables a snapshot carries, and the applied index and its
    term) as of one moment, read in chunks: its own connection holds a read
    transaction, which WAL mode keeps consistent while the replica goes on writing."""

    def __init__(self, path: str, tables: tuple[str, ...]):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'applied'").fetchone()
        self.index = int(row[0]) if row else 0
        found = self.db.execute("SELECT term FROM raft_log WHERE idx = ?", (self.index,)).fetchone()
        if found is None:  # the applied index is where the log was compacted (or an empty store)
            found = self.db.execute("SELECT value FROM meta WHERE key = 'snapshot_term'").fetchone()
        self.term = int(found[0]) if found else 0
        self.pending = list(tables)
        self.after = FIRST_ROWID  # the last rowid read of the first pending table
        self.closed = False

    def chunk(self, rows: int = SNAPSHOT_ROWS) -> dict[str, list[list[Any]]] | None:
        """The next rows (of one table), or None once everything was read."""
        while self.pending:
            table = self.pending[0]
            found = self.db.execute(f"SELECT rowid, * FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                    (self.after, rows)).fetchall()
            if found:
                self.after = found[-1][0]
                return {table: [list(r[1:]) for r in found]}
            self.pending.pop(0)
            self.after = FIRST_ROWID
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.db.execute("COMMIT")
        finally:
            self.db.close()
