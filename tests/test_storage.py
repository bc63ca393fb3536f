"""The store contract (``storage/base.py``), held against every store this project ships.

One ``store`` fixture, parametrised over the ORM store, the Redis store on a plain server, on a
real Redis Cluster and behind real Sentinels, the cache store on django-redis and on Django's
``RedisCache``, and the ``add()`` store on LocMem. Store-specific behaviour (the ORM's
synchronous_commit, what lands in Redis, failure drills) lives in ``test_storage_db.py``,
``test_storage_cache.py`` and ``test_storage_redis.py``.

Without the shared Redis the Redis-backed stores skip with a reason; without ``redis-server``
the Cluster and Sentinel ones do. ``IDEMPOTENCY_TEST_REQUIRE_SERVICES=1`` makes either a failure.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.db import connections
from django.utils import timezone

from django_idempotency.keys import hash_key
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import BaseStorage, Claim, State, StoredResponse
from django_idempotency.storage.cache import CacheStorage
from django_idempotency.storage.cache_add import CacheAddStorage
from django_idempotency.storage.db import DatabaseStorage
from django_idempotency.storage.memory import MemoryStorage
from django_idempotency.storage.redis import RedisStorage
from tests.backends import redis_endpoint, redis_url_with_db

REQUIRE_SERVICES = os.environ.get("IDEMPOTENCY_TEST_REQUIRE_SERVICES") == "1"
# Database 15 belongs to the redis matrices, 14 to test_storage_cache.py.
REDIS_URL = redis_url_with_db(django_settings.REDIS_URL, 13)

LEASE = timedelta(seconds=60)
TTL = timedelta(hours=24)
SCOPE = "user:7"
RESPONSE = StoredResponse(
    status=201,
    headers=(("Content-Type", "application/json"), ("Location", "/payments/1/")),
    body=b'{"id": 1}',
)

STORES = [
    "orm",
    "redis",
    "redis-cluster",
    "redis-sentinel",
    "cache-django-redis",
    "cache-django-builtin",
    "cache-add-locmem",
    "memory",
]
CACHE_BACKENDS = {
    "cache-django-redis": "django_redis.cache.RedisCache",
    "cache-django-builtin": "django.core.cache.backends.redis.RedisCache",
}
EXPECTED_CLASS: dict[str, type[BaseStorage]] = {
    "orm": DatabaseStorage,
    "redis": RedisStorage,
    "redis-cluster": RedisStorage,
    "redis-sentinel": RedisStorage,
    "cache-django-redis": CacheStorage,
    "cache-django-builtin": CacheStorage,
    "cache-add-locmem": CacheAddStorage,
    "memory": MemoryStorage,
}


def _shared_redis_or_skip() -> None:
    endpoint = redis_endpoint(REDIS_URL)
    if REQUIRE_SERVICES or endpoint.answers():
        return
    pytest.skip(f"Redis is not answering at {endpoint} (IDEMPOTENCY_TEST_REQUIRE_SERVICES=1 fails)")


def _clean(client: Any, prefix: str) -> None:
    for key in list(client.scan_iter(match=f"{prefix}*")):
        client.delete(key)


@pytest.fixture(
    params=[
        pytest.param(kind, marks=pytest.mark.django_db(transaction=True)) if kind == "orm" else kind
        for kind in STORES
    ]
)
def store(request: pytest.FixtureRequest, settings: Any) -> Iterator[BaseStorage]:
    kind: str = request.param
    prefix = f"idem-contract-{uuid.uuid4().hex[:12]}:"
    cleanup: Any = None
    if kind == "orm":
        settings.IDEMPOTENCY_STORE = "db"
    elif kind == "memory":
        settings.IDEMPOTENCY_STORE = "django_idempotency.storage.memory.MemoryStorage"
    elif kind == "cache-add-locmem":
        settings.CACHES = {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "idem": {
                "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                "LOCATION": prefix,
            },
        }
        settings.IDEMPOTENCY_STORE = "cache"
        settings.IDEMPOTENCY_CACHE_ALIAS = "idem"
    elif kind in CACHE_BACKENDS:
        _shared_redis_or_skip()
        settings.CACHES = {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "idem": {
                "BACKEND": CACHE_BACKENDS[kind],
                "LOCATION": REDIS_URL,
                "KEY_PREFIX": prefix.rstrip(":"),
                "VERSION": 3,
            },
        }
        settings.IDEMPOTENCY_STORE = "cache"
        settings.IDEMPOTENCY_CACHE_ALIAS = "idem"
        cleanup = redis.Redis.from_url(REDIS_URL)
    else:
        settings.IDEMPOTENCY_STORE = "redis"
        settings.IDEMPOTENCY_REDIS_KEY_PREFIX = prefix
        if kind == "redis":
            _shared_redis_or_skip()
            settings.IDEMPOTENCY_REDIS_URL = REDIS_URL
        elif kind == "redis-cluster":
            request.getfixturevalue("redis_cluster")
            settings.IDEMPOTENCY_REDIS_CLIENT = "tests.redis_servers.cluster_client"
            settings.IDEMPOTENCY_REDIS_ASYNC_CLIENT = "tests.redis_servers.async_cluster_client"
        else:
            request.getfixturevalue("redis_sentinel")
            settings.IDEMPOTENCY_REDIS_CLIENT = "tests.redis_servers.sentinel_client"
            settings.IDEMPOTENCY_REDIS_ASYNC_CLIENT = "tests.redis_servers.async_sentinel_client"
    storage = get_storage()
    assert type(storage) is EXPECTED_CLASS[kind]
    yield storage
    if isinstance(storage, RedisStorage):
        cleanup = storage.client
    if cleanup is not None:
        _clean(cleanup, prefix)


def _now() -> datetime:
    return timezone.now()


def _claim(store: BaseStorage, key: str, fingerprint: str = "fp-1", **kw: Any) -> Claim:
    kw.setdefault("now", _now())
    kw.setdefault("lease", LEASE)
    kw.setdefault("ttl", TTL)
    return store.claim(SCOPE, key, fingerprint, **kw)


def _token(claim: Claim) -> str:
    assert claim.token is not None
    return claim.token


def test_first_claim_wins_and_duplicates_see_the_record(store: BaseStorage) -> None:
    now = _now()
    first = _claim(store, "k", now=now)
    assert first.won and not first.reclaimed

    second = _claim(store, "k", now=now)
    assert not second.won and second.record is not None
    assert second.record.state is State.IN_FLIGHT
    assert second.record.fingerprint == "fp-1"
    assert second.record.created_at == now
    assert second.record.lease_expires_at == now + LEASE
    assert second.record.expires_at == now + TTL

    mismatch = _claim(store, "k", "fp-2", now=now)
    assert not mismatch.won and mismatch.record is not None
    assert mismatch.record.fingerprint == "fp-1"


def test_complete_then_replay(store: BaseStorage) -> None:
    now = _now()
    claim = _claim(store, "k", now=now)
    assert store.complete(SCOPE, "k", _token(claim), RESPONSE, now=now)

    again = _claim(store, "k")
    assert not again.won and again.record is not None
    assert again.record.state is State.COMPLETED
    assert again.record.response == RESPONSE
    assert again.record.expires_at == now + TTL
    assert store.get(SCOPE, "k") == again.record
    # Completion happens once: a second one (same token) finds no in-flight record.
    assert not store.complete(SCOPE, "k", _token(claim), RESPONSE, now=now)


def test_unavailable_result_has_no_response(store: BaseStorage) -> None:
    claim = _claim(store, "k")
    assert store.complete(SCOPE, "k", _token(claim), None, now=_now())
    record = store.get(SCOPE, "k")
    assert record is not None
    assert record.state is State.UNAVAILABLE and record.response is None


def test_release_lets_the_next_request_run(store: BaseStorage) -> None:
    claim = _claim(store, "k")
    assert not store.release(SCOPE, "k", "not-the-owner")
    assert store.get(SCOPE, "k") is not None
    assert store.release(SCOPE, "k", _token(claim))
    assert store.get(SCOPE, "k") is None
    assert not store.release(SCOPE, "k", _token(claim))
    assert _claim(store, "k").won


def test_completed_record_is_never_released(store: BaseStorage) -> None:
    claim = _claim(store, "k")
    assert store.complete(SCOPE, "k", _token(claim), RESPONSE, now=_now())
    assert not store.release(SCOPE, "k", _token(claim))
    assert store.get(SCOPE, "k") is not None


def test_scope_and_key_both_identify_the_record(store: BaseStorage) -> None:
    now = _now()
    assert _claim(store, "k", now=now).won
    assert store.claim("user:8", "k", "fp-1", now=now, lease=LEASE, ttl=TTL).won
    # The engine hands stores a SHA-256 of the key, which keeps "k" and "K" apart even on
    # MariaDB's case-insensitive collations.
    assert _claim(store, hash_key(SCOPE, "k"), now=now).won
    assert _claim(store, hash_key(SCOPE, "K"), now=now).won
    assert store.get("user:9", "k") is None


def test_dead_lease_is_reclaimed_and_the_stale_owner_is_fenced(store: BaseStorage) -> None:
    start = _now()
    crashed = _claim(store, "k", now=start)
    later = start + LEASE + timedelta(seconds=1)

    # A different request cannot take a dead lease: the key still names the first request.
    other = _claim(store, "k", "fp-other", now=later)
    assert not other.won and other.record is not None
    assert other.record.state is State.IN_FLIGHT

    retry = _claim(store, "k", now=later)
    assert retry.won and retry.reclaimed
    assert retry.token != crashed.token
    # One taker per dead lease.
    assert not _claim(store, "k", now=later).won

    # The original wakes up: it can neither store, renew nor delete the retry's claim.
    assert not store.complete(SCOPE, "k", _token(crashed), RESPONSE, now=later)
    assert not store.renew(SCOPE, "k", _token(crashed), now=later, lease=LEASE)
    assert not store.release(SCOPE, "k", _token(crashed))
    record = store.get(SCOPE, "k")
    assert record is not None
    assert record.state is State.IN_FLIGHT and record.created_at == later

    assert store.complete(SCOPE, "k", _token(retry), RESPONSE, now=later)
    record = store.get(SCOPE, "k")
    assert record is not None and record.response == RESPONSE


def test_live_lease_is_not_reclaimed(store: BaseStorage) -> None:
    start = _now()
    _claim(store, "k", now=start)
    assert not _claim(store, "k", now=start + LEASE - timedelta(milliseconds=1)).won


def test_expired_record_counts_as_absent(store: BaseStorage) -> None:
    start = _now()
    claim = _claim(store, "k", now=start)
    assert store.complete(SCOPE, "k", _token(claim), RESPONSE, now=start)
    after = start + TTL
    fresh = _claim(store, "k", "fp-new", now=after)
    assert fresh.won and not fresh.reclaimed
    record = store.get(SCOPE, "k")
    assert record is not None
    assert record.state is State.IN_FLIGHT
    assert record.fingerprint == "fp-new" and record.response is None


def test_binary_body_round_trips_byte_for_byte(store: BaseStorage) -> None:
    body = bytes(range(256)) * 64 + b"\x00\r\n\xff"
    claim = _claim(store, "k")
    response = StoredResponse(200, (("Content-Type", "image/png"),), body)
    assert store.complete(SCOPE, "k", _token(claim), response, now=_now())
    record = _claim(store, "k").record
    assert record is not None and record.response == response


# --- renew ------------------------------------------------------------------------------------


def test_renew_moves_the_lease_so_only_a_dead_owner_is_taken_over(store: BaseStorage) -> None:
    start = _now()
    claim = _claim(store, "k", now=start)
    beat = start + timedelta(seconds=50)
    assert store.renew(SCOPE, "k", _token(claim), now=beat, lease=LEASE)
    record = store.get(SCOPE, "k")
    assert record is not None
    assert record.lease_expires_at == beat + LEASE
    assert record.created_at == start and record.expires_at == start + TTL

    # Past the first lease, not past the renewed one: the owner keeps its claim.
    assert not _claim(store, "k", now=start + LEASE + timedelta(seconds=1)).won
    # Past the renewed one: the owner stopped beating, so it is dead.
    taken = _claim(store, "k", now=beat + LEASE + timedelta(seconds=1))
    assert taken.won and taken.reclaimed


def test_renew_needs_the_owner_and_an_in_flight_record(store: BaseStorage) -> None:
    now = _now()
    assert not store.renew(SCOPE, "absent", "any-token", now=now, lease=LEASE)
    claim = _claim(store, "k", now=now)
    assert not store.renew(SCOPE, "k", "not-the-owner", now=now, lease=LEASE)
    assert store.complete(SCOPE, "k", _token(claim), RESPONSE, now=now)
    assert not store.renew(SCOPE, "k", _token(claim), now=now, lease=LEASE)
    record = store.get(SCOPE, "k")
    assert record is not None and record.state is State.COMPLETED


# --- complete(min_retention) ------------------------------------------------------------------


def test_min_retention_pushes_the_expiry_of_a_request_that_outlived_its_ttl(
    store: BaseStorage,
) -> None:
    start = _now()
    ttl = timedelta(minutes=10)
    claim = _claim(store, "k", now=start, ttl=ttl)
    # The view ran for 15 minutes, its heartbeat keeping the lease: created + TTL has passed.
    late = start + timedelta(minutes=15)
    assert store.renew(SCOPE, "k", _token(claim), now=late - timedelta(seconds=5), lease=LEASE)
    retention = timedelta(minutes=5)
    assert store.complete(SCOPE, "k", _token(claim), RESPONSE, now=late, min_retention=retention)
    record = store.get(SCOPE, "k")
    assert record is not None
    assert record.expires_at == late + retention
    # So the retry that comes right after still replays instead of running again.
    replay = _claim(store, "k", now=late + timedelta(minutes=1), ttl=ttl)
    assert not replay.won and replay.record is not None
    assert replay.record.response == RESPONSE


def test_min_retention_never_shortens_created_plus_ttl(store: BaseStorage) -> None:
    start = _now()
    claim = _claim(store, "k", now=start)
    done = start + timedelta(seconds=2)
    assert store.complete(
        SCOPE, "k", _token(claim), RESPONSE, now=done, min_retention=timedelta(minutes=1)
    )
    record = store.get(SCOPE, "k")
    assert record is not None and record.expires_at == start + TTL


#: The stores that await a client of their own on a long-lived loop (an ASGI server's).
NATIVE_ASYNC = ("redis", "redis-cluster", "redis-sentinel")


def test_async_operations_keep_the_contract(store: BaseStorage, request: Any) -> None:
    """What async views await. On a loop of its own, as under an ASGI server, a store with an
    async client runs there and the others hop to a thread: the answers are the same."""
    now = _now()

    async def run() -> bool:
        try:
            first = await store.aclaim(SCOPE, "a", "fp-1", now=now, lease=LEASE, ttl=TTL)
            held = await store.aclaim(SCOPE, "a", "fp-1", now=now, lease=LEASE, ttl=TTL)
            assert held.record is not None and held.record.state is State.IN_FLIGHT
            assert not await store.acomplete(SCOPE, "a", "not-the-owner", RESPONSE, now=now)
            assert await store.acomplete(SCOPE, "a", _token(first), RESPONSE, now=now)
            replay = await store.aclaim(SCOPE, "a", "fp-1", now=now, lease=LEASE, ttl=TTL)
            assert replay.record is not None and replay.record.response == RESPONSE
            other = await store.aclaim(SCOPE, "b", "fp-1", now=now, lease=LEASE, ttl=TTL)
            assert not await store.arelease(SCOPE, "b", "not-the-owner")
            assert await store.arelease(SCOPE, "b", _token(other))
            return store.runs_on_loop()
        finally:
            if isinstance(store, RedisStorage):
                await store.aclose()
            # The ORM store's thread has a connection of its own: close it like a request does.
            await sync_to_async(connections.close_all)()

    assert asyncio.run(run()) is (request.node.callspec.params["store"] in NATIVE_ASYNC)
    assert store.get(SCOPE, "b") is None
    assert _claim(store, "b").won
