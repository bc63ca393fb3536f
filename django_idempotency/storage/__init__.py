"""Loading the configured store.

``IDEMPOTENCY_STORE`` is ``"db"``, ``"redis"``, ``"cache"`` or a dotted path. ``"cache"`` stands
for the Lua store on a Redis cache and for the ``add()`` store on any other cache, chosen once
when the store is built. The instance (and with it a Redis store's client) is built on first use
and dropped when a relevant setting changes, so ``override_settings`` switches stores.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_idempotency.conf import settings
from django_idempotency.storage.base import BaseStorage

ALIASES = {
    "db": "django_idempotency.storage.db.DatabaseStorage",
    "redis": "django_idempotency.storage.redis.RedisStorage",
    "cache": "django_idempotency.storage.cache.CacheStorage",
}

_RELOAD_ON = frozenset(
    {
        "IDEMPOTENCY_STORE",
        "IDEMPOTENCY_DATABASE",
        "IDEMPOTENCY_CACHE_ALIAS",
        "IDEMPOTENCY_REDIS_URL",
        "IDEMPOTENCY_REDIS_CLIENT",
        "IDEMPOTENCY_REDIS_ASYNC_CLIENT",
        "IDEMPOTENCY_REDIS_KEY_PREFIX",
        "IDEMPOTENCY_REDIS_WAIT_REPLICAS",
        "IDEMPOTENCY_REDIS_WAIT_TIMEOUT",
        "CACHES",
        "DATABASES",
        # The ORM store builds its claim statements once, with the converters the backend picks
        # for the current USE_TZ (MariaDB's make datetimes aware only when it is on).
        "USE_TZ",
    }
)

_instance: BaseStorage | None = None


def storage_class() -> type[BaseStorage]:
    if settings.IDEMPOTENCY_STORE == "cache":
        from django_idempotency.storage.cache_add import store_class_for

        return store_class_for()
    path = ALIASES.get(settings.IDEMPOTENCY_STORE, settings.IDEMPOTENCY_STORE)
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"IDEMPOTENCY_STORE = {settings.IDEMPOTENCY_STORE!r} could not be imported: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseStorage)):
        raise ImproperlyConfigured(
            f"IDEMPOTENCY_STORE = {settings.IDEMPOTENCY_STORE!r} is not a BaseStorage subclass."
        )
    return cls


def get_storage() -> BaseStorage:
    global _instance
    if _instance is None:
        _instance = storage_class()()
    return _instance


def reset_storage(**kwargs: Any) -> None:
    global _instance
    if kwargs.get("setting") is None or kwargs["setting"] in _RELOAD_ON:
        _instance = None


def connect_signals() -> None:
    from django.core.signals import setting_changed

    setting_changed.connect(reset_storage, dispatch_uid="django_idempotency.reset_storage")
