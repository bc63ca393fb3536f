"""The ORM store: one ``IdempotencyKey`` row per (scope, key hash).

The unique constraint is the lock. A claim is a plain INSERT: committed on its own when the
connection is in autocommit (the normal case for a request), so every other worker sees it at once,
and PostgreSQL never makes a duplicate INSERT wait on an uncommitted one. Taking over an expired
record or a dead lease is an UPDATE conditioned on the owner token that was read, so two requests
racing for the same dead record cannot both win.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import Error, IntegrityError, connections, transaction
from django.db.models import Q

from django_idempotency.conf import settings
from django_idempotency.exceptions import StoreError
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

# Errors are caught as django.db.Error, not DatabaseError: a connection that died under the
# driver surfaces as InterfaceError, which is not a DatabaseError (PEP 249).

# A claim that loses every race this many times in a row reports the store as unavailable
# (the caller answers 503) rather than looping under a storm.
CLAIM_ATTEMPTS = 4


class DatabaseStorage(BaseStorage):
    transactional = True

    def __init__(self, using: str | None = None) -> None:
        self.using = using or settings.IDEMPOTENCY_DATABASE

    @property
    def _objects(self):  # type: ignore[no-untyped-def]
        from django_idempotency.models import IdempotencyKey

        return IdempotencyKey.objects.using(self.using)

    def _savepoint_if_nested(self) -> contextlib.AbstractContextManager[object]:
        # Inside an outer transaction a failed INSERT would poison it on PostgreSQL; a savepoint
        # contains the IntegrityError. In autocommit the INSERT is its own transaction already.
        if connections[self.using].in_atomic_block:
            return transaction.atomic(using=self.using)
        return contextlib.nullcontext()

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
        try:
            for _ in range(CLAIM_ATTEMPTS):
                row = (
                    self._objects.filter(scope=scope, key_hash=key_hash)
                    .values_list("pk", "owner_token", *_RECORD_FIELDS)
                    .first()
                )
                token = new_token()
                fresh = {
                    "fingerprint": fingerprint,
                    "state": State.IN_FLIGHT.value,
                    "owner_token": token,
                    "created_at": now,
                    "lease_expires_at": now + lease,
                    "expires_at": now + ttl,
                    "response_status": None,
                    "response_headers": [],
                    "response_body": None,
                }
                if row is None:
                    try:
                        with self._savepoint_if_nested():
                            self._objects.create(scope=scope, key_hash=key_hash, **fresh)
                    except IntegrityError:
                        continue  # another request inserted first: read what it holds
                    return Claim(token=token)
                pk, old_token, *values = row
                record = _to_record(values)
                if not record.can_be_taken_over(fingerprint, now):
                    return Claim(record=record)
                # Conditioned on what was read: if the owner completed (or another request took
                # over) since, nothing matches and the loop reads the record again.
                taken = self._objects.filter(
                    pk=pk, owner_token=old_token, state=record.state.value
                ).update(**fresh)
                if taken:
                    return Claim(token=token, reclaimed=not record.is_expired(now))
        except Error as exc:
            raise StoreError(f"claim failed: {exc.__class__.__name__}") from exc
        raise StoreError("claim kept losing races for the same key")

    def complete(
        self,
        scope: str,
        key_hash: str,
        token: str,
        response: StoredResponse | None,
        *,
        now: datetime,
    ) -> bool:
        values: dict[str, object]
        if response is None:
            values = {"state": State.UNAVAILABLE.value}
        else:
            values = {
                "state": State.COMPLETED.value,
                "response_status": response.status,
                "response_headers": [list(h) for h in response.headers],
                "response_body": response.body,
            }
        try:
            return bool(self._owned(scope, key_hash, token).update(**values))
        except Error as exc:
            raise StoreError(f"complete failed: {exc.__class__.__name__}") from exc

    def release(self, scope: str, key_hash: str, token: str) -> bool:
        try:
            deleted, _ = self._owned(scope, key_hash, token).delete()
        except Error as exc:
            raise StoreError(f"release failed: {exc.__class__.__name__}") from exc
        return bool(deleted)

    def get(self, scope: str, key_hash: str) -> Record | None:
        try:
            row = (
                self._objects.filter(scope=scope, key_hash=key_hash)
                .values_list(*_RECORD_FIELDS)
                .first()
            )
        except Error as exc:
            raise StoreError(f"get failed: {exc.__class__.__name__}") from exc
        return None if row is None else _to_record(list(row))

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        with transaction.atomic(using=self.using):
            yield

    def _owned(self, scope: str, key_hash: str, token: str):  # type: ignore[no-untyped-def]
        return self._objects.filter(
            scope=scope, key_hash=key_hash, owner_token=token, state=State.IN_FLIGHT.value
        )

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
        """Walk the matching records by primary key, one short statement at a time.

        A batch is a SELECT of at most ``batch_size`` primary keys (a plain read: no row locks on
        PostgreSQL, MariaDB or SQLite) and a DELETE that repeats the condition, so a record that
        a request re-claimed in between survives. In autocommit each DELETE commits on its own,
        so a claim or a replay waits for at most one batch. Each pass resumes after the last key
        it saw rather than rescanning from the start, so rows deleted by earlier batches are not
        walked over again.

        The DELETE names the batch by its first and last key, not by an IN list: a list of
        thousands of placeholders cost more to build and parse than PostgreSQL spent deleting
        (see ``docs/purge.md``), and SQLite caps parameters. Keys inside the range that the SELECT
        skipped did not match the condition, and with the cutoff fixed only a record that is
        expired anyway could match later, so the range deletes the batch and nothing live.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        expired = Q(expires_at__lte=now - older_than)
        passes: list[tuple[str, Q]] = [("expired", expired)]
        if stale_in_flight is not None:
            # A crashed claim that is also expired belongs to the expired pass. A real run has
            # deleted it before this pass; a dry run has not, and would count it a second time.
            stale = Q(state=State.IN_FLIGHT.value, lease_expires_at__lte=now - stale_in_flight)
            passes.append(("stale_in_flight", stale & ~expired))
        tally = _PurgeTally(started=time.monotonic())
        try:
            for kind, condition in passes:
                if not self._purge_pass(
                    kind, condition, tally, batch_size, dry_run, max_batches, time_limit, progress
                ):
                    break
        except Error as exc:
            raise StoreError(
                f"purge failed after {tally.deleted} records in {tally.batches} batches: "
                f"{exc.__class__.__name__}: {exc}"
            ) from exc
        return PurgeResult(
            deleted=tally.deleted,
            batches=tally.batches,
            batch_seconds=tally.batch_seconds,
            stale_in_flight=tally.stale_in_flight,
            dry_run=dry_run,
            stopped_by=tally.stopped_by,
            seconds=time.monotonic() - tally.started,
        )

    def _purge_pass(
        self,
        kind: str,
        condition: Q,
        tally: _PurgeTally,
        batch_size: int,
        dry_run: bool,
        max_batches: int | None,
        time_limit: float | None,
        progress: Callable[[PurgeBatch], None] | None,
    ) -> bool:
        """Run one condition to exhaustion; False when a budget stopped the purge."""
        last_pk: object = None
        while True:
            if max_batches is not None and tally.batches >= max_batches:
                tally.stopped_by = "max_batches"
                return False
            if time_limit is not None and time.monotonic() - tally.started >= time_limit:
                tally.stopped_by = "time_limit"
                return False
            began = time.monotonic()
            matching = self._objects.filter(condition)
            if last_pk is not None:
                matching = matching.filter(pk__gt=last_pk)
            pks = list(matching.order_by("pk").values_list("pk", flat=True)[:batch_size])
            if not pks:
                return True
            count = len(pks) if dry_run else self._delete_batch(pks[0], pks[-1], condition)
            seconds = time.monotonic() - began
            tally.add(kind, count, seconds)
            if progress is not None:
                progress(PurgeBatch(number=tally.batches, kind=kind, count=count, seconds=seconds))
            if len(pks) < batch_size:
                return True
            last_pk = pks[-1]

    def _delete_batch(self, first: object, last: object, condition: Q) -> int:
        # QuerySet.delete() loads every row into Python, response bodies included, as soon as
        # any pre_delete or post_delete receiver is connected (audit apps connect them for all
        # models). The raw DELETE never does; no model points at IdempotencyKey, so nothing
        # cascades, and no delete signals are sent for purged records.
        batch = self._objects.filter(condition, pk__gte=first, pk__lte=last)
        return int(batch._raw_delete(self.using))


_RECORD_FIELDS = (
    "fingerprint",
    "state",
    "created_at",
    "lease_expires_at",
    "expires_at",
    "response_status",
    "response_headers",
    "response_body",
)


def _to_record(values: list[object]) -> Record:
    fingerprint, state, created, lease, expires, status, headers, body = values
    response = None
    if state == State.COMPLETED.value and status is not None:
        response = StoredResponse(
            status=int(status),  # type: ignore[call-overload]
            headers=tuple((str(k), str(v)) for k, v in headers),  # type: ignore[attr-defined]
            body=bytes(body) if body is not None else b"",  # type: ignore[call-overload]
        )
    return Record(
        fingerprint=str(fingerprint),
        state=State(state),
        created_at=created,  # type: ignore[arg-type]
        lease_expires_at=lease,  # type: ignore[arg-type]
        expires_at=expires,  # type: ignore[arg-type]
        response=response,
    )


@dataclass
class _PurgeTally:
    """What a purge has done so far, kept outside the loop so a failure can report it."""

    started: float
    deleted: int = 0
    stale_in_flight: int = 0
    batches: int = 0
    batch_seconds: list[float] = field(default_factory=list)
    stopped_by: PurgeStop | None = None

    def add(self, kind: str, count: int, seconds: float) -> None:
        self.deleted += count
        if kind == "stale_in_flight":
            self.stale_in_flight += count
        self.batches += 1
        self.batch_seconds.append(seconds)
