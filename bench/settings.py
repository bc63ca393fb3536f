"""Settings for the benchmarks: the test settings, the bench urlconf, persistent connections.

The database and store still come from ``IDEMPOTENCY_TEST_DB`` / ``IDEMPOTENCY_TEST_STORE``.
``IDEMPOTENCY_BENCH_DB_NAME`` points a gunicorn worker at the throw-away database its parent
created and migrated.
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

ROOT_URLCONF = "bench.urls"

# A production deployment keeps its database connections; without this the WSGI handler's
# request_finished signal would close them after every request, and each request would pay a
# new connection (several milliseconds on PostgreSQL) that has nothing to do with idempotency.
DATABASES["default"]["CONN_MAX_AGE"] = None

_name = os.environ.get("IDEMPOTENCY_BENCH_DB_NAME")
if _name:
    DATABASES["default"]["NAME"] = _name
