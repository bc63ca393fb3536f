"""System checks: unsafe configuration fails at startup, not under the first retry storm.

Every ID is listed in ``CHECK_IDS`` and documented in ``docs/settings.md``; IDs are never reused.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from django.conf import settings as django_settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_idempotency.conf import settings

CHECK_IDS = {
    "E001": "IDEMPOTENCY_STORE cannot be loaded",
    "E002": "a numeric setting is out of range",
    "E003": "IDEMPOTENCY_METHODS names a safe method",
    "E004": "IDEMPOTENCY_DATABASE is not a configured database",
    "E005": "a dotted-path setting cannot be imported",
    "E006": "IDEMPOTENCY_CACHE_ALIAS is not a configured cache",
    "E007": "the cache store is backed by a cache without cross-process atomic add",
    "E008": "the in-memory store is configured outside a test run",
    "E009": "the Redis store has no usable server setting",
    "W001": "ATOMIC_REQUESTS is on for the idempotency database",
    "W002": "IDEMPOTENCY_FAIL_OPEN runs views unprotected when the store is down",
    "W003": "the cache store is backed by the database cache",
    "W004": "IdempotencyMiddleware is installed but IDEMPOTENCY_PATHS is empty",
    "W005": "middleware with process_view() is listed after IdempotencyMiddleware",
}

MIDDLEWARE_PATH = "django_idempotency.middleware.IdempotencyMiddleware"

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def _error(check_id: str, msg: str, hint: str) -> checks.CheckMessage:
    level = checks.Error if check_id.startswith("E") else checks.Warning
    return level(msg, hint=hint, id=f"django_idempotency.{check_id}")


def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[Any]:
    errors: list[checks.CheckMessage] = []
    from django_idempotency.storage import storage_class

    try:
        store = storage_class()
    except ImproperlyConfigured as exc:
        errors.append(
            _error(
                "E001",
                str(exc),
                'Use "db", "redis", "cache" or the dotted path of a BaseStorage.',
            )
        )
    else:
        errors.extend(_check_memory_store(store))
    numbers = {
        "IDEMPOTENCY_TTL": settings.IDEMPOTENCY_TTL,
        "IDEMPOTENCY_LEASE": settings.IDEMPOTENCY_LEASE,
        "IDEMPOTENCY_RETRY_AFTER": settings.IDEMPOTENCY_RETRY_AFTER,
        "IDEMPOTENCY_KEY_MIN_LENGTH": settings.IDEMPOTENCY_KEY_MIN_LENGTH,
    }
    for name, value in numbers.items():
        if value < 1:
            errors.append(
                _error("E002", f"{name} must be at least 1, not {value}.", f"Raise {name}.")
            )
    if settings.IDEMPOTENCY_LEASE > settings.IDEMPOTENCY_TTL:
        errors.append(
            _error(
                "E002",
                "IDEMPOTENCY_LEASE is longer than IDEMPOTENCY_TTL.",
                "A record must outlive its lease; lower the lease or raise the TTL.",
            )
        )
    if not settings.IDEMPOTENCY_KEY_MIN_LENGTH <= settings.IDEMPOTENCY_KEY_MAX_LENGTH:
        errors.append(
            _error(
                "E002",
                "IDEMPOTENCY_KEY_MAX_LENGTH is below IDEMPOTENCY_KEY_MIN_LENGTH.",
                "Keys between 1 and 255 characters fit every client library.",
            )
        )
    if settings.IDEMPOTENCY_WAIT < 0 or settings.IDEMPOTENCY_MAX_RESPONSE_SIZE < 0:
        errors.append(
            _error(
                "E002",
                "IDEMPOTENCY_WAIT and IDEMPOTENCY_MAX_RESPONSE_SIZE cannot be negative.",
                "Use 0 to disable waiting or storing bodies.",
            )
        )
    safe = sorted(settings.IDEMPOTENCY_METHODS & SAFE_METHODS)
    if safe:
        errors.append(
            _error(
                "E003",
                f"IDEMPOTENCY_METHODS includes safe methods: {', '.join(safe)}.",
                "Safe methods are idempotent by definition (RFC 9110 §9.2.1); protect POST, "
                "PATCH and, where needed, PUT and DELETE.",
            )
        )
    for name in ("IDEMPOTENCY_SCOPE_RESOLVER", "IDEMPOTENCY_FINGERPRINT"):
        path = getattr(settings, name)
        try:
            import_string(path)
        except ImportError as exc:
            errors.append(_error("E005", f"{name} = {path!r} cannot be imported: {exc}", ""))
    if settings.IDEMPOTENCY_FAIL_OPEN:
        errors.append(
            _error(
                "W002",
                "IDEMPOTENCY_FAIL_OPEN is on: while the store is down, retries run views again.",
                "Leave it off for payments; silence this check if you accepted the risk.",
            )
        )
    errors.extend(_check_middleware())
    if settings.IDEMPOTENCY_STORE == "db":
        errors.extend(_check_database())
    elif settings.IDEMPOTENCY_STORE == "cache":
        errors.extend(_check_cache())
    elif settings.IDEMPOTENCY_STORE == "redis":
        errors.extend(_check_redis())
    return errors


def _check_redis() -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    url, path = settings.IDEMPOTENCY_REDIS_URL, settings.IDEMPOTENCY_REDIS_CLIENT
    for name in ("IDEMPOTENCY_REDIS_CLIENT", "IDEMPOTENCY_REDIS_ASYNC_CLIENT"):
        errors.extend(_check_factory(name, getattr(settings, name)))
    if not path and not url:
        errors.append(
            _error(
                "E009",
                'IDEMPOTENCY_STORE = "redis" without IDEMPOTENCY_REDIS_URL or '
                "IDEMPOTENCY_REDIS_CLIENT.",
                'Set IDEMPOTENCY_REDIS_URL = "redis://host:6379/0", or a client factory for '
                "Redis Cluster and Sentinel.",
            )
        )
    elif not path and url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        errors.append(
            _error(
                "E009",
                f"IDEMPOTENCY_REDIS_URL = {url!r} is not a redis://, rediss:// or unix:// URL.",
                "",
            )
        )
    prefix = settings.IDEMPOTENCY_REDIS_KEY_PREFIX
    if "{" in prefix and "}" in prefix.split("{", 1)[1]:
        errors.append(
            _error(
                "E009",
                f"IDEMPOTENCY_REDIS_KEY_PREFIX = {prefix!r} holds a {{hash tag}}: on Redis "
                "Cluster every record would land on one slot, hence one shard.",
                "Drop the braces from the prefix.",
            )
        )
    if settings.IDEMPOTENCY_REDIS_WAIT_REPLICAS < 0 or settings.IDEMPOTENCY_REDIS_WAIT_TIMEOUT < 0:
        errors.append(
            _error(
                "E002",
                "IDEMPOTENCY_REDIS_WAIT_REPLICAS and IDEMPOTENCY_REDIS_WAIT_TIMEOUT cannot be "
                "negative.",
                "Use 0 replicas to turn the wait off. A timeout of 0 waits forever: prefer a "
                "bound such as 100 ms.",
            )
        )
    return errors


def _check_factory(name: str, path: str) -> list[checks.CheckMessage]:
    if not path:
        return []
    try:
        factory = import_string(path)
    except ImportError as exc:
        return [
            _error(
                "E009",
                f"{name} = {path!r} cannot be imported: {exc}",
                "Point it at a zero-argument callable that returns a redis-py client.",
            )
        ]
    if not callable(factory):
        return [_error("E009", f"{name} = {path!r} is not callable.", "")]
    return []


def running_tests() -> bool:
    """Whether this process is a test run, where the in-memory store is allowed.

    Three signals, any of which counts: Django's test environment is set up (``manage.py test``
    and pytest-django call ``setup_test_environment()`` before checks or tests run); pytest runs
    this process or started it (pytest 8.2+ sets ``PYTEST_VERSION`` for the whole session, and
    servers a test starts inherit it); or the command line is ``manage.py test``.
    """
    from django.test import utils

    # setup_test_environment() saves what it replaces here and refuses to run twice because
    # of it; there is no public flag for "the test environment is up".
    if hasattr(getattr(utils, "_TestState", None), "saved_data"):
        return True
    if "PYTEST_VERSION" in os.environ:
        return True
    return len(sys.argv) > 1 and sys.argv[1] == "test"


def _check_memory_store(store: type[Any]) -> list[checks.CheckMessage]:
    from django_idempotency.storage.memory import MemoryStorage

    if not issubclass(store, MemoryStorage) or running_tests():
        return []
    return [
        _error(
            "E008",
            f"IDEMPOTENCY_STORE = {settings.IDEMPOTENCY_STORE!r} keeps records in this "
            "process's memory: a retry that reaches another worker, or comes after a restart, "
            "runs again.",
            'It is for test runs only. Use "db" or "cache" (Redis) outside tests, for example '
            "by choosing the store in your test settings.",
        )
    ]


def _check_database() -> list[checks.CheckMessage]:
    alias = settings.IDEMPOTENCY_DATABASE
    databases = django_settings.DATABASES
    if alias not in databases:
        return [
            _error(
                "E004",
                f"IDEMPOTENCY_DATABASE = {alias!r} is not in DATABASES.",
                f"Add it or choose one of: {', '.join(databases)}.",
            )
        ]
    if databases[alias].get("ATOMIC_REQUESTS"):
        return [
            _error(
                "W001",
                f"ATOMIC_REQUESTS is on for {alias!r}: a claim made inside the request's "
                "transaction stays invisible to other workers until the view ends.",
                "IdempotencyMixin and @idempotent wrap the view in their own transaction; mark "
                "protected views with @transaction.non_atomic_requests, or turn "
                "ATOMIC_REQUESTS off.",
            )
        ]
    return []


def _check_cache() -> list[checks.CheckMessage]:
    from django.core.cache.backends.db import DatabaseCache
    from django.core.cache.backends.dummy import DummyCache
    from django.core.cache.backends.filebased import FileBasedCache
    from django.core.cache.backends.locmem import LocMemCache

    alias = settings.IDEMPOTENCY_CACHE_ALIAS
    caches = django_settings.CACHES
    if alias not in caches:
        return [
            _error(
                "E006",
                f"IDEMPOTENCY_CACHE_ALIAS = {alias!r} is not in CACHES.",
                f"Add it or choose one of: {', '.join(caches) or '(none)'}.",
            )
        ]
    path = str(caches[alias].get("BACKEND", ""))
    try:
        backend = import_string(path)
    except ImportError:
        return []  # Django reports the unusable cache backend itself.
    if not isinstance(backend, type):
        return []
    if issubclass(backend, (LocMemCache, FileBasedCache, DummyCache)):
        return [
            _error(
                "E007",
                f"The idempotency cache {alias!r} uses {backend.__name__}: it cannot make a claim "
                "visible to every worker at once, so a retry on another process runs again.",
                "Use Redis (django-redis or django.core.cache.backends.redis.RedisCache) or "
                'IDEMPOTENCY_STORE = "db". For single-process development on LocMemCache, add '
                '"django_idempotency.E007" to SILENCED_SYSTEM_CHECKS.',
            )
        ]
    if issubclass(backend, DatabaseCache):
        return [
            _error(
                "W003",
                f"The idempotency cache {alias!r} is the database cache: completion and release "
                "are a read then a write there, not one atomic step.",
                'IDEMPOTENCY_STORE = "db" uses the same database with a unique constraint and '
                "transactional completion; prefer it, or Redis.",
            )
        ]
    return []


def _check_middleware() -> list[checks.CheckMessage]:
    from django_idempotency.middleware import IdempotencyMiddleware

    middleware = list(getattr(django_settings, "MIDDLEWARE", None) or ())
    position = None
    for index, path in enumerate(middleware):
        try:
            loaded = import_string(path)
        except ImportError:
            continue  # Django reports a middleware that does not import itself.
        if position is None:
            if isinstance(loaded, type) and issubclass(loaded, IdempotencyMiddleware):
                position = index
        elif hasattr(loaded, "process_view"):
            return [*_paths_empty(), _middleware_after(path)]
    return [] if position is None else _paths_empty()


def _paths_empty() -> list[checks.CheckMessage]:
    if settings.IDEMPOTENCY_PATHS:
        return []
    return [
        _error(
            "W004",
            "IdempotencyMiddleware is in MIDDLEWARE, but IDEMPOTENCY_PATHS is empty: it "
            "protects nothing.",
            'Name the protected paths, e.g. IDEMPOTENCY_PATHS = ["/api/"], or remove the '
            "middleware.",
        )
    ]


def _middleware_after(path: str) -> checks.CheckMessage:
    return _error(
        "W005",
        f"{path} is listed after IdempotencyMiddleware: the middleware runs protected views "
        "from its process_view(), so the process_view() of later middleware (CSRF among them) "
        "is skipped for those requests.",
        f"Move {MIDDLEWARE_PATH} to the end of MIDDLEWARE.",
    )


def register() -> None:
    checks.register(check_settings, "django_idempotency")
