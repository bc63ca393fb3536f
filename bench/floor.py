"""The floor: the least a correct implementation of the contract costs on the benchmark's view.

Written by hand for the benchmark and never used by the package, it answers one question: how
much of what ``ours`` costs is the contract itself, and how much is ours. It keeps every part of
the contract that the benchmark's view exercises, with nothing around it:

- the key is validated (1 to 255 printable ASCII characters, bare or as a quoted sf-string), a
  malformed key is a 400;
- the scope is the authenticated principal, resolved after DRF authentication;
- the fingerprint is a SHA-256 over method, path with query string, media type and body; a
  different one under the same key is a 422, whatever the record's state;
- the claim is one atomic statement carrying a random owner token and a lease; a live in-flight
  record is a 409 with ``Retry-After``; an expired record, or a dead lease of the same request,
  is taken over with one UPDATE conditioned on the token that was read;
- the view runs in a transaction: on the ORM store the final response (status, safe headers,
  body) is stored by one write conditioned on the owner token inside it, so the payment and the
  stored response commit together; on Redis the view's transaction commits first and the write
  follows, so a worker killed mid-view leaves no payment behind (the package's
  ``IDEMPOTENCY_ATOMIC``, on by default for every store); a 5xx, a transient 4xx or an
  exception rolls the view back and releases the key (a DELETE conditioned on the token); a
  replay answers the stored status, headers and bytes plus ``Idempotent-Replayed: true``.

Left out because the view never needs them: wait mode, streaming and oversize responses, replay
hooks, signals, logging, settings and per-view options (the defaults are constants here).

ORM backends use raw SQL on the package's own table (``django_idempotency_idempotencykey``):

- PostgreSQL and SQLite claim with ``INSERT ... ON CONFLICT (scope, key_hash) DO NOTHING
  RETURNING id`` in autocommit. On PostgreSQL the statement also runs
  ``set_config('synchronous_commit', 'off', true)``, local to its own transaction, so the claim's
  commit does not wait for the WAL flush: the view's durable commit flushes the WAL up to and past
  the claim, so the claim is as durable as anything the view did.
- MariaDB claims with ``INSERT IGNORE ... RETURNING id`` (MariaDB 10.5+): no row when the key
  was held. ``IGNORE`` also turns data errors into warnings; every value here has a bounded
  length (hashes, tokens, a scope from a primary key), so none can be truncated. MariaDB has no
  per-transaction equivalent of ``synchronous_commit``: ``innodb_flush_log_at_trx_commit`` is
  global, so its claim commit does flush the redo log.

Only a lost claim reads the record (one SELECT). Redis runs one Lua script per step (claim, which
also answers the replay; complete; release) with EVALSHA on the raw redis-py client of the same
django-redis cache as the package's cache store.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection, transaction
from django.http import HttpResponse
from django.utils import timezone

if TYPE_CHECKING:
    from django.http.response import HttpResponseBase
    from rest_framework.request import Request

    _Base = Any
else:
    _Base = object

LEASE = timedelta(seconds=60)
TTL = timedelta(hours=24)
PROTECTED_METHODS = frozenset({"POST", "PATCH"})
TRANSIENT_CLIENT_ERRORS = frozenset({401, 403, 408, 409, 425, 429})
REPLAY_HEADERS = frozenset(
    {
        "content-type",
        "location",
        "etag",
        "link",
        "cache-control",
        "vary",
        "last-modified",
        "content-language",
    }
)
CLAIM_ATTEMPTS = 4
PROBLEM_BASE = "https://django-idempotency.readthedocs.io/en/latest/problems/#"

# A bare token (Stripe's form) or an RFC 8941 sf-string (the draft's form) with its two escapes.
_KEY = re.compile(r'([!#-+\--~]+)|"((?:[ !#-\[\]-~]|\\["\\])*)"')
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True, slots=True)
class Won:
    """This request owns the key: ``ref`` names the record (a row id, a Redis key)."""

    ref: Any
    token: str


@dataclass(frozen=True, slots=True)
class Stored:
    """The completed record in the way: what a replay answers."""

    status: int
    headers: list[list[str]]
    body: bytes


# What holds the key when the claim is lost, other than a stored response.
MISMATCH = "mismatch"
BUSY = "busy"
UNAVAILABLE = "unavailable"

Outcome = Won | Stored | str


class StoreDown(Exception):
    """The store failed or kept losing races: the outcome is unknown, answer 503."""


class Store(Protocol):
    transactional: bool

    def claim(self, scope: str, key_hash: str, fingerprint: str) -> Outcome: ...

    def complete(self, won: Won, status: int, headers: list[list[str]], body: bytes) -> bool: ...

    def release(self, won: Won) -> None: ...


def digest(*parts: bytes) -> str:
    # Length-prefixed, so that moving bytes from one part to the next changes the digest.
    sha = hashlib.sha256()
    for part in parts:
        sha.update(len(part).to_bytes(8, "big"))
        sha.update(part)
    return sha.hexdigest()


def parse_key(raw: str) -> str | None:
    """The key the header names, or None when it is malformed."""
    match = _KEY.fullmatch(raw.strip(" \t"))
    if match is None:
        return None
    bare, quoted = match.groups()
    key = bare if bare is not None else _ESCAPE.sub(r"\1", quoted)
    return key if 1 <= len(key) <= 255 else None


TABLE = "django_idempotency_idempotencykey"
_COLUMNS = (
    "(scope, key_hash, fingerprint, state, owner_token, created_at, lease_expires_at,"
    " expires_at, response_headers)"
)
_CLAIM_SQL = {
    "postgresql": f"INSERT INTO {TABLE} {_COLUMNS} VALUES (%s, %s, %s,"
    " (SELECT 'in_flight' FROM set_config('synchronous_commit', 'off', true)),"
    " %s, %s, %s, %s, '[]') ON CONFLICT (scope, key_hash) DO NOTHING RETURNING id",
    "sqlite": f"INSERT INTO {TABLE} {_COLUMNS} VALUES (%s, %s, %s, 'in_flight', %s, %s, %s, %s,"
    " '[]') ON CONFLICT (scope, key_hash) DO NOTHING RETURNING id",
    "mysql": f"INSERT IGNORE INTO {TABLE} {_COLUMNS} VALUES (%s, %s, %s, 'in_flight', %s, %s, %s,"
    " %s, '[]') RETURNING id",
}
_HELD_SQL = (
    "SELECT id, owner_token, state, fingerprint, expires_at <= %s, lease_expires_at <= %s,"
    f" response_status, response_headers, response_body FROM {TABLE}"
    " WHERE scope = %s AND key_hash = %s"
)
_TAKEOVER_SQL = (
    f"UPDATE {TABLE} SET fingerprint = %s, state = 'in_flight', owner_token = %s,"
    " created_at = %s, lease_expires_at = %s, expires_at = %s, response_status = NULL,"
    " response_headers = '[]', response_body = NULL"
    " WHERE id = %s AND owner_token = %s AND state = %s"
)
_COMPLETE_SQL = (
    f"UPDATE {TABLE} SET state = 'completed', response_status = %s, response_headers = %s,"
    " response_body = %s WHERE id = %s AND owner_token = %s AND state = 'in_flight'"
)
_RELEASE_SQL = f"DELETE FROM {TABLE} WHERE id = %s AND owner_token = %s AND state = 'in_flight'"


class SqlStore:
    """Raw SQL on the package's table, through the view's own connection."""

    transactional = True

    def __init__(self) -> None:
        self._claim_sql = _CLAIM_SQL[connection.vendor]

    def claim(self, scope: str, key_hash: str, fingerprint: str) -> Outcome:
        now = timezone.now()
        adapt = connection.ops.adapt_datetimefield_value
        stamps = (adapt(now), adapt(now + LEASE), adapt(now + TTL))
        try:
            with connection.cursor() as cursor:
                for _ in range(CLAIM_ATTEMPTS):
                    token = secrets.token_hex(16)
                    cursor.execute(self._claim_sql, (scope, key_hash, fingerprint, token, *stamps))
                    row = cursor.fetchone()
                    if row is not None:
                        return Won(row[0], token)
                    cursor.execute(_HELD_SQL, (stamps[0], stamps[0], scope, key_hash))
                    held = cursor.fetchone()
                    if held is None:
                        continue  # released since the INSERT: claim again
                    pk, owner, state, held_fp, expired, dead, status, headers, body = held
                    if expired or (state == "in_flight" and dead and held_fp == fingerprint):
                        cursor.execute(
                            _TAKEOVER_SQL, (fingerprint, token, *stamps, pk, owner, state)
                        )
                        if cursor.rowcount == 1:
                            return Won(pk, token)
                        continue  # someone else took it over or completed it: read again
                    if held_fp != fingerprint:
                        return MISMATCH
                    if state == "in_flight":
                        return BUSY
                    if state != "completed":
                        return UNAVAILABLE
                    if isinstance(headers, str):  # text on SQLite and MariaDB, jsonb decoded
                        headers = json.loads(headers)
                    return Stored(int(status), headers, bytes(body))
        except DatabaseError as exc:
            raise StoreDown from exc
        raise StoreDown

    def complete(self, won: Won, status: int, headers: list[list[str]], body: bytes) -> bool:
        with connection.cursor() as cursor:
            cursor.execute(_COMPLETE_SQL, (status, json.dumps(headers), body, won.ref, won.token))
            return cursor.rowcount == 1

    def release(self, won: Won) -> None:
        with connection.cursor() as cursor:
            cursor.execute(_RELEASE_SQL, (won.ref, won.token))


# KEYS[1] the record. ARGV: now (ms), fingerprint, token, lease end (ms), TTL (ms).
# Expiry is native (PEXPIRE), so an expired record is simply absent.
_CLAIM_LUA = """
local held = redis.call('HMGET', KEYS[1], 'fp', 'state', 'lease')
if held[1] then
  if held[1] ~= ARGV[2] then return 'mismatch' end
  if held[2] == 'completed' then
    return redis.call('HMGET', KEYS[1], 'status', 'headers', 'body')
  end
  if held[2] ~= 'in_flight' then return 'unavailable' end
  if tonumber(held[3]) > tonumber(ARGV[1]) then return 'busy' end
end
redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'state', 'in_flight', 'token', ARGV[3], 'lease', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
# KEYS[1] the record. ARGV: token, status, headers (JSON), body. HSET keeps the key's TTL.
_COMPLETE_LUA = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[2], 'headers', ARGV[3],
  'body', ARGV[4])
return 1
"""
_RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class RedisStore:
    """One Lua script per step on the raw client of the package's django-redis cache."""

    transactional = False

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._scripts = {
            name: (hashlib.sha1(lua.encode(), usedforsecurity=False).hexdigest(), lua)
            for name, lua in (
                ("claim", _CLAIM_LUA),
                ("complete", _COMPLETE_LUA),
                ("release", _RELEASE_LUA),
            )
        }

    def _run(self, name: str, key: str, *args: object) -> Any:
        from redis.exceptions import NoScriptError, RedisError

        sha, lua = self._scripts[name]
        try:
            try:
                return self.client.evalsha(sha, 1, key, *args)
            except NoScriptError:
                return self.client.eval(lua, 1, key, *args)
        except (RedisError, OSError) as exc:
            raise StoreDown from exc

    def claim(self, scope: str, key_hash: str, fingerprint: str) -> Outcome:
        key = f"{self.prefix}:floor:{key_hash}"
        token = secrets.token_hex(16)
        now = int(time.time() * 1000)
        lease_ms = int(LEASE.total_seconds() * 1000)
        ttl_ms = int(TTL.total_seconds() * 1000)
        answer = self._run("claim", key, now, fingerprint, token, now + lease_ms, ttl_ms)
        if answer == 1:
            return Won(key, token)
        if isinstance(answer, list):
            status, headers, body = answer
            return Stored(int(status), json.loads(headers), bytes(body))
        return str(answer.decode())

    def complete(self, won: Won, status: int, headers: list[list[str]], body: bytes) -> bool:
        answer = self._run("complete", won.ref, won.token, status, json.dumps(headers), body)
        return bool(answer)

    def release(self, won: Won) -> None:
        self._run("release", won.ref, won.token)


_store: Store | None = None


def store() -> Store:
    """The floor store matching the package's configured one, built on first use."""
    global _store
    if _store is None:
        if getattr(settings, "IDEMPOTENCY_STORE", "db") == "cache":
            from django.core.cache import caches

            cache: Any = caches[getattr(settings, "IDEMPOTENCY_CACHE_ALIAS", "default")]
            _store = RedisStore(cache.client.get_client(write=True), cache.key_prefix)
        else:
            _store = SqlStore()
    return _store


def problem(status: int, code: str, title: str, retry_after: int | None = None) -> HttpResponse:
    body = json.dumps(
        {"type": PROBLEM_BASE + code, "title": title, "status": status, "detail": title}
    )
    response = HttpResponse(body, status=status, content_type="application/problem+json")
    response["Cache-Control"] = "no-store"
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def replay(stored: Stored) -> HttpResponse:
    response = HttpResponse(stored.body, status=stored.status)
    del response["Content-Type"]
    for name, value in stored.headers:
        response[name] = value
    response["Idempotent-Replayed"] = "true"
    return response


def answer(outcome: str | Stored) -> HttpResponse:
    if isinstance(outcome, Stored):
        return replay(outcome)
    if outcome == MISMATCH:
        return problem(422, "idempotency-key-reused", "The key was used for another request.")
    if outcome == BUSY:
        return problem(409, "idempotency-request-in-progress", "The request is in flight.", 1)
    return problem(409, "idempotency-result-unavailable", "The result was not kept.")


class _Answer(Exception):
    def __init__(self, response: HttpResponse) -> None:
        super().__init__()
        self.response = response


@dataclass(slots=True)
class _Flight:
    won: Won
    atomic: transaction.Atomic | None

    def close(self, *, commit: bool, release: bool) -> None:
        if self.atomic is not None:
            if not commit:
                transaction.set_rollback(True)
            self.atomic.__exit__(None, None, None)
        if release:
            store().release(self.won)

    def release_quietly(self) -> None:
        # The lease still ends on its own; a retry then takes the key over.
        try:
            store().release(self.won)
        except (DatabaseError, StoreDown) as exc:
            print(f"floor: release failed: {exc!r}", file=sys.stderr)


class FloorMixin(_Base):  # type: ignore[misc]
    """Put it first in the bases of a DRF view, like ``IdempotencyMixin``."""

    _floor: _Flight | None = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self._floor = None
        super().initial(request, *args, **kwargs)  # authentication, permissions, throttles
        raw_request = request._request
        raw = raw_request.META.get("HTTP_IDEMPOTENCY_KEY")
        if raw is None or request.method not in PROTECTED_METHODS:
            return
        key = parse_key(raw)
        if key is None:
            raise _Answer(problem(400, "idempotency-key-invalid", "Malformed Idempotency-Key."))
        user = request.user
        scope = f"user:{user.pk}" if user.is_authenticated else "anonymous"
        fingerprint = digest(
            raw_request.method.encode(),
            raw_request.get_full_path().encode(),
            raw_request.META.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower().encode(),
            raw_request.body,
        )
        floor = store()
        try:
            outcome = floor.claim(scope, digest(scope.encode(), key.encode()), fingerprint)
        except StoreDown:
            raise _Answer(
                problem(503, "idempotency-store-unavailable", "The store is unavailable.", 1)
            ) from None
        if not isinstance(outcome, Won):
            raise _Answer(answer(outcome))
        atomic = transaction.atomic()
        atomic.__enter__()
        self._floor = _Flight(outcome, atomic)

    def handle_exception(self, exc: Exception) -> HttpResponseBase:
        if isinstance(exc, _Answer):
            return exc.response
        return super().handle_exception(exc)  # type: ignore[no-any-return]

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            return super().dispatch(request, *args, **kwargs)  # type: ignore[no-any-return]
        except BaseException as exc:
            flight, self._floor = self._floor, None
            if flight is not None:
                # A stopped worker (SystemExit, KeyboardInterrupt) keeps its claim until the
                # lease ends: what the view did outside the database may have happened.
                flight.close(commit=False, release=isinstance(exc, Exception))
            raise

    def finalize_response(
        self, request: Request, response: HttpResponseBase, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        response = super().finalize_response(request, response, *args, **kwargs)
        flight, self._floor = self._floor, None
        if flight is None:
            return response
        status = response.status_code
        if status >= 500 or status in TRANSIENT_CLIENT_ERRORS:
            flight.close(commit=False, release=True)
            return response
        if hasattr(response, "render"):
            response.render()
        body = response.content  # type: ignore[attr-defined]
        headers = [
            [name, value] for name, value in response.items() if name.lower() in REPLAY_HEADERS
        ]
        floor = store()
        if not floor.transactional:
            return self._commit_then_complete(flight, response, status, headers, body)
        try:
            owned = floor.complete(flight.won, status, headers, body)
        except (DatabaseError, StoreDown):
            flight.close(commit=False, release=False)
            flight.release_quietly()
            return problem(503, "idempotency-store-unavailable", "The store is unavailable.", 1)
        if not owned:
            # The lease ended and another request took the key over: keep its record.
            flight.close(commit=False, release=False)
            return problem(409, "idempotency-request-in-progress", "The lease was lost.", 1)
        try:
            flight.close(commit=True, release=False)
        except DatabaseError:
            flight.release_quietly()
            return problem(503, "idempotency-store-unavailable", "The commit failed.", 1)
        return response

    def _commit_then_complete(
        self,
        flight: _Flight,
        response: HttpResponseBase,
        status: int,
        headers: list[list[str]],
        body: bytes,
    ) -> HttpResponseBase:
        # A store outside the database: the view's writes commit first, then the result is
        # stored. A store that fails now leaves the claim to its lease; the client still gets
        # the real answer, since the payment did happen.
        try:
            flight.close(commit=True, release=False)
        except DatabaseError:
            flight.release_quietly()
            return problem(503, "idempotency-store-unavailable", "The commit failed.", 1)
        try:
            store().complete(flight.won, status, headers, body)
        except StoreDown as exc:
            print(f"floor: complete failed: {exc!r}", file=sys.stderr)
        return response
