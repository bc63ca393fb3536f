from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from tests.testapp import views

REQUIRE_SERVICES = os.environ.get("IDEMPOTENCY_TEST_REQUIRE_SERVICES") == "1"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _missing_service() -> str | None:
    """Why the selected backend cannot run here, or None when it can."""
    if settings.DB_BACKEND in ("postgres", "mariadb"):
        db = settings.DATABASES["default"]
        if not _answers(db["HOST"], int(db["PORT"])):
            return f"{settings.DB_BACKEND} is not answering at {db['HOST']}:{db['PORT']}"
    if settings.STORE_BACKEND == "redis":
        location = urlsplit(settings.CACHES[settings.IDEMPOTENCY_CACHE_ALIAS]["LOCATION"])
        host, port = location.hostname or "127.0.0.1", location.port or 6379
        if not _answers(host, port):
            return f"Redis is not answering at {host}:{port}"
    return None


_MISSING = _missing_service()


def pytest_report_header(config: pytest.Config) -> str:
    return f"django-idempotency backend: db={settings.DB_BACKEND} store={settings.STORE_BACKEND}"


def pytest_configure(config: pytest.Config) -> None:
    if _MISSING and REQUIRE_SERVICES:
        pytest.exit(f"{_MISSING} and IDEMPOTENCY_TEST_REQUIRE_SERVICES=1", returncode=3)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _MISSING:
        skip = pytest.mark.skip(reason=f"{_MISSING} (start it, or run the default SQLite suite)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _empty_redis_store() -> Iterator[None]:
    """Redis keeps records across tests (the ORM store's rows roll back or are flushed), so the
    redis matrix empties the store's key prefix around each test."""
    if settings.STORE_BACKEND != "redis":
        yield
        return
    from django.core.cache import caches

    cache = caches[settings.IDEMPOTENCY_CACHE_ALIAS]
    cache.delete_pattern("*")  # type: ignore[attr-defined]  # django-redis: this alias's prefix
    yield
    cache.delete_pattern("*")  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _reset_views() -> Iterator[None]:
    views.SCRIPT.clear()
    views.HOOKS.clear()
    views.AFTER_WRITE.clear()
    views.DELAY = 0.0
    yield
    views.SCRIPT.clear()
    views.HOOKS.clear()
    views.AFTER_WRITE.clear()
    views.DELAY = 0.0
