"""The ORM store: one ``IdempotencyKey`` row per (scope, key hash).

The unique constraint is the lock. A claim is a plain INSERT: committed on its own when the
connection is in autocommit (the normal case for a request), so every other worker sees it at once,
and PostgreSQL never makes a duplicate INSERT wait on an uncommitted one. Taking over an expired
record or a dead lease is an UPDATE conditioned on the owner token that was read, so two requests
racing for the same dead record cannot both win.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timedelta

from django.db import DatabaseError, IntegrityError, connections, transaction

from django_idempotency.conf import settings
from django_idempotency.exceptions import StoreError
from django_idempotency.storage.base import (
    BaseStorage,
    Claim,
    Record,
    State,
    StoredResponse,
    new_token,
)

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
                taken = self._objects.filter(pk=pk, owner_token=old_token).update(**fresh)
                if taken:
                    return Claim(token=token, reclaimed=not record.is_expired(now))
        except DatabaseError as exc:
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
        except DatabaseError as exc:
            raise StoreError(f"complete failed: {exc.__class__.__name__}") from exc

    def release(self, scope: str, key_hash: str, token: str) -> bool:
        try:
            deleted, _ = self._owned(scope, key_hash, token).delete()
        except DatabaseError as exc:
            raise StoreError(f"release failed: {exc.__class__.__name__}") from exc
        return bool(deleted)

    def get(self, scope: str, key_hash: str) -> Record | None:
        try:
            row = (
                self._objects.filter(scope=scope, key_hash=key_hash)
                .values_list(*_RECORD_FIELDS)
                .first()
            )
        except DatabaseError as exc:
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
