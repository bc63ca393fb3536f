"""The Redis store: the Lua scripts of ``storage/lua.py`` on a redis-py client of its own.

``IDEMPOTENCY_STORE = "redis"``. The client comes from ``IDEMPOTENCY_REDIS_CLIENT`` (a dotted path
to a zero-argument callable returning ``redis.Redis``, ``redis.cluster.RedisCluster`` or a
Sentinel ``master_for(...)`` client) or else from ``IDEMPOTENCY_REDIS_URL``. It is built on first
use, kept for the life of the store instance (one per process; a relevant ``setting_changed``
drops both) and shared by every thread: redis-py clients are thread-safe and their pools reset
themselves after a fork.

Every record is its own key, ``IDEMPOTENCY_REDIS_KEY_PREFIX`` + a SHA-256 of scope and key hash,
with no ``{hash tag}``: records spread over every slot of a cluster, and each script touches that
one key, so a cluster never answers CROSSSLOT.

With ``IDEMPOTENCY_REDIS_WAIT_REPLICAS = n`` a claim is followed, on the same connection, by
``WAIT n timeout``: a primary that fails right after acknowledging a claim can lose it when an
asynchronous replica is promoted, and the retry would run the view a second time. When fewer
than ``n`` replicas confirm in time the claim is released and the request answers 503 without
running the view.

Async views await the same scripts on a ``redis.asyncio`` client, one per event loop (its
connections belong to the loop): ``IDEMPOTENCY_REDIS_ASYNC_CLIENT`` names its factory, and a
URL-configured store builds it from the URL. A loop that ``async_to_sync`` made for one call (an
async view served over WSGI, where every request gets a loop of its own) would leave a client
with open connections behind per request, so there the synchronous client runs in a thread, as
it does when only ``IDEMPOTENCY_REDIS_CLIENT`` is set, and for a claim that waits for replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from datetime import datetime, timedelta
from typing import Any

import redis
import redis.asyncio
from asgiref.sync import AsyncToSync, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_idempotency.conf import settings
from django_idempotency.exceptions import StoreError
from django_idempotency.keys import hash_key
from django_idempotency.storage.base import Claim, new_token, store_errors
from django_idempotency.storage.lua import (
    CLAIM_SCRIPT,
    REDIS_ERRORS,
    LuaStorage,
    Script,
    claim_arguments,
    claim_outcome,
)

logger = logging.getLogger("django_idempotency")

#: Seconds a URL-built client waits to connect or for an answer, unless the URL says otherwise
#: (``?socket_timeout=``): a hung server must become a 503, not a hung worker.
DEFAULT_SOCKET_TIMEOUT = 5.0

#: Policies under which Redis never deletes a key to make room. Every record carries a TTL, so
#: the ``volatile-*`` policies can evict live records as readily as the ``allkeys-*`` ones.
SAFE_EVICTION_POLICIES = frozenset({"noeviction"})


def build_client() -> Any:
    """A new redis-py client from the settings (no connection is made yet, except by a cluster
    client, which reads the topology when it is built)."""
    path = settings.IDEMPOTENCY_REDIS_CLIENT
    if path:
        try:
            factory = import_string(path)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"IDEMPOTENCY_REDIS_CLIENT = {path!r} could not be imported: {exc}"
            ) from exc
        return factory()
    url = settings.IDEMPOTENCY_REDIS_URL
    if not url:
        raise ImproperlyConfigured(
            'IDEMPOTENCY_STORE = "redis" needs IDEMPOTENCY_REDIS_URL (redis://, rediss:// or '
            "unix://) or IDEMPOTENCY_REDIS_CLIENT (a dotted path to a client factory)."
        )
    # Options in the URL's query win over these defaults (redis-py merges them last).
    return redis.Redis.from_url(
        url, socket_timeout=DEFAULT_SOCKET_TIMEOUT, socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT
    )


def has_async_client() -> bool:
    """Whether the settings give the store an async client: a factory of its own, or the URL
    when no synchronous factory wins over it (whose async twin cannot be guessed)."""
    if settings.IDEMPOTENCY_REDIS_ASYNC_CLIENT:
        return True
    return bool(settings.IDEMPOTENCY_REDIS_URL) and not settings.IDEMPOTENCY_REDIS_CLIENT


def build_async_client() -> Any:
    """A new ``redis.asyncio`` client from the settings, where ``has_async_client()``."""
    path = settings.IDEMPOTENCY_REDIS_ASYNC_CLIENT
    if path:
        try:
            factory = import_string(path)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"IDEMPOTENCY_REDIS_ASYNC_CLIENT = {path!r} could not be imported: {exc}"
            ) from exc
        return factory()
    return redis.asyncio.Redis.from_url(
        settings.IDEMPOTENCY_REDIS_URL,
        socket_timeout=DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT,
    )


def _one_call_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` is one that ``async_to_sync`` made for a single call and will close."""
    return loop in getattr(AsyncToSync, "loop_thread_executors", ())


def eviction_problem(client: Any) -> str | None:
    """Why the server may drop live records, if its configuration says so and can be read.

    Managed services often rename or refuse ``CONFIG``; then nothing is known and nothing said.
    """
    try:
        config = client.config_get("maxmemory*")
    except Exception:  # noqa: BLE001 - best effort; the store works without knowing
        return None
    values = {str(k): str(v) for k, v in dict(config).items()}
    policy = values.get("maxmemory-policy", "noeviction")
    if policy in SAFE_EVICTION_POLICIES or values.get("maxmemory", "0") == "0":
        return None
    return (
        f"the idempotency Redis runs maxmemory-policy {policy} with maxmemory "
        f"{values.get('maxmemory')}: when memory fills it deletes keys with a TTL, and every "
        "idempotency record has one, so a retry can run again. Use maxmemory-policy noeviction "
        "(full memory then answers 503) on the Redis that holds the records."
    )


class RedisStorage(LuaStorage):
    def __init__(self) -> None:
        self.prefix = settings.IDEMPOTENCY_REDIS_KEY_PREFIX
        self.wait_replicas = settings.IDEMPOTENCY_REDIS_WAIT_REPLICAS
        self.wait_timeout = settings.IDEMPOTENCY_REDIS_WAIT_TIMEOUT
        self._client: Any = None
        self._lock = threading.Lock()
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._has_async = has_async_client()

    @property
    def client(self) -> Any:
        """The shared client, built on first use so that a cluster that is down at startup is a
        503 on the first request rather than an import-time crash."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    client = build_client()
                    problem = eviction_problem(client)
                    if problem:
                        logger.warning("django_idempotency: %s", problem)
                    self._client = client
        return self._client

    def _native_loop(self) -> asyncio.AbstractEventLoop | None:
        """The running loop, where this store has an async client for it."""
        if not self._has_async:
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return None if _one_call_loop(loop) else loop

    def runs_on_loop(self) -> bool:
        return self._native_loop() is not None

    def aclient(self) -> Any:
        loop = self._native_loop()
        if loop is None:
            return None
        client = self._aclients.get(loop)
        if client is None:
            with self._lock:
                client = self._aclients.get(loop)
                if client is None:
                    client = self._aclients[loop] = build_async_client()
        return client

    async def aclose(self) -> None:
        """Close the running loop's async client (an ASGI lifespan shutdown may call this)."""
        client = self._aclients.pop(asyncio.get_running_loop(), None)
        if client is None:
            return
        await client.aclose()
        # A Sentinel-managed client's pool also holds connections to the sentinels.
        manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()

    def record_key(self, scope: str, key_hash: str) -> str:
        return f"{self.prefix}{hash_key(scope, key_hash)}"

    def record_pattern(self) -> str:
        return f"{self.prefix}*"

    def client_for(self, key: str) -> Any:
        return self.client

    def _run(self, script: Script, stage: str, key: str, *args: str) -> Any:
        try:
            return super()._run(script, stage, key, *args)
        except AttributeError as exc:
            if not _is_cluster(self.client):
                raise
            raise _unknown_node(stage) from exc

    async def _arun(self, script: Script, stage: str, key: str, *args: str) -> Any:
        try:
            return await super()._arun(script, stage, key, *args)
        except AttributeError as exc:
            if not _is_cluster(self.aclient()):
                raise
            raise _unknown_node(stage) from exc

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
        if self.wait_replicas <= 0:
            return super().claim(scope, key_hash, fingerprint, now=now, lease=lease, ttl=ttl)
        key = self.record_key(scope, key_hash)
        token = new_token()
        arguments = claim_arguments(fingerprint, token, now=now, lease=lease, ttl=ttl)
        with store_errors("claim", REDIS_ERRORS):
            answer, acknowledged = self._claim_and_wait(key, arguments)
        outcome = claim_outcome(answer, token)
        if outcome.won and acknowledged < self.wait_replicas:
            # Not durable enough to run a payment on. Give the key back so that the retry can
            # claim it at once; if this release is lost too, the lease ends it.
            with contextlib.suppress(StoreError):
                self.release(scope, key_hash, token)
            raise StoreError(
                f"claim acknowledged by {acknowledged} of {self.wait_replicas} replicas "
                f"within {self.wait_timeout} ms"
            )
        return outcome

    async def aclaim(
        self,
        scope: str,
        key_hash: str,
        fingerprint: str,
        *,
        now: datetime,
        lease: timedelta,
        ttl: timedelta,
    ) -> Claim:
        if self.wait_replicas <= 0:
            return await super().aclaim(scope, key_hash, fingerprint, now=now, lease=lease, ttl=ttl)
        # The replica wait costs more than the hop, and needs the node's own connection.
        return await sync_to_async(self.claim)(
            scope, key_hash, fingerprint, now=now, lease=lease, ttl=ttl
        )

    def _claim_and_wait(self, key: str, arguments: tuple[str, ...]) -> tuple[Any, int]:
        """The claim and ``WAIT`` in one pipeline, hence on one connection: ``WAIT`` counts the
        replicas that have this connection's writes, so any other connection would measure
        something else."""
        for _ in range(3):
            node = self._node_client(key)
            pipe = node.pipeline(transaction=False)
            pipe.evalsha(CLAIM_SCRIPT.sha, 1, key, *arguments)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout)
            try:
                answer, acknowledged = pipe.execute()
            except redis.exceptions.NoScriptError:
                node.script_load(CLAIM_SCRIPT.source)
                continue
            except redis.exceptions.AskError:
                # MOVED (a MovedError is an AskError) or ASK: the slot moved since the topology
                # was read. The claim did not run there; read the topology again and retry.
                self.client.nodes_manager.initialize()
                continue
            return answer, int(acknowledged)
        raise StoreError("claim could not reach the shard that owns its key")

    def _node_client(self, key: str) -> Any:
        client = self.client
        if _is_cluster(client):  # the primary of the key's slot
            return client.get_node_from_key(key).redis_connection
        return client


def _is_cluster(client: Any) -> bool:
    return hasattr(client, "get_node_from_key")


def _unknown_node(stage: str) -> StoreError:
    """redis-py's cluster clients follow ASK only to nodes they already know: while a slot moves
    to a shard that served no slot when they read the topology (one just added), the redirected
    call fails inside the client before anything is sent to that shard. Nothing ran; once the
    slot has moved, MOVED teaches the client the new owner."""
    return StoreError(f"{stage} failed: the cluster redirected to a node its client does not know")
