"""The idempotency engine, shared by every entry point.

A protected request goes through three steps, and every integration calls exactly these, so
their behaviour cannot drift apart:

1. :meth:`Idempotency.begin` reads the key, resolves the scope and fingerprint, and claims the
   key with one atomic store operation. It answers at once (replay, 4xx, 409, 503) or returns a
   :class:`Flight` that owns the key.
2. :meth:`Flight.enter` opens the view's transaction and starts renewing the lease; the view
   runs.
3. :meth:`Flight.finish` stores a final response, or rolls back and releases the key for
   anything a retry should run again; :meth:`Flight.fail` does the latter when the view raised.

The engine is built once per view (class or decorated function) and holds no per-request state;
settings stay live through ``django_idempotency.conf``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypedDict, TypeVar

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestDataTooBig, SynchronousOnlyOperation
from django.db import transaction
from django.dispatch import Signal
from django.http import HttpResponse
from django.http.request import RawPostDataException
from django.http.response import HttpResponseBase
from django.utils.module_loading import import_string

from django_idempotency import signals
from django_idempotency.conf import settings
from django_idempotency.exceptions import (
    BodyUnavailable,
    IdempotencyError,
    KeyMissing,
    KeyReused,
    RequestInProgress,
    RequestTooLarge,
    ResultUnavailable,
    StoreError,
    StoreUnavailable,
)
from django_idempotency.heartbeat import heartbeat
from django_idempotency.keys import check_derived_key, hash_key, meta_name, parse_key
from django_idempotency.responses import add_headers, capture, ensure_rendered, problem, replay
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import BaseStorage, Claim, Record, State, StoredResponse

if TYPE_CHECKING:
    from typing_extensions import NotRequired

logger = logging.getLogger("django_idempotency")

#: 4xx answers that describe the moment, not the request: a retry may well succeed.
TRANSIENT_CLIENT_ERRORS = frozenset({401, 403, 408, 409, 425, 429})

# How often a waiting duplicate looks at the record again.
WAIT_POLL_SECONDS = 0.05

# Set on the Django request once an entry point has taken charge of it, so that a request is
# never claimed twice (a decorated action inside a viewset that uses the mixin, a view that the
# middleware also covers).
HANDLED_ATTR = "_idempotency_handled"

# Hooks receive a Django HttpRequest, or a DRF Request (which proxies one) from the integrations.
KeyReader = Callable[[Any], "str | None"]
ScopeResolver = Callable[[Any], "str | None"]
Fingerprinter = Callable[[Any], str]
ReplayHook = Callable[[Any, HttpResponse], "Mapping[str, str] | None"]


_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T")

#: Called with (operation, seconds) after every store call ("claim", "complete", "release",
#: "renew"), whether it returned or raised. ``None`` unless a metrics exporter set it
#: (``django_idempotency.contrib.prometheus``), so that projects without one time nothing.
store_timer: Callable[[str, float], None] | None = None


def _timed(operation: str, call: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    timer = store_timer
    if timer is None:
        return call(*args, **kwargs)
    started = time.perf_counter()
    try:
        return call(*args, **kwargs)
    finally:
        timer(operation, time.perf_counter() - started)


async def _atimed(operation: str, call: Awaitable[_T]) -> _T:
    timer = store_timer
    if timer is None:
        return await call
    started = time.perf_counter()
    try:
        return await call
    finally:
        timer(operation, time.perf_counter() - started)


def now() -> datetime:
    """The engine's clock, and the one way to move it: tests replace this function.

    What ``django.utils.timezone.now()`` answers, with ``USE_TZ`` read from this package's
    settings, which keep it between changes: a fresh request reads the clock four times.
    """
    return datetime.now(timezone.utc if settings.USE_TZ else None)


@functools.cache
def _imported(path: str) -> Any:
    # Settings name hooks by dotted path; a path is imported once, and a changed setting is a
    # new path, so the cache never serves a stale hook.
    return import_string(path)


class PolicyOptions(TypedDict):
    """The keyword options of ``@idempotent``: exactly the fields of :class:`Policy`."""

    required: NotRequired[bool | None]
    methods: NotRequired[Iterable[str] | None]
    ttl: NotRequired[int | None]
    lease: NotRequired[int | None]
    store_server_errors: NotRequired[bool | None]
    atomic: NotRequired[bool | None]
    wait: NotRequired[float | None]
    key: NotRequired[KeyReader | None]
    scope: NotRequired[ScopeResolver | None]
    fingerprint: NotRequired[Fingerprinter | None]
    replay_headers: NotRequired[ReplayHook | None]


@dataclass(frozen=True)
class Policy:
    """How one view is protected: the one list of options, and where each resolves.

    A field left ``None`` follows its setting, read when the request runs, so
    ``override_settings`` and changed settings apply to views built long before.
    """

    #: Answer 400 when the key is missing (``IDEMPOTENCY_REQUIRED``).
    required: bool | None = None
    #: Protected methods (``IDEMPOTENCY_METHODS``), e.g. ``("POST", "PATCH", "PUT")``.
    methods: Iterable[str] | None = None
    #: Seconds a result is replayed (``IDEMPOTENCY_TTL``).
    ttl: int | None = None
    #: Seconds a claim survives its worker (``IDEMPOTENCY_LEASE``).
    lease: int | None = None
    #: Store 5xx answers like Stripe (``IDEMPOTENCY_STORE_SERVER_ERRORS``).
    store_server_errors: bool | None = None
    #: Run the view in a transaction that the result commits with (``IDEMPOTENCY_ATOMIC``).
    atomic: bool | None = None
    #: Seconds a duplicate waits for the original (``IDEMPOTENCY_WAIT``).
    wait: float | None = None
    #: Derive the key on the server (a webhook's event id) instead of reading the header.
    key: KeyReader | None = None
    #: Whose key it is (``IDEMPOTENCY_SCOPE_RESOLVER``); ``None`` from it skips protection.
    scope: ScopeResolver | None = None
    #: What makes a retry the same request (``IDEMPOTENCY_FINGERPRINT``).
    fingerprint: Fingerprinter | None = None
    #: Extra headers for a replay; never its status or body.
    replay_headers: ReplayHook | None = None

    _methods: frozenset[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        methods = None if self.methods is None else frozenset(m.upper() for m in self.methods)
        object.__setattr__(self, "_methods", methods)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.init)

    def protects(self, method: str | None) -> bool:
        methods = self._methods if self._methods is not None else settings.IDEMPOTENCY_METHODS
        return method in methods

    @property
    def is_required(self) -> bool:
        return settings.IDEMPOTENCY_REQUIRED if self.required is None else self.required

    @property
    def ttl_delta(self) -> timedelta:
        return timedelta(seconds=settings.IDEMPOTENCY_TTL if self.ttl is None else self.ttl)

    @property
    def lease_delta(self) -> timedelta:
        return timedelta(seconds=settings.IDEMPOTENCY_LEASE if self.lease is None else self.lease)

    @property
    def wait_seconds(self) -> float:
        return float(settings.IDEMPOTENCY_WAIT if self.wait is None else self.wait)

    @property
    def is_atomic(self) -> bool:
        return settings.IDEMPOTENCY_ATOMIC if self.atomic is None else self.atomic

    def is_final(self, status: int) -> bool:
        if status >= 500:
            store = self.store_server_errors
            return settings.IDEMPOTENCY_STORE_SERVER_ERRORS if store is None else store
        return status not in TRANSIENT_CLIENT_ERRORS

    def read_key(self, request: Any) -> str | None:
        """The request's key, validated; ``None`` when it has none."""
        if self.key is not None:
            derived = self.key(request)
            if derived is None:
                return None
            if isinstance(derived, int) and not isinstance(derived, bool):
                derived = str(derived)  # numeric event ids
            if not isinstance(derived, str):
                raise TypeError(
                    f"The idempotency key function returned {type(derived).__name__}; "
                    "return a str (or None to leave the request unprotected)."
                )
            return check_derived_key(
                derived,
                min_length=settings.IDEMPOTENCY_KEY_MIN_LENGTH,
                max_length=settings.IDEMPOTENCY_KEY_MAX_LENGTH,
            )
        raw = request.META.get(meta_name(settings.IDEMPOTENCY_HEADER))
        if raw is None:
            if self.is_required:
                raise KeyMissing
            return None
        return parse_key(
            raw,
            strict=settings.IDEMPOTENCY_STRICT_KEY_FORMAT,
            min_length=settings.IDEMPOTENCY_KEY_MIN_LENGTH,
            max_length=settings.IDEMPOTENCY_KEY_MAX_LENGTH,
        )

    def resolve_scope(self, request: Any) -> str | None:
        resolver = self.scope or _imported(settings.IDEMPOTENCY_SCOPE_RESOLVER)
        return resolver(request)

    def resolve_fingerprint(self, request: Any) -> str:
        fingerprinter = self.fingerprint or _imported(settings.IDEMPOTENCY_FINGERPRINT)
        try:
            return fingerprinter(request)
        except RequestDataTooBig as exc:
            raise RequestTooLarge from exc
        except RawPostDataException as exc:
            # Code ahead of the layer read the stream itself (request.read(), not request.body):
            # without the bytes a retry cannot be told from another request, so nothing runs.
            logger.error(
                "The body of %s %s was read from its stream before the idempotency layer could "
                "fingerprint it; read request.body instead, or protect the view before that code",
                request.method,
                request.path,
            )
            raise BodyUnavailable from exc


def _send(signal: Signal, sender: type[BaseStorage], **kwargs: Any) -> None:
    # Building the keyword arguments and walking an empty receiver list is measurable on the
    # hot path; most projects connect nothing.
    if signal.receivers:
        signal.send(sender=sender, **kwargs)


_SIGNALS = tuple(value for value in vars(signals).values() if isinstance(value, Signal))


def _listened() -> bool:
    return any(signal.receivers for signal in _SIGNALS)


async def _off_loop(call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run a synchronous outcome step from async code: inline when no receiver is connected
    (it only builds a response), in a worker thread when one is (a receiver may use the ORM)."""
    if _listened():
        return await sync_to_async(call)(*args, **kwargs)
    return call(*args, **kwargs)


class _Wait(enum.Enum):
    """The claim is held by a request still running: look again after a pause."""

    WAIT = "wait"


WAIT = _Wait.WAIT


def _retry_after() -> int:
    return settings.IDEMPOTENCY_RETRY_AFTER


class Idempotency:
    """The engine for one policy; build it once per view."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def begin(self, request: Any) -> HttpResponse | Flight | None:
        """Decide what happens to ``request`` before its view runs.

        ``None``: not protected (safe method, no key on an optional view, skipped scope, a
        request another entry point already handles, or the store is down in fail-open mode):
        run the view as usual. An ``HttpResponse``: answer with it and do not run the view. A
        :class:`Flight`: this request owns the key.
        """
        if not self._applies(request):
            return None
        try:
            identity = self._identify(request)
        except IdempotencyError as error:
            return self.refused(request, error)
        if identity is None:
            return None
        return self._claim(request, *identity)

    async def abegin(self, request: Any) -> HttpResponse | Flight | None:
        """:meth:`begin` for an async view.

        On a store with a client on the running loop the claim is awaited there; on any other
        the whole step runs in one worker thread, as it would for Django's own ORM. The hooks
        are synchronous code: one that reaches the ORM, which Django refuses on an event loop
        (the default scope resolver does when the session's user is not loaded yet), is run
        again in a thread, which is why hooks must not have side effects.
        """
        if not get_storage().runs_on_loop():
            return await sync_to_async(self.begin)(request)
        if not self._applies(request):
            return None
        try:
            try:
                identity = self._identify(request)
            except SynchronousOnlyOperation:
                identity = await sync_to_async(self._identify)(request)
        except IdempotencyError as error:
            return await _off_loop(self.refused, request, error)
        if identity is None:
            return None
        return await self._aclaim(request, *identity)

    def _applies(self, request: Any) -> bool:
        if not self.policy.protects(request.method) or not settings.IDEMPOTENCY_ENABLED:
            return False
        return take_charge(request)

    def _identify(self, request: Any) -> tuple[str, str, str] | None:
        """The request's scope, key hash and fingerprint; ``None`` when it goes unprotected."""
        policy = self.policy
        key = policy.read_key(request)
        if key is None:
            return None
        scope = policy.resolve_scope(request)
        if scope is None:
            return None
        return scope, hash_key(scope, key), policy.resolve_fingerprint(request)

    def refused(self, request: Any, error: IdempotencyError) -> HttpResponse:
        if isinstance(error, KeyMissing):
            _send(signals.key_missing, type(get_storage()), request=request)
        return problem(error)

    def _claim(
        self, request: Any, scope: str, key_hash: str, fingerprint: str
    ) -> HttpResponse | Flight | None:
        storage = get_storage()
        info = {"request": request, "scope": scope, "key_hash": key_hash}
        deadline = time.monotonic() + self.policy.wait_seconds
        while True:
            try:
                claim = _timed(
                    "claim",
                    storage.claim,
                    scope,
                    key_hash,
                    fingerprint,
                    now=now(),
                    lease=self.policy.lease_delta,
                    ttl=self.policy.ttl_delta,
                )
            except StoreError as exc:
                return self.store_unavailable(storage, exc, info)
            outcome = self._decide(storage, claim, fingerprint, info, deadline)
            if outcome is not WAIT:
                return outcome
            time.sleep(WAIT_POLL_SECONDS)

    async def _aclaim(
        self, request: Any, scope: str, key_hash: str, fingerprint: str
    ) -> HttpResponse | Flight | None:
        storage = get_storage()
        info = {"request": request, "scope": scope, "key_hash": key_hash}
        deadline = time.monotonic() + self.policy.wait_seconds
        while True:
            try:
                claim = await _atimed(
                    "claim",
                    storage.aclaim(
                        scope,
                        key_hash,
                        fingerprint,
                        now=now(),
                        lease=self.policy.lease_delta,
                        ttl=self.policy.ttl_delta,
                    ),
                )
            except StoreError as exc:
                return await _off_loop(self.store_unavailable, storage, exc, info)
            if _listened() or self.policy.replay_headers is not None:
                # Receivers and the replay hook are synchronous code that may reach the ORM.
                outcome = await sync_to_async(self._decide)(
                    storage, claim, fingerprint, info, deadline
                )
            else:
                outcome = self._decide(storage, claim, fingerprint, info, deadline)
            if outcome is not WAIT:
                return outcome
            await asyncio.sleep(WAIT_POLL_SECONDS)

    def _decide(
        self,
        storage: BaseStorage,
        claim: Claim,
        fingerprint: str,
        info: dict[str, Any],
        deadline: float,
    ) -> HttpResponse | Flight | _Wait:
        if claim.token is not None:
            return self.claim_won(storage, claim, info)
        record = claim.record
        assert record is not None  # noqa: S101 - a lost claim always carries the record
        if record.fingerprint != fingerprint:
            return self.key_reused(storage, info)
        if record.state is not State.IN_FLIGHT:
            return self.replayed(storage, record, info)
        if time.monotonic() >= deadline:
            return self.in_progress(storage, record, info)
        return WAIT

    # The outcomes of a claim, one method each.

    def claim_won(self, storage: BaseStorage, claim: Claim, info: dict[str, Any]) -> Flight:
        assert claim.token is not None  # noqa: S101
        if claim.reclaimed:
            logger.warning("Reclaimed key %s after its lease ended", info["key_hash"][:12])
            _send(signals.lease_reclaimed, type(storage), **info)
        _send(signals.key_claimed, type(storage), **info)
        return Flight(self.policy, storage, claim.token, **info)

    def key_reused(self, storage: BaseStorage, info: dict[str, Any]) -> HttpResponse:
        _send(signals.fingerprint_mismatch, type(storage), **info)
        return problem(KeyReused())

    def in_progress(
        self, storage: BaseStorage, record: Record, info: dict[str, Any]
    ) -> HttpResponse:
        _send(signals.request_conflict, type(storage), **info)
        remaining = (record.lease_expires_at - now()).total_seconds()
        retry_after = max(1, min(_retry_after(), math.ceil(remaining)))
        return problem(RequestInProgress(retry_after=retry_after))

    def replayed(self, storage: BaseStorage, record: Record, info: dict[str, Any]) -> HttpResponse:
        if record.response is None:
            return problem(ResultUnavailable())
        _send(signals.response_replayed, type(storage), **info)
        response = replay(record.response)
        hook = self.policy.replay_headers
        if hook is not None:
            add_headers(response, hook(info["request"], response) or {})
        return response

    def store_unavailable(
        self, storage: BaseStorage, exc: StoreError, info: dict[str, Any]
    ) -> HttpResponse | None:
        _send(signals.store_error, type(storage), error=exc, stage="claim", **info)
        if settings.IDEMPOTENCY_FAIL_OPEN:
            logger.error(
                "Idempotency store unavailable (%s); IDEMPOTENCY_FAIL_OPEN runs the view "
                "WITHOUT protection for key %s",
                exc,
                info["key_hash"][:12],
            )
            return None
        logger.error("Idempotency store unavailable at claim: %s", exc)
        return problem(StoreUnavailable(retry_after=_retry_after()))


def take_charge(request: Any) -> bool:
    """Mark ``request`` as handled by an entry point; False when another one already is."""
    django_request = getattr(request, "_request", request)
    if getattr(django_request, HANDLED_ATTR, False):
        return False
    setattr(django_request, HANDLED_ATTR, True)
    return True


class _Rollback(Exception):
    """Raised into the view's transaction to roll its writes back."""


class Flight:
    """A request that owns its key, from just before its view runs to the settled key."""

    def __init__(
        self,
        policy: Policy,
        storage: BaseStorage,
        token: str,
        *,
        request: Any,
        scope: str,
        key_hash: str,
    ) -> None:
        self.policy = policy
        self.storage = storage
        self.token = token
        self.request = request
        self.scope = scope
        self.key_hash = key_hash
        self._transaction: contextlib.AbstractContextManager[Any] | None = None
        self._did_commit = False
        self._settled = False
        self._lease = policy.lease_delta
        self._claimed_at = now()
        self.renew_every = self._lease.total_seconds() / 3
        heartbeat.track(self)

    @property
    def _info(self) -> dict[str, Any]:
        return {"request": self.request, "scope": self.scope, "key_hash": self.key_hash}

    def enter(self, *, atomic: bool = True) -> None:
        """Open the view's transaction, when the policy and the view allow one.

        With the ORM store it is the store's own, so the result commits with the view's writes.
        With other stores it is a transaction on ``IDEMPOTENCY_DATABASE``, committed just before
        the result is stored: a worker killed mid-view then leaves no business row behind.
        """
        if not (atomic and self.policy.is_atomic):
            return
        block: contextlib.AbstractContextManager[Any]
        if self.storage.transactional:
            block = self.storage.atomic()
        else:
            block = transaction.atomic(using=settings.IDEMPOTENCY_DATABASE)
        block.__enter__()
        self._transaction = block
        # Registered before the view runs, so it is the first callback the commit runs.
        database = getattr(self.storage, "using", settings.IDEMPOTENCY_DATABASE)
        transaction.on_commit(self._mark_committed, using=database)

    def renew(self) -> bool:
        """Called by the heartbeat thread: move the lease forward while the view runs."""
        if self._settled:
            return False
        try:
            owned = self._renew_now()
        except StoreError as exc:
            logger.error("Could not renew the lease of key %s: %s", self.key_hash[:12], exc)
            _send(signals.store_error, type(self.storage), error=exc, stage="renew", **self._info)
            return True  # try again at the next beat; the lease has two more thirds
        if not owned:
            logger.warning("Lease of key %s was lost while its view ran", self.key_hash[:12])
        return owned

    def _renew_now(self) -> bool:
        return _timed(
            "renew",
            self.storage.renew,
            self.scope,
            self.key_hash,
            self.token,
            now=now(),
            lease=self._lease,
        )

    def finish(self, response: HttpResponseBase) -> HttpResponseBase:
        """Settle the key for ``response`` and return what to send."""
        if self._settled:
            return response
        if not self.policy.is_final(response.status_code):
            return self.not_final(response)
        try:
            ensure_rendered(response)
            stored = capture(response, max_size=settings.IDEMPOTENCY_MAX_RESPONSE_SIZE)
        except BaseException:
            # A response that cannot be rendered is the view failing: Django answers 500.
            self.fail(*sys.exc_info())
            raise
        if self.storage.transactional:
            return self._store_then_commit(response, stored)
        return self._commit_then_store(response, stored)

    async def afinish(self, response: HttpResponseBase) -> HttpResponseBase:
        """:meth:`finish` for an async view, which runs without the view's transaction."""
        if not self.storage.runs_on_loop():
            return await sync_to_async(self.finish)(response)
        if self._settled:
            return response
        if not self.policy.is_final(response.status_code):
            await self.arelease()
            return response
        try:
            if not getattr(response, "is_rendered", True):
                # A template may reach the ORM: Django's handler renders in a thread too.
                await sync_to_async(ensure_rendered)(response)
            stored = capture(response, max_size=settings.IDEMPOTENCY_MAX_RESPONSE_SIZE)
        except BaseException:
            await self.afail(*sys.exc_info())
            raise
        try:
            heartbeat.untrack(self)
            owned = await _atimed(
                "complete",
                self.storage.acomplete(
                    self.scope,
                    self.key_hash,
                    self.token,
                    stored,
                    now=now(),
                    min_retention=self._lease,
                ),
            )
        except StoreError as exc:
            return await _off_loop(self.store_failed, response, exc)
        if not owned:
            return self.lease_lost(response)
        return self.stored(response)

    def _store_then_commit(
        self, response: HttpResponseBase, stored: StoredResponse | None
    ) -> HttpResponseBase:
        try:
            owned = self._complete(stored)
        except StoreError as exc:
            if self._transaction is not None:
                # The view's writes share the failed transaction: keep them out with the
                # result, and free the key if the store answers again.
                return self.commit_failed(exc, stage="complete")
            return self.store_failed(response, exc)
        if not owned:
            return self.lease_lost(response)
        try:
            self._commit()
        except Exception as exc:
            return self.commit_failed(exc, stage="complete")
        return self.stored(response)

    def _commit_then_store(
        self, response: HttpResponseBase, stored: StoredResponse | None
    ) -> HttpResponseBase:
        if self._transaction is not None and now() - self._claimed_at >= self._lease / 3:
            # The view ran long enough for its lease to have needed the heartbeat: make sure the
            # claim is still ours before its writes become permanent. A fast view cannot have
            # lost a lease it holds for three times longer, and pays nothing for this.
            try:
                owned = self._renew_now()
            except StoreError as exc:
                return self.commit_failed(exc, stage="renew")
            if not owned:
                return self.lease_lost(response)
        try:
            self._commit()
        except Exception as exc:
            return self.commit_failed(exc, stage="commit")
        try:
            owned = self._complete(stored)
        except StoreError as exc:
            return self.store_failed(response, exc)
        if not owned:
            return self.lease_lost(response)
        return self.stored(response)

    def _complete(self, stored: StoredResponse | None) -> bool:
        heartbeat.untrack(self)
        return _timed(
            "complete",
            self.storage.complete,
            self.scope,
            self.key_hash,
            self.token,
            stored,
            now=now(),
            min_retention=self._lease,
        )

    # The outcomes of a flight, one method each; every one of them settles the key.

    def stored(self, response: HttpResponseBase) -> HttpResponseBase:
        self._settle()
        return response

    def not_final(self, response: HttpResponseBase) -> HttpResponseBase:
        """A 5xx or a transient 4xx: roll back and release, so a retry runs once."""
        self._rollback_view()
        self.release()
        return response

    def store_failed(self, response: HttpResponseBase, exc: Exception) -> HttpResponseBase:
        """The view's writes committed but the result could not be stored: send the real
        response and leave the lease to expire (the contract's "store fails after the view")."""
        self._settle()
        _send(signals.store_error, type(self.storage), error=exc, stage="complete", **self._info)
        logger.error("Could not store the result for key %s: %s", self.key_hash[:12], exc)
        return response

    def lease_lost(self, response: HttpResponseBase) -> HttpResponseBase:
        logger.warning(
            "Lease of key %s was taken over before its result was stored", self.key_hash[:12]
        )
        if self._transaction is not None:
            self._rollback_view()
            self._settle()
            return problem(RequestInProgress(retry_after=_retry_after()))
        self._settle()
        return response

    def commit_failed(self, exc: Exception, *, stage: str) -> HttpResponse:
        """Nothing of the view committed: free the key and tell the client to retry."""
        logger.error("Could not commit the result of key %s: %s", self.key_hash[:12], exc)
        _send(signals.store_error, type(self.storage), error=exc, stage=stage, **self._info)
        self._rollback_view()
        self.release()
        return problem(StoreUnavailable(retry_after=_retry_after()))

    def fail(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        """The view raised: roll back its writes and release the key, so a retry runs once.

        ``SystemExit``, ``KeyboardInterrupt`` and ``asyncio.CancelledError`` are not the view's
        verdict but its worker being stopped (a timeout, a deploy, a client gone): whatever the
        view did outside the database may have happened, so the key is kept until its lease
        ends. Calling it on a settled flight does nothing, so every entry point may call it from
        its last line of defence.
        """
        if self._unwind(exc_type, exc, tb):
            self.release()

    async def afail(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        """:meth:`fail` for an async view."""
        if not self.storage.runs_on_loop():
            await sync_to_async(self.fail)(exc_type, exc, tb)
        elif self._unwind(exc_type, exc, tb):
            await self.arelease()

    def _unwind(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Roll the view back; whether the key should then be released."""
        if self._settled:
            return False
        self._rollback(exc_type or _Rollback, exc or _Rollback(), tb)
        if exc is not None and not isinstance(exc, Exception):
            logger.warning(
                "Request for key %s was interrupted (%s); the key stays claimed until its lease "
                "ends",
                self.key_hash[:12],
                type(exc).__name__,
            )
            self._settle()
            return False
        return True

    def release(self) -> None:
        self._settle()
        try:
            _timed("release", self.storage.release, self.scope, self.key_hash, self.token)
        except StoreError as exc:
            self.release_failed(exc)
            return
        _send(signals.claim_released, type(self.storage), **self._info)

    async def arelease(self) -> None:
        self._settle()
        try:
            await _atimed("release", self.storage.arelease(self.scope, self.key_hash, self.token))
        except StoreError as exc:
            await _off_loop(self.release_failed, exc)
            return
        await _off_loop(_send, signals.claim_released, type(self.storage), **self._info)

    def release_failed(self, exc: StoreError) -> None:
        # The lease still ends on its own; a retry then reclaims the key.
        logger.error("Could not release key %s: %s", self.key_hash[:12], exc)
        _send(signals.store_error, type(self.storage), error=exc, stage="release", **self._info)

    # Plumbing.

    def _settle(self) -> None:
        self._settled = True
        heartbeat.untrack(self)

    def _commit(self) -> None:
        """Commit the view's transaction; raises only when the commit itself failed.

        Django runs ``on_commit`` callbacks right after the commit, and one that raises
        surfaces from the same call. The marker :meth:`enter` registered first tells the two
        apart: once it ran, the view's writes are in, and so is a result stored with them.
        """
        block, self._transaction = self._transaction, None
        if block is None:
            return
        try:
            block.__exit__(None, None, None)
        except Exception:
            if not self._did_commit:
                raise
            logger.exception(
                "An on_commit callback failed after key %s committed", self.key_hash[:12]
            )

    def _mark_committed(self) -> None:
        self._did_commit = True

    def _rollback_view(self) -> None:
        block, self._transaction = self._transaction, None
        if block is not None:
            _exit_quietly(block, _Rollback, _Rollback(), None, self.key_hash)

    def _rollback(
        self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        block, self._transaction = self._transaction, None
        if block is not None:
            _exit_quietly(block, exc_type, exc, tb, self.key_hash)


def _exit_quietly(
    block: contextlib.AbstractContextManager[Any],
    exc_type: type[BaseException],
    exc: BaseException,
    tb: TracebackType | None,
    key_hash: str,
) -> None:
    try:
        block.__exit__(exc_type, exc, tb)
    except BaseException as error:
        if error is exc:
            return  # the block re-raised what it was given: rolled back
        # The rollback itself failed: the connection is gone, and the database discards the
        # transaction with it. Nothing was committed, which is what a rollback is for.
        logger.error("Rollback failed for key %s: %r", key_hash[:12], error)
