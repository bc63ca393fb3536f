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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta


class State(str, enum.Enum):
    IN_FLIGHT = "in_flight"
    COMPLETED = "completed"
    #: Completed, but the response was streamed or too large to keep: retries get 409.
    UNAVAILABLE = "unavailable"


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


@dataclass(frozen=True)
class PurgeResult:
    deleted: int = 0
    batches: int = 0
    #: Per-batch durations in seconds, for ``--verbosity 2`` and the benchmark.
    batch_seconds: list[float] = field(default_factory=list)


def new_token() -> str:
    return secrets.token_hex(16)


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
    ) -> bool:
        """Store the final response (``None`` marks it unavailable) if ``token`` still owns the key.

        Returns False when the claim was lost to another request. The record keeps the expiry set
        at claim time (created + TTL).
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
        batch_size: int = 1000,
        dry_run: bool = False,
        stale_in_flight: timedelta | None = None,
        max_batches: int | None = None,
        time_limit: float | None = None,
    ) -> PurgeResult:
        """Delete expired records in bounded batches; stores with native expiry do nothing."""
        return PurgeResult()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """A transaction that the view's writes and :meth:`complete` share, where the store can."""
        yield
