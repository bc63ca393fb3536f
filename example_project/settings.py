"""Settings of the example shop.

By default everything runs in one process with no services: SQLite for the data and the ORM store
for idempotency keys. ``EXAMPLE_BACKEND=production`` switches to what a deployment would use:
PostgreSQL for the data and the cache store on Redis (django-redis), so that keys are shared by
every worker. Each half can also be picked alone:

``EXAMPLE_DATABASE``: ``sqlite`` or ``postgres`` (connection from the usual ``PG*`` variables).
``EXAMPLE_STORE``: ``db`` (the ORM store) or ``cache`` (Redis at ``EXAMPLE_REDIS_URL``).

This is a demo: the secret key is public and ``DEBUG`` is on. Do not deploy it as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent

BACKEND = os.environ.get("EXAMPLE_BACKEND", "sqlite")
if BACKEND not in ("sqlite", "production"):
    raise RuntimeError(f"EXAMPLE_BACKEND={BACKEND!r}: use sqlite (default) or production")
PRODUCTION = BACKEND == "production"
DATABASE = os.environ.get("EXAMPLE_DATABASE", "postgres" if PRODUCTION else "sqlite")
STORE = os.environ.get("EXAMPLE_STORE", "cache" if PRODUCTION else "db")
REDIS_URL = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/1")

SECRET_KEY = "example-project-only-not-secret"
DEBUG = os.environ.get("EXAMPLE_DEBUG", "1") == "1"
# "testserver" is the host of Django's test client, which the ``demo`` command drives in-process.
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "example_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    # The OpenAPI schema at /api/schema/ and Swagger UI at /api/docs/; the sidecar serves Swagger
    # UI's files from this site instead of a CDN, so the page works offline too.
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_idempotency",
    "example_project.shop",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

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

STATIC_URL = "static/"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# The confirmation "emails" of the orders endpoint stay in memory (django.core.mail.outbox in
# tests); the shop logger prints one line per email so the terminal shows how many went out.
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
DEFAULT_FROM_EMAIL = "shop@example.com"

REST_FRAMEWORK = {
    # Token authentication for API clients (curl, the demo command), session authentication for
    # the page at /. Keys are scoped to the authenticated user either way.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # drf-spectacular's AutoSchema plus the Idempotency-Key header and the problem responses.
    "DEFAULT_SCHEMA_CLASS": "django_idempotency.openapi.IdempotencyAutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "django-idempotency example shop",
    "DESCRIPTION": "Payments, orders and registration that are safe to retry with an "
    "Idempotency-Key header.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

DATABASES: dict[str, dict[str, Any]]
if DATABASE == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("EXAMPLE_SQLITE_FILE", str(BASE_DIR / "db.sqlite3")),
            # runserver is threaded; let a writer wait for another instead of failing at once.
            "OPTIONS": {"timeout": 20},
        }
    }
elif DATABASE == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("PGDATABASE", "django_idempotency_example"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
        }
    }
else:
    raise RuntimeError(f"EXAMPLE_DATABASE={DATABASE!r}: use sqlite or postgres")

if STORE == "db":
    IDEMPOTENCY_STORE = "db"
elif STORE == "cache":
    # Only a cache whose add() is atomic across processes can hold idempotency keys: Redis here.
    # The default cache stays local; the keys get their own alias so that clearing one never
    # clears the other.
    IDEMPOTENCY_STORE = "cache"
    IDEMPOTENCY_CACHE_ALIAS = "idempotency"
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "idempotency": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "example-shop",
        },
    }
else:
    raise RuntimeError(f"EXAMPLE_STORE={STORE!r}: use db or cache")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "example_project.shop": {"handlers": ["console"], "level": "INFO"},
        "django_idempotency": {"handlers": ["console"], "level": "INFO"},
    },
}
