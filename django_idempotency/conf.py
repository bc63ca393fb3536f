"""Every ``IDEMPOTENCY_*`` setting, read live from ``django.conf.settings``.

Each property returns the documented default when the setting is absent. Nothing is cached,
so ``override_settings`` in tests and settings changed at runtime take effect at once.
The settings reference in ``docs/settings.md`` lists the same names and defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.conf import settings as django_settings

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

    @property
    def IDEMPOTENCY_STORE(self) -> str:
        """``"db"``, ``"cache"`` or a dotted path to a ``BaseStorage`` subclass."""
        return str(self._get("IDEMPOTENCY_STORE", "db"))

    @property
    def IDEMPOTENCY_DATABASE(self) -> str:
        """Database alias of the ORM store."""
        return str(self._get("IDEMPOTENCY_DATABASE", "default"))

    @property
    def IDEMPOTENCY_CACHE_ALIAS(self) -> str:
        return str(self._get("IDEMPOTENCY_CACHE_ALIAS", "default"))

    @property
    def IDEMPOTENCY_HEADER(self) -> str:
        return str(self._get("IDEMPOTENCY_HEADER", "Idempotency-Key"))

    @property
    def IDEMPOTENCY_METHODS(self) -> frozenset[str]:
        methods: Sequence[str] = self._get("IDEMPOTENCY_METHODS", ("POST", "PATCH"))
        return frozenset(m.upper() for m in methods)

    @property
    def IDEMPOTENCY_REQUIRED(self) -> bool:
        return bool(self._get("IDEMPOTENCY_REQUIRED", False))

    @property
    def IDEMPOTENCY_TTL(self) -> int:
        """Seconds a completed record is replayed, counted from its creation."""
        return int(self._get("IDEMPOTENCY_TTL", 24 * 60 * 60))

    @property
    def IDEMPOTENCY_LEASE(self) -> int:
        """Seconds an in-flight claim is honoured before another request may reclaim it."""
        return int(self._get("IDEMPOTENCY_LEASE", 60))

    @property
    def IDEMPOTENCY_RETRY_AFTER(self) -> int:
        """Seconds suggested in ``Retry-After`` on 409 in-progress and 503 answers."""
        return int(self._get("IDEMPOTENCY_RETRY_AFTER", 1))

    @property
    def IDEMPOTENCY_WAIT(self) -> float:
        """Seconds a duplicate waits for the original to finish before answering 409."""
        return float(self._get("IDEMPOTENCY_WAIT", 0))

    @property
    def IDEMPOTENCY_KEY_MIN_LENGTH(self) -> int:
        return int(self._get("IDEMPOTENCY_KEY_MIN_LENGTH", 1))

    @property
    def IDEMPOTENCY_KEY_MAX_LENGTH(self) -> int:
        return int(self._get("IDEMPOTENCY_KEY_MAX_LENGTH", 255))

    @property
    def IDEMPOTENCY_STRICT_KEY_FORMAT(self) -> bool:
        """Accept only the structured-field string form (``"key"``) of the header."""
        return bool(self._get("IDEMPOTENCY_STRICT_KEY_FORMAT", False))

    @property
    def IDEMPOTENCY_REPLAY_HEADERS(self) -> tuple[str, ...]:
        return tuple(self._get("IDEMPOTENCY_REPLAY_HEADERS", DEFAULT_REPLAY_HEADERS))

    @property
    def IDEMPOTENCY_MAX_RESPONSE_SIZE(self) -> int:
        """Largest response body, in bytes, that is stored for replay."""
        return int(self._get("IDEMPOTENCY_MAX_RESPONSE_SIZE", 1024 * 1024))

    @property
    def IDEMPOTENCY_STORE_SERVER_ERRORS(self) -> bool:
        return bool(self._get("IDEMPOTENCY_STORE_SERVER_ERRORS", False))

    @property
    def IDEMPOTENCY_SKIP_ANONYMOUS(self) -> bool:
        return bool(self._get("IDEMPOTENCY_SKIP_ANONYMOUS", False))

    @property
    def IDEMPOTENCY_FAIL_OPEN(self) -> bool:
        return bool(self._get("IDEMPOTENCY_FAIL_OPEN", False))

    @property
    def IDEMPOTENCY_ATOMIC(self) -> bool:
        """Run the view and the completion in one transaction (ORM store only)."""
        return bool(self._get("IDEMPOTENCY_ATOMIC", True))

    @property
    def IDEMPOTENCY_SCOPE_RESOLVER(self) -> str:
        return str(self._get("IDEMPOTENCY_SCOPE_RESOLVER", "django_idempotency.keys.user_scope"))

    @property
    def IDEMPOTENCY_FINGERPRINT(self) -> str:
        return str(
            self._get(
                "IDEMPOTENCY_FINGERPRINT", "django_idempotency.fingerprint.request_fingerprint"
            )
        )

    @property
    def IDEMPOTENCY_PROBLEM_BASE_URI(self) -> str:
        return str(
            self._get(
                "IDEMPOTENCY_PROBLEM_BASE_URI",
                "https://django-idempotency.readthedocs.io/en/latest/problems/#",
            )
        )

    @property
    def IDEMPOTENCY_ENABLED(self) -> bool:
        """False turns the layer off: protected views run as if unprotected (tests only)."""
        return bool(self._get("IDEMPOTENCY_ENABLED", True))


settings = Settings()
