"""The cache stores' own behaviour: Lua through both Django Redis backends, ``add()`` elsewhere.

The store contract they share with every store is in test_storage.py.

Every test that needs Redis uses its own key prefix on a database of its own (not the one the
redis test matrix uses), and deletes what it wrote. Without Redis the tests skip with a reason,
unless IDEMPOTENCY_TEST_REQUIRE_SERVICES=1, where they run and fail.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import uuid
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient
from django.core.checks import Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import Client
from django.utils import timezone

from django_idempotency.checks import check_settings
from django_idempotency.exceptions import StoreError
from django_idempotency.keys import hash_key
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import StoredResponse
from django_idempotency.storage.cache import CacheStorage
from django_idempotency.storage.cache_add import CacheAddStorage
from django_idempotency.storage.lua import Script
from tests.backends import redis_endpoint, redis_url_with_db
from tests.behaviour import fingerprint_for
from tests.testapp import views
from tests.testapp.models import Payment

REDIS_SERVER = redis_endpoint(django_settings.REDIS_URL)
# Database 15 belongs to the redis matrix (tests/settings.py); these tests keep to 14.
REDIS_URL = redis_url_with_db(django_settings.REDIS_URL, 14)
REQUIRE_SERVICES = os.environ.get("IDEMPOTENCY_TEST_REQUIRE_SERVICES") == "1"

LEASE = timedelta(seconds=60)
TTL = timedelta(hours=24)
SCOPE = "user:7"

BACKENDS = {
    "django-redis": "django_redis.cache.RedisCache",
    "django-builtin": "django.core.cache.backends.redis.RedisCache",
}


def _redis_answers() -> bool:
    return REDIS_SERVER.answers()


needs_redis = pytest.mark.skipif(
    not REQUIRE_SERVICES and not _redis_answers(),
    reason=f"Redis is not answering at {REDIS_SERVER} (start it to test the cache "
    "store; IDEMPOTENCY_TEST_REQUIRE_SERVICES=1 turns this skip into a failure)",
)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _use_cache(settings: Any, backend: str, location: str | list[str], **extra: Any) -> None:
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "idem": {"BACKEND": backend, "LOCATION": location, **extra},
    }
    settings.IDEMPOTENCY_STORE = "cache"
    settings.IDEMPOTENCY_CACHE_ALIAS = "idem"


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture(params=list(BACKENDS), ids=list(BACKENDS))
def prefix(request: pytest.FixtureRequest, settings: Any, raw: redis.Redis) -> Iterator[str]:
    """A Redis-backed idempotency cache with its own KEY_PREFIX and a non-default VERSION."""
    name = f"idem-test-{uuid.uuid4().hex[:12]}"
    _use_cache(settings, BACKENDS[request.param], REDIS_URL, KEY_PREFIX=name, VERSION=3)
    yield name
    keys = list(raw.scan_iter(match=f"{name}:*"))
    if keys:
        raw.delete(*keys)


@pytest.fixture
def store(prefix: str) -> CacheStorage:
    storage = get_storage()
    assert isinstance(storage, CacheStorage)
    return storage


def _now() -> datetime:
    return timezone.now()


def _claim(
    store: CacheStorage | CacheAddStorage, key: str, fingerprint: str = "fp-1", **kw: Any
) -> Any:
    kw.setdefault("now", _now())
    kw.setdefault("lease", LEASE)
    kw.setdefault("ttl", TTL)
    return store.claim(SCOPE, key, fingerprint, **kw)


RESPONSE = StoredResponse(
    status=201,
    headers=(("Content-Type", "application/json"), ("Location", "/payments/1/")),
    body=b'{"id": 1}',
)


# --- store-level semantics -------------------------------------------------------------------


# --- what lands in Redis -------------------------------------------------------------------


@needs_redis
def test_keys_honour_key_prefix_and_version(
    store: CacheStorage, raw: redis.Redis, prefix: str
) -> None:
    _claim(store, "k")
    key = store.cache_key(SCOPE, "k")
    assert key.startswith(f"{prefix}:3:idempotency:")
    assert raw.exists(key) == 1
    # Neither the scope nor the key hash appear in clear.
    assert SCOPE not in key and "k" not in key.removeprefix(f"{prefix}:3:idempotency:")


@needs_redis
def test_native_expiry_is_created_plus_ttl(store: CacheStorage, raw: redis.Redis) -> None:
    ttl = timedelta(hours=1)
    # The engine's clock, not Redis's, decides the TTL, so a shifted clock still gets a full TTL.
    start = _now() + timedelta(days=3)
    claim = _claim(store, "k", now=start, ttl=ttl)
    key = store.cache_key(SCOPE, "k")
    in_flight = raw.pttl(key)
    assert 3_590_000 < in_flight <= 3_600_000

    store.complete(SCOPE, "k", claim.token, RESPONSE, now=start + timedelta(seconds=30))
    completed = raw.pttl(key)
    assert 3_590_000 < completed <= in_flight  # completion keeps created + TTL


@needs_redis
def test_values_are_json_not_pickle(store: CacheStorage, raw: redis.Redis) -> None:
    body = bytes(range(256))
    claim = _claim(store, "k")
    store.complete(
        SCOPE,
        "k",
        claim.token,
        StoredResponse(201, (("Content-Type", "image/png"),), body),
        now=_now(),
    )
    fields: dict[bytes, bytes] = raw.hgetall(store.cache_key(SCOPE, "k"))  # type: ignore[assignment]
    assert all(not value.startswith(b"\x80") for value in fields.values())  # pickle protocol 2+
    assert fields[b"state"] == b"completed"
    assert fields[b"fingerprint"] == b"fp-1"
    assert b"token" in fields
    document = json.loads(fields[b"response"])
    assert document["status"] == 201
    assert document["headers"] == [["Content-Type", "image/png"]]
    assert base64.b64decode(document["body"]) == body


@needs_redis
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_decoded_responses_are_read_too(settings: Any, raw: redis.Redis, backend: str) -> None:
    name = f"idem-test-{uuid.uuid4().hex[:12]}"
    options = (
        {"CONNECTION_POOL_KWARGS": {"decode_responses": True}}
        if backend == "django-redis"
        else {"decode_responses": True}
    )
    _use_cache(settings, BACKENDS[backend], REDIS_URL, KEY_PREFIX=name, OPTIONS=options)
    store = get_storage()
    try:
        claim = _claim(store, "k")  # type: ignore[arg-type]
        store.complete(SCOPE, "k", claim.token, RESPONSE, now=_now())
        record = store.get(SCOPE, "k")
        assert record is not None and record.response == RESPONSE
        assert _claim(store, "k").record == record  # type: ignore[arg-type]
    finally:
        raw.delete(*raw.keys(f"{name}:*"))


@needs_redis
def test_foreign_value_under_the_key_is_a_store_error(
    store: CacheStorage, raw: redis.Redis
) -> None:
    raw.set(store.cache_key(SCOPE, "k"), b"not a record")
    with pytest.raises(StoreError):
        _claim(store, "k")


@needs_redis
def test_damaged_record_is_a_store_error(store: CacheStorage, raw: redis.Redis) -> None:
    raw.hset(store.cache_key(SCOPE, "k"), mapping={"state": "in_flight"})
    with pytest.raises(StoreError, match="unreadable"):
        store.get(SCOPE, "k")
    with pytest.raises(StoreError, match="claim failed: ResponseError"):
        _claim(store, "k")


@needs_redis
@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        # Enough for the claim script to call it held, but no ``created``: the client refuses it.
        ({}, "no created"),
        # Far past year 9999: still a number to the claim script, an OverflowError to Python.
        ({"created": 10**20}, "OverflowError"),
    ],
    ids=["missing-field", "time-out-of-range"],
)
def test_held_record_the_client_cannot_read_is_a_store_error(
    store: CacheStorage, raw: redis.Redis, fields: dict[str, int], reason: str
) -> None:
    far = 2**52
    held: dict[Any, Any] = {
        "state": "completed",
        "fingerprint": "f",
        "lease_expires": far,
        "expires": far,
        **fields,
    }
    raw.hset(store.cache_key(SCOPE, "k"), mapping=held)
    with pytest.raises(StoreError, match=f"^unreadable idempotency record: {reason}$"):
        _claim(store, "k")


# --- Redis unreachable ---------------------------------------------------------------------


@pytest.fixture(params=[*BACKENDS, "django-redis-ignore-exceptions"])
def redis_down(request: pytest.FixtureRequest, settings: Any) -> None:
    extra: dict[str, Any] = {}
    backend = request.param
    if backend == "django-redis-ignore-exceptions":
        backend = "django-redis"
        extra["OPTIONS"] = {"IGNORE_EXCEPTIONS": True}
    _use_cache(settings, BACKENDS[backend], f"redis://127.0.0.1:{_closed_port()}/0", **extra)


def test_unreachable_redis_raises_store_error(redis_down: None) -> None:
    store = get_storage()
    with pytest.raises(StoreError, match="claim failed: ConnectionError"):
        store.claim(SCOPE, "k", "fp", now=_now(), lease=LEASE, ttl=TTL)
    with pytest.raises(StoreError):
        store.complete(SCOPE, "k", "t", RESPONSE, now=_now())
    with pytest.raises(StoreError):
        store.release(SCOPE, "k", "t")
    with pytest.raises(StoreError):
        store.get(SCOPE, "k")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers, like a hung Redis."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("django-redis", {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2}),
        ("django-builtin", {"socket_connect_timeout": 0.2, "socket_timeout": 0.2}),
    ],
)
def test_hung_redis_times_out_as_store_error(
    settings: Any, silent_server: int, backend: str, options: dict[str, float]
) -> None:
    location = f"redis://127.0.0.1:{silent_server}/0"
    _use_cache(settings, BACKENDS[backend], location, OPTIONS=options)
    with pytest.raises(StoreError, match="claim failed: TimeoutError"):
        get_storage().claim(SCOPE, "k", "fp", now=_now(), lease=LEASE, ttl=TTL)


def _post(url: str, key: str = "key-1") -> Any:
    return Client().post(
        url, json.dumps({"amount": 10}), content_type="application/json", HTTP_IDEMPOTENCY_KEY=key
    )


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/mixin/payments/", "/decorator/payments/", "/django/payments/"])
def test_unreachable_redis_answers_503_without_running_the_view(redis_down: None, url: str) -> None:
    response = _post(url)
    assert response.status_code == 503
    assert response["Retry-After"] == "1"
    assert response["Content-Type"] == "application/problem+json"
    assert json.loads(response.content)["type"].endswith("idempotency-store-unavailable")
    assert Payment.objects.count() == 0


@pytest.mark.django_db
def test_fail_open_runs_the_view_and_logs(
    redis_down: None, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.IDEMPOTENCY_FAIL_OPEN = True
    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        response = _post("/mixin/payments/")
    assert response.status_code == 201
    assert Payment.objects.count() == 1
    assert any("WITHOUT protection" in message for message in caplog.messages)


# --- through real views: round trips ---------------------------------------------------------


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the Redis commands sent, recorded by wrapping the real client method."""
    sent: list[str] = []
    original = redis.Redis.execute_command

    def counting(self: redis.Redis, *args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return original(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counting)
    return sent


@needs_redis
def test_unknown_script_costs_one_more_round_trip_once(
    store: CacheStorage, commands: list[str]
) -> None:
    # A script no server has seen (a fresh start, a failover, SCRIPT FLUSH): NOSCRIPT, then EVAL,
    # which caches it. Unique source, so that other test runs sharing this Redis cannot interfere.
    script = Script(f"-- {uuid.uuid4()}\nreturn redis.call('EXISTS', KEYS[1])")
    key = store.cache_key(SCOPE, "k")
    client = store.client_for(key)
    assert script(client, key) == 0
    assert commands == ["EVALSHA", "EVAL"]
    commands.clear()
    assert script(client, key) == 0
    assert commands == ["EVALSHA"]


@needs_redis
@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/mixin/payments/", "/decorator/payments/"])
def test_round_trips(store: CacheStorage, commands: list[str], url: str) -> None:
    before_view: list[int] = []
    views.HOOKS.append(lambda: before_view.append(len(commands)))
    assert _post(url, "warm-up").status_code == 201  # the scripts are now cached on the server

    commands.clear()
    before_view.clear()
    fresh = _post(url, "warm")
    assert fresh.status_code == 201
    assert before_view == [1]
    assert commands == ["EVALSHA", "EVALSHA"]  # claim before the view, completion after

    commands.clear()
    replay = _post(url, "warm")
    assert replay.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == fresh.content
    assert commands == ["EVALSHA"]
    assert Payment.objects.count() == 2


@needs_redis
@pytest.mark.django_db
def test_failed_view_releases_in_one_round_trip(store: CacheStorage, commands: list[str]) -> None:
    views.SCRIPT.append("500")
    _post("/mixin/payments/")  # warm the script cache
    views.SCRIPT.append("500")
    commands.clear()
    assert _post("/mixin/payments/", "other").status_code == 500
    assert commands == ["EVALSHA", "EVALSHA"]  # claim, release
    assert store.get("anonymous", hash_key("anonymous", "other")) is None


@needs_redis
@pytest.mark.django_db
def test_view_after_a_crash_runs_once_when_the_lease_has_ended(store: CacheStorage) -> None:
    # A worker claimed the key and died two leases ago.
    scope = "anonymous"
    key_hash = hash_key(scope, "crashed")
    fingerprint = fingerprint_for("/mixin/payments/")
    store.claim(scope, key_hash, fingerprint, now=_now() - 2 * LEASE, lease=LEASE, ttl=TTL)
    assert _post("/mixin/payments/", "crashed").status_code == 201
    replay = _post("/mixin/payments/", "crashed")
    assert replay["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


# --- other caches ---------------------------------------------------------------------------


@pytest.fixture
def locmem(settings: Any) -> CacheAddStorage:
    _use_cache(settings, "django.core.cache.backends.locmem.LocMemCache", f"idem-{uuid.uuid4()}")
    storage = get_storage()
    assert isinstance(storage, CacheAddStorage)
    return storage


def test_fallback_reports_a_failing_cache_as_store_error(locmem: CacheAddStorage) -> None:
    locmem.cache.set(locmem.cache_key(SCOPE, "k"), "not json")
    with pytest.raises(StoreError):
        _claim(locmem, "k")
    with pytest.raises(StoreError):
        locmem.get(SCOPE, "k")


def test_fallback_reclaim_has_one_winner(locmem: CacheAddStorage) -> None:
    start = _now()
    crashed = _claim(locmem, "k", now=start)
    # Another request already holds the takeover guard of this dead lease.
    guard = f"{locmem.cache_key(SCOPE, 'k')}:takeover:{crashed.token}"
    assert locmem.cache.add(guard, "someone-else", 60)
    with pytest.raises(StoreError, match="losing races"):
        _claim(locmem, "k", now=start + LEASE)


def test_fallback_refuses_a_foreign_value(locmem: CacheAddStorage) -> None:
    locmem.cache.set(locmem.cache_key(SCOPE, "k"), "[1, 2]")
    with pytest.raises(StoreError, match="unreadable"):
        locmem.get(SCOPE, "k")


def test_fallback_turns_backend_failures_into_store_error(settings: Any, tmp_path: Path) -> None:
    location = tmp_path / "cache"
    _use_cache(settings, "django.core.cache.backends.filebased.FileBasedCache", str(location))
    store = get_storage()
    location.rmdir()
    location.write_text("a file where the cache directory was")
    with pytest.raises(StoreError, match="claim failed"):
        _claim(store, "k")  # type: ignore[arg-type]


def test_dummy_cache_is_refused(settings: Any) -> None:
    _use_cache(settings, "django.core.cache.backends.dummy.DummyCache", "")
    with pytest.raises(ImproperlyConfigured, match="DummyCache"):
        get_storage()


def test_missing_alias_is_refused(settings: Any) -> None:
    settings.IDEMPOTENCY_STORE = "cache"
    settings.IDEMPOTENCY_CACHE_ALIAS = "nope"
    with pytest.raises(ImproperlyConfigured, match="IDEMPOTENCY_CACHE_ALIAS"):
        get_storage()


# --- system checks --------------------------------------------------------------------------


def _ids(settings: Any) -> list[str]:
    return [message.id for message in check_settings() if message.id]


def test_check_e006_alias_missing(settings: Any) -> None:
    settings.IDEMPOTENCY_STORE = "cache"
    settings.IDEMPOTENCY_CACHE_ALIAS = "nope"
    messages = [m for m in check_settings() if m.id == "django_idempotency.E006"]
    assert len(messages) == 1
    assert isinstance(messages[0], Error)
    assert "'nope'" in messages[0].msg and "default" in (messages[0].hint or "")


@pytest.mark.parametrize(
    "backend",
    [
        "django.core.cache.backends.locmem.LocMemCache",
        "django.core.cache.backends.filebased.FileBasedCache",
        "django.core.cache.backends.dummy.DummyCache",
    ],
)
def test_check_e007_per_process_caches(settings: Any, backend: str) -> None:
    _use_cache(settings, backend, "/tmp/idempotency-never-written")  # noqa: S108
    messages = [m for m in check_settings() if m.id == "django_idempotency.E007"]
    assert len(messages) == 1
    assert isinstance(messages[0], Error)
    assert "SILENCED_SYSTEM_CHECKS" in (messages[0].hint or "")


def test_check_w003_database_cache(settings: Any) -> None:
    _use_cache(settings, "django.core.cache.backends.db.DatabaseCache", "idempotency_cache")
    messages = [m for m in check_settings() if m.id == "django_idempotency.W003"]
    assert len(messages) == 1
    assert isinstance(messages[0], Warning) and not isinstance(messages[0], Error)


@pytest.mark.parametrize("backend", BACKENDS.values())
def test_redis_caches_pass_the_checks(settings: Any, backend: str) -> None:
    _use_cache(settings, backend, REDIS_URL)
    assert not [i for i in _ids(settings) if i[-4:] in ("E006", "E007", "W003")]


def test_unimportable_cache_backend_is_left_to_django(settings: Any) -> None:
    _use_cache(settings, "no.such.Cache", "")
    assert not [i for i in _ids(settings) if i[-4:] in ("E006", "E007", "W003")]


def test_cache_checks_only_apply_to_the_cache_store(settings: Any) -> None:
    settings.IDEMPOTENCY_STORE = "db"
    settings.IDEMPOTENCY_CACHE_ALIAS = "nope"
    assert "django_idempotency.E006" not in _ids(settings)


def test_manage_py_check_fails_on_locmem_unless_silenced(settings: Any) -> None:
    _use_cache(settings, "django.core.cache.backends.locmem.LocMemCache", "dev")
    with pytest.raises(SystemCheckError, match="django_idempotency.E007"):
        call_command("check")
    settings.SILENCED_SYSTEM_CHECKS = ["django_idempotency.E007"]
    call_command("check")


@pytest.fixture
def two_shards() -> Iterator[tuple[str, list[str], list[redis.Redis]]]:
    """A fresh key prefix, the URLs of two Redis databases and a client on each; the records
    under the prefix are deleted afterwards."""
    name = f"idem-test-{uuid.uuid4().hex[:12]}"
    shards = [redis_url_with_db(django_settings.REDIS_URL, db) for db in (13, 14)]
    clients = [redis.Redis.from_url(url) for url in shards]
    yield name, shards, clients
    for client in clients:
        found = client.keys(f"{name}:*")
        if found:
            client.delete(*found)
        client.close()


@needs_redis
def test_django_redis_shard_client_keeps_each_record_on_one_shard(
    settings: Any, two_shards: tuple[str, list[str], list[redis.Redis]]
) -> None:
    name, shards, clients = two_shards
    _use_cache(
        settings,
        BACKENDS["django-redis"],
        shards,
        KEY_PREFIX=name,
        OPTIONS={"CLIENT_CLASS": "django_redis.client.ShardClient"},
    )
    store = get_storage()
    assert isinstance(store, CacheStorage)
    keys = [f"k{i}" for i in range(24)]  # all on one shard: 1 run in 8 million
    for key in keys:
        claim = _claim(store, key)
        assert store.complete(SCOPE, key, claim.token, RESPONSE, now=_now())
        assert _claim(store, key).record.response == RESPONSE
    used = [client.keys(f"{name}:*") for client in clients]
    assert sum(len(found) for found in used) == len(keys)
    assert all(used)  # 24 keys over 2 shards: both hold some


def _shard(key: str, servers: int = 2) -> int:
    return zlib.crc32(key.encode()) % servers


class KeyShardedClient(RedisCacheClient):
    """A custom client of Django's RedisCache that picks the server from the key, as its
    ``get_client(key)`` signature invites."""

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        client: Any = self  # Django's stubs leave the client's attributes out
        index = _shard(str(key), len(client._servers))
        if index not in client._pools:
            client._pools[index] = client._pool_class.from_url(
                client._servers[index], **client._pool_options
            )
        return client._client(connection_pool=client._pools[index])


class KeyShardedRedisCache(DjangoRedisCache):
    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = KeyShardedClient


@needs_redis
def test_a_custom_redis_cache_client_is_asked_for_every_key(
    settings: Any, two_shards: tuple[str, list[str], list[redis.Redis]]
) -> None:
    # The store keeps the one writer of the stock clients, never the client a custom one picked
    # for the first key it saw.
    name, shards, clients = two_shards
    _use_cache(settings, f"{__name__}.KeyShardedRedisCache", shards, KEY_PREFIX=name)
    store = get_storage()
    assert isinstance(store, CacheStorage)
    # Keys until the client's own rule puts some on each server (the prefix is random).
    keys: list[str] = []
    while len(keys) < 8 or len({_shard(store.cache_key(SCOPE, k)) for k in keys}) < 2:
        keys.append(f"k{len(keys)}")
    for key in keys:
        claim = _claim(store, key)
        assert store.complete(SCOPE, key, claim.token, RESPONSE, now=_now())
        assert _claim(store, key).record.response == RESPONSE
    for key in keys:
        record = store.cache_key(SCOPE, key)
        assert [client.exists(record) for client in clients][_shard(record)] == 1
    assert sum(len(client.keys(f"{name}:*")) for client in clients) == len(keys)


@needs_redis
@pytest.mark.django_db
def test_django_redis_closing_its_connections_after_each_request(
    settings: Any, monkeypatch: pytest.MonkeyPatch, raw: redis.Redis
) -> None:
    # CLOSE_CONNECTION disconnects the cache's pool when a request ends; the store's writer
    # (the same pool) connects again for the next request.
    name = f"idem-test-{uuid.uuid4().hex[:12]}"
    _use_cache(
        settings,
        BACKENDS["django-redis"],
        REDIS_URL,
        KEY_PREFIX=name,
        OPTIONS={"CLOSE_CONNECTION": True},
    )
    closed: list[object] = []
    disconnect = redis.ConnectionPool.disconnect

    def counting(pool: redis.ConnectionPool, *args: Any, **kwargs: Any) -> None:
        closed.append(pool)
        disconnect(pool, *args, **kwargs)

    monkeypatch.setattr(redis.ConnectionPool, "disconnect", counting)
    before = Payment.objects.count()
    first = _post("/mixin/payments/", "closing")
    assert first.status_code == 201
    writer = get_storage().client_for("any")  # type: ignore[attr-defined]
    assert writer.connection_pool in closed  # the writer's pool was closed with the request
    again = _post("/mixin/payments/", "closing")
    assert again.status_code == 201
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() - before == 1
    raw.delete(*raw.keys(f"{name}:*"))
