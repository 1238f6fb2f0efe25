"""`bazar`: the command-line client of a running store (standard library only).

    bazar info [ID] | search TOPIC | buy ID [--quantity N] [--key K] | orders
    bazar price ID P | restock ID N | add --title T --topic T --price P --quantity N
    bazar import FILE   many books from a CSV or JSON file, in batches that fit a request
    bazar status     every replica's /health in one table; exit 1 when a service is broken
    bazar verify     the invariants of DESIGN.md (guarantee 3) read from every replica; exit 1 when one breaks

The front end is `--url` (or BAZAR_URL, default http://127.0.0.1:5000); admin calls
send BAZAR_ADMIN_TOKEN. Output is a table, or JSON with `--json`. Errors are one
line on stderr: exit 1 for an answer that is an error, 2 when the front end cannot
be reached.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Sequence
from urllib.parse import quote

from bazar.errors import Invalid
from bazar.records import MAX_BODY, SEED_BOOKS, NewBook, parse_csv_books, parse_new_books

DEFAULT_URL = "http://127.0.0.1:5000"


class Failed(Exception):
    """A one-line error for stderr, and the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Unreachable(Exception):
    pass


def request(method: str, url: str, body: Any = None, *, token: str | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10.0, raw: bytes | None = None,
            content_type: str = "application/json") -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON body or None, lower-case headers); Unreachable when no answer came.
    The body is `body` as JSON, or `raw` bytes of `content_type`."""
    if not url.startswith(("http://", "https://")):
        raise Unreachable(f"{url!r} is not an http:// or https:// URL")
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http(s) only, checked above
    if data is not None:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - http(s) only, checked above
            status, raw, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        with e:
            status, raw, hdrs = e.code, e.read(), e.headers
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise Unreachable(str(reason)) from None
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    return status, parsed, {k.lower(): v for k, v in hdrs.items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Client:
    def __init__(self, url: str, token: str | None):
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None, *, admin: bool = False,
             headers: dict[str, str] | None = None, **kw: Any) -> Any:
        try:
            status, parsed, _ = request(method, self.url + path, body, token=self.token if admin else None,
                                        headers=headers, **kw)
        except Unreachable as exc:
            raise Failed(f"cannot reach the front end at {self.url}: {exc}", 2) from None
        if status >= 400:
            message = parsed.get("error") if isinstance(parsed, dict) else None
            hint = " (set BAZAR_ADMIN_TOKEN)" if status == 401 and not self.token else ""
            raise Failed(f"{method} {path}: {status} {message or 'error'}{hint}")
        return parsed


BOOK_COLUMNS = ("id", "title", "topic", "price", "quantity")
ORDER_COLUMNS = ("id", "book_id", "title", "quantity", "price", "total", "created")


def show(args: argparse.Namespace, data: Any, columns: Sequence[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
        return
    rows = data if isinstance(data, list) else [data]
    print(table(columns, [[row.get(c) for c in columns] for row in rows]))


# -- the client commands -------------------------------------------------------------------

def cmd_info(args: argparse.Namespace, client: Client) -> int:
    path = f"/bazar/info/{args.id}" if args.id is not None else "/bazar/info/all"
    show(args, client.call("GET", path), BOOK_COLUMNS)
    return 0


def cmd_search(args: argparse.Namespace, client: Client) -> int:
    show(args, client.call("GET", "/bazar/search/" + quote(args.topic, safe="")), ("id", "title"))
    return 0


def cmd_buy(args: argparse.Namespace, client: Client) -> int:
    headers = {"Idempotency-Key": args.key} if args.key else None
    answer = client.call("POST", f"/bazar/purchase/{args.id}", {"quantity": args.quantity}, headers=headers)
    show(args, answer if args.json else answer["order"], ORDER_COLUMNS)
    return 0


def cmd_orders(args: argparse.Namespace, client: Client) -> int:
    show(args, client.call("GET", "/bazar/orders", admin=True), ORDER_COLUMNS)
    return 0


def cmd_price(args: argparse.Namespace, client: Client) -> int:
    show(args, client.call("PUT", f"/bazar/update_price/{args.id}", {"price": args.price}, admin=True), BOOK_COLUMNS)
    return 0


def cmd_restock(args: argparse.Namespace, client: Client) -> int:
    show(args, client.call("POST", f"/bazar/restock/{args.id}", {"quantity": args.quantity}, admin=True),
         BOOK_COLUMNS)
    return 0


def cmd_add(args: argparse.Namespace, client: Client) -> int:
    book = client.call("POST", "/bazar/books", {"title": args.title, "topic": args.topic, "price": args.price,
                                                "quantity": args.quantity}, admin=True)
    show(args, book, BOOK_COLUMNS)
    return 0


# -- import ----------------------------------------------------------------------------------

def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Invalid("a book has a key more than once")
    return dict(pairs)


def read_import(path: str) -> tuple[NewBook, ...]:
    """Every book of FILE, checked as the front end checks them (a bad one is named by
    its row in the file): CSV for a .csv name, JSON for .json, else by the content
    (a JSON list starts with '[')."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise Failed(f"cannot read {path}: {exc.strerror or exc}") from None
    suffix = os.path.splitext(path)[1].lower()
    is_json = suffix == ".json" or (suffix != ".csv" and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["))
    try:
        if not is_json:
            return parse_csv_books(data)
        try:
            body = json.loads(data.decode("utf-8-sig"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError) as exc:
            raise Invalid(f"not a JSON list of books ({exc})") from None
        return parse_new_books(body)
    except Invalid as exc:
        raise Failed(f"{path}: {exc.message}; nothing was imported") from None


def csv_batches(books: Sequence[NewBook], limit: int = MAX_BODY) -> list[tuple[bytes, int]]:
    """The books as CSV bodies of at most `limit` bytes, each with its header: (body, books in it)."""
    def line(row: Sequence[Any]) -> bytes:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(row)
        return out.getvalue().encode()

    header = line(("title", "topic", "price", "quantity"))
    batches: list[tuple[bytes, int]] = []
    lines: list[bytes] = []
    size = len(header)
    for book in books:
        encoded = line((book.title, book.topic, repr(book.price), book.quantity))
        if lines and size + len(encoded) > limit:
            batches.append((header + b"".join(lines), len(lines)))
            lines, size = [], len(header)
        lines.append(encoded)
        size += len(encoded)
    if lines:
        batches.append((header + b"".join(lines), len(lines)))
    return batches


def id_ranges(ids: Sequence[int]) -> str:
    """The ids as runs: "7-9, 12, 15-20"."""
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(f"{ids[i]}" if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(parts)


def cmd_import(args: argparse.Namespace, client: Client) -> int:
    books = read_import(args.file)
    ids: list[int] = []
    for body, count in csv_batches(books):
        try:
            answer = client.call("POST", "/bazar/books/import", admin=True, raw=body, content_type="text/csv")
        except Failed as exc:
            done = f" (ids {id_ranges(ids)})" if ids else ""
            raise Failed(f"{exc}; {len(ids)} of {len(books)} books were imported before this batch of {count}"
                         f"{done}", exc.code) from None
        ids += answer["ids"]
    if args.json:
        print(json.dumps({"ids": ids}))
    else:
        print(f"imported {len(ids)} books: ids {id_ranges(ids)}")
    return 0


# -- status ----------------------------------------------------------------------------------

def replica_urls(client: Client) -> dict[str, list[str]]:
    """The replicas the front end is configured with (its /health lists them)."""
    health = client.call("GET", "/health")
    if not isinstance(health, dict) or not isinstance(health.get("catalog"), list):
        raise Failed(f"{client.url}/health does not list replicas: is it a Bazar front end?")
    return {service: [r["url"] for r in health[service]] for service in ("catalog", "order")}


def health_of(url: str) -> dict[str, Any] | None:
    try:
        status, parsed, _ = request("GET", url + "/health", timeout=3.0)
    except Unreachable:
        return None
    return parsed if status == 200 and isinstance(parsed, dict) else None


def service_problems(service: str, healths: dict[str, dict[str, Any] | None]) -> list[str]:
    """What is broken in one service, from its replicas' /health.

    - no primary: no reachable replica says it is primary;
    - two primaries claim the same epoch (Raft allows at most one leader per term);
    - replicas disagree: two replicas in the same epoch name different leaders.
    A primary of an older epoch next to a newer one is a deposed primary that has not
    heard yet: not an error. Whether replicas at the same applied index hold the same
    data is `bazar verify`'s question (it reads the data)."""
    up = {u: h for u, h in healths.items() if h is not None}
    problems = []
    primaries = [(h.get("epoch"), u) for u, h in up.items() if h.get("role") == "primary"]
    if not primaries:
        problems.append(f"{service}: no primary")
    epochs: dict[Any, list[str]] = {}
    for epoch, url in primaries:
        epochs.setdefault(epoch, []).append(url)
    for epoch, urls in epochs.items():
        if len(urls) > 1:
            problems.append(f"{service}: {len(urls)} primaries claim epoch {epoch}: {', '.join(urls)}")
    leaders: dict[Any, set[Any]] = {}
    for h in up.values():
        if h.get("leader") is not None:
            leaders.setdefault(h.get("epoch"), set()).add(h.get("leader"))
    for epoch, named in leaders.items():
        if len(named) > 1:
            problems.append(f"{service}: replicas disagree on the primary of epoch {epoch}: "
                            f"{', '.join(str(n) for n in sorted(named, key=str))}")
    return problems


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    front = client.call("GET", "/health")
    urls = replica_urls(client)
    rows: list[dict[str, Any]] = [{"service": "frontend", "url": client.url, "role": "frontend",
                                   "status": front.get("status"), "pid": front.get("pid"),
                                   "applied": front.get("last_seq")}]
    problems: list[str] = []
    warnings: list[str] = []
    for service, service_urls in urls.items():
        healths = {u: health_of(u) for u in service_urls}
        primary = max((h for h in healths.values() if h and h.get("role") == "primary"),
                      key=lambda h: h.get("epoch", 0), default=None)
        for url, h in healths.items():
            if h is None:
                warnings.append(f"{service} replica {url} does not answer")
                rows.append({"service": service, "url": url, "status": "down"})
                continue
            lag = primary["last_seq"] - h["last_seq"] if primary and isinstance(h.get("last_seq"), int) else None
            rows.append({"service": service, "url": url, "replica": h.get("replica"), "role": h.get("role"),
                         "status": h.get("status") if h.get("voter", True) else f"{h.get('status')} (learner)",
                         "epoch": h.get("epoch"), "applied": h.get("last_seq"), "commit": h.get("commit"),
                         "lag": lag, "pid": h.get("pid")})
        problems += service_problems(service, healths)
    if args.json:
        print(json.dumps({"processes": rows, "problems": problems, "warnings": warnings}, indent=2))
    else:
        columns = ("service", "replica", "url", "role", "status", "epoch", "applied", "commit", "lag", "pid")
        print(table(columns, [[r.get(c) for c in columns] for r in rows]))
        for line in warnings:
            print("warning: " + line)
        for line in problems:
            print("PROBLEM: " + line)
        if not problems:
            print("ok: every service has one primary and its replicas agree on it")
    return 1 if problems else 0


# -- verify ----------------------------------------------------------------------------------

def read_replica(url: str, path: str, token: str | None) -> tuple[int, Any] | None:
    """(applied index, records) of one replica, or None when it cannot answer now."""
    try:
        status, parsed, headers = request("GET", url + path, token=token, timeout=5.0)
    except Unreachable:
        return None
    seq = headers.get("x-bazar-seq", "")
    if status != 200 or not isinstance(parsed, list) or not seq.isdigit():
        return None
    return int(seq), parsed


def settled(urls: list[str], path: str, token: str | None, deadline: float,
            problems: list[str], service: str) -> list[Any] | None:
    """Read `path` from every replica until all answer at one applied index (the
    store is quiet); then their records must be equal. Returns the records."""
    last: dict[str, tuple[int, Any] | None] = {}
    while True:
        last = {u: read_replica(u, path, token) for u in urls}
        seqs = {r[0] for r in last.values() if r is not None}
        if None not in last.values() and len(seqs) == 1:
            break
        if time.monotonic() >= deadline:
            described = ", ".join(f"{u} at {r[0] if r else 'no answer'}" for u, r in last.items())
            problems.append(f"{service}: replicas did not settle at one applied index ({described}); "
                            "verify needs a quiet store")
            answered = [r for r in last.values() if r is not None]
            return max(answered, key=lambda r: r[0])[1] if answered else None
        time.sleep(0.3)
    answers = [(u, r) for u, r in last.items() if r is not None]
    first_url, (seq, records) = answers[0]
    for url, (_, other) in answers[1:]:
        if other != records:
            problems.append(f"{service}: replicas {first_url} and {url} hold different records at applied index {seq}")
    return records  # type: ignore[no-any-return]


def parse_expectation(text: str) -> tuple[int, int]:
    ident, sep, value = text.partition("=")
    if not sep or not ident.isdigit() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected ID=COPIES, got {text!r}")
    return int(ident), int(value)


def check_orders(books: list[dict[str, Any]], orders: list[dict[str, Any]], expect: dict[int, int],
                 seed_only: bool) -> list[str]:
    """Guarantee 3 as far as it can be checked from outside (see `verify`'s help)."""
    problems = []
    by_id = {b["id"]: b for b in books}
    seen: set[Any] = set()
    sold: dict[int, int] = {}
    for o in orders:
        if o["id"] in seen:
            problems.append(f"order {o['id']} is listed more than once")
        seen.add(o["id"])
        book = by_id.get(o["book_id"])
        if book is None:
            problems.append(f"order {o['id']} is for book {o['book_id']}, which the catalog does not hold")
        elif o["title"] != book["title"]:
            problems.append(f"order {o['id']} names {o['title']!r} but book {o['book_id']} is {book['title']!r}")
        if abs(round(o["price"] * o["quantity"], 2) - o["total"]) > 0.005:
            problems.append(f"order {o['id']}: total {o['total']} is not {o['quantity']} x {o['price']}")
        sold[o["book_id"]] = sold.get(o["book_id"], 0) + o["quantity"]
    for b in books:
        if b["quantity"] < 0:
            problems.append(f"book {b['id']} has {b['quantity']} copies: oversold")
    seed = {i: s[3] for i, s in enumerate(SEED_BOOKS)
            if i in by_id and by_id[i]["title"] == s[0] and by_id[i]["topic"] == s[1]}
    for ident, initial in seed.items():
        held = by_id[ident]["quantity"] + sold.get(ident, 0)
        # restocks only add copies: stock + sold below the seed means a lost order or lost stock
        if held < initial:
            problems.append(f"book {ident}: {by_id[ident]['quantity']} in stock + {sold.get(ident, 0)} sold = {held}, "
                            f"fewer than the {initial} it started with")
        if seed_only and ident not in expect and held != initial:
            problems.append(f"book {ident}: {by_id[ident]['quantity']} in stock + {sold.get(ident, 0)} sold = {held}, "
                            f"not the {initial} it started with (--no-restocks)")
    for ident, total in expect.items():
        if ident not in by_id:
            problems.append(f"book {ident} (--expect-stock) is not in the catalog")
            continue
        held = by_id[ident]["quantity"] + sold.get(ident, 0)
        if held != total:
            problems.append(f"book {ident}: {by_id[ident]['quantity']} in stock + {sold.get(ident, 0)} sold = "
                            f"{held}, not the expected {total}")
    return problems


def cmd_verify(args: argparse.Namespace, client: Client) -> int:
    if not client.token:
        raise Failed("verify reads the order replicas' GET /orders: set BAZAR_ADMIN_TOKEN")
    urls = replica_urls(client)
    problems: list[str] = []
    deadline = time.monotonic() + args.settle
    books = settled(urls["catalog"], "/books", None, deadline, problems, "catalog")
    orders = settled(urls["order"], "/orders", client.token, deadline, problems, "order")
    if books is not None and orders is not None:
        problems += check_orders(books, orders, dict(args.expect_stock or []), args.no_restocks)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems,
                          "books": len(books or []), "orders": len(orders or [])}, indent=2))
    else:
        for line in problems:
            print("BROKEN: " + line)
        if not problems:
            print(f"ok: {len(urls['catalog'])} catalog and {len(urls['order'])} order replicas agree; "
                  f"{len(books or [])} books, {len(orders or [])} confirmed orders, stock accounted for")
    return 1 if problems else 0


# -- the command line -----------------------------------------------------------------------

def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bazar", description="Talk to a Bazar front end and check a running store.")
    p.add_argument("--url", default=os.environ.get("BAZAR_URL", DEFAULT_URL),
                   help="the front end (default: $BAZAR_URL or %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # the same two options after the command too (`bazar info --json`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="the front end")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", parents=[common], help="every book, or one")
    s.add_argument("id", nargs="?", type=int)
    s.set_defaults(run=cmd_info)
    s = sub.add_parser("search", parents=[common], help="books of a topic")
    s.add_argument("topic")
    s.set_defaults(run=cmd_search)
    s = sub.add_parser("buy", parents=[common], help="buy copies of a book")
    s.add_argument("id", type=int)
    s.add_argument("--quantity", type=positive, default=1)
    s.add_argument("--key", help="Idempotency-Key: repeating the purchase with it buys once")
    s.set_defaults(run=cmd_buy)
    s = sub.add_parser("orders", parents=[common], help="every confirmed order (admin)")
    s.set_defaults(run=cmd_orders)
    s = sub.add_parser("price", parents=[common], help="set a book's price (admin)")
    s.add_argument("id", type=int)
    s.add_argument("price", type=float)
    s.set_defaults(run=cmd_price)
    s = sub.add_parser("restock", parents=[common], help="add copies of a book (admin)")
    s.add_argument("id", type=int)
    s.add_argument("quantity", type=positive)
    s.set_defaults(run=cmd_restock)
    s = sub.add_parser("add", parents=[common], help="add a book (admin)")
    s.add_argument("--title", required=True)
    s.add_argument("--topic", required=True)
    s.add_argument("--price", type=float, required=True)
    s.add_argument("--quantity", type=positive, required=True)
    s.set_defaults(run=cmd_add)
    s = sub.add_parser("import", parents=[common], help="add many books from a CSV or JSON file (admin)",
                       description="Reads FILE: CSV with the header title,topic,price,quantity, or a JSON list of "
                       "{title, topic, price, quantity} (by the .csv or .json name, else by the content). Every book "
                       "is checked first: a bad one is named by its row and nothing is sent. Then the books go in "
                       "batches that fit a request (64 KiB), each added all or nothing; if one fails, the books of the "
                       "batches before it stay, and the error says which.")
    s.add_argument("file")
    s.set_defaults(run=cmd_import)
    s = sub.add_parser("status", parents=[common],
                       help="every replica and the front end; exit 1 when a service is broken",
                       description="Reads the front end's /health (which lists the replicas) and each replica's "
                       "/health. Exit 1 when a service has no primary, when two primaries claim one epoch, or when "
                       "replicas of one epoch name different primaries. A replica that does not answer is a warning.")
    s.set_defaults(run=cmd_status)
    s = sub.add_parser(
        "verify", parents=[common], help="check the store's invariants on every replica; exit 1 when one is broken",
        description="Reads every catalog replica's GET /books and every order replica's GET /orders (admin token), "
        "waiting up to --settle seconds for all replicas of a service to report one applied index, then checks: "
        "replicas at that index hold equal records; every confirmed order is listed once, for a book the catalog "
        "holds and under that book's title, with total = quantity x price; no stock is negative; for the seed "
        "books, stock + copies sold is at least the seed quantity (restocks only add). initial + restocked = "
        "stock + sold is checked exactly for the books named by --expect-stock, and for every seed book with "
        "--no-restocks.")
    s.add_argument("--settle", type=float, default=10.0, help="seconds to wait for a quiet store (default 10)")
    s.add_argument("--expect-stock", type=parse_expectation, action="append", metavar="ID=COPIES",
                   help="book ID started with and was restocked to COPIES in all (repeatable)")
    s.add_argument("--no-restocks", action="store_true",
                   help="no seed book was restocked: stock + sold must equal its seed quantity")
    s.set_defaults(run=cmd_verify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    client = Client(args.url, os.environ.get("BAZAR_ADMIN_TOKEN") or None)
    try:
        return int(args.run(args, client))
    except Failed as exc:
        print(f"bazar: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a surprise answer: one line, never a traceback
        print(f"bazar: unexpected answer from {args.url}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
