"""A whole Bazar store in one process, driven by one seed: deterministic simulation.

`World` wires 3 catalog and 3 order replicas (`Replica` over `Store`, with their
apps, the catalog's `Publisher` pushing invalidations to the front ends, the
order's `Purchases` with its sweep and its catalog health checks) and 1 or 2 front
ends (`Frontend` with its cache on, `InvalidationStream`, health polls), exactly as
the twistd plugins wire them, on the in-memory network of `bazar.sim.network` and
one simulated clock. Each process runs on its own `ProcessClock`, so it can be paused
(SIGSTOP) or killed (kill -9) on its own.

Everything random comes from the seed: one `random.Random(seed)` hands out a
separate stream to the nemesis, the clients, the network, every replica's election
timer and the front ends' request ids (`uuid.uuid4` is patched for the run), so a
seed replays exactly, and a change to the clients leaves the fault schedule as it
was.

`simulate(seed)` runs one seed: clients buy, change prices, restock and read
through the front ends while the `Nemesis` loses, delays and duplicates messages,
partitions (both ways and one way), crashes, restarts, pauses, wipes and corrupts
replicas (at most one replica per service without its data at a time, as the fault
model says). Then every fault is healed, the store is left quiet until it has
settled, and `World.check` looks for anything DESIGN.md "Guarantees" rules out: a
history that is not linearizable per book, stock that does not add up on some
catalog replica, an acknowledged purchase missing (or twice, or wrong) on some
order replica, a refused one kept, replicas of a service that differ, two leaders
in one term, a sale that is no order, a 500, an error logged as unexpected, a store
that does not answer again once healed.

The regression schedules of tests/test_simulation.py use the same `World` with
the nemesis off and drive the faults by hand.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, cast

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure

from bazar.catalog import CatalogMachine, CatalogNode, build_catalog
from bazar.frontend import Frontend, build_frontend
from bazar.http.client import Unreachable, call
from bazar.order import OrderMachine, OrderNode, Purchases, build_order
from bazar.records import SEED_BOOKS
from bazar.replication import raft
from bazar.replication.raft import Entry
from bazar.replication.replica import Replica
from bazar.replication.store import Outcome as StoreOutcome
from bazar.replication.store import Store
from bazar.settings import CatalogSettings, FrontendSettings, OrderSettings, ReplicaSettings
from bazar.sim.history import OUT_OF_STOCK, History, Op, book_key
from bazar.sim.linearizability import LINEARIZABLE, BookModel, check
from bazar.sim.network import DROP, MODES, REFUSE, LinkFaults, Network, ProcessClock, SimClock, url_of

# The simulated store's own credentials: nothing outside this process ever sees them.
SECRET = "cluster-secret-for-the-simulation"  # noqa: S105
TOKEN = "admin-token-for-the-simulation"  # noqa: S105
SERVICES = ("catalog", "order")
REPLICAS = (1, 2, 3)
FRONTEND_PORT = 5000
CLIENT_PORT = 6000
BASE_PORT = {"catalog": 5100, "order": 5200}
STEP = 0.05  # seconds of simulated time between two looks at the store (leaders, settling)
REQUEST_TIMEOUT = 10.0  # a client's patience for one answer
BUY_BUDGET = 25.0  # a buyer retries one Idempotency-Key this long at most
BUY_ATTEMPTS = 4
JITTER = 0.003  # every message takes up to 3 ms: concurrent messages arrive in any order
COMPACT_AFTER, KEEP_ENTRIES = 8, 4  # each replica's log compaction (see `boot`)
PROBE = 99  # the process id of the harness's own operations in the history
# Benign in a faulty network: a process logging these is doing its job.
EXPECTED_ERRORS = (
    "CancelledError",
    "TimeoutError",
    "ConnectionLost",
    "ConnectionRefusedError",
    "ConnectionDone",
    "ResponseNeverReceived",
    "Unavailable",
    "Invalid",
    "NotFound",
    "Conflict",
    "OutOfStock",
    "Unreachable",
    "Busy",
)


@frozen
class Profile:
    """How long each phase of a seed lasts, in simulated seconds."""

    name: str
    faults: float  # the nemesis acts this long once the store is up
    tail: float  # clients go on this long after the heal
    settle: float  # at most this long for the store to settle once the clients stopped
    clients: int
    check_seconds: float = 20.0  # the linearizability checker's wall-clock budget


PROFILES = {
    "full": Profile("full", faults=20.0, tail=3.0, settle=20.0, clients=5),
    "short": Profile("short", faults=8.0, tail=2.0, settle=15.0, clients=4),
}


@frozen
class Finding:
    """Something a guarantee rules out."""

    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


@define
class Purchase:
    """One purchase as its client saw it (across its retries with one key)."""

    process: int
    key: str
    book: int
    quantity: int
    status: int | None = None  # the final answer; None: no answer
    order: dict[str, Any] | None = None


@define
class Node:
    """One replica process: its store on disk, and while it runs, its objects."""

    service: str
    ident: int
    port: int
    path: str
    clock: ProcessClock | None = None
    replica: Replica | None = None
    loops: list[LoopingCall] = field(factory=list)
    purchases: Purchases | None = None  # the order service's purchase flow (and sweep)
    state: str = "down"  # up | paused | down
    lost_data: bool = False  # wiped or corrupt, and not yet a voter again
    boots: int = 0

    @property
    def name(self) -> str:
        return f"{self.service}-{self.ident}"

    @property
    def running(self) -> bool:
        return self.state in ("up", "paused")


@define
class FrontendNode:
    index: int
    port: int
    fe: Frontend
    clock: ProcessClock
    loops: list[LoopingCall]

    @property
    def name(self) -> str:
        return f"frontend-{self.index}"


def derived(rng: random.Random) -> random.Random:
    return random.Random(rng.getrandbits(64))


@contextlib.contextmanager
def patched_uuid4(rng: random.Random) -> Iterator[None]:
    """The front end's request ids and idempotency keys come from `uuid.uuid4`: make
    them the seed's."""
    original = uuid.uuid4
    uuid.uuid4 = lambda: uuid.UUID(int=rng.getrandbits(128), version=4)
    try:
        yield
    finally:
        uuid.uuid4 = original


class RecordingStore(Store):
    """A Store that tells the simulation every entry it applies."""

    on_apply: Callable[[Entry], None] | None = None

    def apply(self, entry: Entry) -> StoreOutcome:
        outcome = super().apply(entry)
        if self.on_apply is not None:
            self.on_apply(entry)
        return outcome


def corrupt_file(path: str, rng: random.Random) -> str:
    """Overwrite bytes of a SQLite file as a failing disk would: its header, or a
    whole page of the b-tree. What was done, in words."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if size <= 4096 or rng.random() < 0.5:
            f.write(rng.randbytes(100))
            return "header overwritten"
        page = rng.randrange(1, size // 4096)
        f.seek(page * 4096)
        f.write(rng.randbytes(4096))
        return f"page {page + 1} overwritten"


class World:
    """A Bazar store (3 catalog + 3 order replicas, 1 or 2 front ends) in memory."""

    def __init__(
        self,
        seed: int,
        root: str | None = None,
        *,
        frontends: int | None = None,
        profile: str = "full",
        log: Callable[[str], None] | None = None,
    ):
        self.seed = seed
        master = random.Random(seed)
        self.rng = {name: derived(master) for name in ("nemesis", "clients", "network", "replicas", "ids", "disk")}
        self.profile = PROFILES[profile]
        self.frontend_count = frontends if frontends is not None else (2 if master.random() < 0.3 else 1)
        self._own_root = root is None
        self.root = root if root is not None else tempfile.mkdtemp(prefix=f"bazar-sim-{seed}-", dir=_scratch())
        self.clock = SimClock()
        self.network = Network(self.clock, rng=self.rng["network"])
        self.network.jitter = JITTER
        self.network.once = {CLIENT_PORT + i for i in range(PROBE + 1)}
        self.history = History()
        self.purchases: list[Purchase] = []
        self.findings: list[Finding] = []
        self.events: list[str] = []
        self.leaders: dict[tuple[str, int], set[int]] = {}
        self.statuses: Counter[str] = Counter()
        self.errors: list[str] = []
        self.say = log
        self.nodes: dict[str, Node] = {}
        self.entries: dict[str, dict[int, tuple[int, Any]]] = {service: {} for service in SERVICES}
        for service in SERVICES:
            for i in REPLICAS:
                port = BASE_PORT[service] + i
                self.nodes[f"{service}-{i}"] = Node(
                    service, i, port, os.path.join(self.root, f"{service}-{i}", "store.db")
                )
        self.frontends: list[FrontendNode] = []
        self.running_clients: list[Deferred[None]] = []
        self.stop_clients_at = 0.0
        self.closed = False

    # -- facts --------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock.seconds()

    def note(self, text: str) -> None:
        line = f"{self.now():8.3f}  {text}"
        self.events.append(line)
        if self.say is not None:
            self.say(line)

    def replicas(self, service: str) -> list[Node]:
        return [self.nodes[f"{service}-{i}"] for i in REPLICAS]

    def urls(self, service: str) -> list[str]:
        return [url_of(n.port) for n in self.replicas(service)]

    def leader(self, service: str) -> Node | None:
        """The running replica that is leader in the highest term, if any."""
        found = [n for n in self.replicas(service) if n.running and n.replica is not None and n.replica.is_primary]
        return max(found, key=lambda n: n.replica.epoch if n.replica else 0) if found else None

    # -- processes ----------------------------------------------------------------------
    def boot(self, name: str) -> Node:
        """Start a replica process from what its data directory holds."""
        node = self.nodes[name]
        assert not node.running, f"{name} is running"
        clock = ProcessClock(self.clock, name)
        # No fsync: a simulated crash kills the process, never the machine, and what a
        # committed transaction wrote is in the file for the next process either way.
        # (Power loss is not simulated.)
        machine = CatalogMachine() if node.service == "catalog" else OrderMachine()
        # Compaction every few dozen entries (production: every 10,000): a replica that
        # was down or lost its data then catches up by snapshot (§5.3) in every seed.
        store = RecordingStore(node.path, machine, synchronous="OFF", compact_after=COMPACT_AFTER,
                               keep_entries=KEEP_ENTRIES)
        store.on_apply = lambda entry: self.record(node, entry)
        http = self.network.client(node.port)
        replica_settings = ReplicaSettings(service=node.service, replica_id=node.ident,
                                           peers={n.ident: url_of(n.port) for n in self.replicas(node.service)},
                                           secret=SECRET, admin_token=TOKEN)
        built: CatalogNode | OrderNode
        if node.service == "catalog":
            frontends = tuple(url_of(FRONTEND_PORT + k) for k in range(self.frontend_count))
            built = build_catalog(CatalogSettings(replica=replica_settings, frontends=frontends), store=store,
                                  clock=clock, http=http, rng=derived(self.rng["replicas"]))
        else:
            built = build_order(OrderSettings(replica=replica_settings, catalog=tuple(self.urls("catalog"))),
                                store=store, clock=clock, http=http, rng=derived(self.rng["replicas"]))
            node.purchases = built.purchases
        replica = built.replica
        as_built = replica.on_primary

        def elected() -> None:
            self.elected(node.service, replica)
            if as_built is not None:
                as_built()

        replica.on_primary = elected
        self.network.add(node.port, built.resource)
        loops = [self._loop(clock, every, work, now=True) for every, work, _ in built.periodic]
        built.start()
        node.clock, node.replica, node.loops, node.state = clock, replica, loops, "up"
        node.boots += 1
        if store.healed:
            self.note(f"{name}: the store found its file corrupt, moved it aside and starts empty")
        return node

    def _loop(self, clock: ProcessClock, every: float, f: Callable[[], Any], now: bool) -> LoopingCall:
        """A TimerService of the process: its call logs and survives its own errors."""

        def guarded() -> None:
            try:
                result = f()
                if isinstance(result, Deferred):
                    result.addErrback(self._unexpected, "a periodic call")
            except Exception:
                self._unexpected(Failure(), "a periodic call")

        loop = LoopingCall(guarded)
        loop.clock = clock
        loop.start(every, now=now)
        return loop

    def boot_frontend(self, index: int) -> FrontendNode:
        port = FRONTEND_PORT + index
        clock = ProcessClock(self.clock, f"frontend-{index}")
        http = self.network.client(port)
        built = build_frontend(FrontendSettings(catalog=tuple(self.urls("catalog")), order=tuple(self.urls("order")),
                                                secret=SECRET, admin_token=TOKEN), clock=clock, http=http)
        fe = built.frontend
        self.network.add(port, built.resource)
        loops = [self._loop(clock, every, work, now=True) for every, work, _ in built.periodic]
        node = FrontendNode(index, port, fe, clock, loops)
        self.frontends.append(node)
        return node

    def crash(self, name: str, *, quiet: bool = False) -> None:
        """kill -9: no more code of it runs, what it had not committed to its file is
        gone, every connection to it is reset."""
        node = self.nodes[name]
        if not node.running:
            return
        assert node.clock is not None and node.replica is not None
        node.clock.kill()
        self.network.crash(node.port)
        node.replica.store.abandon()  # the open transaction dies with the process
        node.state = "down"
        node.replica = None
        node.purchases = None
        node.clock = None
        node.loops = []
        if not quiet:
            self.note(f"{name}: crashed")

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        if node.running:
            return
        self.boot(name)
        self.note(f"{name}: restarted")

    def wipe(self, name: str) -> None:
        """The data directory is lost: crash, and what comes back has an empty one."""
        node = self.nodes[name]
        self.crash(name)
        shutil.rmtree(os.path.dirname(node.path), ignore_errors=True)
        node.lost_data = True
        self.note(f"{name}: data directory wiped")

    def corrupt(self, name: str) -> None:
        node = self.nodes[name]
        self.crash(name)
        if os.path.exists(node.path):
            what = corrupt_file(node.path, self.rng["disk"])
            node.lost_data = True
            self.note(f"{name}: store corrupted ({what})")

    def pause(self, name: str) -> None:
        node = self.nodes[name]
        if node.state != "up":
            return
        assert node.clock is not None
        node.clock.pause()
        self.network.pause(node.port)
        node.state = "paused"
        self.note(f"{name}: paused")

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.state != "paused":
            return
        assert node.clock is not None
        # A stopped process sits in epoll_wait: on SIGCONT the reactor first handles
        # what its sockets hold, and only then runs its due timers (the tick among
        # them). So the network goes first: what arrived meanwhile meets the process
        # before its clock has been caught up by a tick.
        self.network.resume(node.port)
        node.clock.resume()
        node.state = "up"
        self.note(f"{name}: resumed")

    def may_lose_data(self, service: str, name: str) -> bool:
        """The fault model: one replica of a service at a time may lose its data. One
        that lost it counts until it is back as a voter (caught up)."""
        for node in self.replicas(service):
            if node.name != name and self.lost(node):
                return False
        return True

    def lost(self, node: Node) -> bool:
        if node.lost_data and node.running and node.replica is not None and node.replica.store.voter:
            node.lost_data = False
        return node.lost_data

    def start(self) -> None:
        """Boot everything and wait for both services to have a primary the front ends know."""
        for k in range(self.frontend_count):
            self.boot_frontend(k)
        for name in self.nodes:
            self.boot(name)
        self.note(f"store booted: {self.frontend_count} front end(s)")

        def ready() -> bool:
            return all(
                fe.fe.catalog.primary_state() is not None
                and fe.fe.order.primary_state() is not None
                and not fe.fe.cache.bypass
                for fe in self.frontends
            )

        if not self.run_until(ready, 15.0):
            self.finding("liveness", "the store had no primaries known to the front ends 15 s after boot")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for name, node in self.nodes.items():
            if node.running:
                self.crash(name, quiet=True)
        for fe in self.frontends:
            fe.clock.kill()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- time ---------------------------------------------------------------------------
    def step(self) -> None:
        self.clock.advance(STEP)
        self.sample()

    def run_for(self, seconds: float) -> None:
        for _ in range(max(1, round(seconds / STEP))):
            self.step()

    def run_until(self, condition: Callable[[], bool], limit: float) -> bool:
        deadline = self.now() + limit
        self.clock.advance(0)
        while not condition():
            if self.now() >= deadline:
                return False
            self.step()
        return True

    def wait(self, d: Deferred[Any], limit: float = 60.0) -> Any:
        box: list[Any] = []
        d.addBoth(box.append)
        if not self.run_until(lambda: bool(box), limit):
            raise AssertionError(f"no result after {limit} simulated seconds")
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def sample(self) -> None:
        """At most one leader per term: remember who led in which term (at every
        step, besides every election as it happens: `elected`)."""
        for node in self.nodes.values():
            replica = node.replica
            if node.running and replica is not None and replica.core.role == raft.LEADER:
                self.leaders.setdefault((node.service, replica.epoch), set()).add(node.ident)

    def elected(self, service: str, replica: Replica) -> None:
        self.leaders.setdefault((service, replica.epoch), set()).add(replica.replica_id)

    # -- errors -------------------------------------------------------------------------
    def _unexpected(self, failure: Failure, where: str) -> None:
        name = type(failure.value).__name__
        if name not in EXPECTED_ERRORS:
            self.errors.append(f"{where}: {name}: {failure.getErrorMessage()}")

    def observe_log(self, event: dict[str, Any]) -> None:
        """Every logged failure whose kind a faulty network does not explain is a finding."""
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            name = type(failure.value).__name__
            if name not in EXPECTED_ERRORS:
                text = event.get("log_format", "") or ""
                self.errors.append(f"logged at {self.now():.3f}: {text!r}: {name}: {failure.getErrorMessage()}")
        if self.say is not None and event.get("log_namespace", "").startswith("bazar"):
            from twisted.logger import formatEvent

            self.say(f"{self.now():8.3f}      [{event.get('log_namespace')}] {formatEvent(event)}")

    def finding(self, what: str, detail: str) -> None:
        self.findings.append(Finding(what, detail))

    # -- clients ------------------------------------------------------------------------
    def client_http(self, process: int) -> Any:
        return self.network.client(CLIENT_PORT + process)

    def frontend_url(self, process: int) -> str:
        return url_of(FRONTEND_PORT + process % self.frontend_count)

    async def buy(self, process: int, book: int, quantity: int, key: str, *, frontend: int | None = None) -> Purchase:
        """A purchase with an Idempotency-Key, retried with the same key while the
        answer is 503 or missing, a bounded number of times."""
        http = self.client_http(process)
        url = url_of(FRONTEND_PORT + (frontend if frontend is not None else process % self.frontend_count))
        purchase = Purchase(process, key, book, quantity)
        self.purchases.append(purchase)
        handle = self.history.invoke(process, "buy", book_key(book), quantity, self.now())
        deadline = self.now() + BUY_BUDGET
        for attempt in range(BUY_ATTEMPTS):
            status, answer = await self._call(
                http, "POST", f"{url}/bazar/purchase/{book}", {"quantity": quantity}, {b"Idempotency-Key": key.encode()}
            )
            if status == 200:
                order = answer.get("order") if isinstance(answer, dict) else None
                if not isinstance(order, dict):
                    self.finding("answer", f"purchase {key} answered 200 without an order: {answer!r}")
                    self.history.unknown(handle)
                    return purchase
                purchase.status, purchase.order = 200, order
                self.history.ok(handle, {"price": order.get("price")}, self.now())
                return purchase
            if status == 409:
                purchase.status = 409
                self.history.fail(handle, OUT_OF_STOCK, self.now())
                return purchase
            if status not in (0, 502, 503, 504):
                purchase.status = status
                self.finding("answer", f"purchase {key} of book {book} answered {status}: {answer!r}")
                self.history.fail(handle, f"http {status}", self.now())
                return purchase
            if attempt + 1 == BUY_ATTEMPTS or self.now() >= deadline:
                break
            await deferLater(self.clock, 0.2 * (attempt + 1))
        self.history.unknown(handle)
        return purchase

    async def admin(self, process: int, kind: str, book: int, value: Any, *, frontend: int | None = None) -> None:
        """A price update or a restock: never retried (the front end gives each call a
        new request id, so a retry could apply twice): no answer is unknown."""
        http = self.client_http(process)
        url = url_of(FRONTEND_PORT + (frontend if frontend is not None else process % self.frontend_count))
        handle = self.history.invoke(process, kind, book_key(book), value, self.now())
        if kind == "set_price":
            status, answer = await self._call(
                http,
                "PUT",
                f"{url}/bazar/update_price/{book}",
                {"price": value},
                {b"Authorization": b"Bearer " + TOKEN.encode()},
            )
        else:
            status, answer = await self._call(
                http,
                "POST",
                f"{url}/bazar/restock/{book}",
                {"quantity": value},
                {b"Authorization": b"Bearer " + TOKEN.encode()},
            )
        if status == 200 and isinstance(answer, dict):
            self.history.ok(handle, {"price": answer.get("price"), "quantity": answer.get("quantity")}, self.now())
        elif status in (0, 502, 503, 504):
            self.history.unknown(handle)
        else:
            self.finding("answer", f"{kind} of book {book} answered {status}: {answer!r}")
            self.history.fail(handle, f"http {status}", self.now())

    async def read(self, process: int, book: int, *, frontend: int | None = None) -> dict[str, Any] | None:
        http = self.client_http(process)
        url = url_of(FRONTEND_PORT + (frontend if frontend is not None else process % self.frontend_count))
        handle = self.history.invoke(process, "read", book_key(book), None, self.now())
        status, answer = await self._call(http, "GET", f"{url}/bazar/info/{book}", None, {})
        if status == 200 and isinstance(answer, dict):
            self.history.ok(handle, {"price": answer.get("price"), "quantity": answer.get("quantity")}, self.now())
            return answer
        if status not in (0, 502, 503, 504):
            self.finding("answer", f"read of book {book} answered {status}: {answer!r}")
        self.history.unknown(handle)
        return None

    async def _call(self, http: Any, method: str, url: str, body: Any, headers: dict[bytes, bytes]) -> tuple[int, Any]:
        try:
            status, answer, _ = await call(
                http, self.clock, method, url, body=body, headers=headers, timeout=REQUEST_TIMEOUT
            )
        except Unreachable:
            self.statuses["no answer"] += 1
            return 0, None
        self.statuses[str(status)] += 1
        if status >= 500 and status != 503:
            self.finding("answer", f"{method} {url} answered {status}: {answer!r}")
        return status, answer

    async def client(self, process: int, rng: random.Random, books: tuple[int, ...]) -> None:
        """One client: a mix of purchases, reads, price updates and restocks."""
        n = 0
        while self.now() < self.stop_clients_at:
            book = rng.choice(books)
            kind = rng.choices(("buy", "read", "set_price", "restock"), (45, 30, 10, 15))[0]
            if kind == "buy":
                n += 1
                await self.buy(process, book, rng.choice((1, 1, 2)), f"sim-{self.seed}-{process}-{n}")
            elif kind == "read":
                await self.read(process, book)
            elif kind == "set_price":
                await self.admin(process, "set_price", book, float(rng.randrange(1000, 9999)) / 100)
            else:
                await self.admin(process, "restock", book, rng.randint(1, 3))
            await deferLater(self.clock, rng.uniform(0.05, 0.6))

    def start_clients(self, count: int, until: float, books: tuple[int, ...]) -> None:
        self.stop_clients_at = until
        for process in range(count):
            d = ensureDeferred(self.client(process, derived(self.rng["clients"]), books))
            d.addErrback(self._unexpected, f"client {process}")
            self.running_clients.append(d)

    def clients_done(self) -> bool:
        return all(d.called for d in self.running_clients)

    # -- quiet ----------------------------------------------------------------------------
    def heal(self) -> None:
        """End every fault: links, pauses, crashes."""
        self.network.heal()
        self.network.faults = LinkFaults()
        for name, node in self.nodes.items():
            if node.state == "paused":
                self.resume(name)
        for name, node in self.nodes.items():
            if not node.running:
                self.restart(name)
        self.note("healed: every link, process and disk")

    def settled(self) -> bool:
        """Every replica runs and votes, each service has one leader that all know,
        every replica has applied all the leader holds, every sale is an order."""
        for service in SERVICES:
            leader = self.leader(service)
            if leader is None or leader.replica is None or not leader.replica.serving:
                return False
            last = leader.replica.store.last_index()
            if leader.replica.core.commit < last:
                return False
            for node in self.replicas(service):
                r = node.replica
                if node.state != "up" or r is None or not r.store.voter or r.leader != leader.ident:
                    return False
                if r.store.applied != last or r.store.last_index() != last:
                    return False
        order, catalog = self.leader("order"), self.leader("catalog")
        assert order is not None and order.replica is not None and catalog is not None and catalog.replica is not None
        return self.sale_keys(catalog) == self.order_keys(order)

    def sale_keys(self, node: Node) -> set[str]:
        assert node.replica is not None
        return {str(k) for (k,) in node.replica.store.db.execute("SELECT key FROM sales")}

    def order_keys(self, node: Node) -> set[str]:
        assert node.replica is not None
        return {str(k) for (k,) in node.replica.store.db.execute("SELECT idem FROM orders")}

    # -- checks ---------------------------------------------------------------------------
    def tables(self, node: Node) -> list[tuple[Any, ...]]:
        assert node.replica is not None
        db = node.replica.store.db
        if node.service == "catalog":
            return list(db.execute("SELECT * FROM books ORDER BY id"))
        return list(db.execute("SELECT * FROM orders ORDER BY id"))

    def record(self, node: Node, entry: Entry) -> None:
        """An entry a replica applied: the same at its index on every replica of the
        service, or a finding (state machine safety)."""
        known = self.entries[node.service].setdefault(entry.index, (entry.term, entry.op))
        if known != (entry.term, entry.op):
            self.finding("replicas differ", f"{node.name} applied {entry!r} where another applied {known!r}")

    def applied_log(self, node: Node) -> list[tuple[int, int, Any]]:
        """The entries a replica's state holds, in order (those before a snapshot it
        installed, or before its log was compacted, as every replica applied them)."""
        assert node.replica is not None
        known = self.entries[node.service]
        return [(i, *known[i]) for i in range(1, node.replica.store.applied + 1) if i in known]

    def checked_history(self) -> list[Op]:
        """With one front end every operation is checked; with two, writes only: across
        front ends a read may lag a write by the invalidation delay (DESIGN.md,
        guarantee 4), so it is not bound by linearizability."""
        if self.frontend_count == 1:
            return list(self.history.ops)
        return [op for op in self.history.ops if op.kind != "read"]

    def check(self) -> list[Finding]:
        """Every guarantee that a quiet store must show; the findings (also kept)."""
        self._check_linearizable()
        self._check_leaders()
        self._check_replicas_agree()
        self._check_stock()
        self._check_orders()
        for error in self.errors[:10]:
            self.finding("error", error)
        return self.findings

    def _check_linearizable(self) -> None:
        models = {book_key(i): BookModel(book[2], book[3]) for i, book in enumerate(SEED_BOOKS)}
        result = check(self.checked_history(), models, time_limit=self.profile.check_seconds)
        if result.verdict != LINEARIZABLE:
            self.finding("linearizability", f"{result.verdict}: {result.explanation}")

    def _check_leaders(self) -> None:
        for (service, term), ids in sorted(self.leaders.items()):
            if len(ids) > 1:
                self.finding("leaders", f"{service} term {term} had leaders {sorted(ids)}")

    def _check_replicas_agree(self) -> None:
        for service in SERVICES:
            nodes = [n for n in self.replicas(service) if n.replica is not None]
            first = nodes[0]
            for other in nodes[1:]:
                if self.tables(other) != self.tables(first):
                    self.finding("replicas differ", f"{other.name} and {first.name} hold different tables")
                # (that every replica applied the same entry at each index is checked
                # as they apply it: `record`)

    def confirmed(self, node: Node) -> dict[int, int]:
        """Copies in orders, per book, on one order replica."""
        assert node.replica is not None
        rows = node.replica.store.db.execute("SELECT book_id, SUM(quantity) FROM orders GROUP BY book_id")
        return {int(b): int(q) for b, q in rows}

    def _check_stock(self) -> None:
        """initial + restocked == quantity + confirmed copies, per book, on every
        catalog replica; restocks counted from that replica's own applied log (once
        per request id, acknowledged or not)."""
        sold: dict[int, int] | None = None
        for node in self.replicas("order"):
            mine = self.confirmed(node)
            if sold is None:
                sold = mine
            elif mine != sold:
                self.finding("orders differ", f"{node.name} has confirmed copies {mine}, another {sold}")
        assert sold is not None
        for node in self.replicas("catalog"):
            assert node.replica is not None
            restocked: Counter[int] = Counter()
            seen: set[str] = set()
            for _, _, op in self.applied_log(node):
                if op is None or op.get("op") != "restock" or op.get("rid") in seen:
                    continue
                seen.add(str(op.get("rid")))
                restocked[int(op["id"])] += int(op["quantity"])
            for book_id, quantity in node.replica.store.db.execute("SELECT id, quantity FROM books ORDER BY id"):
                if book_id >= len(SEED_BOOKS):
                    continue
                initial = SEED_BOOKS[book_id][3]
                if initial + restocked[book_id] != quantity + sold.get(book_id, 0):
                    self.finding(
                        "stock",
                        f"{node.name}, book {book_id}: initial {initial} + restocked "
                        f"{restocked[book_id]} != quantity {quantity} + sold {sold.get(book_id, 0)}",
                    )

    def _check_orders(self) -> None:
        """Every purchase answered 200 is an order, once, for its book, at its price, on
        every order replica; none answered 409 is; every sale on every catalog replica
        is exactly one order, for the same book, quantity and price, and every order
        was a sale."""
        sales: dict[str, tuple[Any, ...]] = {}
        for node in self.replicas("catalog"):
            assert node.replica is not None
            rows = node.replica.store.db.execute("SELECT key, book_id, quantity, price FROM sales")
            mine = {str(r[0]): tuple(r[1:]) for r in rows}
            if sales and mine != sales:
                self.finding("sales differ", f"{node.name} holds other sales than another catalog replica")
            sales = sales or mine
        for node in self.replicas("order"):
            assert node.replica is not None
            rows = node.replica.store.db.execute("SELECT id, book_id, quantity, price, idem FROM orders")
            by_idem: dict[str, list[tuple[Any, ...]]] = {}
            for row in rows:
                by_idem.setdefault(str(row[4]), []).append(row)
                if sales.get(str(row[4])) != tuple(row[1:4]):
                    self.finding("orders", f"{node.name}: order {row} is no sale (the sale: {sales.get(str(row[4]))})")
            for key in sales.keys() - by_idem.keys():
                self.finding("orders", f"{node.name}: sale {key} {sales[key]} is no order once quiet")
            for p in self.purchases:
                found = by_idem.get("client:" + p.key, [])
                if p.status == 200:
                    assert p.order is not None
                    if len(found) != 1:
                        self.finding("orders", f"{node.name}: purchase {p.key} answered 200 has {len(found)} orders")
                        continue
                    oid, book, quantity, price, _ = found[0]
                    if oid != p.order.get("id") or book != p.book or quantity != p.quantity \
                            or price != p.order.get("price"):
                        self.finding(
                            "orders",
                            f"{node.name}: purchase {p.key} (book {p.book} x{p.quantity}) "
                            f"answered {p.order} but the order is {found[0]}",
                        )
                elif p.status == 409 and found:
                    self.finding("orders", f"{node.name}: purchase {p.key} answered 409 is an order: {found}")

    # -- the final probe --------------------------------------------------------------------
    def probe(self, books: tuple[int, ...]) -> None:
        """Once quiet the store answers again: a read and a purchase of every book go
        through, and repeating answered purchases' keys gives their outcome."""
        for book in books:
            if self.wait(ensureDeferred(self.read(PROBE, book, frontend=0))) is None:
                self.finding("liveness", f"no answer to a read of book {book} once healed and quiet")
        answered = [p for p in self.purchases if p.status in (200, 409)]
        for p in answered[-3:]:
            again = self.wait(ensureDeferred(self._repeat(p)))
            if again != (p.status, (p.order or {}).get("id")):
                self.finding("idempotency", f"purchase {p.key} answered {p.status} {p.order} and, repeated, {again}")

    async def _repeat(self, p: Purchase) -> tuple[int, Any]:
        http = self.client_http(PROBE)
        status, answer = await self._call(
            http,
            "POST",
            f"{url_of(FRONTEND_PORT)}/bazar/purchase/{p.book}",
            {"quantity": p.quantity},
            {b"Idempotency-Key": p.key.encode()},
        )
        order = answer.get("order") if isinstance(answer, dict) else None
        return status, order.get("id") if isinstance(order, dict) else None


def _scratch() -> str | None:
    """A RAM disk when there is one: the stores' files cost nothing to write there."""
    shm = "/dev/shm"  # noqa: S108 (a fresh private directory is made inside it)
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


# -- the nemesis -------------------------------------------------------------------------------

FAULTS = (
    "isolate",
    "isolate-all",
    "bipartition",
    "one-way",
    "crash",
    "pause",
    "wipe",
    "corrupt",
    "flaky",
    "lag-and-wipe",
)
FAULT_WEIGHTS = (14, 6, 8, 12, 14, 14, 6, 6, 10, 6)


@define
class Nemesis:
    """Draws a seed's fault schedule up front (so it can be printed and replayed) and
    applies it; targets named "leader" are resolved when the fault starts."""

    world: World
    rng: random.Random
    plan: list[tuple[float, str, dict[str, Any]]] = field(factory=list)
    calls: list[Any] = field(factory=list)
    flaky: int = 0

    def draw(self, start: float, end: float) -> None:
        rng = self.rng
        t = start + rng.uniform(0.0, 1.0)
        while t < end - 0.5:
            kind = rng.choices(FAULTS, FAULT_WEIGHTS)[0]
            service = rng.choice(SERVICES)
            target: int | str = "leader" if rng.random() < 0.5 else rng.choice(REPLICAS)
            duration = min(rng.uniform(0.3, 4.0), end - t)
            args = {
                "service": service,
                "target": target,
                "duration": round(duration, 3),
                "mode": rng.choice(MODES),
                "seed": rng.getrandbits(32),
            }
            self.plan.append((round(t, 3), kind, args))
            # faults overlap half of the time; otherwise the next begins soon after
            t += rng.uniform(0.2, duration + 1.0) if rng.random() < 0.5 else duration + rng.uniform(0.2, 1.5)

    def start(self) -> None:
        now = self.world.now()
        for t, kind, args in self.plan:
            self.calls.append(self.world.clock.callLater(max(0.0, t - now), self.apply, kind, args))

    def stop(self) -> None:
        for pending in self.calls:
            if pending.active():
                pending.cancel()
        self.calls = []

    def later(self, delay: float, f: Callable[..., Any], *args: Any) -> None:
        self.calls.append(self.world.clock.callLater(delay, f, *args))

    def target(self, service: str, target: int | str) -> Node:
        world = self.world
        if target == "leader":
            leader = world.leader(service)
            if leader is not None:
                return leader
            target = REPLICAS[0]
        return world.nodes[f"{service}-{target}"]

    def ports(self) -> list[int]:
        """Every server process: replicas and front ends (clients stay connected)."""
        return [n.port for n in self.world.nodes.values()] + [fe.port for fe in self.world.frontends]

    def apply(self, kind: str, args: dict[str, Any]) -> None:
        world, net = self.world, self.world.network
        node = self.target(args["service"], args["target"])
        duration, mode = float(args["duration"]), str(args["mode"])
        rng = random.Random(args["seed"])
        if kind == "isolate":
            peers = [n.port for n in world.replicas(node.service) if n is not node]
            pairs = [(node.port, p) for p in peers]
            world.note(f"nemesis: {node.name} cut from its peers ({mode}) for {duration:.2f} s")
            self._cut(pairs, mode, duration)
        elif kind == "isolate-all":
            pairs = [(node.port, p) for p in self.ports() if p != node.port]
            world.note(f"nemesis: {node.name} cut from everyone ({mode}) for {duration:.2f} s")
            self._cut(pairs, mode, duration)
        elif kind == "bipartition":
            ports = self.ports()
            rng.shuffle(ports)
            side = set(ports[: rng.randint(1, len(ports) - 1)])
            pairs = [(a, b) for a in side for b in ports if b not in side]
            world.note(f"nemesis: partition {sorted(side)} | {sorted(set(ports) - side)} ({mode}) for {duration:.2f} s")
            self._cut(pairs, mode, duration)
        elif kind == "one-way":
            peers = [n.port for n in world.replicas(node.service) if n is not node]
            outgoing = rng.random() < 0.5
            links = [(node.port, p) if outgoing else (p, node.port) for p in peers[: rng.randint(1, len(peers))]]
            world.note(f"nemesis: one-way cut {links} ({mode}) for {duration:.2f} s")
            for a, b in links:
                net.block(a, b, mode)
            self.later(duration, self._unblock, links)
        elif kind == "crash":
            world.crash(node.name)
            self.later(duration, world.restart, node.name)
        elif kind == "pause":
            world.pause(node.name)
            self.later(duration, world.resume, node.name)
        elif kind in ("wipe", "corrupt"):
            if not world.may_lose_data(node.service, node.name):
                world.note(f"nemesis: no {kind} of {node.name}: another {node.service} replica lost its data")
                return
            if kind == "wipe":
                world.wipe(node.name)
            else:
                world.corrupt(node.name)
            self.later(min(duration, 1.0), world.restart, node.name)
        elif kind == "lag-and-wipe":
            self._lag_and_wipe(node.service, duration, rng)
        elif kind == "flaky":
            faults = LinkFaults(
                loss=rng.uniform(0, 0.1),
                reply_loss=rng.uniform(0, 0.1),
                duplicate=rng.uniform(0, 0.1),
                delay=rng.uniform(0, 0.1),
                slow=rng.uniform(0, 0.05),
            )
            world.note(f"nemesis: flaky links for {duration:.2f} s: {faults}")
            net.faults = faults
            self.flaky += 1
            self.later(duration, self._calm)

    def _lag_and_wipe(self, service: str, duration: float, rng: random.Random) -> None:
        """A composed fault, the one the learner rule is for: a backup G falls behind
        (cut from the leader), the other backup F loses its disk and comes back, and
        the leader dies. Then only F knew the recent writes besides the leader: were
        F to vote before catching up, G could win and those writes would be lost."""
        world = self.world
        lead = world.leader(service)
        if lead is None:
            return
        backups = [n for n in world.replicas(service) if n is not lead]
        rng.shuffle(backups)
        lagging, wiped = backups
        if not world.may_lose_data(service, wiped.name):
            world.note(f"nemesis: no lag-and-wipe of {wiped.name}: another {service} replica lost its data")
            return
        duration = max(duration, 1.5)
        world.note(f"nemesis: {lagging.name} falls behind, then {wiped.name} is wiped and {lead.name} dies")
        self._cut([(lead.port, lagging.port)], DROP, duration)
        self.later(duration * 0.3, self._wipe, wiped)
        self.later(duration * 0.3 + 0.2, world.restart, wiped.name)
        self.later(duration * 0.3 + 0.3, world.crash, lead.name)
        self.later(duration, world.restart, lead.name)

    def _wipe(self, node: Node) -> None:
        # asked again when it happens: another fault may have taken a replica's data since
        if self.world.may_lose_data(node.service, node.name):
            self.world.wipe(node.name)
        else:
            self.world.note(f"nemesis: no wipe of {node.name}: another {node.service} replica lost its data")

    def _cut(self, pairs: list[tuple[int, int]], mode: str, duration: float) -> None:
        for a, b in pairs:
            self.world.network.cut(a, b, mode)
        self.later(duration, self._uncut, pairs)

    def _uncut(self, pairs: list[tuple[int, int]]) -> None:
        for a, b in pairs:
            self.world.network.uncut(a, b)
        self.world.note(f"nemesis: healed {len(pairs)} link(s)")

    def _unblock(self, links: list[tuple[int, int]]) -> None:
        for a, b in links:
            self.world.network.unblock(a, b)
        self.world.note(f"nemesis: healed one-way cut {links}")

    def _calm(self) -> None:
        self.flaky -= 1
        if self.flaky == 0:
            self.world.network.faults = LinkFaults()
            self.world.note("nemesis: links calm again")


# -- one seed -----------------------------------------------------------------------------------

BOOKS = (1, 2)  # a book with plenty of copies, and one with 8 (it runs out)


@frozen
class Outcome:
    seed: int
    findings: tuple[Finding, ...]
    frontends: int
    operations: int
    simulated: float
    events: tuple[str, ...]
    history: str
    tables: tuple[Any, ...]
    stats: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.findings


def simulate(
    seed: int,
    *,
    profile: str = "full",
    frontends: int | None = None,
    faults: bool = True,
    log: Callable[[str], None] | None = None,
    root: str | None = None,
) -> Outcome:
    """Run one seed from boot to the checks."""
    random.seed(seed)  # for any library that draws from the module's generator
    world = World(seed, root, frontends=frontends, profile=profile, log=log)
    observer = cast(ILogObserver, world.observe_log)
    globalLogPublisher.addObserver(observer)
    try:
        with patched_uuid4(world.rng["ids"]):
            return _run(world, faults)
    finally:
        globalLogPublisher.removeObserver(observer)
        world.close()


def _run(world: World, faults: bool) -> Outcome:
    p = world.profile
    world.start()
    start = world.now()
    fault_end = start + p.faults
    nemesis = Nemesis(world, world.rng["nemesis"])
    if faults:
        nemesis.draw(start, fault_end)
        for t, kind, args in nemesis.plan:
            world.note(f"plan: at {t:.3f} {kind} {args}")
        nemesis.start()
    world.start_clients(p.clients, fault_end + p.tail, BOOKS)
    world.run_until(lambda: world.now() >= fault_end, p.faults + 1)
    nemesis.stop()
    world.heal()
    # the clients stop issuing after the tail; their last operations end within their budgets
    if not world.run_until(world.clients_done, p.tail + BUY_BUDGET + 2 * REQUEST_TIMEOUT):
        world.finding("liveness", "a client operation was still waiting long after the heal")
    if world.run_until(world.settled, p.settle):
        world.probe(BOOKS)
        world.run_until(world.settled, p.settle)
    else:
        world.finding(
            "liveness", f"the store had not settled {p.settle:.0f} s after the clients stopped: " + describe(world)
        )
    world.check()  # settled or not: what else is wrong says why
    tables = tuple((n.name, world.tables(n)) for n in world.nodes.values() if n.replica is not None)
    return Outcome(
        world.seed,
        tuple(world.findings),
        world.frontend_count,
        len(world.history.ops),
        world.now(),
        tuple(world.events),
        world.history.to_json(),
        tables,
        dict(world.network.stats) | {f"status {k}": v for k, v in world.statuses.items()},
    )


def describe(world: World) -> str:
    parts = []
    for node in world.nodes.values():
        r = node.replica
        if r is None:
            parts.append(f"{node.name} {node.state}")
            continue
        parts.append(
            f"{node.name} {node.state} {r.core.role} term {r.epoch} leader {r.leader} "
            f"applied {r.store.applied} commit {r.core.commit} last {r.store.last_index()} "
            f"voter {r.store.voter}"
        )
    return "; ".join(parts)


__all__ = [
    "BOOKS",
    "DROP",
    "PROFILES",
    "REFUSE",
    "Finding",
    "Nemesis",
    "Node",
    "Outcome",
    "Purchase",
    "World",
    "corrupt_file",
    "patched_uuid4",
    "simulate",
]
