from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from django.conf import settings

from tests.backends import missing_service
from tests.testapp import views

REQUIRE_SERVICES = os.environ.get("IDEMPOTENCY_TEST_REQUIRE_SERVICES") == "1"


_MISSING = missing_service(settings)


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
