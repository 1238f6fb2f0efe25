"""What Bazar refuses, or cannot do now, in its own terms.

Domain code (records, stores, replication, the services) raises these; only the
HTTP edges turn them into statuses (`bazar.http.app` for answers, `bazar.http.client`
for a peer's answer turned back into the same error). Each carries one sentence for
the client.

An operation's failure is also an *outcome* of the replicated log: it is recorded
under its request id by its kind (`kind`, the class name) and raised again, as the
same kind, when the request is repeated (`error_of_kind`).
"""

from __future__ import annotations


class BazarError(Exception):
    """A request refused, or one that cannot be served now; `message` says why."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        return type(self).__name__


class Invalid(BazarError):
    """Malformed or out-of-range input: nothing was done, and repeating it will not help."""


class Unauthorized(BazarError):
    """The admin token is missing or wrong."""


class Forbidden(BazarError):
    """An internal door without the cluster secret, or a form from another site."""


class NotFound(BazarError):
    """No such book, order or resource."""


class Conflict(BazarError):
    """The request contradicts what is recorded (an Idempotency-Key reused for another purchase)."""


class OutOfStock(Conflict):
    """Fewer copies left than asked for."""


class TooLarge(BazarError):
    """A body over the limit."""


class Unavailable(BazarError):
    """No replica can take the request now (no primary, not caught up, a failover):
    retry shortly. A write answered so may still have happened: retry it with the
    same request id to learn its outcome."""

    def __init__(self, message: str, *, retry_after: float | None = 1.0):
        super().__init__(message, retry_after=retry_after)


# The kinds an operation applied from the log may end with (recorded by name).
OUTCOME_KINDS: dict[str, type[BazarError]] = {cls.__name__: cls for cls in (Invalid, NotFound, Conflict, OutOfStock)}


def error_of_kind(kind: str, message: str) -> BazarError:
    """The error recorded as `kind` (an unknown kind is an Invalid: it came from
    nowhere Bazar knows)."""
    return OUTCOME_KINDS.get(kind, Invalid)(message)
