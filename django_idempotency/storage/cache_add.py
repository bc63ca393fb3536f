"""The cache store for caches without scripting (Memcached, the database cache): ``cache.add()``.

The closest safe equivalent of the Lua store, not an atomic one. The claim is ``cache.add()``,
atomic wherever the backend's ``add`` is (Memcached, and the database cache through its primary
key). Taking over a dead record is guarded by a second ``add`` on a key derived from the old owner
token, so two reclaimers cannot both win. Completion and release read the record, compare the
token, then write: in between, a request whose lease has *already ended* can be overtaken and
still write. A process lock makes each sequence atomic within one process, which is all a LocMem
cache ever spans. The system checks refuse per-process caches and warn on the database cache
(docs/stores.md explains the trade).

Values are JSON strings in the shared record encoding (``storage/records.py``); the backend may
still wrap them in its own serializer.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import datetime, timedelta
from typing import Any

from django.core.cache import InvalidCacheBackendError, caches
from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.dummy import DummyCache
from django.core.exceptions import ImproperlyConfigured

from django_idempotency.conf import settings
from django_idempotency.exceptions import StoreError
from django_idempotency.keys import hash_key
from django_idempotency.storage import records
from django_idempotency.storage.base import (
    CLAIM_ATTEMPTS,
    BaseStorage,
    Claim,
    Record,
    State,
    StoredResponse,
    new_token,
    store_errors,
)


def configured_cache(alias: str) -> BaseCache:
    """The cache behind ``alias``, refused when it cannot hold a record at all."""
    try:
        cache = caches[alias]
    except InvalidCacheBackendError as exc:
        raise ImproperlyConfigured(
            f"IDEMPOTENCY_CACHE_ALIAS = {alias!r} is not a configured cache: {exc}"
        ) from exc
    if isinstance(cache, DummyCache):
        raise ImproperlyConfigured(
            f"The idempotency cache {alias!r} is a DummyCache, which stores nothing: "
            "every retry would run again. Use Redis, or IDEMPOTENCY_STORE = 'db'."
        )
    return cache


def is_redis(cache: BaseCache) -> bool:
    from django.core.cache.backends.redis import RedisCache

    if isinstance(cache, RedisCache):
        return True
    try:
        from django_redis.cache import RedisCache as DjangoRedisCache  # type: ignore[import-untyped]
    except ImportError:
        return False
    return isinstance(cache, DjangoRedisCache)


def store_class_for(alias: str | None = None) -> type[BaseStorage]:
    """The store ``IDEMPOTENCY_STORE = "cache"`` stands for: Lua on Redis, ``add()`` elsewhere."""
    cache = configured_cache(alias or settings.IDEMPOTENCY_CACHE_ALIAS)
    if is_redis(cache):
        # Only a Redis cache needs redis-py, and only then is storage/cache.py imported.
        from django_idempotency.storage.cache import CacheStorage

        return CacheStorage
    return CacheAddStorage


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


class CacheAddStorage(BaseStorage):
    native_expiry = True
    transactional = False

    def __init__(self, alias: str | None = None) -> None:
        self.alias = alias or settings.IDEMPOTENCY_CACHE_ALIAS
        configured_cache(self.alias)
        self._lock = threading.Lock()

    @property
    def cache(self) -> BaseCache:
        return caches[self.alias]

    def record_key(self, scope: str, key_hash: str) -> str:
        """Named as ``CacheStorage`` names it, so switching cache backends keeps the keys."""
        return self.cache.make_and_validate_key(f"idempotency:{hash_key(scope, key_hash)}")

    cache_key = record_key

    def _load(self, key: str) -> tuple[Record, dict[str, Any]] | None:
        raw = self.cache.get(key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise StoreError("unreadable idempotency record") from exc
        if not isinstance(data, dict):
            raise StoreError("unreadable idempotency record")
        return records.to_record(data), data

    def _owned(self, key: str, token: str) -> tuple[Record, dict[str, Any]] | None:
        held = self._load(key)
        if held is None or held[1].get("token") != token or held[0].state is not State.IN_FLIGHT:
            return None
        return held

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
        key = self.record_key(scope, key_hash)
        timeout = max(1, math.ceil(ttl.total_seconds()))
        with self._lock, store_errors("claim"):
            for _ in range(CLAIM_ATTEMPTS):
                token = new_token()
                value = _dump(
                    records.in_flight_fields(fingerprint, token, now=now, lease=lease, ttl=ttl)
                )
                if self.cache.add(key, value, timeout):
                    return Claim(token=token)
                held = self._load(key)
                if held is None:
                    continue  # it expired between add and get
                record, data = held
                if not record.can_be_taken_over(fingerprint, now):
                    return Claim(record=record)
                guard = f"{key}:takeover:{data.get('token', '')}"
                if not self.cache.add(guard, token, timeout):
                    continue  # another request is taking it over: read what it wrote
                self.cache.set(key, value, timeout)
                return Claim(token=token, reclaimed=not record.is_expired(now))
        raise StoreError("claim kept losing races for the same key")

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
        key = self.record_key(scope, key_hash)
        with self._lock, store_errors("complete"):
            held = self._owned(key, token)
            if held is None:
                return False
            record, data = held
            if response is None:
                data["state"] = State.UNAVAILABLE.value
            else:
                data["state"] = State.COMPLETED.value
                data["response"] = records.dump_response(response)
            expires_at = max(record.expires_at, now + min_retention)
            data["expires"] = records.micros(expires_at)
            left = max(1, math.ceil((expires_at - now).total_seconds()))
            self.cache.set(key, _dump(data), left)
            return True

    def renew(
        self, scope: str, key_hash: str, token: str, *, now: datetime, lease: timedelta
    ) -> bool:
        key = self.record_key(scope, key_hash)
        with self._lock, store_errors("renew"):
            held = self._owned(key, token)
            if held is None:
                return False
            record, data = held
            data["lease_expires"] = records.micros(now + lease)
            left = max(1, math.ceil((record.expires_at - now).total_seconds()))
            self.cache.set(key, _dump(data), left)
            return True

    def release(self, scope: str, key_hash: str, token: str) -> bool:
        key = self.record_key(scope, key_hash)
        with self._lock, store_errors("release"):
            if self._owned(key, token) is None:
                return False
            return bool(self.cache.delete(key))

    def get(self, scope: str, key_hash: str) -> Record | None:
        key = self.record_key(scope, key_hash)
        with store_errors("get"):
            held = self._load(key)
        return None if held is None else held[0]
