"""``@idempotent_function``: once-only work that no HTTP client retries.

A function that charges a card or sends an email from a management command, a signal handler or
a task queue gets the same guarantee as a view, from the same engine: the key is claimed with one
atomic store operation, the lease is renewed by the heartbeat while the body runs, the result is
stored fenced by the owner token, and a later call with the key gets the stored result instead of
running again. The result is stored as the record's body, JSON with a marker content type, so
records of functions and of views share one format, one purge and one admin.

How a call ends, mirroring a request's outcomes:

* the key is free: the body runs; its JSON-serialisable result is stored and returned;
* the key holds a result: that result is returned and the body does not run;
* another call holds the key: :class:`~django_idempotency.exceptions.AlreadyInProgress` with
  ``retry_after``, or after waiting up to ``wait`` seconds, the stored result;
* the key was used with other arguments: :class:`~django_idempotency.exceptions.KeyReused`;
* the body raised: the key is released and the exception propagates, so the next call runs;
* the store is down: :class:`~django_idempotency.exceptions.StoreUnavailable` and the body does
  not run (unless ``IDEMPOTENCY_FAIL_OPEN``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from asgiref.sync import sync_to_async
from django.http import HttpResponse
from django.http.response import HttpResponseBase

from django_idempotency import core, signals
from django_idempotency.conf import settings
from django_idempotency.core import (
    WAIT_POLL_SECONDS,
    Flight,
    Idempotency,
    Policy,
    _retry_after,
    _send,
)
from django_idempotency.exceptions import (
    AlreadyInProgress,
    KeyReused,
    ResultUnavailable,
    StoreError,
    StoreUnavailable,
)
from django_idempotency.keys import hash_key, parse_key
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import BaseStorage, Record, State

F = TypeVar("F", bound=Callable[..., Any])

#: The content type of a stored function result, telling it apart from a view's response.
RESULT_CONTENT_TYPE = "application/vnd.django-idempotency.result+json"

KeyFunction = Callable[..., "str | None"]
ScopeFunction = Callable[..., str]
FingerprintFunction = Callable[..., str]


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no whitespace, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def arguments_fingerprint(signature: inspect.Signature, args: Any, kwargs: Any) -> str:
    """SHA-256 of the canonical JSON of the bound arguments, defaults applied.

    Binding first makes ``f(1)``, ``f(order_id=1)`` and ``f(1, retries=3)`` with a default of 3
    the same call, as they are to the function.
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    try:
        text = canonical_json(bound.arguments)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "idempotent_function fingerprints the arguments as JSON, and these are not JSON "
            f"({exc}); pass fingerprint=callable(*args, **kwargs) -> str"
        ) from exc
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class _Busy:
    """Another call holds the key; the caller waits or reports it."""

    storage: BaseStorage
    record: Record
    info: dict[str, Any]


@dataclass(frozen=True)
class _Stored:
    value: Any


class _Engine(Idempotency):
    """The engine's claim outcomes, as values and exceptions instead of HTTP answers.

    Signals and logging are the view engine's own (``request`` is ``None``), so counting hit
    rates covers functions without a second set of receivers.
    """

    def attempt(
        self, scope: str, key_hash: str, fingerprint: str
    ) -> Flight | _Stored | _Busy | None:
        storage = get_storage()
        info: dict[str, Any] = {"request": None, "scope": scope, "key_hash": key_hash}
        try:
            claim = storage.claim(
                scope,
                key_hash,
                fingerprint,
                now=core.now(),  # the engine's one clock, looked up on each call
                lease=self.policy.lease_delta,
                ttl=self.policy.ttl_delta,
            )
        except StoreError as exc:
            if self.store_unavailable(storage, exc, info) is None:
                return None  # IDEMPOTENCY_FAIL_OPEN: run without protection, as a view would
            raise StoreUnavailable(retry_after=_retry_after()) from exc
        if claim.token is not None:
            return self.claim_won(storage, claim, info)
        record = claim.record
        assert record is not None  # noqa: S101 - a lost claim always carries the record
        if record.fingerprint != fingerprint:
            self.key_reused(storage, info)
        if record.state is not State.IN_FLIGHT:
            return _Stored(self.replayed_value(storage, record, info))
        return _Busy(storage, record, info)

    def key_reused(self, storage: BaseStorage, info: dict[str, Any]) -> NoReturn:
        _send(signals.fingerprint_mismatch, type(storage), **info)
        raise KeyReused("This key was already used with different arguments.")

    def in_progress(self, storage: BaseStorage, record: Record, info: dict[str, Any]) -> NoReturn:
        _send(signals.request_conflict, type(storage), **info)
        remaining = (record.lease_expires_at - core.now()).total_seconds()
        raise AlreadyInProgress(retry_after=max(1, min(_retry_after(), math.ceil(remaining))))

    def replayed_value(self, storage: BaseStorage, record: Record, info: dict[str, Any]) -> Any:
        if record.response is None:
            raise ResultUnavailable(
                "A call with this key completed, but its result was too large to be stored."
            )
        _send(signals.response_replayed, type(storage), **info)
        return json.loads(record.response.body)


class OnceFunction:
    """One protected function: how its calls are keyed, scoped and fingerprinted.

    ``call`` separates the arguments that identify a call from the callable that runs the body,
    so that an integration can add arguments of its own (a Celery task's ``self``).
    """

    def __init__(
        self,
        name: str,
        signature: inspect.Signature,
        *,
        key: KeyFunction,
        scope: str | ScopeFunction | None,
        fingerprint: FingerprintFunction | None,
        policy: Policy,
    ) -> None:
        if not callable(key):
            raise TypeError("idempotent_function(key=...) takes a callable(*args, **kwargs) -> str")
        self.name = name
        self.signature = signature
        self.key = key
        self.scope = f"function:{name}" if scope is None else scope
        self.fingerprint = fingerprint
        self.engine = _Engine(policy)

    # Before the body.

    def identify(self, args: Any, kwargs: Any) -> tuple[str, str, str] | None:
        """(scope, key hash, fingerprint) of a call, or ``None`` when it is not protected."""
        raw = self.key(*args, **kwargs)
        if raw is None:
            return None
        if not isinstance(raw, str):
            raise TypeError(
                f"The key function of {self.name} returned {type(raw).__name__}, not str"
            )
        key = parse_key(
            raw,
            strict=False,
            min_length=settings.IDEMPOTENCY_KEY_MIN_LENGTH,
            max_length=settings.IDEMPOTENCY_KEY_MAX_LENGTH,
        )
        scope = self.scope if isinstance(self.scope, str) else self.scope(*args, **kwargs)
        if self.fingerprint is not None:
            fingerprint = self.fingerprint(*args, **kwargs)
        else:
            fingerprint = arguments_fingerprint(self.signature, args, kwargs)
        return scope, hash_key(scope, key), fingerprint

    def begin(self, args: Any, kwargs: Any) -> Flight | _Stored | None:
        identity = self.identify(args, kwargs)
        if identity is None:
            return None
        deadline = time.monotonic() + self.engine.policy.wait_seconds
        while True:
            outcome = self.engine.attempt(*identity)
            if not isinstance(outcome, _Busy):
                return outcome
            if time.monotonic() >= deadline:
                self.engine.in_progress(outcome.storage, outcome.record, outcome.info)
            time.sleep(WAIT_POLL_SECONDS)

    async def abegin(self, args: Any, kwargs: Any) -> Flight | _Stored | None:
        # The store is called on Django's thread for synchronous code (database connections
        # stay where Django closes them); waiting sleeps on the event loop, never on that thread.
        identity = self.identify(args, kwargs)
        if identity is None:
            return None
        deadline = time.monotonic() + self.engine.policy.wait_seconds
        while True:
            outcome = await sync_to_async(self.engine.attempt)(*identity)
            if not isinstance(outcome, _Busy):
                return outcome
            if time.monotonic() >= deadline:
                await sync_to_async(self.engine.in_progress)(
                    outcome.storage, outcome.record, outcome.info
                )
            await asyncio.sleep(WAIT_POLL_SECONDS)

    # After the body.

    def encode(self, flight: Flight, value: Any) -> HttpResponse:
        try:
            body = canonical_json(value)
        except (TypeError, ValueError) as exc:
            flight.fail(*sys.exc_info())
            raise TypeError(
                f"{self.name} returned a value that cannot be stored as JSON ({exc}); nothing was "
                "stored and the key was released. Return JSON data (dict, list, str, int, float, "
                "bool, None), e.g. an id instead of a model instance."
            ) from exc
        return HttpResponse(body, status=200, content_type=RESULT_CONTENT_TYPE)

    def finish(self, flight: Flight, result: HttpResponse) -> Any:
        """Store the result; every caller, this one included, gets its JSON round trip."""
        answer = flight.finish(result)
        if answer is not result:
            raise _as_exception(answer)
        return json.loads(result.content)

    def call(self, args: Any, kwargs: Any, run: Callable[[], Any]) -> Any:
        outcome = self.begin(args, kwargs)
        if outcome is None:
            return run()
        if isinstance(outcome, _Stored):
            return outcome.value
        outcome.enter()
        try:
            value = run()
        except BaseException:
            outcome.fail(*sys.exc_info())
            raise
        return self.finish(outcome, self.encode(outcome, value))

    async def acall(self, args: Any, kwargs: Any, run: Callable[[], Awaitable[Any]]) -> Any:
        outcome = await self.abegin(args, kwargs)
        if outcome is None:
            return await run()
        if isinstance(outcome, _Stored):
            return outcome.value
        # A coroutine cannot share the ORM store's synchronous transaction (as for async views).
        outcome.enter(atomic=False)
        try:
            value = await run()
        except BaseException:
            await sync_to_async(outcome.fail)(*sys.exc_info())
            raise
        response = await sync_to_async(self.encode)(outcome, value)
        return await sync_to_async(self.finish)(outcome, response)


def _as_exception(answer: HttpResponseBase) -> Exception:
    """The engine settled the flight with a problem instead of storing the result."""
    retry_after = int(answer.get("Retry-After", "1"))
    if answer.status_code == 409:
        # The lease was taken over while the body ran; its writes were rolled back.
        return AlreadyInProgress(retry_after=retry_after)
    return StoreUnavailable(retry_after=retry_after)


def idempotent_function(
    *,
    key: KeyFunction,
    scope: str | ScopeFunction | None = None,
    ttl: int | None = None,
    lease: int | None = None,
    wait: float | None = None,
    fingerprint: FingerprintFunction | None = None,
    atomic: bool | None = None,
) -> Callable[[F], F]:
    """Run the decorated function once per key; later calls return its stored result.

    ``key`` and ``fingerprint`` are called with the function's own arguments; ``key`` returning
    ``None`` runs the call unprotected. ``scope`` (a string or a callable of the arguments)
    defaults to the function's dotted name. ``ttl``, ``lease``, ``wait`` and ``atomic`` follow
    their ``IDEMPOTENCY_*`` settings when left ``None``.
    """
    policy = Policy(ttl=ttl, lease=lease, wait=wait, atomic=atomic)

    def decorate(func: F) -> F:
        once = OnceFunction(
            f"{func.__module__}.{func.__qualname__}",
            inspect.signature(func),
            key=key,
            scope=scope,
            fingerprint=fingerprint,
            policy=policy,
        )
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await once.acall(args, kwargs, lambda: func(*args, **kwargs))

            wrapper: Any = async_wrapper
        else:

            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                return once.call(args, kwargs, lambda: func(*args, **kwargs))

            wrapper = sync_wrapper
        wrapper.idempotency = once
        return wrapper  # type: ignore[no-any-return]

    return decorate
