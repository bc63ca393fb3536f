"""The ORM store's own guarantees, below the HTTP layer."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from django_idempotency.exceptions import StoreError
from django_idempotency.models import IdempotencyKey, IdempotencyKeyQuerySet
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


def test_lost_insert_race_reads_the_winner(
    store: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row appears between our read and our INSERT: the unique constraint decides."""
    now = timezone.now()
    real_first = IdempotencyKeyQuerySet.first
    reads = []

    def first_then_someone_inserts(qs: IdempotencyKeyQuerySet) -> object:
        result = real_first(qs)
        reads.append(result)
        if len(reads) == 1:
            DatabaseStorage().claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
        return result

    monkeypatch.setattr(IdempotencyKeyQuerySet, "first", first_then_someone_inserts)
    lost = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    assert not lost.won
    assert lost.record is not None
    assert lost.record.state is State.IN_FLIGHT
    assert reads[0] is None  # the first read saw nothing: the INSERT lost, then we re-read


def test_owner_completing_during_a_takeover_wins(
    store: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slow owner completes between the reclaimer's read and its UPDATE: no second run."""
    start = timezone.now()
    owner = store.claim("s", "h", "fp", now=start, lease=LEASE, ttl=TTL)
    assert owner.token is not None
    owner_token = owner.token
    real_first = IdempotencyKeyQuerySet.first
    reads = []

    def first_then_owner_completes(qs: IdempotencyKeyQuerySet) -> object:
        result = real_first(qs)
        reads.append(result)
        if len(reads) == 1:
            assert DatabaseStorage().complete("s", "h", owner_token, RESPONSE, now=start)
        return result

    monkeypatch.setattr(IdempotencyKeyQuerySet, "first", first_then_owner_completes)
    late = start + 2 * LEASE
    takeover = store.claim("s", "h", "fp", now=late, lease=LEASE, ttl=TTL)
    assert not takeover.won
    assert takeover.record is not None
    assert takeover.record.state is State.COMPLETED
    assert takeover.record.response == RESPONSE


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
