"""The Lua scripts behind both Redis stores, and the store logic they share.

Each operation is one script, so each is atomic on the server and costs one round trip: the claim
reads and writes in one step (never read-then-write), and completion, renewal and release are a
compare-and-set / compare-and-delete on the owner token. Every script touches exactly one key, the
record, passed as ``KEYS[1]``: Redis Cluster routes it to the shard that owns the key's slot and
never answers CROSSSLOT, and a MOVED/ASK redirection is followed by the cluster client.

``RedisStorage`` (``storage/redis.py``) runs them on a redis-py client of its own;
``CacheStorage`` (``storage/cache.py``) on the raw client behind a Django Redis cache. Only how a
record's key is named and which client runs the script differ, so those are the two methods a
subclass supplies.
"""

from __future__ import annotations

import abc
import hashlib
import math
from datetime import datetime, timedelta
from typing import Any

# Imported with this module, never lazily inside a call: the first request of a busy process
# arrives on many threads at once, and redis-py's package (which imports redis.asyncio, which
# imports redis.cluster...) does not survive being imported by several threads together; the
# loser got an ImportError, hence a 500, under the cluster storm test.
from asgiref.sync import sync_to_async
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from django_idempotency.exceptions import StoreError
from django_idempotency.storage import records
from django_idempotency.storage.base import (
    BaseStorage,
    Claim,
    Record,
    State,
    StoredResponse,
    new_token,
    store_errors,
)

# KEYS[1] the record. ARGV: now, fingerprint, token, lease end, record end, TTL in milliseconds.
# Answers {"claimed"}, {"reclaimed"}, or {"held", <the HELD_FIELDS of the record in the way>}:
# the fields a lost claim needs, by position, so the client parses 7 values, not every pair.
_CLAIM = """
local now = tonumber(ARGV[1])
local held = redis.call('HMGET', KEYS[1], 'state', 'fingerprint', 'lease_expires', 'expires')
local outcome = 'claimed'
if held[1] then
  local expired = tonumber(held[4]) <= now
  local dead = held[1] == 'in_flight' and tonumber(held[3]) <= now and held[2] == ARGV[2]
  if not (expired or dead) then
    local out = redis.call('HMGET', KEYS[1], @HELD_FIELDS@)
    table.insert(out, 1, 'held')
    return out
  end
  if not expired then outcome = 'reclaimed' end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'v', '@VERSION@', 'state', 'in_flight', 'fingerprint', ARGV[2],
  'token', ARGV[3], 'created', ARGV[1], 'lease_expires', ARGV[4], 'expires', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {outcome}
""".replace("@VERSION@", records.FORMAT_VERSION).replace(
    "@HELD_FIELDS@", ", ".join(f"'{name}'" for name in records.HELD_FIELDS)
)

# KEYS[1] the record. ARGV: token, final state, response JSON ('' when unavailable), the earliest
# record end (microseconds) and the retention it stands for (milliseconds). The expiry set at
# claim time (created + TTL) stays unless the request outlived it: HSET keeps a key's TTL.
_COMPLETE = """
local held = redis.call('HMGET', KEYS[1], 'token', 'state', 'expires')
if held[1] ~= ARGV[1] or held[2] ~= 'in_flight' then return 0 end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'response', ARGV[3])
end
if tonumber(held[3]) < tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'expires', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return 1
"""

# KEYS[1] the record. ARGV: token, new lease end (microseconds).
_RENEW = """
local held = redis.call('HMGET', KEYS[1], 'token', 'state')
if held[1] ~= ARGV[1] or held[2] ~= 'in_flight' then return 0 end
redis.call('HSET', KEYS[1], 'lease_expires', ARGV[2])
return 1
"""

# KEYS[1] the record. ARGV: token.
_RELEASE = """
local held = redis.call('HMGET', KEYS[1], 'token', 'state')
if held[1] ~= ARGV[1] or held[2] ~= 'in_flight' then return 0 end
return redis.call('DEL', KEYS[1])
"""


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(self, client: Any, key: str, *args: str) -> Any:
        try:
            return client.evalsha(self.sha, 1, key, *args)
        except NoScriptError:
            # EVAL also caches the script server-side, so only the first call on a fresh (or
            # flushed, or failed-over) server pays this second round trip.
            return client.eval(self.source, 1, key, *args)

    async def acall(self, client: Any, key: str, *args: str) -> Any:
        """The same on a ``redis.asyncio`` client."""
        try:
            return await client.evalsha(self.sha, 1, key, *args)
        except NoScriptError:
            return await client.eval(self.source, 1, key, *args)


CLAIM_SCRIPT = Script(_CLAIM)
COMPLETE_SCRIPT = Script(_COMPLETE)
RELEASE_SCRIPT = Script(_RELEASE)
RENEW_SCRIPT = Script(_RENEW)


#: What redis-py raises when an outcome is unknown: the cluster's base error is no
#: ``RedisError`` (a cluster with no reachable node for a slot raises it), sockets may leak
#: ``OSError``.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


def claim_arguments(
    fingerprint: str, token: str, *, now: datetime, lease: timedelta, ttl: timedelta
) -> tuple[str, ...]:
    start = records.micros(now)
    return (
        str(start),
        fingerprint,
        token,
        str(start + lease // records.MICROSECOND),
        str(start + ttl // records.MICROSECOND),
        str(max(1, math.ceil(ttl.total_seconds() * 1000))),
    )


def complete_arguments(
    token: str, response: StoredResponse | None, *, now: datetime, min_retention: timedelta
) -> tuple[str, ...]:
    if response is None:
        state, document = State.UNAVAILABLE.value, ""
    else:
        state, document = State.COMPLETED.value, records.dump_response(response)
    keep_until = str(records.micros(now + min_retention))
    keep_ms = str(max(1, math.ceil(min_retention.total_seconds() * 1000)))
    return (token, state, document, keep_until, keep_ms)


def claim_outcome(answer: Any, token: str) -> Claim:
    if not isinstance(answer, list) or not answer:
        raise StoreError(f"claim answered {type(answer).__name__}, not a script result")
    outcome = records.text(answer[0])
    if outcome in ("claimed", "reclaimed"):
        return Claim(token=token, reclaimed=outcome == "reclaimed")
    if outcome != "held":
        raise StoreError(f"claim answered {outcome!r}")
    values = answer[1:]
    if len(values) != len(records.HELD_FIELDS):
        raise StoreError(f"claim answered {len(values)} fields of the held record")
    return Claim(record=records.held_record(values))


class LuaStorage(BaseStorage):
    """A store whose every operation is one of the scripts above, on one key."""

    native_expiry = True
    transactional = False

    @abc.abstractmethod
    def record_key(self, scope: str, key_hash: str) -> str:
        """The Redis key of a record. It must carry no hash tag, so records spread over slots."""

    @abc.abstractmethod
    def record_pattern(self) -> str:
        """A SCAN pattern that matches this store's records and nothing else (for the stats)."""

    @abc.abstractmethod
    def client_for(self, key: str) -> Any:
        """The redis-py client (plain, Sentinel-managed or cluster) that runs ``key``'s scripts."""

    def aclient(self) -> Any:
        """The ``redis.asyncio`` client of the running loop, or ``None`` when the store has none
        there (its async steps then run the synchronous client in a thread)."""
        return None

    def runs_on_loop(self) -> bool:
        return self.aclient() is not None

    def _run(self, script: Script, stage: str, key: str, *args: str) -> Any:
        with store_errors(stage, REDIS_ERRORS):
            return script(self.client_for(key), key, *args)

    async def _arun(self, script: Script, stage: str, key: str, *args: str) -> Any:
        with store_errors(stage, REDIS_ERRORS):
            client = self.aclient()
            if client is not None:
                return await script.acall(client, key, *args)
        return await sync_to_async(self._run)(script, stage, key, *args)

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
        token = new_token()
        arguments = claim_arguments(fingerprint, token, now=now, lease=lease, ttl=ttl)
        return claim_outcome(self._run(CLAIM_SCRIPT, "claim", key, *arguments), token)

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
        key = self.record_key(scope, key_hash)
        token = new_token()
        arguments = claim_arguments(fingerprint, token, now=now, lease=lease, ttl=ttl)
        return claim_outcome(await self._arun(CLAIM_SCRIPT, "claim", key, *arguments), token)

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
        arguments = complete_arguments(token, response, now=now, min_retention=min_retention)
        return records.flag(self._run(COMPLETE_SCRIPT, "complete", key, *arguments))

    async def acomplete(
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
        arguments = complete_arguments(token, response, now=now, min_retention=min_retention)
        return records.flag(await self._arun(COMPLETE_SCRIPT, "complete", key, *arguments))

    def renew(
        self, scope: str, key_hash: str, token: str, *, now: datetime, lease: timedelta
    ) -> bool:
        key = self.record_key(scope, key_hash)
        lease_end = str(records.micros(now + lease))
        return records.flag(self._run(RENEW_SCRIPT, "renew", key, token, lease_end))

    def release(self, scope: str, key_hash: str, token: str) -> bool:
        key = self.record_key(scope, key_hash)
        return records.flag(self._run(RELEASE_SCRIPT, "release", key, token))

    async def arelease(self, scope: str, key_hash: str, token: str) -> bool:
        key = self.record_key(scope, key_hash)
        return records.flag(await self._arun(RELEASE_SCRIPT, "release", key, token))

    def get(self, scope: str, key_hash: str) -> Record | None:
        key = self.record_key(scope, key_hash)
        with store_errors("get", REDIS_ERRORS):
            fields = self.client_for(key).hgetall(key)
        if not fields:
            return None
        return records.to_record({records.text(k): records.text(v) for k, v in fields.items()})
