"""The layout of `bazar/`, read from its imports: the rooms of docs/architecture.md and
the rules between them (domain code free of HTTP, a Raft core without I/O, no cycle
between rooms, the tools outside the store). The picture in docs/architecture.md is
drawn from the same imports, and must stay the one the code draws."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"

# room: (what it holds, its modules by prefix)
ROOMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "records": ("what the store is about: books, orders, sales, operations, errors, settings, "
                "the messages between processes",
                ("bazar.errors", "bazar.codec", "bazar.records", "bazar.ops", "bazar.settings", "bazar.messages")),
    "trace": ("opt-in tracing: one JSON line per step of a request, when BAZAR_TRACE names a file "
              "(imports nothing of Bazar, so every room may use it)", ("bazar.trace",)),
    "replication": ("Raft: the core without I/O, the SQLite log and state machine, the replica driver",
                    ("bazar.replication",)),
    "http": ("the edge: JSON app and routes, reading requests, the hardened server, the client to peers",
             ("bazar.http",)),
    "services": ("the catalog, the order service and the front end, with the front end's cache, "
                 "its invalidations and its view of the replicas",
                 ("bazar.catalog", "bazar.order", "bazar.frontend", "bazar.balancer", "bazar.cache",
                  "bazar.invalidation")),
    "pages": ("the storefront and the live cluster page", ("bazar.pages",)),
    "process": ("options, a process's life, serving a wired node, the bazar-cluster supervisor",
                ("bazar.config", "bazar.lifecycle", "bazar.process", "bazar.cluster")),
    "cli": ("the bazar command", ("bazar.cli",)),
    "sim": ("the deterministic simulation and the linearizability checker", ("bazar.sim",)),
    "bench": ("bazar-bench", ("bazar.bench",)),
    "testing": ("what the tests and the bench start: in-memory stores, real processes, faults",
                ("bazar.testing",)),
}
STORE = ("records", "trace", "replication", "http", "services", "pages", "process")  # what runs in production
DOMAIN = ("bazar.errors", "bazar.codec", "bazar.records", "bazar.ops", "bazar.settings", "bazar.messages",
          "bazar.cache", "bazar.replication.raft", "bazar.replication.store")
HTTP = ("bazar.http", "klein", "treq", "twisted.web", "werkzeug")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "bazar").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if name != "bazar":  # (the package itself holds only its version)
            found[name] = path
    return found


def room_of(module: str) -> str:
    for room, (_, prefixes) in ROOMS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return room
    raise AssertionError(f"{module} is in no room of docs/architecture.md")


def imports(path: Path) -> set[str]:
    """What a module imports at run time (an `if TYPE_CHECKING:` block is for the
    type checker only)."""
    tree = ast.parse(path.read_text())
    checking = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                for n in ast.walk(block)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from bazar.x import y`: the module bazar.x.y when there is one, else bazar.x
            submodules = {f"{node.module}.{a.name}" for a in node.names} & set(modules())
            found |= submodules or {node.module}
    return found


def uses(module: str, targets: tuple[str, ...], path: Path) -> set[str]:
    return {i for i in imports(path) if any(i == t or i.startswith(t + ".") for t in targets)}


def room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules().items():
        mine = room_of(module)
        graph[mine]
        for target in imports(path):
            # (`bazar` itself, its `__version__`, is no room's: any may read it)
            if target.startswith("bazar."):
                theirs = room_of(target)
                if theirs != mine:
                    graph[mine].add(theirs)
    return graph


def diagram() -> str:
    """The picture of docs/architecture.md: the rooms, their modules, who uses whom."""
    found = modules()
    by_room: dict[str, list[str]] = defaultdict(list)
    for module, path in found.items():
        if path.name not in ("__init__.py", "__main__.py"):
            by_room[room_of(module)].append(module.rsplit(".", 1)[1])
    lines = ["```mermaid", "flowchart BT"]
    for room in ROOMS:
        lines.append(f'  {room}["<b>{room}</b><br/>{" · ".join(sorted(by_room[room]))}"]')
    graph = room_graph()
    for room in ROOMS:
        for target in sorted(graph[room], key=list(ROOMS).index):
            lines.append(f"  {room} --> {target}")
    lines.append("```")
    return "\n".join(lines)


def test_every_module_is_in_a_room() -> None:
    for module in modules():
        room_of(module)


def test_the_rooms_of_the_store_form_no_cycle() -> None:
    graph = room_graph()
    done: set[str] = set()

    def visit(room: str, path: tuple[str, ...]) -> None:
        assert room not in path, f"a cycle between rooms: {' -> '.join((*path, room))}"
        if room in done:
            return
        for target in graph[room]:
            visit(target, (*path, room))
        done.add(room)

    for room in ROOMS:
        visit(room, ())


def test_records_stand_on_nothing_else_of_bazar() -> None:
    assert room_graph()["records"] == set()


@pytest.mark.parametrize("module", DOMAIN)
def test_domain_code_is_free_of_http(module: str) -> None:
    assert not uses(module, HTTP, modules()[module]), f"{module} imports HTTP"


def test_the_raft_core_does_no_io() -> None:
    """bazar.replication.raft: a state machine fed messages and ticks (the standard
    library's pure parts and attrs only: no sockets, clocks, disks or Twisted)."""
    allowed = {"__future__", "random", "typing", "attrs", "collections", "collections.abc", "dataclasses",
               "enum", "itertools", "math"}
    found = imports(modules()["bazar.replication.raft"])
    assert found <= allowed, sorted(found - allowed)


def test_the_store_never_imports_the_tools() -> None:
    tools = tuple(p for room, (_, prefixes) in ROOMS.items() if room not in STORE for p in prefixes)
    for module, path in modules().items():
        if room_of(module) in STORE:
            assert not uses(module, tools, path), f"{module} imports a tool"


def test_the_picture_in_docs_architecture_md_is_the_one_the_code_draws() -> None:
    text = DOC.read_text()
    drawn = re.search(r"```mermaid\n.*?```", text, re.S)
    assert drawn is not None, "docs/architecture.md has no mermaid picture"
    assert drawn.group(0) == diagram(), (
        "docs/architecture.md's picture is out of date; the code draws:\n" + diagram())


if __name__ == "__main__":  # python tests/test_architecture.py: the picture, for docs/architecture.md
    print(diagram())
