"""What each Bazar process is told: who it is, who its peers are, its secrets, and
the tuning values (timer periods, timeouts, budgets) that shape its behaviour under
faults. Frozen records, made from the twistd options (`bazar.config`) in production
and by hand in the tests and the simulation; the `build_*` function of each service
takes one and wires the process's objects from it."""

from __future__ import annotations

from attrs import field, frozen


@frozen
class RaftTiming:
    """The Raft driver's clock and patience (bazar.replication)."""

    tick: float = 0.05  # seconds per core tick
    election_ticks: int = 14  # the minimum election timeout, in ticks (randomized up to twice that)
    heartbeat_ticks: int = 2
    rpc_timeout: float = 1.0  # seconds a Raft message exchange may take (an append: twice that)
    write_timeout: float = 8.0  # seconds a write may wait to be committed before it is answered 503
    forward_timeout: float = 2.0  # seconds a write forwarded to the primary may take


@frozen
class ClientTiming:
    """How one service's replicas are called (bazar.balancer)."""

    timeout: float = 2.0  # seconds one read may take
    health_timeout: float = 0.5  # a healthy replica answers /health in milliseconds
    attempt: float = 1.0  # seconds one write attempt may take before it is sent again
    write_budget: float = 10.0  # seconds a write is retried through a failover
    read_budget: float = 2.0  # seconds a read is retried while no replica can serve it
    max_in_flight: int = 32  # requests in flight to one replica at a time


@frozen
class ReplicaSettings:
    """One replica of a replicated service."""

    service: str  # "catalog" or "order"
    replica_id: int
    peers: dict[int, str] = field(factory=dict)  # every replica of the service, itself included
    secret: str | None = None
    admin_token: str | None = None
    timing: RaftTiming = RaftTiming()


@frozen
class CatalogSettings:
    replica: ReplicaSettings
    frontends: tuple[str, ...] = ()  # front ends to push invalidations to over HTTP
    redis: str | None = None  # Redis URL to publish invalidations on
    push_delay: float = 0.001  # seconds between a commit and its push (the write's answer leaves first)


@frozen
class OrderSettings:
    replica: ReplicaSettings
    catalog: tuple[str, ...] = ()  # the catalog replicas
    catalog_client: ClientTiming = ClientTiming(write_budget=8.0)
    catalog_poll: float = 0.5  # seconds between health checks of the catalog replicas
    settle_after: float = 2.0  # seconds a sale is left to its own purchase before the sweep records it
    sweep_every: float = 1.0


@frozen
class FrontendSettings:
    catalog: tuple[str, ...] = ()
    order: tuple[str, ...] = ()
    cache_size: int = 1024  # entries (0: no cache)
    redis: str | None = None  # Redis URL to receive invalidations from
    secret: str | None = None
    admin_token: str | None = None
    catalog_client: ClientTiming = ClientTiming()
    order_client: ClientTiming = ClientTiming(write_budget=15.0)
    poll_every: float = 0.25  # seconds between health checks of every replica
    invalidation_grace: float = 1.0  # seconds a gap in the invalidations may last before the cache is flushed
    # Several front end processes on one port (SO_REUSEPORT): this one's own port beside it,
    # and the others' own URLs, told of every write made here before it is answered
    reuse_port: bool = False
    internal_port: int | None = None
    siblings: tuple[str, ...] = ()
    sibling_timeout: float = 0.5  # seconds a write's answer waits, at most, for the siblings to take its keys
