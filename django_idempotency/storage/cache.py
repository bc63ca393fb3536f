"""The cache store on Redis: the shared Lua scripts, run through a Django Redis cache's client.

``IDEMPOTENCY_STORE = "cache"`` picks this store when the cache is Redis (django-redis, or
Django's own ``RedisCache``) and :class:`~django_idempotency.storage.cache_add.CacheAddStorage`
for any other cache (see ``cache_add.store_class_for``). The scripts are the ones
``RedisStorage`` runs (``storage/lua.py``); this store only names keys the way the cache does
(``KEY_PREFIX``, ``VERSION``) and borrows the cache's raw redis-py client. The raw client is used
on purpose: the cache backend's serializer would pickle values, and django-redis
``IGNORE_EXCEPTIONS`` would turn an unreachable server into answers that look like "no record", an
outcome this layer must never guess.
"""

from __future__ import annotations

from typing import Any

from django.core.cache import caches
from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.redis import RedisCacheClient
from django.core.exceptions import ImproperlyConfigured

from django_idempotency.conf import settings
from django_idempotency.keys import hash_key
from django_idempotency.storage.cache_add import configured_cache, is_redis
from django_idempotency.storage.lua import LuaStorage


class CacheStorage(LuaStorage):
    def __init__(self, alias: str | None = None) -> None:
        self.alias = alias or settings.IDEMPOTENCY_CACHE_ALIAS
        cache = configured_cache(self.alias)
        if not is_redis(cache):
            raise ImproperlyConfigured(
                f"CacheStorage runs Lua on Redis; the cache {self.alias!r} is "
                f"{type(cache).__name__}. Use IDEMPOTENCY_STORE = 'cache', which picks "
                "CacheAddStorage for it, or a Redis cache."
            )
        # How the cache names keys (KEY_FUNCTION, KEY_PREFIX, VERSION) comes from its settings,
        # the same in every thread's copy, and the store is rebuilt when CACHES changes: kept
        # here, naming a record needs no per-thread cache lookup.
        self._key_func = cache.key_func
        self._key_prefix = cache.key_prefix
        self._version = cache.version
        self._writer: Any = None

    @property
    def cache(self) -> BaseCache:
        # Django hands each thread its own cache object; this store instance is shared by all.
        return caches[self.alias]

    def record_key(self, scope: str, key_hash: str) -> str:
        """The backend key of a record: KEY_PREFIX and VERSION apply, the raw scope does not.

        The scope is hashed with the key hash so that principals' identifiers (emails, tenant
        names) never appear in the cache. The key is not validated: validation only warns about
        what memcached refuses, and a hex digest under a prefix is always a valid Redis key.
        """
        name = f"idempotency:{hash_key(scope, key_hash)}"
        return str(self._key_func(name, self._key_prefix, self._version))

    def record_pattern(self) -> str:
        return self.cache.make_key("idempotency:*")

    #: The name this key had before the stores shared their scripts.
    cache_key = record_key

    def client_for(self, key: str) -> Any:
        writer = self._writer
        if writer is not None:
            return writer
        cache: Any = self.cache
        if hasattr(cache, "client"):  # django-redis
            client = cache.client
            # ShardClient picks the server from the key; the others have one writer.
            if hasattr(client, "get_server"):
                return client.get_server(key)
            writer = client.get_client(write=True)
        else:
            writer = cache._cache.get_client(key, write=True)
            if type(cache._cache) is not RedisCacheClient:
                return writer  # a custom client may pick the server from the key
        # The one writer is kept for every thread: each thread's cache object would hand back a
        # client of its own, but a redis-py client is thread-safe and rebuilds its connections
        # after a fork, django-redis shares one pool per server between them anyway, and this
        # store is rebuilt when CACHES changes. Asking the cache again cost a thread-local
        # look-up and two calls per store call.
        self._writer = writer
        return writer
