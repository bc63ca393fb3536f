"""One OS process that calls a once-only function, for the cross-process function tests.

``python -m tests.function_worker FUNCTION ORDER_ID`` sets Django up on the calling test's
database (``IDEMPOTENCY_SERVE_DB_NAME``, as ``tests.serve`` does), prints ``READY``, waits for a
line on stdin (the test releases every process at once), calls
``tests.testapp.functions.FUNCTION(ORDER_ID)`` and prints one JSON line with the outcome.
``IDEMPOTENCY_SERVE_DELAY`` is how long the body sleeps.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import traceback
from typing import Any


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django
    from django.conf import settings

    name = os.environ.get("IDEMPOTENCY_SERVE_DB_NAME")
    if name:
        settings.DATABASES["default"]["NAME"] = name
    django.setup()

    from django.db import connections

    from django_idempotency import AlreadyInProgress, KeyReused
    from django_idempotency.exceptions import StoreUnavailable
    from tests.testapp import functions

    functions.DELAY = float(os.environ.get("IDEMPOTENCY_SERVE_DELAY", "0"))
    function = getattr(functions, sys.argv[1])
    order_id = sys.argv[2]
    print("READY", flush=True)
    sys.stdin.readline()
    outcome: dict[str, Any]
    try:
        value = function(order_id)
        if inspect.iscoroutine(value):
            value = asyncio.run(value)
        outcome = {"outcome": "value", "value": value}
    except AlreadyInProgress as exc:
        outcome = {"outcome": "in_progress", "retry_after": exc.retry_after}
    except StoreUnavailable as exc:
        outcome = {"outcome": "store_unavailable", "retry_after": exc.retry_after}
    except KeyReused:
        outcome = {"outcome": "key_reused"}
    except BaseException:
        outcome = {"outcome": "error", "traceback": traceback.format_exc()}
    finally:
        connections.close_all()
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
