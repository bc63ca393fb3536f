"""The cache store: one record per (scope, key hash) in a Django cache, expiring natively.

On Redis (django-redis, or Django's own ``RedisCache``) every operation is one Lua script run
through the raw redis-py client, so each is atomic on the server and costs one round trip: the
claim reads and writes in one step (never read-then-write), and completion and release are a
compare-and-set / compare-and-delete on the owner token. The raw client is used on purpose: the
cache backend's serializer would pickle values, and django-redis ``IGNORE_EXCEPTIONS`` would turn
an unreachable server into answers that look like "no record", an outcome this layer must never
guess.

A record is a Redis hash of short text fields; the stored response is one JSON document whose body
is base64, so nothing read back is ever unpickled.

Other caches get the closest safe equivalent built on ``cache.add()`` (see ``_CacheRecords``):
the claim is as atomic as the backend's ``add``, but fencing is a read followed by a write. The
system checks refuse per-process caches and warn on the database cache (docs/stores.md explains
the trade).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from django.conf import settings as django_settings
from django.core.cache import InvalidCacheBackendError, caches
from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.dummy import DummyCache
from django.core.exceptions import ImproperlyConfigured

from django_idempotency.conf import settings
from django_idempotency.exceptions import StoreError
from django_idempotency.keys import hash_key
from django_idempotency.storage.base import (
    CLAIM_ATTEMPTS,
    BaseStorage,
    Claim,
    Record,
    State,
    StoredResponse,
    new_token,
)

if TYPE_CHECKING:
    from redis import Redis

# Bumped if the stored layout ever changes, so that old records are recognisable.
FORMAT_VERSION = "1"

_EPOCH_AWARE = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)

# Times travel as integer microseconds since the epoch: exact in a Lua number (a double) until
# the year 2255, and an exact round trip for the engine's datetimes.
#
# KEYS[1] the record. ARGV: now, fingerprint, token, lease end, record end, TTL in milliseconds.
# Answers {"claimed"}, {"reclaimed"}, or {"held", field, value, ...} for the record in the way.
_CLAIM = """
local now = tonumber(ARGV[1])
local held = redis.call('HMGET', KEYS[1], 'state', 'fingerprint', 'lease_expires', 'expires')
local outcome = 'claimed'
if held[1] then
  local expired = tonumber(held[4]) <= now
  local dead = held[1] == 'in_flight' and tonumber(held[3]) <= now and held[2] == ARGV[2]
  if not (expired or dead) then
    local out = redis.call('HGETALL', KEYS[1])
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
""".replace("@VERSION@", FORMAT_VERSION)

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


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(self, client: Redis, key: str, *args: str) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return client.evalsha(self.sha, 1, key, *args)
        except NoScriptError:
            # EVAL also caches the script server-side, so only the first call on a fresh (or
            # flushed, or failed-over) server pays this second round trip.
            return client.eval(self.source, 1, key, *args)


CLAIM_SCRIPT = _Script(_CLAIM)
COMPLETE_SCRIPT = _Script(_COMPLETE)
RELEASE_SCRIPT = _Script(_RELEASE)
RENEW_SCRIPT = _Script(_RENEW)


class CacheStorage(BaseStorage):
    native_expiry = True
    transactional = False

    def __init__(self, alias: str | None = None) -> None:
        self.alias = alias or settings.IDEMPOTENCY_CACHE_ALIAS
        try:
            cache = caches[self.alias]
        except InvalidCacheBackendError as exc:
            raise ImproperlyConfigured(
                f"IDEMPOTENCY_CACHE_ALIAS = {self.alias!r} is not a configured cache: {exc}"
            ) from exc
        if isinstance(cache, DummyCache):
            raise ImproperlyConfigured(
                f"The idempotency cache {self.alias!r} is a DummyCache, which stores nothing: "
                "every retry would run again. Use Redis, or IDEMPOTENCY_STORE = 'db'."
            )
        self._redis = _is_redis(cache)
        self._fallback = None if self._redis else _CacheRecords(self.alias)

    @property
    def cache(self) -> BaseCache:
        # Django hands each thread its own cache object; this store instance is shared by all.
        return caches[self.alias]

    def cache_key(self, scope: str, key_hash: str) -> str:
        """The backend key of a record: KEY_PREFIX and VERSION apply, the raw scope does not.

        The scope is hashed with the key hash so that principals' identifiers (emails, tenant
        names) never appear in the cache, and keys stay short and memcached-safe.
        """
        return self.cache.make_and_validate_key(f"idempotency:{hash_key(scope, key_hash)}")

    def _client(self, key: str) -> Redis:
        cache: Any = self.cache
        if hasattr(cache, "client"):  # django-redis
            client = cache.client
            # ShardClient picks the server from the key; the others have one writer.
            if hasattr(client, "get_server"):
                return client.get_server(key)  # type: ignore[no-any-return]
            return client.get_client(write=True)  # type: ignore[no-any-return]
        return cache._cache.get_client(key, write=True)  # type: ignore[no-any-return]

    def _run(self, script: _Script, stage: str, key: str, *args: str) -> Any:
        from redis.exceptions import RedisError

        try:
            return script(self._client(key), key, *args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"{stage} failed: {exc.__class__.__name__}: {exc}") from exc

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
        key = self.cache_key(scope, key_hash)
        if self._fallback is not None:
            return self._fallback.claim(key, fingerprint, now=now, lease=lease, ttl=ttl)
        token = new_token()
        start = _micros(now)
        answer = self._run(
            CLAIM_SCRIPT,
            "claim",
            key,
            str(start),
            fingerprint,
            token,
            str(start + lease // _MICROSECOND),
            str(start + ttl // _MICROSECOND),
            str(max(1, math.ceil(ttl.total_seconds() * 1000))),
        )
        if not isinstance(answer, list) or not answer:
            raise StoreError(f"claim answered {type(answer).__name__}, not a script result")
        outcome = _text(answer[0])
        if outcome in ("claimed", "reclaimed"):
            return Claim(token=token, reclaimed=outcome == "reclaimed")
        if outcome != "held":
            raise StoreError(f"claim answered {outcome!r}")
        return Claim(record=_record(_pairs(answer[1:])))

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
        key = self.cache_key(scope, key_hash)
        if self._fallback is not None:
            return self._fallback.complete(key, token, response, now=now, retention=min_retention)
        if response is None:
            state, document = State.UNAVAILABLE.value, ""
        else:
            state, document = State.COMPLETED.value, _dump_response(response)
        keep_until = _micros(now + min_retention)
        keep_ms = str(max(1, math.ceil(min_retention.total_seconds() * 1000)))
        answer = self._run(
            COMPLETE_SCRIPT, "complete", key, token, state, document, str(keep_until), keep_ms
        )
        return _flag(answer)

    def renew(
        self, scope: str, key_hash: str, token: str, *, now: datetime, lease: timedelta
    ) -> bool:
        key = self.cache_key(scope, key_hash)
        if self._fallback is not None:
            return self._fallback.renew(key, token, now=now, lease=lease)
        lease_end = str(_micros(now + lease))
        return _flag(self._run(RENEW_SCRIPT, "renew", key, token, lease_end))

    def release(self, scope: str, key_hash: str, token: str) -> bool:
        key = self.cache_key(scope, key_hash)
        if self._fallback is not None:
            return self._fallback.release(key, token)
        return _flag(self._run(RELEASE_SCRIPT, "release", key, token))

    def get(self, scope: str, key_hash: str) -> Record | None:
        key = self.cache_key(scope, key_hash)
        if self._fallback is not None:
            return self._fallback.get(key)
        from redis.exceptions import RedisError

        try:
            fields = self._client(key).hgetall(key)
        except (RedisError, OSError) as exc:
            raise StoreError(f"get failed: {exc.__class__.__name__}: {exc}") from exc
        if not fields:
            return None
        return _record({_text(k): _text(v) for k, v in fields.items()})


def _is_redis(cache: BaseCache) -> bool:
    from django.core.cache.backends.redis import RedisCache

    if isinstance(cache, RedisCache):
        return True
    try:
        from django_redis.cache import RedisCache as DjangoRedisCache  # type: ignore[import-untyped]
    except ImportError:
        return False
    return isinstance(cache, DjangoRedisCache)


def _micros(moment: datetime) -> int:
    epoch = _EPOCH_NAIVE if moment.tzinfo is None else _EPOCH_AWARE
    return (moment - epoch) // _MICROSECOND


def _moment(micros: str | int) -> datetime:
    # The engine compares these with its own clock, so match its awareness (USE_TZ).
    epoch = _EPOCH_AWARE if django_settings.USE_TZ else _EPOCH_NAIVE
    return epoch + int(micros) * _MICROSECOND


def _text(value: object) -> str:
    # decode_responses=True in the connection options hands back str instead of bytes.
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise StoreError(f"unexpected {type(value).__name__} in a stored record")


def _flag(value: object) -> bool:
    if not isinstance(value, int):
        raise StoreError(f"script answered {type(value).__name__}, not an integer")
    return bool(value)


def _pairs(flat: Sequence[object]) -> dict[str, str]:
    texts = [_text(item) for item in flat]
    return dict(zip(texts[::2], texts[1::2], strict=True))


def _dump_response(response: StoredResponse) -> str:
    return json.dumps(
        {
            "status": response.status,
            "headers": [list(header) for header in response.headers],
            "body": base64.b64encode(response.body).decode("ascii"),
        },
        separators=(",", ":"),
    )


def _load_response(document: str) -> StoredResponse:
    data = json.loads(document)
    return StoredResponse(
        status=int(data["status"]),
        headers=tuple((str(name), str(value)) for name, value in data["headers"]),
        body=base64.b64decode(data["body"], validate=True),
    )


def _record(fields: Mapping[str, Any]) -> Record:
    try:
        state = State(fields["state"])
        document = fields.get("response")
        response = None
        if state is State.COMPLETED and document:
            response = _load_response(document)
        return Record(
            fingerprint=str(fields["fingerprint"]),
            state=state,
            created_at=_moment(fields["created"]),
            lease_expires_at=_moment(fields["lease_expires"]),
            expires_at=_moment(fields["expires"]),
            response=response,
        )
    except (KeyError, ValueError, TypeError) as exc:
        # Not ours, or damaged: an outcome we cannot read is an outcome we must not guess.
        raise StoreError(f"unreadable idempotency record: {exc.__class__.__name__}") from exc


class _CacheRecords:
    """Records on a cache without scripting: the closest safe equivalent, not an atomic one.

    The claim is ``cache.add()``, atomic wherever the backend's ``add`` is (Memcached, and the
    database cache through its primary key). Taking over a dead record is guarded by a second
    ``add`` on a key derived from the old owner token, so two reclaimers cannot both win.
    Completion and release read the record, compare the token, then write: in between, a request
    whose lease has *already ended* can be overtaken and still write. A process lock makes each
    sequence atomic within one process, which is all a LocMem cache ever spans.

    Values are JSON strings; the backend may still wrap them in its own serializer.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self._lock = threading.Lock()

    @property
    def cache(self) -> BaseCache:
        return caches[self.alias]

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
        return _record(data), data

    def _owned(self, key: str, token: str) -> tuple[Record, dict[str, Any]] | None:
        held = self._load(key)
        if held is None or held[1].get("token") != token or held[0].state is not State.IN_FLIGHT:
            return None
        return held

    def claim(
        self, key: str, fingerprint: str, *, now: datetime, lease: timedelta, ttl: timedelta
    ) -> Claim:
        timeout = max(1, math.ceil(ttl.total_seconds()))
        with self._lock, _errors("claim"):
            for _ in range(CLAIM_ATTEMPTS):
                token = new_token()
                start = _micros(now)
                value = json.dumps(
                    {
                        "v": FORMAT_VERSION,
                        "state": State.IN_FLIGHT.value,
                        "fingerprint": fingerprint,
                        "token": token,
                        "created": start,
                        "lease_expires": start + lease // _MICROSECOND,
                        "expires": start + ttl // _MICROSECOND,
                    },
                    separators=(",", ":"),
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
        key: str,
        token: str,
        response: StoredResponse | None,
        *,
        now: datetime,
        retention: timedelta,
    ) -> bool:
        with self._lock, _errors("complete"):
            held = self._owned(key, token)
            if held is None:
                return False
            record, data = held
            if response is None:
                data["state"] = State.UNAVAILABLE.value
            else:
                data["state"] = State.COMPLETED.value
                data["response"] = _dump_response(response)
            expires_at = max(record.expires_at, now + retention)
            data["expires"] = _micros(expires_at)
            left = max(1, math.ceil((expires_at - now).total_seconds()))
            self.cache.set(key, json.dumps(data, separators=(",", ":")), left)
            return True

    def renew(self, key: str, token: str, *, now: datetime, lease: timedelta) -> bool:
        with self._lock, _errors("renew"):
            held = self._owned(key, token)
            if held is None:
                return False
            record, data = held
            data["lease_expires"] = _micros(now + lease)
            left = max(1, math.ceil((record.expires_at - now).total_seconds()))
            self.cache.set(key, json.dumps(data, separators=(",", ":")), left)
            return True

    def release(self, key: str, token: str) -> bool:
        with self._lock, _errors("release"):
            if self._owned(key, token) is None:
                return False
            return bool(self.cache.delete(key))

    def get(self, key: str) -> Record | None:
        with _errors("get"):
            held = self._load(key)
        return None if held is None else held[0]


@contextlib.contextmanager
def _errors(stage: str) -> Iterator[None]:
    """Whatever a cache backend raises means the outcome is unknown: report the store down."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{stage} failed: {exc.__class__.__name__}: {exc}") from exc
