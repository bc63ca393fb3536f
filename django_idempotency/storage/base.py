"""The contract every idempotency store implements.

A store holds one record per (scope, key hash). Its operations must each be atomic on the
backend: :meth:`BaseStorage.claim` is the only way a request gets to run the view, and
:meth:`BaseStorage.complete` / :meth:`BaseStorage.release` succeed only for the owner token
that the claim handed out, so a request whose lease was taken over can never overwrite or
delete the record of the request that took over.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType

from asgiref.sync import sync_to_async

from django_idempotency.exceptions import StoreError

# Re-exported: the purge types lived here before they had a module of their own.
from django_idempotency.storage.purge import (
    PURGE_BATCH_SIZE,
    PurgeBatch,
    PurgeResult,
    PurgeStop,
)

__all__ = [
    "CLAIM_ATTEMPTS",
    "PURGE_BATCH_SIZE",
    "BaseStorage",
    "Claim",
    "PurgeBatch",
    "PurgeResult",
    "PurgeStop",
    "Record",
    "STATES_BY_VALUE",
    "State",
    "StoredResponse",
    "new_token",
    "store_errors",
]


class State(str, enum.Enum):
    IN_FLIGHT = "in_flight"
    COMPLETED = "completed"
    #: Completed, but the response was streamed or too large to keep: retries get 409.
    UNAVAILABLE = "unavailable"


#: Each state by the value a store reads back: text, or bytes from a Redis client that does not
#: decode responses. A dictionary look-up, where ``State(value)`` costs several times more on a
#: path every replay takes.
STATES_BY_VALUE: dict[object, State] = {
    **{state.value: state for state in State},
    **{state.value.encode(): state for state in State},
}


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class Record:
    fingerprint: str
    state: State
    created_at: datetime
    lease_expires_at: datetime
    expires_at: datetime
    response: StoredResponse | None = None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at <= now

    def lease_expired(self, now: datetime) -> bool:
        return self.state is State.IN_FLIGHT and self.lease_expires_at <= now

    def can_be_taken_over(self, fingerprint: str, now: datetime) -> bool:
        """An expired record counts as absent; a dead lease is reclaimed by a matching request."""
        return self.is_expired(now) or (self.lease_expired(now) and self.fingerprint == fingerprint)


@dataclass(frozen=True)
class Claim:
    """Either an owner token (run the view) or the record that holds the key."""

    token: str | None = None
    record: Record | None = None
    #: True when the token was won by taking over a dead lease.
    reclaimed: bool = False

    @property
    def won(self) -> bool:
        return self.token is not None


#: A claim that loses every race this many times in a row reports the store as unavailable (the
#: caller answers 503) rather than looping under a storm. Every store uses it.
CLAIM_ATTEMPTS = 4


def new_token() -> str:
    return secrets.token_hex(16)


class store_errors:  # noqa: N801 - used like a function, as contextlib.suppress is
    """Turn a backend failure inside the block into ``StoreError`` (the engine answers 503).

    Every store wraps its calls with this, so a failure reads the same whichever store raised it:
    ``"<stage> failed: <ExceptionClass>[: <message>]"``. An outcome the backend could not confirm
    is an outcome no store may guess, so anything in ``errors`` counts as "unknown". ``detail``
    leaves the backend's own message out where it may quote stored values (SQL parameters).
    A class rather than ``@contextmanager``: it wraps every store call on the hot path, and a
    generator-based manager costs several times more per ``with``.
    """

    __slots__ = ("detail", "errors", "stage")

    def __init__(
        self,
        stage: str,
        errors: tuple[type[BaseException], ...] = (Exception,),
        *,
        detail: bool = True,
    ) -> None:
        self.stage = stage
        self.errors = errors
        self.detail = detail

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Never swallows: what is not turned into StoreError propagates unchanged.
        if exc is None or isinstance(exc, StoreError) or not isinstance(exc, self.errors):
            return
        message = f"{self.stage} failed: {exc.__class__.__name__}"
        if self.detail:
            message = f"{message}: {exc}"
        raise StoreError(message) from exc


class BaseStorage(abc.ABC):
    """Subclass this and point ``IDEMPOTENCY_STORE`` at the subclass's dotted path."""

    #: True when records expire natively and ``purge_expired`` has nothing to do.
    native_expiry: bool = False
    #: True when :meth:`atomic` can make completion commit with the view's own writes.
    transactional: bool = False

    @abc.abstractmethod
    def claim(
        self,
        scope: str,
        key_hash: str,
        fingerprint: str,
        *,
        now: datetime,
        lease: timedelta,
        ttl: timedelta,
    ) -> Claim:
        """Atomically take the key, or return the live record that holds it.

        A missing or expired record is replaced; an in-flight record whose lease has ended is
        taken over when ``fingerprint`` matches (``Claim.reclaimed``). Raises ``StoreError`` when
        the backend fails or the outcome is unknown.
        """

    @abc.abstractmethod
    def complete(
        self,
        scope: str,
        key_hash: str,
        token: str,
        response: StoredResponse | None,
        *,
        now: datetime,
        min_retention: timedelta = timedelta(0),
    ) -> bool:
        """Store the final response (``None`` marks it unavailable) if ``token`` still owns the key.

        Returns False when the claim was lost to another request. The record keeps the expiry set
        at claim time (created + TTL), pushed out to ``now + min_retention`` when that is later:
        a request that ran longer than its TTL must still leave a result its retry can replay.
        """

    @abc.abstractmethod
    def renew(
        self, scope: str, key_hash: str, token: str, *, now: datetime, lease: timedelta
    ) -> bool:
        """Move the lease of an in-flight claim to ``now + lease`` if ``token`` still owns it.

        The lease heartbeat calls this while the view runs, so that only a dead worker's claim
        can be taken over. Returns False when the claim is no longer this token's.
        """

    @abc.abstractmethod
    def release(self, scope: str, key_hash: str, token: str) -> bool:
        """Delete the in-flight record if ``token`` still owns it, so that a retry runs once."""

    @abc.abstractmethod
    def get(self, scope: str, key_hash: str) -> Record | None:
        """The stored record, expired or not (for waiting, the admin and tests)."""

    def purge_expired(
        self,
        *,
        now: datetime,
        batch_size: int = PURGE_BATCH_SIZE,
        dry_run: bool = False,
        stale_in_flight: timedelta | None = None,
        max_batches: int | None = None,
        time_limit: float | None = None,
        older_than: timedelta = timedelta(0),
        progress: Callable[[PurgeBatch], None] | None = None,
    ) -> PurgeResult:
        """Delete expired records in bounded batches; stores with native expiry do nothing.

        A record goes when ``expires_at <= now - older_than``; with ``stale_in_flight``, an
        in-flight record also goes once its lease ended that long before ``now`` (its worker
        died). Live records are never touched. ``max_batches`` and ``time_limit`` (seconds) are
        budgets: the purge stops between batches and says so in ``PurgeResult.stopped_by``, so a
        cron job can bound its run and pick up the rest next time. ``progress`` is called after
        each batch. ``dry_run`` walks the same batches and deletes nothing.
        """
        return PurgeResult(dry_run=dry_run)

    # Async views. The engine awaits these only where :meth:`runs_on_loop` says the store has a
    # client on the running event loop; otherwise it runs its synchronous steps in a worker
    # thread, one hop per step, as Django runs the ORM for async code. These defaults do the
    # same hop, so that a caller that awaits them on any store gets the same answers.

    def runs_on_loop(self) -> bool:
        """True when :meth:`aclaim`, :meth:`acomplete` and :meth:`arelease` await a native
        async client on the running loop instead of a worker thread."""
        return False

    async def aclaim(
        self,
        scope: str,
        key_hash: str,
        fingerprint: str,
        *,
        now: datetime,
        lease: timedelta,
        ttl: timedelta,
    ) -> Claim:
        return await sync_to_async(self.claim)(
            scope, key_hash, fingerprint, now=now, lease=lease, ttl=ttl
        )

    async def acomplete(
        self,
        scope: str,
        key_hash: str,
        token: str,
        response: StoredResponse | None,
        *,
        now: datetime,
        min_retention: timedelta = timedelta(0),
    ) -> bool:
        return await sync_to_async(self.complete)(
            scope, key_hash, token, response, now=now, min_retention=min_retention
        )

    async def arelease(self, scope: str, key_hash: str, token: str) -> bool:
        return await sync_to_async(self.release)(scope, key_hash, token)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """A transaction that the view's writes and :meth:`complete` share, where the store can."""
        yield
