from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests import redis_servers
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
    if settings.STORE_BACKEND == "redisstore":
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        _delete_prefix(client, settings.IDEMPOTENCY_REDIS_KEY_PREFIX)
        yield
        _delete_prefix(client, settings.IDEMPOTENCY_REDIS_KEY_PREFIX)
        client.close()
        return
    if settings.STORE_BACKEND != "redis":
        yield
        return
    from django.core.cache import caches

    cache = caches[settings.IDEMPOTENCY_CACHE_ALIAS]
    cache.delete_pattern("*")  # type: ignore[attr-defined]  # django-redis: this alias's prefix
    yield
    cache.delete_pattern("*")  # type: ignore[attr-defined]


def _delete_prefix(client: Any, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


#: The Cluster and Sentinel set-ups start a dozen servers; one backend of the matrix runs them.
RUN_REDIS_SERVERS = (
    settings.STORE_BACKEND == "redisstore"
    or os.environ.get("IDEMPOTENCY_TEST_REDIS_SERVERS") == "1"
)


def _servers_or_skip() -> None:
    if not RUN_REDIS_SERVERS:
        pytest.skip(
            "Redis Cluster and Sentinel tests run in the redis-store backend "
            "(or with IDEMPOTENCY_TEST_REDIS_SERVERS=1)"
        )
    reason = redis_servers.missing()
    if reason is None:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} and IDEMPOTENCY_TEST_REQUIRE_SERVICES=1")
    pytest.skip(f"{reason}: the Redis Cluster and Sentinel tests need them")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[redis_servers.Cluster]:
    """Six ``redis-server --cluster-enabled yes`` (3 primaries, 3 replicas), once per session.

    ``IDEMPOTENCY_TEST_CLUSTER_NODES`` names them for ``tests.redis_servers.cluster_client`` in
    this process and in the server processes it starts.
    """
    _servers_or_skip()
    with tempfile.TemporaryDirectory(prefix="idem-cluster-") as root:
        cluster = redis_servers.start_cluster(Path(root))
        os.environ["IDEMPOTENCY_TEST_CLUSTER_NODES"] = cluster.nodes
        try:
            yield cluster
        finally:
            os.environ.pop("IDEMPOTENCY_TEST_CLUSTER_NODES", None)
            cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[redis_servers.SentinelSet]:
    """One primary, one replica and three Sentinels, once per session."""
    _servers_or_skip()
    with tempfile.TemporaryDirectory(prefix="idem-sentinel-") as root:
        group = redis_servers.start_sentinel_set(Path(root))
        os.environ["IDEMPOTENCY_TEST_SENTINELS"] = group.addresses
        try:
            yield group
        finally:
            os.environ.pop("IDEMPOTENCY_TEST_SENTINELS", None)
            group.stop()


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
