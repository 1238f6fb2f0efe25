"""Jepsen-style fault test: partitions, one-way cuts and SIGSTOP pauses against real
processes, with every client operation recorded and checked for linearizability.

The store (3 catalog + 3 order replicas + 1 front end, see faults.Store) runs with
every process-to-process link through a TCP proxy owned by the test. Client threads
work through the front end the whole time: buyers (each purchase with its own
Idempotency-Key, retried with the same key on 503 or no answer), an admin changing
prices and restocking (never retried: the front end gives each call a fresh request
id, so a retry could apply twice), and a reader of `GET /bazar/info/{id}`. Every
operation goes into a `bazar.sim.history.History`.

Meanwhile the nemesis, about 45 s in all, each fault ~3.5 s then healed:
  1. isolates the catalog primary from its backups (it still reaches the front end
     and the order replicas);
  2. isolates the order primary from its backups likewise (links silently dropping);
  3. isolates the catalog primary from its backups and the front end from the backups
     as well, so the front end reaches the catalog only through the old primary while
     the order replicas reach every catalog replica; then the same for the order
     primary (which still reaches the catalog);
  4. cuts the catalog primary -> backups links one way, then the order primary's;
  5. SIGSTOPs the catalog primary for ~3 s, then the order primary;
  6. cuts random replica links (refusing or dropping, some slowed) for ~4 s;
then heals everything and lets the clients run a little longer.

Afterwards, once the store is healthy and quiet, every finding below is collected
(so one run reports all it caught) and the test fails if there is any:
  - the history is linearizable per book (reads included, through one front end);
  - every purchase answered 200 is in GET /orders exactly once on every order replica,
    for the book and quantity bought, and nothing else is (no refused purchase kept);
  - on every catalog replica, for every book: initial + restocked == quantity + sum of
    confirmed order quantities (restocks without an answer may count or not);
  - all replicas of a service hold identical data; no answer was a 5xx other than 503;
  - at most one primary per epoch (every replica's /health polled every ~100 ms);
  - writes succeed again after the faults heal; repeating a purchase's key returns
    its outcome.
Failover times (fault start -> first acknowledged write sent after it) are printed,
not asserted: timing on a shared machine would make the test flaky.

Run: python -m pytest tests/test_partitions.py -q -s
Replay a nemesis schedule: BAZAR_TEST_PARTITION_SEED=<seed printed by a run>.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bazar.sim.history import OUT_OF_STOCK, History, book_key
from bazar.sim.linearizability import BookModel, check
from bazar.testing.faults import DROP, MODES, REFUSE, Link, PrimaryWatch, Store
from bazar.testing.processes import TOKEN, call, get_json, try_get_json, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.partition]

BUYERS = 3
SEED_RESTOCK = 1000  # copies added to every seed book at the quiet start, so they never run out
TEST_BOOKS = [("Partitions for the Impatient", 10.0, 30), ("One-Way Links", 25.5, 30)]  # title, price, quantity
REQUEST_TIMEOUT = 20.0  # above the front end's own retry budget for purchases (15 s)
PURCHASE_BUDGET = 12.0  # a buyer retries one key this long, then moves on (the key is settled after the run)
SETTLE_BUDGET = 25.0  # for every purchase still unresolved after the run, all together
FAULT_SECONDS = 3.5
PAUSE_SECONDS = 3.0
GAP_SECONDS = 1.5  # between two faults, for the store to settle
RANDOM_SECONDS = 4.0
TAIL_SECONDS = 3.0  # clients keep going after the last heal
CHECK_SECONDS = 30.0  # the linearizability checker's budget


# -- what the clients did ----------------------------------------------------------

@dataclass
class Attempt:
    kind: str  # buy | set_price | restock
    sent: float
    done: float
    status: int  # 0: no answer (refused, reset, timed out)


@dataclass
class Purchase:
    key: str
    book: int
    quantity: int
    handle: int
    attempts: list[Attempt] = field(default_factory=list)
    order: dict[str, Any] | None = None
    final: int | None = None  # 200 / 409 / other 4xx; None while unresolved


class Recorder:
    """The shared record of the clients: the history, every attempt, every status."""

    def __init__(self, front: str):
        self.front = front
        self.lock = threading.Lock()
        self.history = History()
        self.purchases: list[Purchase] = []
        self.attempts: list[Attempt] = []
        self.statuses: Counter[tuple[str, int]] = Counter()  # (request kind, status)
        self.errors: list[str] = []
        self.restocked: dict[int, int] = defaultdict(int)  # answered 200
        self.unknown_restocks: dict[int, list[int]] = defaultdict(list)  # no answer: applied or not
        self._process = 0

    def new_process(self) -> int:
        # A client whose last op has no answer gets a new process id: that op may still
        # take effect at any time, so the client's next op is concurrent with it.
        with self.lock:
            self._process += 1
            return self._process

    def invoke(self, process: int, kind: str, book: int, value: Any) -> int:
        with self.lock:
            return self.history.invoke(process, kind, book_key(book), value, time.monotonic())

    def complete(self, handle: int, status: str, output: Any = None, now: float | None = None) -> None:
        with self.lock:
            if status == "ok":
                self.history.ok(handle, output, now or time.monotonic())
            elif status == "fail":
                self.history.fail(handle, output, now or time.monotonic())
            else:
                self.history.unknown(handle)

    def seen(self, kind: str, status: int, attempt: Attempt | None = None) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1
            if attempt is not None:
                self.attempts.append(attempt)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    # -- purchases --
    def buy(self, process: int, book: int, quantity: int, budget: float,
            stop: threading.Event | None = None) -> Purchase:
        p = Purchase(f"part-{uuid.uuid4().hex}", book, quantity, self.invoke(process, "buy", book, quantity))
        with self.lock:
            self.purchases.append(p)
        self.settle(p, budget, stop)
        return p

    def settle(self, p: Purchase, budget: float, stop: threading.Event | None = None) -> None:
        """Send the purchase, retrying its key on 503 / no answer within `budget` seconds."""
        deadline = time.monotonic() + budget
        for _ in range(500):
            sent = time.monotonic()
            try:
                r = call("POST", f"{self.front}/bazar/purchase/{p.book}", {"quantity": p.quantity},
                         headers={"Idempotency-Key": p.key}, timeout=REQUEST_TIMEOUT)
                status, body = r.status, r.json
            except (OSError, ValueError):
                status, body = 0, None
            a = Attempt("buy", sent, time.monotonic(), status)
            p.attempts.append(a)
            self.seen("buy", status, a)
            if status == 200:
                p.order, p.final = body["order"], 200
                self.complete(p.handle, "ok", {"price": body["order"]["price"]}, a.done)
                return
            if 400 <= status < 500:
                p.final = status
                message = str((body or {}).get("error", ""))
                if status == 409 and "out of stock" in message:
                    self.complete(p.handle, "fail", OUT_OF_STOCK, a.done)
                else:
                    self.error(f"purchase {p.key} of book {p.book}: {status} {message}")
                    self.complete(p.handle, "fail", f"http {status}", a.done)
                return
            if status >= 500 and status != 503:
                self.error(f"purchase {p.key}: {status} {body}")
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return
            time.sleep(0.2)

    # -- admin writes and reads (one attempt each) --
    def admin(self, process: int, kind: str, book: int, value: float | int) -> str:
        """set_price or restock; returns the op's status (ok / fail / unknown)."""
        handle = self.invoke(process, kind, book, value)
        if kind == "set_price":
            method, path, body = "PUT", f"/bazar/update_price/{book}", {"price": value}
        else:
            method, path, body = "POST", f"/bazar/restock/{book}", {"quantity": value}
        sent = time.monotonic()
        try:
            r = call(method, self.front + path, body, token=TOKEN, timeout=REQUEST_TIMEOUT)
            status, answer = r.status, r.json
        except (OSError, ValueError):
            status, answer = 0, None
        a = Attempt(kind, sent, time.monotonic(), status)
        self.seen(kind, status, a)
        if status == 200:
            self.complete(handle, "ok", {"price": answer["price"], "quantity": answer["quantity"]}, a.done)
            if kind == "restock":
                with self.lock:
                    self.restocked[book] += int(value)
            return "ok"
        if 400 <= status < 500:
            self.error(f"{kind} {value} of book {book}: {status} {answer}")
            self.complete(handle, "fail", f"http {status}", a.done)
            return "fail"
        if status >= 500 and status != 503:
            self.error(f"{kind} of book {book}: {status} {answer}")
        self.complete(handle, "unknown")
        if kind == "restock":
            with self.lock:
                self.unknown_restocks[book].append(int(value))
        return "unknown"

    def read(self, process: int, book: int) -> None:
        handle = self.invoke(process, "read", book, None)
        try:
            r = call("GET", f"{self.front}/bazar/info/{book}", timeout=REQUEST_TIMEOUT)
            status, answer = r.status, r.json
        except (OSError, ValueError):
            status, answer = 0, None
        self.seen("read", status)
        if status == 200:
            self.complete(handle, "ok", {"price": answer["price"], "quantity": answer["quantity"]})
            return
        if status not in (0, 503):
            self.error(f"read of book {book}: {status} {answer}")
        self.complete(handle, "fail", f"http {status}")  # a failed read told nothing


class Clients:
    """Buyers, an admin and a reader, working through the front end until stopped."""

    def __init__(self, rec: Recorder, seed_books: list[int], test_books: list[int], seed: int):
        self.rec = rec
        self.seed_books = seed_books
        self.test_books = test_books
        self.seed = seed
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.buyer, args=(i,), daemon=True, name=f"buyer-{i}")
                        for i in range(BUYERS)]
        self.threads += [threading.Thread(target=self.admin, daemon=True, name="admin"),
                         threading.Thread(target=self.reader, daemon=True, name="reader")]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=REQUEST_TIMEOUT + 5)

    def _loop(self, step: Callable[[], None], pause: tuple[float, float], rng: random.Random) -> None:
        for _ in range(100_000):  # far more than the run needs; the stop event ends it
            if self.stop.is_set():
                return
            step()
            self.stop.wait(rng.uniform(*pause))

    def buyer(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        process = [self.rec.new_process()]

        def step() -> None:
            book = rng.choice(self.test_books if rng.random() < 0.6 else self.seed_books)
            p = self.rec.buy(process[0], book, rng.randint(1, 2), PURCHASE_BUDGET, self.stop)
            if p.final is None:
                process[0] = self.rec.new_process()
        self._loop(step, (0.03, 0.08), rng)

    def admin(self) -> None:
        rng = random.Random(self.seed * 100 + 50)
        process = [self.rec.new_process()]

        def step() -> None:
            book = rng.choice(self.test_books)
            if rng.random() < 0.5:
                status = self.rec.admin(process[0], "set_price", book, round(rng.uniform(5, 95), 2))
            else:
                status = self.rec.admin(process[0], "restock", book, rng.randint(1, 8))
            if status == "unknown":
                process[0] = self.rec.new_process()
        self._loop(step, (0.15, 0.3), rng)

    def reader(self) -> None:
        rng = random.Random(self.seed * 100 + 60)
        process = self.rec.new_process()
        self._loop(lambda: self.rec.read(process, rng.choice(self.test_books)), (0.03, 0.07), rng)


# -- the nemesis -----------------------------------------------------------------------

class Nemesis:
    """The fault schedule; every fault is noted in store.net.events with its services."""

    def __init__(self, store: Store, rng: random.Random):
        self.store = store
        self.net = store.net
        self.rng = rng
        self.faults: list[tuple[str, float, tuple[str, ...]]] = []  # (label, start, services)

    def _fault(self, label: str, services: Iterable[str]) -> None:
        event = self.net.note(label, services)
        self.faults.append((label, event.at, event.services))

    def _primary(self, service: str) -> str | None:
        try:
            return self.store.wait_primary(service, timeout=10.0).name
        except AssertionError:
            self.net.note(f"no {service} primary to hit")
            return None

    def _backups(self, primary: str) -> list[str]:
        service = primary.rsplit("-", 1)[0]
        return [n.name for n in self.store.of(service) if n.name != primary]

    def isolate_primary(self, service: str, mode: str) -> None:
        primary = self._primary(service)
        if primary is None:
            return
        self._fault(f"isolate {service} primary {primary} from its backups ({mode})", [service])
        self.net.isolate(primary, peers_only=True, mode=mode)
        time.sleep(FAULT_SECONDS)
        self.net.heal_all()
        self.net.note(f"heal {primary}")

    def bridge(self, service: str) -> None:
        """The primary is cut off from its backups, and the front end from the backups
        too: the front end reaches the service only through the old primary, while the
        rest of the store (the order replicas, for the catalog) reaches every replica."""
        primary = self._primary(service)
        if primary is None:
            return
        self._fault(f"isolate {service} primary {primary} from its backups; the front end reaches only it",
                    [service])
        self.net.isolate(primary, peers_only=True, mode=REFUSE)
        for backup in self._backups(primary):
            for fe in self.store.frontends:
                self.net.cut_between(fe.name, backup, REFUSE)
        time.sleep(FAULT_SECONDS)
        self.net.heal_all()
        self.net.note(f"heal {primary} and the front end")

    def one_way_from_primary(self, service: str) -> None:
        primary = self._primary(service)
        if primary is None:
            return
        self._fault(f"cut {service} primary {primary} -> backups, one way", [service])
        for backup in self._backups(primary):
            self.net.cut_one_way(primary, backup, REFUSE)
        time.sleep(PAUSE_SECONDS)
        self.net.heal_all()
        self.net.note(f"heal {primary} -> backups")

    def pause_primary(self, service: str) -> None:
        primary = self._primary(service)
        if primary is None:
            return
        node = self.store.nodes[primary]
        self._fault(f"SIGSTOP {service} primary {primary} (pid {node.pid})", [service])
        node.pause()
        try:
            time.sleep(PAUSE_SECONDS)
        finally:
            node.resume()
        self.net.note(f"SIGCONT {primary}")

    def random_cuts(self) -> None:
        replicas = {n.name for n in self.store.replicas}
        candidates = [link for (src, dst), link in sorted(self.net.links.items())
                      if src in replicas and dst in replicas]
        self._fault("random replica link cuts", ["catalog", "order"])
        end = time.monotonic() + RANDOM_SECONDS
        for _ in range(int(RANDOM_SECONDS) + 1):
            if time.monotonic() >= end:
                break
            self.net.heal_all()
            chosen: list[Link] = self.rng.sample(candidates, self.rng.randint(1, 3))
            for link in chosen:
                link.cut(self.rng.choice(MODES))
            slow = self.rng.choice(candidates)
            if slow not in chosen:
                slow.set_delay(self.rng.uniform(0.02, 0.2))
            self.net.note("cut " + ", ".join(f"{lk.src}->{lk.dst} ({lk.mode})" for lk in chosen)
                          + f"; slow {slow.src}->{slow.dst} by {slow.delay:.2f}s")
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        self.net.heal_all()
        self.net.note("heal all")

    def run(self) -> None:
        steps: list[Callable[[], None]] = [
            lambda: self.isolate_primary("catalog", REFUSE),
            lambda: self.isolate_primary("order", DROP),
            lambda: self.bridge("catalog"),
            lambda: self.bridge("order"),
            lambda: self.one_way_from_primary("catalog"),
            lambda: self.one_way_from_primary("order"),
            lambda: self.pause_primary("catalog"),
            lambda: self.pause_primary("order"),
            self.random_cuts,
        ]
        time.sleep(1.5)  # some traffic before the first fault
        try:
            for step in steps:
                step()
                time.sleep(GAP_SECONDS)
        finally:
            # whatever happened, nothing stays cut or stopped
            self.net.heal_all()
            for node in self.store.nodes.values():
                if node.paused:
                    node.resume()


# -- findings ----------------------------------------------------------------------------

class Findings:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, check_name: str, detail: str) -> None:
        self.items.append((check_name, detail))

    def text(self) -> str:
        return "\n".join(f"[{name}] {detail}" for name, detail in self.items)


def subset_sums(values: list[int]) -> set[int]:
    sums = {0}
    for v in values:
        sums |= {s + v for s in sums}
    return sums


def stock_problems(rec: Recorder, initial: dict[int, int], books: list[Any], orders: list[Any],
                   names: list[str]) -> list[str]:
    """initial + restocked == quantity + confirmed, for every book on every catalog
    replica (confirmed: from the first order replica's list; the lists are compared
    separately). A restock without an answer may have been applied or not."""
    confirmed: dict[int, int] = defaultdict(int)
    for o in orders[0] if orders else []:
        confirmed[o["book_id"]] += o["quantity"]
    problems = []
    for name, listed in zip(names, books):
        for b in listed:
            i = b["id"]
            if i not in initial:
                problems.append(f"{name}: book {i} was never added by the test: {b}")
                continue
            surplus = b["quantity"] + confirmed[i] - initial[i] - rec.restocked[i]
            if surplus not in subset_sums(rec.unknown_restocks[i]):
                problems.append(f"{name}: book {i}: initial {initial[i]} + restocked {rec.restocked[i]} (+ any of "
                                f"{rec.unknown_restocks[i]} unanswered) != quantity {b['quantity']} + confirmed "
                                f"{confirmed[i]} (off by {surplus})")
    return problems


def failover_seconds(attempts: list[Attempt], start: float, kinds: set[str]) -> float | None:
    done = [a.done for a in attempts if a.kind in kinds and a.status == 200 and a.sent >= start]
    return round(min(done) - start, 2) if done else None


def failover_figures(rec: Recorder, watch: PrimaryWatch, at: float, services: tuple[str, ...]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if "catalog" in services:
        figures["admin writes"] = failover_seconds(rec.attempts, at, {"set_price", "restock"})
    figures["purchases"] = failover_seconds(rec.attempts, at, {"buy"})
    for service in services:
        figures[f"new {service} primary"] = watch.election_seconds(service, at)
    return figures


def read_replicas(store: Store) -> tuple[list[Any], list[Any]]:
    books = [try_get_json(n.url + "/books", timeout=5.0) for n in store.catalogs]
    orders = [try_get_json(n.url + "/orders", timeout=5.0, token=TOKEN) for n in store.orders]
    return books, orders


# -- the test ------------------------------------------------------------------------------

def test_partitions_and_pauses(tmp_path: Path) -> None:
    seed = int(os.environ.get("BAZAR_TEST_PARTITION_SEED") or random.randrange(1 << 30))
    print(f"\nPARTITION SEED {seed}")
    began = time.monotonic()
    store = Store(str(tmp_path / "store"))
    watch: PrimaryWatch | None = None
    clients: Clients | None = None
    findings = Findings()
    try:
        store.start()
        watch = PrimaryWatch(store).start()
        front = store.front

        # -- a known starting point, at a quiet moment --
        for book_id in range(7):
            r = call("POST", f"{front}/bazar/restock/{book_id}", {"quantity": SEED_RESTOCK}, token=TOKEN)
            assert r.status == 200, (r.status, r.body)
        test_books = []
        for title, price, quantity in TEST_BOOKS:
            r = call("POST", f"{front}/bazar/books", {"title": title, "topic": "partitions", "price": price,
                                                      "quantity": quantity}, token=TOKEN)
            assert r.status == 201, (r.status, r.body)
            test_books.append(int(r.json["id"]))
        store.wait_quiet()
        start_books = {b["id"]: b for b in get_json(front + "/bazar/info/all")}
        for node in store.catalogs:
            assert {b["id"]: b for b in get_json(node.url + "/books")} == start_books, f"{node.name} differs"
        assert get_json(front + "/bazar/orders", token=TOKEN) == [], "the store must start without orders"
        initial = {i: b["quantity"] for i, b in start_books.items()}  # before the clients' restocks
        models = {book_key(i): BookModel(float(b["price"]), int(b["quantity"])) for i, b in start_books.items()}
        seed_books = [i for i in start_books if i not in test_books]

        # -- clients and nemesis --
        rec = Recorder(front)
        clients = Clients(rec, seed_books, test_books, seed)
        nemesis = Nemesis(store, random.Random(seed))
        run_start = time.monotonic()
        clients.start()
        nemesis.run()
        healed_at = time.monotonic()
        time.sleep(TAIL_SECONDS)
        clients.finish()
        run_seconds = time.monotonic() - run_start
        if any(t.is_alive() for t in clients.threads):
            findings.add("harness", "a client thread did not finish in time")

        # -- recovery: the store must become healthy, and take writes, again --
        try:
            store.wait_healthy(45)
        except AssertionError as exc:
            findings.add("liveness", f"the store did not become healthy within 45 s of the heal: {exc}"[:1500])
        deadline = time.monotonic() + SETTLE_BUDGET
        unresolved = [p for p in rec.purchases if p.final is None]
        for p in unresolved:
            rec.settle(p, max(0.5, deadline - time.monotonic()))
        for p in rec.purchases:
            if p.final is None:
                rec.complete(p.handle, "unknown")
        after_heal = rec.new_process()
        probe = rec.buy(after_heal, seed_books[0], 1, 20.0)
        price_probe = "unknown"
        probe_deadline = time.monotonic() + 20.0
        for _ in range(10):  # one attempt each: a price update is not retried blindly
            price_probe = rec.admin(after_heal, "set_price", test_books[0], 42.0)
            if price_probe == "ok" or time.monotonic() >= probe_deadline:
                break
            after_heal = rec.new_process()
            time.sleep(1.0)
        if probe.final != 200 or price_probe != "ok":
            findings.add("liveness", f"writes after the heal: purchase {probe.final}, price update {price_probe}")
        for book_id in test_books:  # final reads: the end state takes part in the check
            rec.read(after_heal, book_id)
        if not [a for a in rec.attempts if a.status == 200 and a.sent >= healed_at]:
            findings.add("liveness", "no write was acknowledged after the heal")

        # -- the replicas settle: identical, and the sweep has finished pending orders --
        try:
            store.wait_quiet(20)
        except AssertionError as exc:
            findings.add("convergence", f"the store did not become quiet within 20 s: {str(exc)[:300]}")

        catalog_names = [n.name for n in store.catalogs]

        def settled() -> tuple[list[Any], list[Any]] | None:
            # identical replicas that keep the stock invariant (the order primary's
            # sweep may still be finishing a pending order)
            books, orders = read_replicas(store)
            if any(b is None or b != books[0] for b in books) or any(o is None or o != orders[0] for o in orders):
                return None
            if stock_problems(rec, initial, books, orders, catalog_names):
                return None
            return books, orders

        try:
            books, orders = wait_until(settled, 10, "identical replicas keeping the stock invariant", interval=1.0)
        except AssertionError:
            books, orders = read_replicas(store)  # the differences are reported below
        for node, listed in zip(store.catalogs, books):
            if listed is None:
                findings.add("convergence", f"{node.name}: GET /books failed")
        for node, listed in zip(store.orders, orders):
            if listed is None:
                findings.add("convergence", f"{node.name}: GET /orders failed")
        books = [b or [] for b in books]
        orders = [o or [] for o in orders]
        for service, lists, nodes in (("catalog", books, store.catalogs), ("order", orders, store.orders)):
            for node, listed in zip(nodes[1:], lists[1:]):
                if listed != lists[0]:
                    a = {x["id"]: x for x in lists[0]}
                    b = {x["id"]: x for x in listed}
                    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                    findings.add("identical replicas", f"{service}: {nodes[0].name} and {node.name} differ on "
                                 f"{len(differ)} records, e.g. ids {differ[:8]}")

        # -- purchases answered 200: each in GET /orders exactly once, nothing else there --
        ok = [p for p in rec.purchases if p.final == 200]
        answered: dict[int, Purchase] = {}
        for p in ok:
            assert p.order is not None
            if p.order["id"] in answered:
                findings.add("orders", f"two purchases were answered with order {p.order['id']}: "
                             f"{answered[p.order['id']].key} and {p.key}")
            answered[p.order["id"]] = p
        still_unknown = Counter((p.book, p.quantity) for p in rec.purchases if p.final is None)
        for node, listed in zip(store.orders, orders):
            ids = Counter(o["id"] for o in listed)
            twice = sorted(i for i, n in ids.items() if n > 1)
            missing = sorted(set(answered) - set(ids))
            extra = [o for o in listed if o["id"] not in answered]
            wrong = [(o, answered[o["id"]].order) for o in listed
                     if o["id"] in answered and (o != answered[o["id"]].order
                                                 or (o["book_id"], o["quantity"]) != (answered[o["id"]].book,
                                                                                      answered[o["id"]].quantity))]
            possible = Counter(still_unknown)
            unexplained = []
            for o in extra:  # a confirmed order may belong to a purchase that never got an answer
                if possible[(o["book_id"], o["quantity"])] > 0:
                    possible[(o["book_id"], o["quantity"])] -= 1
                else:
                    unexplained.append(o["id"])
            if twice:
                findings.add("orders", f"{node.name}: orders listed twice: {twice[:10]}")
            if missing:
                findings.add("orders", f"{node.name}: {len(missing)} of {len(answered)} purchases answered 200 "
                             f"are missing from GET /orders, e.g. order ids {missing[:10]}")
            if unexplained:
                findings.add("orders", f"{node.name}: {len(unexplained)} confirmed orders were never answered 200 "
                             f"(refused or unknown purchases kept), e.g. ids {unexplained[:10]}")
            if wrong:
                findings.add("orders", f"{node.name}: {len(wrong)} orders differ from the answer the buyer got, "
                             f"e.g. listed {wrong[0][0]} answered {wrong[0][1]}")

        # -- stock: initial + restocked == quantity + confirmed, on every catalog replica --
        for text in stock_problems(rec, initial, books, orders, catalog_names):
            findings.add("stock", text)

        # -- no 5xx but 503 --
        bad = {f"{kind} {status}": n for (kind, status), n in rec.statuses.items() if status >= 500 and status != 503}
        if bad:
            findings.add("no 5xx", f"answers other than 503 in the 5xx range: {bad}")
        for text in rec.errors[:10]:
            findings.add("client errors", text)
        for text in store.net.proxies.errors[:10]:
            findings.add("harness", f"proxy: {text}")

        # -- at most one primary per epoch --
        watch.stop()
        for (service, epoch), replicas in sorted(watch.primaries_by_epoch().items()):
            if len(replicas) > 1:
                findings.add("one primary per epoch", f"{service} epoch {epoch}: primaries {sorted(replicas)}")
        deposed = watch.deposed_primaries()

        # -- linearizability, per book --
        check_started = time.monotonic()
        result = check(rec.history, models, time_limit=CHECK_SECONDS)
        check_seconds = time.monotonic() - check_started
        history_file = tmp_path / "history.json"
        history_file.write_text(rec.history.to_json())
        if not result.ok:
            not_ok = {k: v for k, v in result.per_key.items() if v != "linearizable"}
            findings.add("linearizable", f"{result.verdict}: {not_ok} (history in {history_file})\n"
                         + result.explanation)

        # -- a repeated key returns the purchase's outcome (last: this may buy again) --
        idem_bad = []
        for p in random.Random(seed).sample(ok, min(8, len(ok))):
            r = call("POST", f"{front}/bazar/purchase/{p.book}", {"quantity": p.quantity},
                     headers={"Idempotency-Key": p.key}, timeout=REQUEST_TIMEOUT)
            if r.status != 200 or r.json["order"] != p.order:
                idem_bad.append(f"{p.key}: answered {p.order} first, now {r.status} {r.body[:200]!r}")
        refused = [p for p in rec.purchases if p.final == 409]
        for p in random.Random(seed).sample(refused, min(4, len(refused))):
            r = call("POST", f"{front}/bazar/purchase/{p.book}", {"quantity": p.quantity},
                     headers={"Idempotency-Key": p.key}, timeout=REQUEST_TIMEOUT)
            if r.status != 409:
                idem_bad.append(f"{p.key}: refused with 409 first, now {r.status} {r.body[:200]!r}")
        if idem_bad:
            findings.add("idempotency", f"{len(idem_bad)} repeated keys changed their outcome, e.g. {idem_bad[:3]}")

        # -- figures --
        ops = rec.history.ops
        figures = {
            "seed": seed,
            "run_seconds": round(run_seconds, 1),
            "ops": dict(Counter(f"{op.kind} {op.status}" for op in ops)),
            "purchases": len(rec.purchases),
            "purchases_ok": len(ok),
            "purchases_409": len(refused),
            "purchases_unknown": sum(1 for p in rec.purchases if p.final is None),
            "settled_after_run": len(unresolved),
            "statuses": {f"{k} {s}": n for (k, s), n in sorted(rec.statuses.items())},
            # fault start -> first acknowledged write whose attempt was sent after it, and
            # fault start -> first primary of a newer epoch seen by the watch
            "failover_seconds": {label: failover_figures(rec, watch, at, services)
                                 for label, at, services in nemesis.faults},
            "primaries_by_epoch": {f"{s} {e}": sorted(r) for (s, e), r in
                                   sorted(watch.primaries_by_epoch().items())},
            "deposed_primary_still_claiming_seconds": deposed,
            "linearizability": {"verdict": result.verdict, "per_key": dict(result.per_key),
                                "seconds": round(check_seconds, 2)},
        }
        print("PARTITION FIGURES " + json.dumps(figures, indent=1))
        print("NEMESIS EVENTS\n" + "\n".join(f"  +{e.at - run_start:6.2f}s (t={e.at:.3f}) {e.what}"
                                              for e in store.net.events))
        (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1))
        if findings.items:
            print("PROCESS LOGS\n" + store.tail_logs(40))
    except BaseException:
        print("PROCESS LOGS\n" + store.tail_logs(40))
        raise
    finally:
        if clients is not None:
            clients.finish()
        if watch is not None:
            watch.stop()
        store.stop()
        print(f"PARTITION TEST took {time.monotonic() - began:.1f}s in all")
    assert not store.leftovers(), f"processes still running: {store.leftovers()}"
    assert not findings.items, f"{len(findings.items)} findings:\n" + findings.text()

