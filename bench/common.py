"""What both request benchmarks share: choosing the backend, users with tokens, cleaning up."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --backend takes the names runtests.py uses; "redis" is the cache store on a real Redis, with
# the database IDEMPOTENCY_TEST_DB names (SQLite unless told otherwise).
BACKENDS = {
    "sqlite": ("sqlite", "db"),
    "postgres": ("postgres", "db"),
    "mariadb": ("mariadb", "db"),
    "redis": (None, "redis"),
}


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        help="shorthand for IDEMPOTENCY_TEST_DB / IDEMPOTENCY_TEST_STORE (default: the env)",
    )
    parser.add_argument("--db", choices=["sqlite", "postgres", "mariadb"], help="the database")
    parser.add_argument("--store", choices=["db", "redis"], help="the idempotency store")


def setup(args: argparse.Namespace) -> None:
    """Export the chosen backend for the settings (and any child process), then set Django up."""
    if args.backend:
        db, store = BACKENDS[args.backend]
        if db is not None:
            os.environ["IDEMPOTENCY_TEST_DB"] = db
        os.environ["IDEMPOTENCY_TEST_STORE"] = store
    if args.db:
        os.environ["IDEMPOTENCY_TEST_DB"] = args.db
    if args.store:
        os.environ["IDEMPOTENCY_TEST_STORE"] = args.store
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


@dataclass(frozen=True)
class Principal:
    pk: int
    token: str

    @property
    def authorization(self) -> str:
        return f"Token {self.token}"


def make_principals(count: int = 2) -> list[Principal]:
    """Distinct users with real DRF tokens, so scopes differ and authentication is real work."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    users = get_user_model()
    made = []
    for number in range(count):
        user = users.objects.create_user(username=f"bench-{number}", password=None)
        made.append(Principal(pk=user.pk, token=Token.objects.create(user=user).key))
    return made


def describe_backend() -> str:
    from django.conf import settings
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("SELECT 'SQLite ' || sqlite_version()")
        else:
            cursor.execute("SELECT version()")
        version = str(cursor.fetchone()[0]).split(" on ")[0]
    store = settings.STORE_BACKEND  # type: ignore[misc]
    return f"db={settings.DB_BACKEND} ({version}) store={store}"  # type: ignore[misc]


def store_label() -> str:
    """``postgres``, ``sqlite``, ``mariadb`` for the ORM store, ``redis`` for the cache store."""
    from django.conf import settings

    if settings.STORE_BACKEND == "redis":  # type: ignore[misc]
        return "redis"
    return str(settings.DB_BACKEND)  # type: ignore[misc]


def clear_redis() -> int:
    """Delete this run's Redis records (ours and the floor's share the settings' key prefix)."""
    from django.conf import settings

    if settings.STORE_BACKEND != "redis":  # type: ignore[misc]
        return 0
    from django.core.cache import caches

    cache = caches[settings.IDEMPOTENCY_CACHE_ALIAS]  # type: ignore[misc]
    client = cache.client.get_client(write=True)  # type: ignore[attr-defined]
    prefix = cache.key_prefix
    assert prefix.startswith("idem-tests-"), prefix  # never sweep anything but our own run
    deleted = 0
    batch = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.delete(*batch)
            batch = []
    if batch:
        deleted += client.delete(*batch)
    return deleted
