"""The ORM store's own guarantees, below the HTTP layer (the contract is in test_storage.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from django_idempotency.exceptions import StoreError
from django_idempotency.models import IdempotencyKey
from django_idempotency.storage.base import State, StoredResponse
from django_idempotency.storage.db import DatabaseStorage
from tests.faults import unreachable_database

pytestmark = pytest.mark.django_db(transaction=True)

LEASE = timedelta(seconds=60)
TTL = timedelta(hours=24)
RESPONSE = StoredResponse(status=201, headers=(("Content-Type", "text/plain"),), body=b"\x00ok")


@pytest.fixture
def store() -> DatabaseStorage:
    return DatabaseStorage()


def test_raw_key_is_never_stored(store: DatabaseStorage) -> None:
    store.claim("user:1", "a" * 64, "fp", now=timezone.now(), lease=LEASE, ttl=TTL)
    row = IdempotencyKey.objects.get()
    assert row.key_hash == "a" * 64
    assert row.response_body is None


def test_claim_inside_an_outer_transaction_keeps_it_usable(store: DatabaseStorage) -> None:
    now = timezone.now()
    store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    with transaction.atomic():
        # A duplicate INSERT fails inside a savepoint; the outer transaction goes on.
        IdempotencyKey.objects.filter(scope="s").update(scope="s")
        lost = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
        assert not lost.won
        assert IdempotencyKey.objects.count() == 1


def test_claim_retries_when_the_holder_vanishes_before_it_is_read(
    store: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The insert lost, then the holder was released before it could be read: claim again.

    PostgreSQL meets this when the holder committed after the claim statement's snapshot; the
    statement is made to report that outcome here on every backend.
    """
    now = timezone.now()
    holder = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    assert holder.token is not None
    statement = type(store._statement(connection))
    real_run = statement.run
    monkeypatch.setattr(
        statement,
        "run",
        lambda self, cursor, c, fresh: (real_run(self, cursor, c, fresh)[0], None),
    )
    real_read = statement.read
    reads: list[str] = []

    def released_first(self: Any, cursor: Any, c: Any, scope: str, key_hash: str) -> object:
        if not reads:
            assert DatabaseStorage().release("s", "h", holder.token)  # type: ignore[arg-type]
        reads.append(scope)
        return real_read(self, cursor, c, scope, key_hash)

    monkeypatch.setattr(statement, "read", released_first)
    retry = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    assert retry.won
    assert reads == ["s"]
    assert IdempotencyKey.objects.get().owner_token == retry.token


def test_owner_completing_during_a_takeover_wins(
    store: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slow owner completes between the reclaimer's read and its UPDATE: no second run."""
    start = timezone.now()
    owner = store.claim("s", "h", "fp", now=start, lease=LEASE, ttl=TTL)
    assert owner.token is not None
    owner_token = owner.token
    real_take_over = DatabaseStorage._take_over
    attempts: list[tuple[Any, ...]] = []

    def owner_completes_first(self: DatabaseStorage, *args: Any) -> bool:
        if not attempts:
            assert DatabaseStorage().complete("s", "h", owner_token, RESPONSE, now=start)
        attempts.append(args)
        return real_take_over(self, *args)

    monkeypatch.setattr(DatabaseStorage, "_take_over", owner_completes_first)
    late = start + 2 * LEASE
    takeover = store.claim("s", "h", "fp", now=late, lease=LEASE, ttl=TTL)
    assert not takeover.won
    assert len(attempts) == 1  # the UPDATE matched nothing; the claim read the result instead
    assert takeover.record is not None
    assert takeover.record.state is State.COMPLETED
    assert takeover.record.response == RESPONSE


def test_owner_renewing_during_a_takeover_keeps_its_claim(
    store: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat renews the lease between the reclaimer's read and its UPDATE."""
    start = timezone.now()
    owner = store.claim("s", "h", "fp", now=start, lease=LEASE, ttl=TTL)
    assert owner.token is not None
    owner_token = owner.token
    late = start + 2 * LEASE
    real_take_over = DatabaseStorage._take_over

    def owner_renews_first(self: DatabaseStorage, *args: Any) -> bool:
        assert DatabaseStorage().renew("s", "h", owner_token, now=late, lease=LEASE)
        return real_take_over(self, *args)

    monkeypatch.setattr(DatabaseStorage, "_take_over", owner_renews_first)
    takeover = store.claim("s", "h", "fp", now=late, lease=LEASE, ttl=TTL)
    assert not takeover.won
    assert IdempotencyKey.objects.get().owner_token == owner_token


def test_database_errors_become_store_errors() -> None:
    with unreachable_database() as alias:
        store = DatabaseStorage(using=alias)
        now = timezone.now()
        with pytest.raises(StoreError):
            store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
        with pytest.raises(StoreError):
            store.complete("s", "h", "t", RESPONSE, now=now)
        with pytest.raises(StoreError):
            store.release("s", "h", "t")
        with pytest.raises(StoreError):
            store.get("s", "h")


def test_record_in_a_state_we_do_not_know_is_a_store_error(store: DatabaseStorage) -> None:
    # A row edited by hand or by another program: its outcome cannot be guessed (503, not 500).
    now = timezone.now()
    assert store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL).won
    IdempotencyKey.objects.update(state="archived")
    with pytest.raises(StoreError, match="^unreadable idempotency record: state 'archived'$"):
        store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    with pytest.raises(StoreError, match="unreadable"):
        store.get("s", "h")


# --- the claim's commit on PostgreSQL ---------------------------------------------------------

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="synchronous_commit is a PostgreSQL setting"
)


def _synchronous_commit() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        row = cursor.fetchone()
        assert row is not None
        return str(row[0])


def _claim_sql(store: DatabaseStorage, key: str) -> str:
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        assert store.claim("s", key, "fp", now=timezone.now(), lease=LEASE, ttl=TTL).won
    (query,) = ctx.captured_queries
    return str(query["sql"])


@postgres_only
def test_claim_relaxes_synchronous_commit_for_its_own_transaction_only(
    store: DatabaseStorage,
) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = 'remote_write'")
    try:
        assert "set_config('synchronous_commit', 'off', true)" in _claim_sql(store, "h1")
        assert _synchronous_commit() == "remote_write"
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")


@postgres_only
def test_claim_keeps_synchronous_commit_when_turned_off_or_inside_a_transaction(
    store: DatabaseStorage, settings: Any
) -> None:
    with transaction.atomic():
        # The outer transaction's commit is the caller's: the claim must not relax it.
        assert "synchronous_commit" not in _claim_sql(store, "h1")
        assert _synchronous_commit() == "on"
    settings.IDEMPOTENCY_ASYNC_CLAIM_COMMIT = False
    assert "synchronous_commit" not in _claim_sql(DatabaseStorage(), "h2")


@postgres_only
def test_the_views_own_commit_still_waits_for_the_flush() -> None:
    import json

    from django.test import Client

    from tests.testapp import views

    seen: list[str] = []
    views.HOOKS.append(lambda: seen.append(_synchronous_commit()))
    response = Client().post(
        "/mixin/payments/",
        json.dumps({"amount": 1}),
        "application/json",
        HTTP_IDEMPOTENCY_KEY="durable",
    )
    assert response.status_code == 201
    assert seen == ["on"]  # read inside the view's transaction, after the relaxed claim
    assert _synchronous_commit() == "on"
