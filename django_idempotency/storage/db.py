"""The ORM store: one ``IdempotencyKey`` row per (scope, key hash).

The unique constraint is the lock. A claim is ONE statement in autocommit, an insert that does
nothing when the key is held (``ON CONFLICT DO NOTHING`` on PostgreSQL and SQLite, ``ON DUPLICATE
KEY UPDATE`` that changes nothing on MariaDB/MySQL), so a fresh key costs no read and every other
worker sees the claim as soon as it commits. On MariaDB ``RETURNING`` hands back the row that
holds the key in the same statement; elsewhere a lost claim reads it with one SELECT.

On PostgreSQL the claim's own commit does not wait for the WAL flush
(``IDEMPOTENCY_ASYNC_CLAIM_COMMIT``): the WAL is written in order, so the view's durable commit
flushes the claim with it, and a crash before that loses the claim together with the view's
writes, which only lets the retry run at once instead of after the lease (docs/stores.md).

Taking over an expired record or a dead lease is an UPDATE that repeats the takeover condition
and the owner token that was read, so two requests racing for the same dead record cannot both
win, and a lease renewed in between by its live owner is not taken.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import Error, IntegrityError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.models import Field, Q

from django_idempotency.conf import settings
from django_idempotency.exceptions import StoreError
from django_idempotency.storage.base import (
    CLAIM_ATTEMPTS,
    PURGE_BATCH_SIZE,
    STATES_BY_VALUE,
    BaseStorage,
    Claim,
    PurgeBatch,
    PurgeResult,
    PurgeStop,
    Record,
    State,
    StoredResponse,
    new_token,
    store_errors,
)

# Errors are caught as django.db.Error, not DatabaseError: a connection that died under the
# driver surfaces as InterfaceError, which is not a DatabaseError (PEP 249).

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

# What a claim writes, in this order; the primary key is the database's.
_CLAIM_FIELDS = ("scope", "key_hash", "owner_token", *_RECORD_FIELDS)

# What every claim writes alike: the state and an empty response (_ClaimStatement prepares these
# for the database once, not on every claim).
_CLAIM_CONSTANTS: dict[str, Any] = {
    "state": State.IN_FLIGHT.value,
    "response_status": None,
    "response_headers": [],
    "response_body": None,
}


class DatabaseStorage(BaseStorage):
    transactional = True

    def __init__(self, using: str | None = None) -> None:
        self.using = using or settings.IDEMPOTENCY_DATABASE
        self._statements: dict[tuple[str, bool], _ClaimStatement] = {}

    @property
    def _objects(self):  # type: ignore[no-untyped-def]
        from django_idempotency.models import IdempotencyKey

        return IdempotencyKey.objects.using(self.using)

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
        token = new_token()
        fresh = {
            "scope": scope,
            "key_hash": key_hash,
            "owner_token": token,
            "fingerprint": fingerprint,
            "created_at": now,
            "lease_expires_at": now + lease,
            "expires_at": now + ttl,
            **_CLAIM_CONSTANTS,
        }
        with store_errors("claim", (Error,), detail=False):
            connection = connections[self.using]
            statement = self._statement(connection)
            # One cursor for the claim and, when it was lost, the read of the record in its way.
            with connection.cursor() as cursor:
                for _ in range(CLAIM_ATTEMPTS):
                    won, held = statement.run(cursor, connection, fresh)
                    if won:
                        return Claim(token=token)
                    if held is None:
                        held = statement.read(cursor, connection, scope, key_hash)
                        if held is None:
                            continue  # released or purged since the insert saw it: try again
                    pk, old_token, record = held
                    if not record.can_be_taken_over(fingerprint, now):
                        return Claim(record=record)
                    if self._take_over(pk, old_token, record, fingerprint, fresh, now):
                        return Claim(token=token, reclaimed=not record.is_expired(now))
        raise StoreError("claim kept losing races for the same key")

    def _statement(self, connection: BaseDatabaseWrapper) -> _ClaimStatement:
        # Inside an outer transaction (ATOMIC_REQUESTS, a test case) the claim commits with it:
        # relaxing synchronous_commit there would relax the caller's own commit too.
        relaxed = settings.IDEMPOTENCY_ASYNC_CLAIM_COMMIT and not connection.in_atomic_block
        cache_key = (connection.vendor, relaxed)
        statement = self._statements.get(cache_key)
        if statement is None:
            statement = _ClaimStatement.build(connection, relaxed)
            self._statements[cache_key] = statement
        return statement

    def _read(self, scope: str, key_hash: str) -> tuple[Any, str, Record] | None:
        connection = connections[self.using]
        with connection.cursor() as cursor:
            return self._statement(connection).read(cursor, connection, scope, key_hash)

    def _take_over(
        self,
        pk: Any,
        old_token: str,
        record: Record,
        fingerprint: str,
        fresh: dict[str, Any],
        now: datetime,
    ) -> bool:
        # The condition is repeated, not only the state that was read: a live owner that renewed
        # its lease since the read keeps its claim.
        dead = Q(expires_at__lte=now) | Q(
            state=State.IN_FLIGHT.value, lease_expires_at__lte=now, fingerprint=fingerprint
        )
        values = {k: v for k, v in fresh.items() if k not in ("scope", "key_hash")}
        taken = self._objects.filter(
            dead, pk=pk, owner_token=old_token, state=record.state.value
        ).update(**values)
        return bool(taken)

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
        stored: tuple[Any, ...]
        if response is None:
            state, stored = State.UNAVAILABLE.value, (None, [], None)
        else:
            headers = [list(h) for h in response.headers]
            state, stored = State.COMPLETED.value, (response.status, headers, response.body)
        with store_errors("complete", (Error,), detail=False):
            connection = connections[self.using]
            statement = self._statement(connection)
            return statement.complete(
                connection, scope, key_hash, token, state, stored, now + min_retention
            )

    def renew(
        self, scope: str, key_hash: str, token: str, *, now: datetime, lease: timedelta
    ) -> bool:
        with store_errors("renew", (Error,), detail=False):
            return bool(self._owned(scope, key_hash, token).update(lease_expires_at=now + lease))

    def release(self, scope: str, key_hash: str, token: str) -> bool:
        with store_errors("release", (Error,), detail=False):
            deleted = self._owned(scope, key_hash, token)._raw_delete(self.using)
        return bool(deleted)

    def get(self, scope: str, key_hash: str) -> Record | None:
        with store_errors("get", (Error,), detail=False):
            held = self._read(scope, key_hash)
        return None if held is None else held[2]

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


def _to_record(values: list[object]) -> Record:
    fingerprint, state_value, created, lease, expires, status, headers, body = values
    state = STATES_BY_VALUE.get(state_value)
    if state is None:
        # Written by hand or by another program: an outcome we cannot read is not guessed.
        raise StoreError(f"unreadable idempotency record: state {state_value!r}")
    response = None
    if state is State.COMPLETED and status is not None:
        response = StoredResponse(
            status=int(status),  # type: ignore[call-overload]
            headers=tuple([(str(k), str(v)) for k, v in headers]),  # type: ignore[attr-defined]
            body=bytes(body) if body is not None else b"",  # type: ignore[call-overload]
        )
    return Record(
        fingerprint=str(fingerprint),
        state=state,
        created_at=created,  # type: ignore[arg-type]
        lease_expires_at=lease,  # type: ignore[arg-type]
        expires_at=expires,  # type: ignore[arg-type]
        response=response,
    )


class _ClaimStatement:
    """The one-statement claim of one database vendor, built once per store, vendor and mode.

    :meth:`run` answers ``(won, held)``: ``won`` when this claim inserted its row; otherwise
    ``held`` is the row in the way when the statement could return it, else ``None`` (the caller
    reads it).
    """

    def __init__(self, connection: BaseDatabaseWrapper, relaxed: bool) -> None:
        from django_idempotency.models import IdempotencyKey

        meta = IdempotencyKey._meta

        def column(name: str) -> Field[Any, Any]:
            found = meta.get_field(name)
            assert isinstance(found, Field)  # noqa: S101 - plain columns, never relations
            return found

        qn = connection.ops.quote_name
        self.fields = tuple(column(name) for name in _CLAIM_FIELDS)
        self.table = qn(meta.db_table)
        self.columns = ", ".join(qn(str(f.column)) for f in self.fields)
        self.placeholders = ", ".join(["%s"] * len(self.fields))
        self.pk = qn(str(column("id").column))
        self.scope = qn(str(column("scope").column))
        self.key_hash = qn(str(column("key_hash").column))
        self.unique = f"{self.scope}, {self.key_hash}"
        holder_fields = [column(name) for name in ("owner_token", *_RECORD_FIELDS)]
        self.holder_columns = ", ".join(qn(str(f.column)) for f in holder_fields)
        # What the ORM would apply to each column read back (datetimes on SQLite and MariaDB,
        # JSON text, memoryview bodies), so a raw row becomes the same values as a queryset's.
        # Only the columns that have converters are listed: on PostgreSQL that is the JSON one.
        self.converters: list[tuple[int, Any, list[Any]]] = []
        for index, model_field in enumerate(holder_fields[1:]):
            col = model_field.get_col(meta.db_table)
            converters = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
            if converters:
                self.converters.append((index, col, converters))
        # Per claim, the four strings go as they are (a CharField prepares a str to itself) and
        # the three datetimes straight to the backend's adapter: they are the engine's own,
        # aware exactly when USE_TZ is on, so the field's checks (a naive-datetime warning)
        # have nothing to do, and skipping them saves a few microseconds per time on every
        # claim. The constants were prepared here, once.
        self.prepared = {
            name: column(name).get_db_prep_save(value, connection)
            for name, value in _CLAIM_CONSTANTS.items()
        }
        self.sql = self.statement(relaxed)
        # The hot statements after the claim, built once rather than compiled by the ORM on each
        # request: reading the holder of a lost claim, and storing the result.
        self.read_sql = (
            f"SELECT {self.pk}, {self.holder_columns} FROM {self.table} "
            f"WHERE {self.scope} = %s AND {self.key_hash} = %s"
        )
        self.stored_fields = tuple(
            column(name) for name in ("response_status", "response_headers", "response_body")
        )
        greatest = "MAX" if connection.vendor == "sqlite" else "GREATEST"
        expires = qn(str(column("expires_at").column))
        owned = f"{self.scope} = %s AND {self.key_hash} = %s AND {qn('owner_token')} = %s"
        self.complete_sql = (
            f"UPDATE {self.table} SET {qn('state')} = %s, "
            + "".join(f"{qn(str(f.column))} = %s, " for f in self.stored_fields)
            + f"{expires} = {greatest}({expires}, %s) WHERE {owned} AND {qn('state')} = %s"
        )

    @staticmethod
    def build(connection: BaseDatabaseWrapper, relaxed: bool) -> _ClaimStatement:
        if connection.vendor == "postgresql":
            return _PostgresClaim(connection, relaxed)
        if connection.vendor == "mysql" and connection.mysql_is_mariadb:  # type: ignore[attr-defined]
            return _MariaDBClaim(connection, relaxed)
        if connection.vendor == "sqlite":
            return _SQLiteClaim(connection, relaxed)
        return _ClaimStatement(connection, relaxed)

    def statement(self, relaxed: bool) -> str:
        # Identifiers come from the model's options, quoted by the backend; values are parameters.
        return f"INSERT INTO {self.table} ({self.columns}) VALUES ({self.placeholders})"

    def params(self, connection: BaseDatabaseWrapper, fresh: dict[str, Any]) -> list[Any]:
        adapt, constant = connection.ops.adapt_datetimefield_value, self.prepared
        return [
            fresh["scope"],
            fresh["key_hash"],
            fresh["owner_token"],
            fresh["fingerprint"],
            constant["state"],
            adapt(fresh["created_at"]),
            adapt(fresh["lease_expires_at"]),
            adapt(fresh["expires_at"]),
            constant["response_status"],
            constant["response_headers"],
            constant["response_body"],
        ]

    def run(
        self, cursor: CursorWrapper, connection: BaseDatabaseWrapper, fresh: dict[str, Any]
    ) -> tuple[bool, tuple[Any, str, Record] | None]:
        """Any other backend: a plain INSERT whose unique violation means the claim was lost."""
        savepoint: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if connection.in_atomic_block:
            # Inside an outer transaction a failed INSERT would poison it on PostgreSQL-like
            # backends; a savepoint contains the IntegrityError.
            savepoint = transaction.atomic(using=connection.alias)
        try:
            with savepoint:
                cursor.execute(self.sql, self.params(connection, fresh))
        except IntegrityError:
            return False, None
        return True, None

    def read(
        self, cursor: CursorWrapper, connection: BaseDatabaseWrapper, scope: str, key_hash: str
    ) -> tuple[Any, str, Record] | None:
        cursor.execute(self.read_sql, [scope, key_hash])
        row = cursor.fetchone()
        return None if row is None else self.holder(connection, row)

    def complete(
        self,
        connection: BaseDatabaseWrapper,
        scope: str,
        key_hash: str,
        token: str,
        state: str,
        stored: tuple[Any, ...],
        keep_until: datetime,
    ) -> bool:
        values = zip(self.stored_fields, stored, strict=True)
        params = [
            state,
            *(f.get_db_prep_save(value, connection) for f, value in values),
            connection.ops.adapt_datetimefield_value(keep_until),
            scope,
            key_hash,
            token,
            State.IN_FLIGHT.value,
        ]
        with connection.cursor() as cursor:
            cursor.execute(self.complete_sql, params)
            return bool(cursor.rowcount)

    def holder(
        self, connection: BaseDatabaseWrapper, row: Sequence[Any]
    ) -> tuple[Any, str, Record]:
        pk, token, *values = row
        for index, col, converters in self.converters:
            value = values[index]
            for converter in converters:
                value = converter(value, col, connection)
            values[index] = value
        return pk, str(token), _to_record(values)


class _PostgresClaim(_ClaimStatement):
    """``INSERT … ON CONFLICT DO NOTHING RETURNING``: a row back means the claim was won.

    ``relaxed`` evaluates ``set_config(..., true)`` inside the statement, so
    ``synchronous_commit = off`` holds for this statement's own transaction only.

    A CTE that also returns the holder would answer a lost claim in one statement, and measured
    faster for that (896 µs against 1135 µs for the insert and the SELECT), but it made every
    fresh claim slower (576 µs against 427 µs, medians of 9 rounds of 200 on the 2-core CI
    machine). Fresh keys are most of the traffic, so the plain insert stays.
    """

    def statement(self, relaxed: bool) -> str:
        relax = "set_config('synchronous_commit', 'off', true) IS NOT NULL" if relaxed else "TRUE"
        return (
            f"INSERT INTO {self.table} ({self.columns}) "
            f"SELECT {self.placeholders} WHERE {relax} "
            f"ON CONFLICT ({self.unique}) DO NOTHING RETURNING {self.pk}"
        )

    def run(
        self, cursor: CursorWrapper, connection: BaseDatabaseWrapper, fresh: dict[str, Any]
    ) -> tuple[bool, tuple[Any, str, Record] | None]:
        cursor.execute(self.sql, self.params(connection, fresh))
        return cursor.fetchone() is not None, None


class _MariaDBClaim(_ClaimStatement):
    """A duplicate key "updates" the row to itself, and RETURNING hands back the holder.

    Comparing the returned token with ours tells who won. Not ``INSERT IGNORE``, which would
    also turn a too-long scope into a silently truncated, shared one. MariaDB has no per-
    transaction durability switch (``innodb_flush_log_at_trx_commit`` is global), so
    ``relaxed`` changes nothing here.
    """

    def statement(self, relaxed: bool) -> str:
        return (
            f"INSERT INTO {self.table} ({self.columns}) VALUES ({self.placeholders}) "
            f"ON DUPLICATE KEY UPDATE {self.pk} = {self.pk} "
            f"RETURNING {self.pk}, {self.holder_columns}"
        )

    def run(
        self, cursor: CursorWrapper, connection: BaseDatabaseWrapper, fresh: dict[str, Any]
    ) -> tuple[bool, tuple[Any, str, Record] | None]:
        cursor.execute(self.sql, self.params(connection, fresh))
        row = cursor.fetchone()
        if row is None:
            return False, None
        if row[1] == fresh["owner_token"]:
            return True, None
        return False, self.holder(connection, row)


class _SQLiteClaim(_ClaimStatement):
    """``ON CONFLICT DO NOTHING``; SQLite cannot return the holder, so a lost claim reads it."""

    def statement(self, relaxed: bool) -> str:
        return f"{super().statement(relaxed)} ON CONFLICT ({self.unique}) DO NOTHING"

    def run(
        self, cursor: CursorWrapper, connection: BaseDatabaseWrapper, fresh: dict[str, Any]
    ) -> tuple[bool, tuple[Any, str, Record] | None]:
        cursor.execute(self.sql, self.params(connection, fresh))
        return cursor.rowcount == 1, None


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
