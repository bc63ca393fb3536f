"""Every ``IDEMPOTENCY_*`` setting, and Django's ``USE_TZ``, read from ``django.conf.settings``.

Each property returns the documented default when the setting is absent. A value is looked up
once and kept until Django announces a change (``setting_changed``, which ``override_settings``
and ``modify_settings`` send), so the hot path pays a dictionary lookup rather than a settings
miss per option per request, and tests still see every override at once. The settings reference
in ``docs/settings.md`` lists the same names and defaults.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

DEFAULT_REPLAY_HEADERS: tuple[str, ...] = (
    "Content-Type",
    "Location",
    "ETag",
    "Link",
    "Cache-Control",
    "Vary",
    "Last-Modified",
    "Content-Language",
)

# Headers that describe one client's session. They are never stored, whatever
# IDEMPOTENCY_REPLAY_HEADERS says, so a replay cannot hand one client another's cookie.
NEVER_STORED_HEADERS = frozenset({"set-cookie", "www-authenticate", "authorization"})


class Settings:
    def _get(self, name: str, default: Any) -> Any:
        return getattr(django_settings, name, default)

    def reload(self) -> None:
        """Forget every value read so far; the next access reads the setting again."""
        self.__dict__.clear()

    @cached_property
    def IDEMPOTENCY_STORE(self) -> str:
        """``"db"``, ``"redis"``, ``"cache"`` or a dotted path to a ``BaseStorage`` subclass."""
        return str(self._get("IDEMPOTENCY_STORE", "db"))

    @cached_property
    def IDEMPOTENCY_DATABASE(self) -> str:
        """Database alias of the ORM store."""
        return str(self._get("IDEMPOTENCY_DATABASE", "default"))

    @cached_property
    def IDEMPOTENCY_CACHE_ALIAS(self) -> str:
        return str(self._get("IDEMPOTENCY_CACHE_ALIAS", "default"))

    @cached_property
    def IDEMPOTENCY_REDIS_URL(self) -> str:
        """``redis://``, ``rediss://`` or ``unix://`` URL of the Redis store's server."""
        return str(self._get("IDEMPOTENCY_REDIS_URL", "") or "")

    @cached_property
    def IDEMPOTENCY_REDIS_CLIENT(self) -> str:
        """Dotted path of a zero-argument callable returning the Redis store's redis-py client
        (``Redis``, ``RedisCluster`` or a Sentinel ``master_for`` client); wins over the URL."""
        return str(self._get("IDEMPOTENCY_REDIS_CLIENT", "") or "")

    @cached_property
    def IDEMPOTENCY_REDIS_ASYNC_CLIENT(self) -> str:
        """Dotted path of a zero-argument callable returning the ``redis.asyncio`` twin of that
        client, for async views; without it a URL-built store makes its own."""
        return str(self._get("IDEMPOTENCY_REDIS_ASYNC_CLIENT", "") or "")

    @cached_property
    def IDEMPOTENCY_REDIS_KEY_PREFIX(self) -> str:
        return str(self._get("IDEMPOTENCY_REDIS_KEY_PREFIX", "idempotency:"))

    @cached_property
    def IDEMPOTENCY_REDIS_WAIT_REPLICAS(self) -> int:
        """Replicas that must acknowledge a claim (``WAIT``) before the view runs; 0 is off."""
        return int(self._get("IDEMPOTENCY_REDIS_WAIT_REPLICAS", 0))

    @cached_property
    def IDEMPOTENCY_REDIS_WAIT_TIMEOUT(self) -> int:
        """Milliseconds a claim waits for those acknowledgements before answering 503."""
        return int(self._get("IDEMPOTENCY_REDIS_WAIT_TIMEOUT", 100))

    @cached_property
    def IDEMPOTENCY_HEADER(self) -> str:
        return str(self._get("IDEMPOTENCY_HEADER", "Idempotency-Key"))

    @cached_property
    def IDEMPOTENCY_METHODS(self) -> frozenset[str]:
        methods: Sequence[str] = self._get("IDEMPOTENCY_METHODS", ("POST", "PATCH"))
        return frozenset(m.upper() for m in methods)

    @cached_property
    def IDEMPOTENCY_REQUIRED(self) -> bool:
        return bool(self._get("IDEMPOTENCY_REQUIRED", False))

    @cached_property
    def IDEMPOTENCY_TTL(self) -> int:
        """Seconds a completed record is replayed, counted from its creation."""
        return int(self._get("IDEMPOTENCY_TTL", 24 * 60 * 60))

    @cached_property
    def IDEMPOTENCY_LEASE(self) -> int:
        """Seconds an in-flight claim is honoured before another request may reclaim it."""
        return int(self._get("IDEMPOTENCY_LEASE", 60))

    @cached_property
    def IDEMPOTENCY_RETRY_AFTER(self) -> int:
        """Seconds suggested in ``Retry-After`` on 409 in-progress and 503 answers."""
        return int(self._get("IDEMPOTENCY_RETRY_AFTER", 1))

    @cached_property
    def IDEMPOTENCY_WAIT(self) -> float:
        """Seconds a duplicate waits for the original to finish before answering 409."""
        return float(self._get("IDEMPOTENCY_WAIT", 0))

    @cached_property
    def IDEMPOTENCY_KEY_MIN_LENGTH(self) -> int:
        return int(self._get("IDEMPOTENCY_KEY_MIN_LENGTH", 1))

    @cached_property
    def IDEMPOTENCY_KEY_MAX_LENGTH(self) -> int:
        return int(self._get("IDEMPOTENCY_KEY_MAX_LENGTH", 255))

    @cached_property
    def IDEMPOTENCY_STRICT_KEY_FORMAT(self) -> bool:
        """Accept only the structured-field string form (``"key"``) of the header."""
        return bool(self._get("IDEMPOTENCY_STRICT_KEY_FORMAT", False))

    @cached_property
    def IDEMPOTENCY_REPLAY_HEADERS(self) -> tuple[str, ...]:
        return tuple(self._get("IDEMPOTENCY_REPLAY_HEADERS", DEFAULT_REPLAY_HEADERS))

    @cached_property
    def IDEMPOTENCY_MAX_RESPONSE_SIZE(self) -> int:
        """Largest response body, in bytes, that is stored for replay."""
        return int(self._get("IDEMPOTENCY_MAX_RESPONSE_SIZE", 1024 * 1024))

    @cached_property
    def IDEMPOTENCY_STORE_SERVER_ERRORS(self) -> bool:
        return bool(self._get("IDEMPOTENCY_STORE_SERVER_ERRORS", False))

    @cached_property
    def IDEMPOTENCY_SKIP_ANONYMOUS(self) -> bool:
        return bool(self._get("IDEMPOTENCY_SKIP_ANONYMOUS", False))

    @cached_property
    def IDEMPOTENCY_FAIL_OPEN(self) -> bool:
        return bool(self._get("IDEMPOTENCY_FAIL_OPEN", False))

    @cached_property
    def IDEMPOTENCY_ATOMIC(self) -> bool:
        """Run the view in a transaction on ``IDEMPOTENCY_DATABASE``; the result commits with it
        (ORM store) or is stored right after its commit (other stores)."""
        return bool(self._get("IDEMPOTENCY_ATOMIC", True))

    @cached_property
    def IDEMPOTENCY_ASYNC_CLAIM_COMMIT(self) -> bool:
        """PostgreSQL: the claim's own commit does not wait for the WAL flush."""
        return bool(self._get("IDEMPOTENCY_ASYNC_CLAIM_COMMIT", True))

    @cached_property
    def IDEMPOTENCY_SCOPE_RESOLVER(self) -> str:
        return str(self._get("IDEMPOTENCY_SCOPE_RESOLVER", "django_idempotency.keys.user_scope"))

    @cached_property
    def IDEMPOTENCY_FINGERPRINT(self) -> str:
        return str(
            self._get(
                "IDEMPOTENCY_FINGERPRINT", "django_idempotency.fingerprint.request_fingerprint"
            )
        )

    @cached_property
    def IDEMPOTENCY_PATHS(self) -> tuple[str | re.Pattern[str], ...]:
        """What ``IdempotencyMiddleware`` protects: path prefixes (``str``) and compiled
        patterns (``re.Pattern``, searched), matched against ``request.path_info``."""
        return tuple(self._get("IDEMPOTENCY_PATHS", ()))

    @cached_property
    def IDEMPOTENCY_PROBLEM_BASE_URI(self) -> str:
        return str(
            self._get(
                "IDEMPOTENCY_PROBLEM_BASE_URI",
                "https://django-idempotency.readthedocs.io/en/latest/problems/#",
            )
        )

    @cached_property
    def USE_TZ(self) -> bool:
        """Django's own setting, kept here too: the engine's clock reads it on every request,
        and a read through ``django.conf.settings`` costs as much as the clock itself."""
        return bool(django_settings.USE_TZ)

    @cached_property
    def IDEMPOTENCY_ENABLED(self) -> bool:
        """False turns the layer off: protected views run as if unprotected (tests only)."""
        return bool(self._get("IDEMPOTENCY_ENABLED", True))


settings = Settings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    # Any setting may feed a default (USE_TZ, CACHES, DATABASES...), and changes are rare.
    settings.reload()


setting_changed.connect(_reload, dispatch_uid="django_idempotency.conf.reload")
