"""The ORM store's own guarantees, below the HTTP layer."""

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


def test_claim_then_complete_then_replay(store: DatabaseStorage) -> None:
    now = timezone.now()
    claim = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    assert claim.won
    assert not claim.reclaimed
    assert claim.token is not None
    assert store.complete("s", "h", claim.token, RESPONSE, now=now)
    lost = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    assert not lost.won
    assert lost.record is not None
    assert lost.record.state is State.COMPLETED
    assert lost.record.response == RESPONSE
    assert lost.record.expires_at == now + TTL


def test_raw_key_is_never_stored(store: DatabaseStorage) -> None:
    store.claim("user:1", "a" * 64, "fp", now=timezone.now(), lease=LEASE, ttl=TTL)
    row = IdempotencyKey.objects.get()
    assert row.key_hash == "a" * 64
    assert row.response_body is None


def test_stale_owner_cannot_complete_or_release_a_reclaimed_key(store: DatabaseStorage) -> None:
    start = timezone.now()
    stale = store.claim("s", "h", "fp", now=start, lease=LEASE, ttl=TTL)
    assert stale.token is not None
    # Not before the lease ends...
    early = store.claim(
        "s", "h", "fp", now=start + LEASE - timedelta(seconds=1), lease=LEASE, ttl=TTL
    )
    assert not early.won
    # ...but after it.
    later = start + LEASE + timedelta(seconds=1)
    fresh = store.claim("s", "h", "fp", now=later, lease=LEASE, ttl=TTL)
    assert fresh.won
    assert fresh.reclaimed
    assert fresh.token is not None
    assert not store.complete("s", "h", stale.token, RESPONSE, now=later)
    assert not store.release("s", "h", stale.token)
    record = store.get("s", "h")
    assert record is not None
    assert record.state is State.IN_FLIGHT
    assert store.complete("s", "h", fresh.token, RESPONSE, now=later)


def test_dead_lease_with_another_fingerprint_is_not_reclaimed(store: DatabaseStorage) -> None:
    start = timezone.now()
    store.claim("s", "h", "fp", now=start, lease=LEASE, ttl=TTL)
    other = store.claim("s", "h", "other", now=start + 2 * LEASE, lease=LEASE, ttl=TTL)
    assert not other.won
    assert other.record is not None
    assert other.record.fingerprint == "fp"


def test_expired_record_counts_as_absent(store: DatabaseStorage) -> None:
    start = timezone.now()
    first = store.claim("s", "h", "fp", now=start, lease=LEASE, ttl=TTL)
    assert first.token is not None
    store.complete("s", "h", first.token, RESPONSE, now=start)
    again = store.claim("s", "h", "another body", now=start + TTL, lease=LEASE, ttl=TTL)
    assert again.won
    assert not again.reclaimed
    record = store.get("s", "h")
    assert record is not None
    assert record.state is State.IN_FLIGHT
    assert record.fingerprint == "another body"
    assert IdempotencyKey.objects.count() == 1


def test_release_lets_the_next_request_claim(store: DatabaseStorage) -> None:
    now = timezone.now()
    first = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    assert first.token is not None
    assert store.release("s", "h", first.token)
    assert store.get("s", "h") is None
    assert store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL).won


def test_unavailable_marker(store: DatabaseStorage) -> None:
    now = timezone.now()
    claim = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    assert claim.token is not None
    assert store.complete("s", "h", claim.token, None, now=now)
    record = store.get("s", "h")
    assert record is not None
    assert record.state is State.UNAVAILABLE
    assert record.response is None


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
        statement, "run", lambda self, c, fresh: (real_run(self, c, fresh)[0], None)
    )
    real_read = DatabaseStorage._read
    reads: list[str] = []

    def released_first(self: DatabaseStorage, scope: str, key_hash: str) -> object:
        if not reads:
            assert DatabaseStorage().release("s", "h", holder.token)  # type: ignore[arg-type]
        reads.append(scope)
        return real_read(self, scope, key_hash)

    monkeypatch.setattr(DatabaseStorage, "_read", released_first)
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
