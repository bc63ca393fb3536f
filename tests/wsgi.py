"""The test project as a WSGI application, for the tests that run it under a real gunicorn.

``IDEMPOTENCY_SERVE_DB_NAME`` points every worker at the calling test's database, as for
``tests/serve.py``; the backend and store come from the same environment as the test run.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from django.conf import settings  # noqa: E402

if os.environ.get("IDEMPOTENCY_SERVE_DB_NAME"):
    # Before any connection opens: every worker uses the test database.
    settings.DATABASES["default"]["NAME"] = os.environ["IDEMPOTENCY_SERVE_DB_NAME"]

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
