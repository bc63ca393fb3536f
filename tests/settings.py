"""Test settings. The backend comes from the environment so one suite runs on every backend.

``IDEMPOTENCY_TEST_DB``: ``sqlite`` (default), ``postgres`` or ``mariadb``.
``IDEMPOTENCY_TEST_STORE``: ``db`` (default), ``redis`` (the cache store on a real Redis) or
``redisstore`` (``IDEMPOTENCY_STORE = "redis"``, the Redis store on its own client).
``IDEMPOTENCY_TEST_REQUIRE_SERVICES=1``: a backend that does not answer fails the run instead of
skipping it (``.ci/run`` sets it).

Servers: ``PGHOST``/``PGPORT``, ``MYSQL_HOST``/``MYSQL_PORT``, ``IDEMPOTENCY_TEST_REDIS_URL``. A
host may be a Unix socket instead, as each client spells it: ``PGHOST=/var/run/postgresql`` (the
directory), ``MYSQL_HOST=/run/mysqld/mysqld.sock`` (the file), ``unix:///run/redis.sock?db=15``.
``tests/backends.py`` probes the same addresses, so a backend is never skipped for a socket.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
import tempfile
from pathlib import Path
from typing import Any


def _installed_package_only() -> None:
    """Under tox, refuse a ``django_idempotency`` that does not come from site-packages.

    tox tests the built wheel; a checkout that slipped onto ``sys.path`` would hide a file
    missing from it. Every process that loads these settings checks, including the servers the
    concurrency tests start.
    """
    if os.environ.get("IDEMPOTENCY_TEST_INSTALLED_PACKAGE") != "1":
        return
    spec = importlib.util.find_spec("django_idempotency")
    origin = Path(spec.origin if spec and spec.origin else "?").resolve()
    site_dirs = {Path(sysconfig.get_path(name)).resolve() for name in ("purelib", "platlib")}
    if not any(origin.is_relative_to(site_dir) for site_dir in site_dirs):
        raise RuntimeError(
            f"IDEMPOTENCY_TEST_INSTALLED_PACKAGE=1, but django_idempotency comes from {origin}, "
            f"not from the installed distribution in {', '.join(map(str, sorted(site_dirs)))}"
        )


_installed_package_only()

DB_BACKEND = os.environ.get("IDEMPOTENCY_TEST_DB", "sqlite")
STORE_BACKEND = os.environ.get("IDEMPOTENCY_TEST_STORE", "db")
REDIS_URL = os.environ.get("IDEMPOTENCY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# One key prefix per test run, inherited by the server processes the concurrency tests start, so
# that runs sharing a Redis neither see nor empty each other's records.
REDIS_KEY_PREFIX = os.environ.setdefault(
    "IDEMPOTENCY_TEST_REDIS_PREFIX", f"idem-tests-{os.getpid()}"
)

SECRET_KEY = "tests-only-not-secret"  # noqa: S105
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.testapp.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "rest_framework",
    "rest_framework.authtoken",
    "django_idempotency",
    "tests.testapp",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_idempotency.middleware.IdempotencyMiddleware",
]
# Only the views under /mw/ rely on the middleware; every other entry point is tested without it.
IDEMPOTENCY_PATHS = ["/mw/"]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# Test users need a password, not a slow one: PBKDF2 would dominate the suite's time.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
}

# The SQLite test database is a file, not shared memory, so that threads and server processes
# in the concurrency tests each open a real connection and meet SQLite's real locking.
_SQLITE_TEST_FILE = os.environ.get(
    "IDEMPOTENCY_TEST_SQLITE_FILE",
    str(Path(tempfile.gettempdir()) / f"django_idempotency_test_{os.getpid()}.sqlite3"),
)

DATABASES: dict[str, dict[str, Any]]
# One test database per run, so that runs on the same server (tox envs, a developer's two
# terminals) cannot drop each other's database.
_SERVER_TEST_NAME = os.environ.get("IDEMPOTENCY_TEST_DB_NAME", f"test_idempotency_{os.getpid()}")

if DB_BACKEND == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("PGDATABASE", "test"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            "TEST": {"NAME": _SERVER_TEST_NAME},
        }
    }
elif DB_BACKEND == "mariadb":
    try:
        import MySQLdb  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        import pymysql  # type: ignore[import-untyped]

        pymysql.install_as_MySQLdb()
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.mysql",
            "NAME": os.environ.get("MYSQL_DATABASE", "test"),
            "USER": os.environ.get("MYSQL_USER", "root"),
            "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
            "PORT": os.environ.get("MYSQL_PORT", "3306"),
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {
                "NAME": _SERVER_TEST_NAME,
                "CHARSET": "utf8mb4",
                "COLLATION": "utf8mb4_general_ci",
            },
        }
    }
elif DB_BACKEND == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(Path(tempfile.gettempdir()) / "django_idempotency_dev.sqlite3"),
            "OPTIONS": {"timeout": 20},
            "TEST": {"NAME": _SQLITE_TEST_FILE},
        }
    }
else:
    raise RuntimeError(f"IDEMPOTENCY_TEST_DB={DB_BACKEND!r}: use sqlite, postgres or mariadb")

if STORE_BACKEND == "redis":
    IDEMPOTENCY_STORE = "cache"
    IDEMPOTENCY_CACHE_ALIAS = "idempotency"
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "idempotency": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_KEY_PREFIX,
        },
    }
elif STORE_BACKEND == "redisstore":
    # The Redis store on its own client; IDEMPOTENCY_TEST_REDIS_CLIENT swaps in a cluster or
    # Sentinel client factory (tests/redis_servers.py) for the processes a test starts.
    IDEMPOTENCY_STORE = "redis"
    IDEMPOTENCY_REDIS_URL = REDIS_URL
    IDEMPOTENCY_REDIS_CLIENT = os.environ.get("IDEMPOTENCY_TEST_REDIS_CLIENT", "")
    IDEMPOTENCY_REDIS_KEY_PREFIX = f"{REDIS_KEY_PREFIX}:"
    IDEMPOTENCY_REDIS_WAIT_REPLICAS = int(os.environ.get("IDEMPOTENCY_TEST_REDIS_WAIT", "0"))
elif STORE_BACKEND == "db":
    IDEMPOTENCY_STORE = "db"
else:
    raise RuntimeError(
        f"IDEMPOTENCY_TEST_STORE={STORE_BACKEND!r}: use db, redis (the cache store) or "
        "redisstore (the Redis store)"
    )
