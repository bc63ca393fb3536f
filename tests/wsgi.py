"""WSGI entry point over the test project, for real servers (gunicorn) started by tests.

Like ``tests.serve``: ``IDEMPOTENCY_SERVE_DB_NAME`` names the database (the calling test's test
database), and the backend and store come from ``IDEMPOTENCY_TEST_DB`` / ``IDEMPOTENCY_TEST_STORE``.
``IDEMPOTENCY_SERVE_MAX_BODY`` lowers ``DATA_UPLOAD_MAX_MEMORY_SIZE``, so that an oversized body
need not be megabytes long.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402
from django.conf import settings  # noqa: E402

_name = os.environ.get("IDEMPOTENCY_SERVE_DB_NAME")
if _name:
    settings.DATABASES["default"]["NAME"] = _name
_max_body = os.environ.get("IDEMPOTENCY_SERVE_MAX_BODY")
if _max_body:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = int(_max_body)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(process)d %(name)s %(levelname)s %(message)s"))
for _logger in ("django.request", "django_idempotency"):
    logging.getLogger(_logger).addHandler(_handler)

application = get_wsgi_application()
