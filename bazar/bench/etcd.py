"""etcd beside Bazar: the reference for a replicated write (phase "etcd").

When the `etcd` binary is on PATH, a three-member etcd cluster is started on loopback
(data directories under the bench's own directory, stopped by PID at the end) and
driven with the same keep-alive client and connection counts as Bazar: puts and
linearizable ranges through etcd's v3 JSON gateway (`POST /v3/kv/put`,
`POST /v3/kv/range`, keys and values in base64; the v2 API is off by default since
etcd 3.4), sent to its leader (its best case: nothing forwarded). Beside them, in the
same sweeps: Bazar's replicated write (`PUT /bazar/update_price/<bench book>` with the
admin token), its purchase and its cached read. The CPU of the server processes is
summed over each step (etcd's three members; Bazar's front end and the replicas the
operation involves), for the server CPU per write.

Without etcd, Bazar's side is still measured, and etcd's is reported "not measured".
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from typing import Any

from bazar.bench.compare import Target, sweep
from bazar.bench.http import build_request, http_json
from bazar.bench.phases import INFO_BOOK, Ctx, log
from bazar.testing.processes import HOST, Processes, free_ports, wait_until

MEMBERS = 3
WRITE_CONNS = ("1", "16", "64")
READ_CONNS = ("1", "16")
PURCHASE_CONNS = ("1", "16")
KEY = "bazar-bench/book"
NO_ETCD = "not measured (no etcd on PATH)"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def put_request(port: int, key: str, value: str) -> bytes:
    return build_request("POST", "/v3/kv/put", port, body={"key": b64(key), "value": b64(value)})


def range_request(port: int, key: str) -> bytes:
    """A linearizable range (etcd's default): confirmed with a majority, as Bazar's leader confirms its lease."""
    return build_request("POST", "/v3/kv/range", port, body={"key": b64(key)})


class EtcdCluster:
    """A three-member etcd cluster on free loopback ports, each member a process of its
    own (logs and data under `workdir`), stopped by PID."""

    def __init__(self, binary: str, workdir: str, token: str):
        self.binary = binary
        self.workdir = workdir
        self.token = token
        ports = free_ports(2 * MEMBERS)
        self.client_ports, self.peer_ports = ports[:MEMBERS], ports[MEMBERS:]
        self.procs = Processes()

    def argv(self, i: int) -> list[str]:
        client, peer = f"http://{HOST}:{self.client_ports[i]}", f"http://{HOST}:{self.peer_ports[i]}"
        members = ",".join(f"bench-{j}=http://{HOST}:{p}" for j, p in enumerate(self.peer_ports))
        return [self.binary, "--name", f"bench-{i}", "--data-dir", os.path.join(self.workdir, f"member-{i}"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", members, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn"]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        os.makedirs(self.workdir, exist_ok=True)
        # etcd reads ETCD_* variables as flags: none of the caller's may change these members
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        for i in range(MEMBERS):
            self.procs.start(f"etcd-{i}", self.argv(i), env=env, cwd=self.workdir)
        wait_until(self.leader_port, timeout, "an etcd leader that takes a put")
        return self

    def leader_port(self) -> int | None:
        """The client port of the member that is leader, once it takes a put; None before."""
        if self.procs.exited():
            raise RuntimeError(f"an etcd member exited:\n{self.procs.logs()}")
        for port in self.client_ports:
            status, answer = http_json(port, "POST", "/v3/maintenance/status", body={}, timeout=1.0)
            header = answer.get("header") if isinstance(answer, dict) else None
            if status == 200 and isinstance(header, dict) and answer.get("leader") == header.get("member_id"):
                put_status, _ = http_json(port, "POST", "/v3/kv/put", body={"key": b64(KEY), "value": b64("x")})
                return port if put_status == 200 else None
        return None

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for _, p, _ in self.procs.started)

    def stop(self) -> None:
        """SIGTERM to the members, SIGKILL after 5 s: a member that was told to stop while its
        peers stop too can wait long on them, and its data is thrown away anyway."""
        t0 = time.monotonic()
        self.procs.stop(wait=5.0)
        log(f"  etcd: {MEMBERS} members stopped in {time.monotonic() - t0:.1f}s")


def etcd_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.splitlines()[0].strip() if out.strip() else ""
    return first.replace("etcd Version:", "etcd").strip() or None  # "etcd Version: 3.4.23" -> "etcd 3.4.23"


def bazar_targets(port: int, token: str, book_id: int, pids: dict[str, int]) -> dict[str, Target]:
    """Bazar's write, purchase and read, each charged the CPU of the processes it involves."""
    fe = tuple(pid for name, pid in pids.items() if name.startswith("frontend"))
    catalog = tuple(pid for name, pid in pids.items() if name.startswith("catalog"))
    order = tuple(pid for name, pid in pids.items() if name.startswith("order"))
    return {
        "write": Target(port, build_request("PUT", f"/bazar/update_price/{book_id}", port, body={"price": 12.5},
                                            token=token), fe + catalog),
        "purchase": Target(port, build_request("POST", f"/bazar/purchase/{book_id}", port, body={"quantity": 1}),
                           fe + catalog + order),
        "read": Target(port, build_request("GET", f"/bazar/info/{INFO_BOOK}", port), fe),
    }


def phase_etcd(ctx: Ctx, port: int, token: str, book_id: int, pids: dict[str, int], workdir: str,
               binary: str | None = None) -> dict[str, Any]:
    """Bazar's replicated write, purchase and read beside etcd's put and range (when
    etcd is on PATH): {"bazar": {"write"|"purchase"|"read": {conns: stats}}, "etcd":
    {"put"|"range": {conns: stats}} or {"skipped": why}, ...}."""
    bazar = bazar_targets(port, token, book_id, pids)
    res: dict[str, Any] = {"bazar": {}, "bazar_processes": sorted(pids), "members": MEMBERS}
    binary = binary if binary is not None else shutil.which("etcd")
    cluster = None
    if binary is None:
        log(f"  etcd: {NO_ETCD}; measuring Bazar's side only")
        res["etcd"] = {"skipped": NO_ETCD}
    else:
        res["etcd_version"] = etcd_version(binary)
        cluster = EtcdCluster(binary, workdir, f"bazar-bench-{ctx.run_id}")
    try:
        if cluster is not None:
            cluster.start()
        leader = cluster.leader_port() if cluster is not None else None
        if cluster is not None and leader is None:
            raise RuntimeError("the etcd cluster lost its leader")
        etcd = ({"put": Target(leader, put_request(leader, KEY, "x" * 100), cluster.pids),
                 "range": Target(leader, range_request(leader, KEY), cluster.pids)}
                if cluster is not None and leader is not None else {})
        writes = sweep(ctx, {"bazar write": bazar["write"], **({"etcd put": etcd["put"]} if etcd else {})},
                       WRITE_CONNS)
        purchases = sweep(ctx, {"bazar purchase": bazar["purchase"]}, PURCHASE_CONNS)
        reads = sweep(ctx, {"bazar read": bazar["read"], **({"etcd range": etcd["range"]} if etcd else {})},
                      READ_CONNS)
        res["bazar"] = {"write": writes["bazar write"], "purchase": purchases["bazar purchase"],
                        "read": reads["bazar read"]}
        if etcd:
            res["etcd"] = {"put": writes["etcd put"], "range": reads["etcd range"]}
        return res
    finally:
        if cluster is not None:
            cluster.stop()
