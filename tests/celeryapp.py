"""The Celery app of the ``contrib.celery`` tests: a real worker on the Redis broker.

``celery -A tests.celeryapp worker --pool=solo`` runs it on the calling test's database
(``IDEMPOTENCY_SERVE_DB_NAME``, as ``tests.serve`` does). The broker is Redis database 14
(``IDEMPOTENCY_TEST_CELERY_BROKER``) and each test run has its own queue
(``IDEMPOTENCY_TEST_CELERY_QUEUE``), so that runs sharing the server never take each other's
tasks. A short visibility timeout, swept every second, redelivers the task of a killed worker
within seconds instead of an hour.

Every task reports to a Redis list (``events_key(run)``): ``body`` each time a body starts (so a
test can count executions, committed or not), and the worker's signals add ``retry``,
``success`` and ``failure``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
_DB_NAME = os.environ.get("IDEMPOTENCY_SERVE_DB_NAME")
#: While this file exists, the worker's next claim fails as a store outage does (StoreError),
#: and removes the file: one outage, then the real store again.
OUTAGE_FILE = os.environ.get("IDEMPOTENCY_TEST_CELERY_OUTAGE_FILE", "")
_REAL_STORE = ""
if _DB_NAME or OUTAGE_FILE:
    from django.conf import settings

    if _DB_NAME:
        settings.DATABASES["default"]["NAME"] = _DB_NAME
    if OUTAGE_FILE:
        _REAL_STORE = settings.IDEMPOTENCY_STORE
        settings.IDEMPOTENCY_STORE = "tests.celeryapp.OutageStore"
django.setup()

import redis  # noqa: E402
from celery import Celery, shared_task, signals  # noqa: E402
from django.utils.module_loading import import_string  # noqa: E402

from django_idempotency.contrib.celery import idempotent_task  # noqa: E402
from django_idempotency.exceptions import StoreError  # noqa: E402
from django_idempotency.storage import ALIASES  # noqa: E402
from django_idempotency.storage.base import Claim  # noqa: E402
from tests.testapp.models import Payment  # noqa: E402

if _REAL_STORE:

    class OutageStore(import_string(ALIASES.get(_REAL_STORE, _REAL_STORE))):  # type: ignore[misc]
        def claim(self, *args: Any, **kwargs: Any) -> Claim:
            if os.path.exists(OUTAGE_FILE):
                os.unlink(OUTAGE_FILE)
                raise StoreError("the store is down for this test")
            claim: Claim = super().claim(*args, **kwargs)
            return claim


BROKER_URL = os.environ.get("IDEMPOTENCY_TEST_CELERY_BROKER", "redis://127.0.0.1:6379/14")
QUEUE = os.environ.get("IDEMPOTENCY_TEST_CELERY_QUEUE", f"idem-tests-{os.getpid()}")
#: Seconds a dead worker's claim holds its key (the heartbeat renews a live one).
LEASE = 6
#: Seconds before Redis hands an unacknowledged task to another worker.
VISIBILITY_TIMEOUT = 2

app = Celery("idempotency_tests", broker=BROKER_URL, set_as_current=True)
app.conf.update(
    task_default_queue=QUEUE,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
app.set_default()

_redis = redis.Redis.from_url(BROKER_URL)


def events_key(run: str) -> str:
    return f"{QUEUE}:events:{run}"


def report(run: str, event: str, **details: Any) -> None:
    _redis.rpush(events_key(run), json.dumps({"event": event, "pid": os.getpid(), **details}))


def events(run: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in _redis.lrange(events_key(run), 0, -1)]


def _run_of(sender: Any, args: Any, kwargs: Any) -> str | None:
    if sender is None or not str(getattr(sender, "name", "")).startswith("tests.celeryapp."):
        return None
    return str(args[0]) if args else kwargs.get("run")


def ready_key() -> str:
    return f"{QUEUE}:ready"


@signals.worker_ready.connect
def _on_ready(**_: Any) -> None:
    _redis.rpush(ready_key(), os.getpid())


@signals.task_retry.connect
def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    run = _run_of(sender, request.args, request.kwargs)
    if run is not None:
        report(run, "retry", reason=type(reason).__name__)


@signals.task_success.connect
def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    run = _run_of(sender, sender.request.args, sender.request.kwargs)
    if run is not None:
        report(run, "success", result=result)


@signals.task_failure.connect
def _on_failure(
    sender: Any = None, exception: Any = None, args: Any = (), kwargs: Any = None, **_: Any
) -> None:
    run = _run_of(sender, args, kwargs or {})
    if run is not None:
        report(run, "failure", error=repr(exception))


def _body(run: str, amount: int, *, sleep: float, fail: bool = False) -> dict[str, Any]:
    attempt = len([e for e in events(run) if e["event"] == "body"]) + 1
    report(run, "body", attempt=attempt)
    payment = Payment.objects.create(amount=amount)
    if sleep and attempt == 1:
        time.sleep(sleep)  # only the first execution is slow: the one the tests kill
    if fail and attempt == 1:
        raise RuntimeError("mail server down")
    return {"payment": payment.pk, "run": run}


@shared_task(bind=True, acks_late=True, name="tests.celeryapp.charge")
@idempotent_task(key=lambda run, amount, sleep=0.0: f"charge:{run}", lease=LEASE)
def charge(self: Any, run: str, amount: int, sleep: float = 0.0) -> dict[str, Any]:
    return _body(run, amount, sleep=sleep)


@shared_task(
    bind=True,
    acks_late=True,
    name="tests.celeryapp.flaky",
    autoretry_for=(RuntimeError,),
    retry_kwargs={"max_retries": 3, "countdown": 0},
)
@idempotent_task(key=lambda run, amount: f"flaky:{run}", lease=LEASE)
def flaky(self: Any, run: str, amount: int) -> dict[str, Any]:
    return _body(run, amount, sleep=0.0, fail=True)
