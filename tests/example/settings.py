"""Settings for the example project's tests: the example's own settings, test-ready.

Run them apart from the package suite, which uses ``tests.settings``::

    pytest -p no:randomly --ds=tests.example.settings tests/example

``EXAMPLE_BACKEND=production`` tests the example on PostgreSQL and the Redis cache store.
"""

from __future__ import annotations

from example_project import settings as example
from example_project.settings import *  # noqa: F403
from example_project.settings import DATABASE, INSTALLED_APPS, STORE

# tests/conftest.py, shared with the package suite, imports the package's test app and reads these
# two names to skip (or, with IDEMPOTENCY_TEST_REQUIRE_SERVICES=1, fail) when a service is down.
INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp"]
DB_BACKEND = DATABASE
STORE_BACKEND = "redis" if STORE == "cache" else "db"

# Hashing cost is irrelevant here and dominates the time of tests that create users.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if STORE == "cache":
    # tests/conftest.py empties the store's key prefix around each test: keep the tests' records
    # apart from those of an example server running on the same Redis.
    CACHES = {
        **example.CACHES,
        "idempotency": {**example.CACHES["idempotency"], "KEY_PREFIX": "example-shop-tests"},
    }
