"""The in-memory store, for test suites that need no database and no Redis.

Records live in a dict of this process, so a retry that reaches another worker process runs
again: it holds the contract only within one process. That is what a test run is, and nothing
else: the system check ``django_idempotency.E008`` refuses this store outside tests
(docs/testing.md says how tests are recognised).

Every operation holds one lock for its whole read-decide-write, so claims, completions and
releases are atomic across the threads of the process, and fenced by the owner token like the
real stores.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from django_idempotency.storage.base import (
    PURGE_BATCH_SIZE,
    BaseStorage,
    Claim,
    PurgeBatch,
    PurgeResult,
    PurgeStop,
    Record,
    State,
    StoredResponse,
    new_token,
)

#: The dotted path to put in ``IDEMPOTENCY_STORE``.
MEMORY_STORE = "django_idempotency.storage.memory.MemoryStorage"


@dataclass
class _Entry:
    record: Record
    token: str


class MemoryStorage(BaseStorage):
    native_expiry = False
    transactional = False

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Re-entrant, so that a purge's progress callback may read the store.
        self._lock = threading.RLock()

    def _owned(self, scope: str, key_hash: str, token: str) -> _Entry | None:
        """The in-flight entry ``token`` still owns; call with the lock held.

        Every fenced operation (complete, release, and a lease renewal) starts here.
        """
        entry = self._entries.get((scope, key_hash))
        if entry is None or entry.token != token or entry.record.state is not State.IN_FLIGHT:
            return None
        return entry

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
        with self._lock:
            held = self._entries.get((scope, key_hash))
            if held is not None and not held.record.can_be_taken_over(fingerprint, now):
                return Claim(record=held.record)
            token = new_token()
            self._entries[(scope, key_hash)] = _Entry(
                Record(
                    fingerprint=fingerprint,
                    state=State.IN_FLIGHT,
                    created_at=now,
                    lease_expires_at=now + lease,
                    expires_at=now + ttl,
                ),
                token,
            )
            reclaimed = held is not None and not held.record.is_expired(now)
            return Claim(token=token, reclaimed=reclaimed)

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
        with self._lock:
            entry = self._owned(scope, key_hash, token)
            if entry is None:
                return False
            state = State.UNAVAILABLE if response is None else State.COMPLETED
            expires_at = max(entry.record.expires_at, now + min_retention)
            entry.record = replace(
                entry.record, state=state, response=response, expires_at=expires_at
            )
            return True

    def renew(
        self, scope: str, key_hash: str, token: str, *, now: datetime, lease: timedelta
    ) -> bool:
        with self._lock:
            entry = self._owned(scope, key_hash, token)
            if entry is None:
                return False
            entry.record = replace(entry.record, lease_expires_at=now + lease)
            return True

    def release(self, scope: str, key_hash: str, token: str) -> bool:
        with self._lock:
            if self._owned(scope, key_hash, token) is None:
                return False
            del self._entries[(scope, key_hash)]
            return True

    def get(self, scope: str, key_hash: str) -> Record | None:
        with self._lock:
            entry = self._entries.get((scope, key_hash))
            return None if entry is None else entry.record

    def clear(self) -> None:
        """Forget every record, as a test database does between tests."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

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
        started = time.monotonic()
        cutoff = now - older_than
        with self._lock:
            expired = [k for k, e in self._entries.items() if e.record.expires_at <= cutoff]
            stale: list[tuple[str, str]] = []
            if stale_in_flight is not None:
                stale = [
                    k
                    for k, e in self._entries.items()
                    if e.record.state is State.IN_FLIGHT
                    and e.record.lease_expires_at <= now - stale_in_flight
                    and e.record.expires_at > cutoff
                ]
            deleted = stale_count = batches = 0
            seconds: list[float] = []
            stopped_by: PurgeStop | None = None
            for kind, keys in (("expired", expired), ("stale_in_flight", stale)):
                for start in range(0, len(keys), batch_size):
                    if max_batches is not None and batches >= max_batches:
                        stopped_by = "max_batches"
                        break
                    if time_limit is not None and time.monotonic() - started >= time_limit:
                        stopped_by = "time_limit"
                        break
                    batch_started = time.monotonic()
                    chunk = keys[start : start + batch_size]
                    if not dry_run:
                        for key in chunk:
                            del self._entries[key]
                    batches += 1
                    deleted += len(chunk)
                    if kind == "stale_in_flight":
                        stale_count += len(chunk)
                    seconds.append(time.monotonic() - batch_started)
                    if progress is not None:
                        progress(PurgeBatch(batches, kind, len(chunk), seconds[-1]))
                if stopped_by is not None:
                    break
        return PurgeResult(
            deleted=deleted,
            batches=batches,
            batch_seconds=seconds,
            stale_in_flight=stale_count,
            dry_run=dry_run,
            stopped_by=stopped_by,
            seconds=time.monotonic() - started,
        )
