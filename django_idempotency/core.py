"""The idempotency engine, shared by the DRF mixin and the decorator.

A protected request goes through three steps, and both integrations call exactly these, so their
behaviour cannot drift apart:

1. :meth:`Idempotency.begin` validates the key, resolves the scope and fingerprint, and claims the
   key with one atomic store operation. It answers at once (replay, 4xx, 409, 503) or returns a
   :class:`Flight` that owns the key.
2. :meth:`Flight.enter` opens the store's transaction (ORM store: the view's own writes and the
   completion commit together), then the view runs.
3. :meth:`Flight.finish` stores a final response, or rolls back and releases the key for anything a
   retry should run again; :meth:`Flight.fail` does the latter when the view raised.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone
from django.utils.module_loading import import_string

from django_idempotency import signals
from django_idempotency.conf import settings
from django_idempotency.exceptions import (
    IdempotencyError,
    KeyMissing,
    KeyReused,
    RequestInProgress,
    RequestTooLarge,
    ResultUnavailable,
    StoreError,
    StoreUnavailable,
)
from django_idempotency.keys import hash_key, parse_key
from django_idempotency.responses import add_headers, capture, ensure_rendered, problem, replay
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import BaseStorage, Record, State

logger = logging.getLogger("django_idempotency")

#: 4xx answers that describe the moment, not the request: a retry may well succeed.
TRANSIENT_CLIENT_ERRORS = frozenset({401, 403, 408, 409, 425, 429})

# How often a waiting duplicate looks at the record again.
WAIT_POLL_SECONDS = 0.05

# Hooks receive a Django HttpRequest, or a DRF Request (which proxies one) from the integrations.
ScopeResolver = Callable[[Any], "str | None"]
Fingerprinter = Callable[[Any], str]
ReplayHook = Callable[[Any, HttpResponse], "Mapping[str, str] | None"]


@dataclass(frozen=True)
class Policy:
    """How one view is protected. ``None`` fields fall back to the live settings."""

    required: bool | None = None
    methods: frozenset[str] | None = None
    ttl: int | None = None
    lease: int | None = None
    store_server_errors: bool | None = None
    atomic: bool | None = None
    wait: float | None = None
    scope: ScopeResolver | None = None
    fingerprint: Fingerprinter | None = None
    replay_headers: ReplayHook | None = None

    def protects(self, method: str | None) -> bool:
        methods = self.methods if self.methods is not None else settings.IDEMPOTENCY_METHODS
        return (method or "").upper() in methods

    def is_final(self, status: int) -> bool:
        if status >= 500:
            store = self.store_server_errors
            return store if store is not None else settings.IDEMPOTENCY_STORE_SERVER_ERRORS
        return status not in TRANSIENT_CLIENT_ERRORS

    def resolve_scope(self, request: HttpRequest) -> str | None:
        resolver = self.scope or import_string(settings.IDEMPOTENCY_SCOPE_RESOLVER)
        return resolver(request)

    def resolve_fingerprint(self, request: HttpRequest) -> str:
        fingerprinter = self.fingerprint or import_string(settings.IDEMPOTENCY_FINGERPRINT)
        return fingerprinter(request)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def now() -> datetime:
    """The engine's default clock; tests move time by replacing it or passing ``clock``."""
    return timezone.now()


class Idempotency:
    def __init__(
        self,
        policy: Policy,
        storage: BaseStorage | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.policy = policy
        self.storage = storage or get_storage()
        self._clock = clock

    def clock(self) -> datetime:
        return self._clock() if self._clock is not None else now()

    def begin(self, request: HttpRequest) -> HttpResponse | Flight | None:
        """Decide what happens to ``request`` before its view runs.

        ``None``: not protected (safe method, no key on an optional view, skipped scope, or the
        store is down in fail-open mode): run the view as usual. An ``HttpResponse``: answer with
        it and do not run the view. A :class:`Flight`: this request owns the key.
        """
        policy = self.policy
        if not policy.protects(request.method):
            return None
        try:
            raw = request.headers.get(settings.IDEMPOTENCY_HEADER)
            if raw is None:
                if _pick(policy.required, settings.IDEMPOTENCY_REQUIRED):
                    raise KeyMissing
                return None
            key = parse_key(
                raw,
                strict=settings.IDEMPOTENCY_STRICT_KEY_FORMAT,
                min_length=settings.IDEMPOTENCY_KEY_MIN_LENGTH,
                max_length=settings.IDEMPOTENCY_KEY_MAX_LENGTH,
            )
            scope = policy.resolve_scope(request)
            if scope is None:
                return None
            try:
                fingerprint = policy.resolve_fingerprint(request)
            except RequestDataTooBig as exc:
                raise RequestTooLarge from exc
            return self._claim(request, scope, hash_key(scope, key), fingerprint)
        except IdempotencyError as error:
            return problem(error)

    def _claim(
        self, request: HttpRequest, scope: str, key_hash: str, fingerprint: str
    ) -> HttpResponse | Flight | None:
        policy = self.policy
        lease = timedelta(seconds=_pick(policy.lease, settings.IDEMPOTENCY_LEASE))
        ttl = timedelta(seconds=_pick(policy.ttl, settings.IDEMPOTENCY_TTL))
        wait = float(_pick(policy.wait, settings.IDEMPOTENCY_WAIT))
        deadline = time.monotonic() + wait
        sender = type(self.storage)
        info = {"request": request, "scope": scope, "key_hash": key_hash}
        while True:
            try:
                claim = self.storage.claim(
                    scope, key_hash, fingerprint, now=self.clock(), lease=lease, ttl=ttl
                )
            except StoreError as exc:
                signals.store_error.send(sender=sender, error=exc, stage="claim", **info)
                if settings.IDEMPOTENCY_FAIL_OPEN:
                    logger.error(
                        "Idempotency store unavailable (%s); IDEMPOTENCY_FAIL_OPEN runs the view "
                        "WITHOUT protection for key %s",
                        exc,
                        key_hash[:12],
                    )
                    return None
                logger.error("Idempotency store unavailable at claim: %s", exc)
                raise StoreUnavailable(retry_after=settings.IDEMPOTENCY_RETRY_AFTER) from exc
            if claim.token is not None:
                if claim.reclaimed:
                    logger.warning("Reclaimed key %s after its lease ended", key_hash[:12])
                    signals.lease_reclaimed.send(sender=sender, **info)
                signals.key_claimed.send(sender=sender, **info)
                return Flight(self, request, scope, key_hash, claim.token)
            record = claim.record
            assert record is not None  # noqa: S101 - a lost claim always carries the record
            if record.fingerprint != fingerprint:
                signals.fingerprint_mismatch.send(sender=sender, **info)
                raise KeyReused
            if record.state is State.IN_FLIGHT:
                if time.monotonic() < deadline:
                    time.sleep(WAIT_POLL_SECONDS)
                    continue
                signals.request_conflict.send(sender=sender, **info)
                raise RequestInProgress(retry_after=self._retry_after(record))
            return self._replay(request, record, info)

    def _retry_after(self, record: Record) -> int:
        remaining = (record.lease_expires_at - self.clock()).total_seconds()
        return max(1, min(settings.IDEMPOTENCY_RETRY_AFTER, math.ceil(remaining)))

    def _replay(self, request: HttpRequest, record: Record, info: dict[str, Any]) -> HttpResponse:
        if record.response is None:
            raise ResultUnavailable
        signals.response_replayed.send(sender=type(self.storage), **info)
        response = replay(record.response)
        hook = self.policy.replay_headers
        if hook is not None:
            add_headers(response, hook(request, response) or {})
        return response


class _Rollback(Exception):
    """Raised into the store's transaction to roll the view's writes back."""


class Flight:
    """A request that owns its key, from just before its view runs to the stored result."""

    def __init__(
        self, engine: Idempotency, request: HttpRequest, scope: str, key_hash: str, token: str
    ) -> None:
        self.engine = engine
        self.request = request
        self.scope = scope
        self.key_hash = key_hash
        self.token = token
        self._stack = contextlib.ExitStack()
        self._in_transaction = False

    @property
    def _info(self) -> dict[str, Any]:
        return {"request": self.request, "scope": self.scope, "key_hash": self.key_hash}

    def enter(self, *, atomic: bool = True) -> None:
        """Open the store's transaction around the view, when the store and policy allow it."""
        storage = self.engine.storage
        policy_atomic = _pick(self.engine.policy.atomic, settings.IDEMPOTENCY_ATOMIC)
        if atomic and policy_atomic and storage.transactional:
            self._stack.enter_context(storage.atomic())
            self._in_transaction = True

    def _close(self, *, commit: bool) -> None:
        self._in_transaction = False
        if commit:
            self._stack.close()
        else:
            self._rollback(_Rollback, _Rollback(), None)

    def _rollback(
        self,
        exc_type: type[BaseException],
        exc: BaseException,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._stack.__exit__(exc_type, exc, tb)
        except Exception as error:
            # The rollback itself failed: the connection is gone, and the database discards the
            # transaction with it. Nothing was committed, which is what a rollback is for.
            logger.error("Rollback failed for key %s: %r", self.key_hash[:12], error)

    def finish(self, response: HttpResponseBase) -> HttpResponseBase:
        """Store ``response`` if it is final, else roll back and release. Returns what to send."""
        policy = self.engine.policy
        storage = self.engine.storage
        if not policy.is_final(response.status_code):
            self._close(commit=False)
            self._release()
            return response
        ensure_rendered(response)
        stored = capture(response, max_size=settings.IDEMPOTENCY_MAX_RESPONSE_SIZE)
        sender = type(storage)
        try:
            owned = storage.complete(
                self.scope, self.key_hash, self.token, stored, now=self.engine.clock()
            )
        except StoreError as exc:
            signals.store_error.send(sender=sender, error=exc, stage="complete", **self._info)
            logger.error("Could not store the result for key %s: %s", self.key_hash[:12], exc)
            if self._in_transaction:
                # The view's writes share the failed transaction: keep them out with the result,
                # and free the key if the store answers again, so the retry need not wait.
                self._close(commit=False)
                self._release()
                return problem(StoreUnavailable(retry_after=settings.IDEMPOTENCY_RETRY_AFTER))
            return response
        if not owned:
            logger.warning(
                "Lease of key %s was taken over before its result was stored", self.key_hash[:12]
            )
            if self._in_transaction:
                self._close(commit=False)
                return problem(RequestInProgress(retry_after=settings.IDEMPOTENCY_RETRY_AFTER))
            return response
        try:
            self._close(commit=True)
        except Exception as exc:
            if self._stored():
                # The commit went through; a transaction.on_commit() callback raised after it.
                # The result is stored and will replay, so the client gets it now as well.
                logger.exception(
                    "An on_commit callback failed after key %s was stored", self.key_hash[:12]
                )
                return response
            logger.error("Commit failed for key %s: %s", self.key_hash[:12], exc)
            signals.store_error.send(sender=sender, error=exc, stage="complete", **self._info)
            self._release()
            return problem(StoreUnavailable(retry_after=settings.IDEMPOTENCY_RETRY_AFTER))
        return response

    def _stored(self) -> bool:
        try:
            record = self.engine.storage.get(self.scope, self.key_hash)
        except StoreError:
            return False
        return record is not None and record.state is not State.IN_FLIGHT

    def fail(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        """The view raised: roll back its writes and release the key, so a retry runs once.

        ``SystemExit``, ``KeyboardInterrupt`` and ``asyncio.CancelledError`` are not the view's
        verdict but its worker being stopped (a timeout, a deploy, a client gone): whatever the
        view did outside the database may have happened, so the key is kept until its lease ends.
        """
        self._in_transaction = False
        self._rollback(exc_type or _Rollback, exc or _Rollback(), tb)
        if exc is not None and not isinstance(exc, Exception):
            logger.warning(
                "Request for key %s was interrupted (%s); the key stays claimed until its lease "
                "ends",
                self.key_hash[:12],
                type(exc).__name__,
            )
            return
        self._release()

    def _release(self) -> None:
        storage = self.engine.storage
        try:
            storage.release(self.scope, self.key_hash, self.token)
        except StoreError as exc:
            # The lease still ends on its own; a retry then reclaims the key.
            logger.error("Could not release key %s: %s", self.key_hash[:12], exc)
            signals.store_error.send(sender=type(storage), error=exc, stage="release", **self._info)
            return
        signals.claim_released.send(sender=type(storage), **self._info)
