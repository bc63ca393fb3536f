"""A threaded WSGI server over the test project, for the cross-process concurrency tests.

``python -m tests.serve`` binds a free port on 127.0.0.1, prints ``PORT <number>`` on stdout once
it accepts connections, and serves until it is terminated. It is its own OS process with its own
database connections, like one worker of a multi-worker deployment.

Environment:

``IDEMPOTENCY_SERVE_DB_NAME``
    The database ``NAME`` to use, normally the test database of the calling test, so that the
    server and the test count the same ``Payment`` rows. Without it the settings' name is used.
``IDEMPOTENCY_SERVE_DELAY``
    Seconds the payment view sleeps (``tests.testapp.views.DELAY``), so that requests overlap.
``IDEMPOTENCY_SERVE_WRITE_DELAY``
    Seconds the payment view sleeps after it wrote the payment row, before it answers.
``IDEMPOTENCY_SERVE_LEASE``
    ``IDEMPOTENCY_LEASE`` for this server, in seconds.

The database backend and store come from ``IDEMPOTENCY_TEST_DB`` / ``IDEMPOTENCY_TEST_STORE``,
as for the test run itself.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler


class _Server(ThreadedWSGIServer):
    # A storm connects all at once; Django's default backlog of 10 would make the kernel drop
    # SYNs and the clients retry a second later, which spreads the storm out.
    request_queue_size = 256


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django
    from django.conf import settings

    lease = os.environ.get("IDEMPOTENCY_SERVE_LEASE")
    if lease:
        settings.IDEMPOTENCY_LEASE = int(lease)
    name = os.environ.get("IDEMPOTENCY_SERVE_DB_NAME")
    if name:
        # Connections are opened lazily, after this: every thread of the server uses ``name``.
        settings.DATABASES["default"]["NAME"] = name
    django.setup()

    from django.core.wsgi import get_wsgi_application

    from tests.testapp import views

    # get_wsgi_application() runs django.setup() again, whose logging dictConfig resets the
    # handlers of every existing child of the "django" logger: build the app before adding ours,
    # or view exceptions (django.request) never reach the log the tests read.
    application = get_wsgi_application()

    views.DELAY = float(os.environ.get("IDEMPOTENCY_SERVE_DELAY", "0"))
    write_delay = float(os.environ.get("IDEMPOTENCY_SERVE_WRITE_DELAY", "0"))
    if write_delay:
        views.AFTER_WRITE.append(lambda: time.sleep(write_delay))
    # With DEBUG off Django sends request errors only to mail_admins; the test wants them on
    # stderr, where it collects them when an assertion fails.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(process)d %(name)s %(levelname)s %(message)s"))
    for logger_name in ("django.request", "django_idempotency"):
        logging.getLogger(logger_name).addHandler(handler)

    server = _Server(("127.0.0.1", 0), WSGIRequestHandler, allow_reuse_address=False)
    server.set_app(application)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
