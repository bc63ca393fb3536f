"""Python clients that follow the client rules: one key per call, the same key on every retry.

``IdempotentSession`` is a ``requests.Session``; ``IdempotentTransport`` plugs into
``httpx.Client`` and ``httpx.AsyncClient``. Both take their decisions from one
``RetryPolicy`` and one ``_Attempts`` counter, so they retry the same answers after the same
waits: a client library must not be the reason a payment runs twice or a 422 is retried.

Neither library is a dependency of the package (``pip install "django-idempotency[client]"``);
this module imports what is installed, and nothing else in the package imports this module.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn

try:
    import requests
    from requests.structures import CaseInsensitiveDict
except ImportError:  # pragma: no cover - exercised only without the client extra
    HAS_REQUESTS = False
else:
    HAS_REQUESTS = True

try:
    import httpx
except ImportError:  # pragma: no cover - exercised only without the client extra
    HAS_HTTPX = False
else:
    HAS_HTTPX = True

__all__ = [
    "DEFAULT_RETRY_STATUSES",
    "IdempotentResult",
    "IdempotentSession",
    "IdempotentTransport",
    "RetryPolicy",
    "idempotent_result",
    "parse_retry_after",
]

#: Answers that say "not done, try again": nothing was stored for the key, so a retry with the
#: same key runs the request at most once more (docs/clients.md, "Retrying").
DEFAULT_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Methods that get a key unless the caller asks for more; PUT and DELETE are idempotent by
#: definition (RFC 9110 §9.2.2), so servers protect them only where asked.
DEFAULT_METHODS = frozenset({"POST", "PATCH"})
HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
IN_PROGRESS = "idempotency-request-in-progress"
_EXTENSION = "idempotency"


@dataclass(frozen=True)
class RetryPolicy:
    """Which answers are retried, and for how long. Shared by every client in this module.

    Waits use exponential backoff with full jitter: before retry *n* the client sleeps a random
    time between 0 and ``min(max_backoff, backoff * 2 ** (n - 1))`` seconds, so that clients
    that failed together do not retry together. A ``Retry-After`` header (seconds or an HTTP
    date) is a floor under that wait. ``deadline`` bounds the whole call, waits included: no
    attempt starts, and no attempt's timeout reaches, past it.
    """

    #: Attempts in all, the first one included.
    max_attempts: int = 5
    #: Upper bound of the first retry's random wait, in seconds; it doubles per retry.
    backoff: float = 0.5
    max_backoff: float = 30.0
    #: Seconds for the whole call, waits included; ``None`` for no bound but ``max_attempts``.
    deadline: float | None = 60.0
    #: A ``Retry-After`` longer than this ends the retries: the caller gets that answer.
    max_retry_after: float = 60.0
    #: Statuses retried with the same key; 409 is retried only as ``IN_PROGRESS``.
    retry_statuses: frozenset[int] = field(default=DEFAULT_RETRY_STATUSES)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff, max_backoff and max_retry_after cannot be negative")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError("deadline must be positive, or None")
        if 422 in self.retry_statuses or 400 in self.retry_statuses:
            # A reused or malformed key stays reused or malformed: retrying cannot help.
            raise ValueError("400 and 422 are final answers and are never retried")

    def backoff_delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """The random wait before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return float(rng() * ceiling)

    def should_retry(self, status: int, content_type: str, body: Callable[[], bytes]) -> bool:
        """Whether an answer means "try again with the same key".

        ``body`` is called only for a 409, the one status whose meaning is in its problem type:
        ``idempotency-request-in-progress`` is retried, ``idempotency-result-unavailable`` and
        a view's own 409 are final.
        """
        if status == 409:
            return is_in_progress(content_type, body())
        return status in self.retry_statuses


def is_in_progress(content_type: str, body: bytes) -> bool:
    if content_type.split(";")[0].strip().lower() != "application/problem+json":
        return False
    try:
        problem = json.loads(body)
    except ValueError:
        return False
    return isinstance(problem, dict) and str(problem.get("type", "")).endswith(IN_PROGRESS)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 §10.2.3), or None if unusable.

    The value is either non-negative integer seconds or an HTTP date; a date in the past means
    "now" (0 seconds).
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000" dates parse naive; HTTP dates are always GMT
        moment = moment.replace(tzinfo=timezone.utc)
    current = now or datetime.now(timezone.utc)
    return max(0.0, (moment - current).total_seconds())


def new_key() -> str:
    """A random (version 4) UUID: unguessable, and unique without coordination."""
    return str(uuid.uuid4())


def format_key(key: str) -> str:
    """The key as a structured-field string (``"key"``), which strict servers require too."""
    if not key or not all(" " <= char <= "~" for char in key):
        raise ValueError("an idempotency key is 1 or more printable ASCII characters")
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


@dataclass(frozen=True)
class IdempotentResult:
    """What one idempotent call took: read it with :func:`idempotent_result`."""

    #: The key every attempt carried (unquoted).
    key: str
    #: Attempts made, the first one included: 1 when the first answer was final.
    attempts: int
    #: True when the final answer carried ``Idempotent-Replayed: true``: an earlier attempt
    #: ran the request (its answer was lost) and this is its stored response.
    replayed: bool


def idempotent_result(response: object) -> IdempotentResult:
    """The :class:`IdempotentResult` of a response from ``IdempotentSession`` or
    ``IdempotentTransport`` (requests or httpx, the same call).

    Raises ``LookupError`` for a response that no idempotent call produced (a ``GET``, or a
    method the client was not asked to protect).
    """
    extensions = getattr(response, "extensions", None)
    if isinstance(extensions, Mapping):
        result = extensions.get(_EXTENSION)
    else:
        result = getattr(response, "idempotency", None)
    if not isinstance(result, IdempotentResult):
        raise LookupError("this response did not come from an idempotent call")
    return result


class _Attempts:
    """The retry loop's state for one logical call; both clients drive it the same way."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.rng = rng
        self.count = 0
        self.started = clock()

    def begin(self) -> None:
        self.count += 1

    def remaining(self) -> float | None:
        if self.policy.deadline is None:
            return None
        return max(0.0, self.policy.deadline - (self.clock() - self.started))

    def timeout(self, requested: float | None) -> float | None:
        """An attempt's timeout: the caller's, cut so that it ends by the deadline."""
        remaining = self.remaining()
        if remaining is None:
            return requested
        # A zero timeout means "no wait at all" to some libraries: keep a sliver.
        remaining = max(remaining, 0.001)
        return remaining if requested is None else min(requested, remaining)

    def wait(self, retry_after: float | None) -> float | None:
        """Seconds to sleep before the next attempt, or None when the call must stop here."""
        if self.count >= self.policy.max_attempts:
            return None
        if retry_after is not None and retry_after > self.policy.max_retry_after:
            return None
        delay = self.policy.backoff_delay(self.count, self.rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        return delay


def _missing(library: str) -> NoReturn:
    raise ImportError(
        f"this client needs {library}: pip install 'django-idempotency[client]' "
        f"(or pip install {library})"
    )


if HAS_REQUESTS or TYPE_CHECKING:
    #: Failures after which the outcome is unknown or nothing was sent: retried with the key.
    #: TLS errors are left out: a certificate that failed once fails again.
    _REQUESTS_RETRIED: tuple[type[Exception], ...] = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
    )

    class IdempotentSession(requests.Session):
        """A ``requests.Session`` whose unsafe calls carry a key and retry with that key.

        ``post`` and ``patch`` (``methods``, default ``{"POST", "PATCH"}``; add ``"PUT"`` or
        ``"DELETE"`` when the server protects them) send ``Idempotency-Key`` with a fresh UUID4
        per call, or the caller's ``idempotency_key=``; a call of any method that passes
        ``idempotency_key=`` (or its own ``Idempotency-Key`` header) is protected too. The body
        is prepared once, so every attempt sends the same bytes. Read what the call took with
        :func:`idempotent_result`.

        When the retries run out, the last answer is returned, or the last connection error
        raised. To retry such a call later, or after a restart, generate the key yourself,
        store it with the pending operation, and pass it as ``idempotency_key=``.
        """

        def __init__(
            self,
            *,
            policy: RetryPolicy | None = None,
            methods: Collection[str] = DEFAULT_METHODS,
            header: str = HEADER,
            sleep: Callable[[float], None] = time.sleep,
        ) -> None:
            super().__init__()
            self.policy = policy or RetryPolicy()
            self.idempotent_methods = frozenset(m.upper() for m in methods)
            self.idempotency_header = header
            self._sleep = sleep

        def request(
            self,
            method: str | bytes,
            url: str | bytes,
            params: Any = None,
            data: Any = None,
            headers: Any = None,
            cookies: Any = None,
            files: Any = None,
            auth: Any = None,
            timeout: Any = None,
            allow_redirects: bool = True,
            proxies: Any = None,
            hooks: Any = None,
            stream: bool | None = None,
            verify: Any = None,
            cert: Any = None,
            json: Any = None,
            *,
            idempotency_key: str | None = None,
        ) -> requests.Response:
            verb = (method.decode() if isinstance(method, bytes) else method).upper()
            merged: CaseInsensitiveDict[Any] = CaseInsensitiveDict(headers or {})
            given = merged.get(self.idempotency_header)
            if verb not in self.idempotent_methods and idempotency_key is None and given is None:
                return super().request(
                    verb, url, params, data, headers, cookies, files, auth, timeout,
                    allow_redirects, proxies, hooks, stream, verify, cert, json,
                )  # fmt: skip
            if idempotency_key is not None:
                merged[self.idempotency_header] = format_key(idempotency_key)
            elif given is None:
                merged[self.idempotency_header] = format_key(new_key())
            key = _unquote(str(merged[self.idempotency_header]))
            prepared = self.prepare_request(
                requests.Request(
                    method=verb,
                    url=url.decode() if isinstance(url, bytes) else url,
                    headers=merged,
                    files=files,
                    data=data or {},
                    json=json,
                    params=params or {},
                    auth=auth,
                    cookies=cookies,
                    hooks=hooks,
                )
            )
            if prepared.body is not None and not isinstance(prepared.body, (bytes, str)):
                raise TypeError(
                    "an idempotent call resends its body on every attempt: pass bytes, str, "
                    "a dict or json=, not a stream or a file"
                )
            settings = self.merge_environment_settings(
                prepared.url, proxies or {}, stream, verify, cert
            )
            attempts = _Attempts(self.policy)
            while True:
                attempts.begin()
                try:
                    response = self.send(
                        prepared.copy(),
                        timeout=_cap_requests_timeout(timeout, attempts),
                        allow_redirects=allow_redirects,
                        **settings,
                    )
                except requests.exceptions.SSLError:
                    raise
                except _REQUESTS_RETRIED:
                    delay = attempts.wait(None)
                    if delay is None:
                        raise
                    self._sleep(delay)
                    continue
                content_type = response.headers.get("Content-Type", "")
                if not self.policy.should_retry(
                    response.status_code, content_type, _reader(response)
                ):
                    break
                delay = attempts.wait(parse_retry_after(response.headers.get("Retry-After")))
                if delay is None:
                    break
                response.close()
                self._sleep(delay)
            replayed = response.headers.get(REPLAYED_HEADER, "").lower() == "true"
            response.idempotency = IdempotentResult(  # type: ignore[attr-defined]
                key=key, attempts=attempts.count, replayed=replayed
            )
            return response

        def post(
            self,
            url: str | bytes,
            data: Any = None,
            json: Any = None,
            *,
            idempotency_key: str | None = None,
            **kwargs: Any,
        ) -> requests.Response:
            return self.request(
                "POST", url, data=data, json=json, idempotency_key=idempotency_key, **kwargs
            )

        def patch(
            self,
            url: str | bytes,
            data: Any = None,
            *,
            idempotency_key: str | None = None,
            **kwargs: Any,
        ) -> requests.Response:
            return self.request("PATCH", url, data=data, idempotency_key=idempotency_key, **kwargs)

        def put(
            self,
            url: str | bytes,
            data: Any = None,
            *,
            idempotency_key: str | None = None,
            **kwargs: Any,
        ) -> requests.Response:
            return self.request("PUT", url, data=data, idempotency_key=idempotency_key, **kwargs)

        def delete(
            self, url: str | bytes, *, idempotency_key: str | None = None, **kwargs: Any
        ) -> requests.Response:
            return self.request("DELETE", url, idempotency_key=idempotency_key, **kwargs)

    def _reader(response: requests.Response) -> Callable[[], bytes]:
        return lambda: response.content

    def _cap_requests_timeout(timeout: Any, attempts: _Attempts) -> Any:
        if isinstance(timeout, tuple):
            connect, read = timeout
            return (attempts.timeout(connect), attempts.timeout(read))
        return attempts.timeout(timeout)


if HAS_HTTPX or TYPE_CHECKING:
    #: As for requests: no answer, so the outcome is unknown; the same key makes retrying safe.
    _HTTPX_RETRIED: tuple[type[Exception], ...] = (
        httpx.TimeoutException,
        httpx.NetworkError,
        httpx.RemoteProtocolError,
    )

    class IdempotentTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
        """An httpx transport, for ``httpx.Client`` and ``httpx.AsyncClient`` alike, that gives
        unsafe requests a key and retries them with that key.

        ``transport`` is the one that sends (default: ``httpx.HTTPTransport()`` for a
        ``Client``, ``httpx.AsyncHTTPTransport()`` for an ``AsyncClient``); pass your own to
        set TLS, proxies or limits, since httpx ignores those client options once a transport
        is given. A request that already has an ``Idempotency-Key`` header, or an
        ``idempotency_key`` request extension, keeps that key and is protected whatever its
        method. Read what the call took with :func:`idempotent_result`.
        """

        def __init__(
            self,
            transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
            *,
            policy: RetryPolicy | None = None,
            methods: Collection[str] = DEFAULT_METHODS,
            header: str = HEADER,
        ) -> None:
            self.policy = policy or RetryPolicy()
            self.idempotent_methods = frozenset(m.upper() for m in methods)
            self.idempotency_header = header
            self._given = transport
            self._sync: httpx.BaseTransport | None = None
            self._async: httpx.AsyncBaseTransport | None = None

        def _sync_transport(self) -> httpx.BaseTransport:
            if self._sync is None:
                if self._given is None:
                    self._sync = httpx.HTTPTransport()
                elif isinstance(self._given, httpx.BaseTransport):
                    self._sync = self._given
                else:
                    raise TypeError("the wrapped transport is async: use httpx.AsyncClient")
            return self._sync

        def _async_transport(self) -> httpx.AsyncBaseTransport:
            if self._async is None:
                if self._given is None:
                    self._async = httpx.AsyncHTTPTransport()
                elif isinstance(self._given, httpx.AsyncBaseTransport):
                    self._async = self._given
                else:
                    raise TypeError("the wrapped transport is sync: use httpx.Client")
            return self._async

        def _keyed(self, request: httpx.Request) -> str | None:
            """Give the request its key (once, before the first attempt), or None to leave it."""
            given = request.headers.get(self.idempotency_header)
            asked = request.extensions.get("idempotency_key")
            protected = request.method.upper() in self.idempotent_methods
            if not protected and given is None and asked is None:
                return None
            if given is None:
                request.headers[self.idempotency_header] = format_key(
                    str(asked) if asked is not None else new_key()
                )
            return _unquote(request.headers[self.idempotency_header])

        @staticmethod
        def _cap(request: httpx.Request, attempts: _Attempts) -> None:
            timeouts = dict(request.extensions.get("timeout", {}))
            for name in ("connect", "read", "write", "pool"):
                timeouts[name] = attempts.timeout(timeouts.get(name))
            request.extensions = {**request.extensions, "timeout": timeouts}

        def _decide(self, response: httpx.Response, attempts: _Attempts) -> float | None:
            """After a body-read answer: seconds to wait before retrying, or None to return it."""
            if not self.policy.should_retry(
                response.status_code, response.headers.get("Content-Type", ""), response.read
            ):
                return None
            return attempts.wait(parse_retry_after(response.headers.get("Retry-After")))

        @staticmethod
        def _finish(response: httpx.Response, key: str, attempts: _Attempts) -> httpx.Response:
            replayed = response.headers.get(REPLAYED_HEADER, "").lower() == "true"
            response.extensions[_EXTENSION] = IdempotentResult(
                key=key, attempts=attempts.count, replayed=replayed
            )
            return response

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            transport = self._sync_transport()
            key = self._keyed(request)
            if key is None:
                return transport.handle_request(request)
            request.read()  # every attempt resends these bytes
            attempts = _Attempts(self.policy)
            while True:
                attempts.begin()
                self._cap(request, attempts)
                try:
                    response = transport.handle_request(request)
                except _HTTPX_RETRIED:
                    delay = attempts.wait(None)
                    if delay is None:
                        raise
                    time.sleep(delay)
                    continue
                if response.status_code == 409:
                    response.read()
                delay = self._decide(response, attempts)
                if delay is None:
                    return self._finish(response, key, attempts)
                response.close()
                time.sleep(delay)

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            import anyio  # a dependency of httpx; runs under asyncio and trio alike

            transport = self._async_transport()
            key = self._keyed(request)
            if key is None:
                return await transport.handle_async_request(request)
            await request.aread()
            attempts = _Attempts(self.policy)
            while True:
                attempts.begin()
                self._cap(request, attempts)
                try:
                    response = await transport.handle_async_request(request)
                except _HTTPX_RETRIED:
                    delay = attempts.wait(None)
                    if delay is None:
                        raise
                    await anyio.sleep(delay)
                    continue
                if response.status_code == 409:
                    await response.aread()
                delay = self._decide(response, attempts)
                if delay is None:
                    return self._finish(response, key, attempts)
                await response.aclose()
                await anyio.sleep(delay)

        def close(self) -> None:
            if self._sync is not None:
                self._sync.close()

        async def aclose(self) -> None:
            if self._async is not None:
                await self._async.aclose()


def __getattr__(name: str) -> NoReturn:
    # Reached only for names the branches above did not define: say which library is missing.
    if name == "IdempotentSession":
        _missing("requests")
    if name == "IdempotentTransport":
        _missing("httpx")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
