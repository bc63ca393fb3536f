"""Loading the configured store.

``IDEMPOTENCY_STORE`` is ``"db"``, ``"cache"`` or a dotted path. The instance is built on first
use and dropped when a relevant setting changes, so ``override_settings`` switches stores.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_idempotency.conf import settings
from django_idempotency.storage.base import BaseStorage

ALIASES = {
    "db": "django_idempotency.storage.db.DatabaseStorage",
    "cache": "django_idempotency.storage.cache.CacheStorage",
}

_RELOAD_ON = frozenset(
    {"IDEMPOTENCY_STORE", "IDEMPOTENCY_DATABASE", "IDEMPOTENCY_CACHE_ALIAS", "CACHES", "DATABASES"}
)

_instance: BaseStorage | None = None


def storage_class() -> type[BaseStorage]:
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
