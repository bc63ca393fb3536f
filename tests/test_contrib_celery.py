"""``django_idempotency.contrib.celery`` with real workers on the Redis broker (issue 10).

Each test starts ``celery worker --pool=solo`` processes on the test database (``tests.celeryapp``,
Redis database 14, a queue of this run's own) and stops them by PID. The task bodies write a
``Payment`` in their transaction and report each execution to Redis, so the tests count both
what ran and what committed. Without Redis they skip, and fail under
``IDEMPOTENCY_TEST_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from tests.backends import redis_endpoint
from tests.conftest import REQUIRE_SERVICES

os.environ.setdefault("IDEMPOTENCY_TEST_CELERY_QUEUE", f"idem-tests-{os.getpid()}")
BROKER = os.environ.setdefault("IDEMPOTENCY_TEST_CELERY_BROKER", "redis://127.0.0.1:6379/14")

if not redis_endpoint(BROKER).answers():
    reason = f"Redis for the Celery broker does not answer at {redis_endpoint(BROKER)}"
    if REQUIRE_SERVICES:
        raise RuntimeError(f"{reason} and IDEMPOTENCY_TEST_REQUIRE_SERVICES=1")
    pytest.skip(reason, allow_module_level=True)

from django_idempotency import AlreadyInProgress  # noqa: E402
from django_idempotency.contrib.celery import idempotent_task  # noqa: E402
from django_idempotency.keys import hash_key  # noqa: E402
from django_idempotency.storage import get_storage  # noqa: E402
from tests import celeryapp  # noqa: E402 - needs the queue name above
from tests.testapp.models import Payment  # noqa: E402

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 40.0


class Workers:
    """Worker processes of one test; each is stopped by its PID when the test ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, count: int = 1, **extra_env: str) -> list[subprocess.Popen[bytes]]:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "IDEMPOTENCY_SERVE_DB_NAME": str(connection.settings_dict["NAME"]),
            **extra_env,
        }
        started = []
        for _ in range(count):
            number = len(self.processes)
            with (self.log_dir / f"worker-{number}.log").open("wb") as log:
                process = subprocess.Popen(  # noqa: S603 - our own app, no shell
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "tests.celeryapp",
                        "worker",
                        "--pool=solo",
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                        "--loglevel=INFO",
                        "-Q",
                        celeryapp.QUEUE,
                        "-n",
                        f"w{number}-{uuid.uuid4().hex[:6]}@%h",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.processes.append(process)
            started.append(process)
        wanted = {p.pid for p in started}
        deadline = time.monotonic() + TIMEOUT
        while wanted - self.ready():
            for process in started:
                assert process.poll() is None, f"worker exited:\n{self.logs()}"
            assert time.monotonic() < deadline, f"workers not ready:\n{self.logs()}"
            time.sleep(0.1)
        return started

    def ready(self) -> set[int]:
        return {int(pid) for pid in celeryapp._redis.lrange(celeryapp.ready_key(), 0, -1)}

    def logs(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-3000:] for path in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # warm shutdown
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    running = Workers(tmp_path)
    try:
        yield running
    finally:
        running.stop()
        # This run's queue, its events and the workers' ready marks; kombu's own bookkeeping
        # keys are shared by every run on the broker database and stay.
        leftovers = list(celeryapp._redis.scan_iter(match=f"{celeryapp.QUEUE}*"))
        if leftovers:
            celeryapp._redis.delete(*leftovers)


def new_run() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def wait_for(
    run: str, condition: Callable[[list[dict[str, Any]]], bool], workers: Workers
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        events = celeryapp.events(run)
        if condition(events):
            return events
        assert time.monotonic() < deadline, f"timed out; events {events}\n{workers.logs()}"
        time.sleep(0.1)


def count(events: list[dict[str, Any]], kind: str) -> int:
    return sum(1 for e in events if e["event"] == kind)


def test_task_published_twice_with_the_same_key_executes_once(workers: Workers) -> None:
    workers.start(2)
    run = new_run()
    celeryapp.charge.delay(run, 100, 1.0)
    celeryapp.charge.delay(run, 100, 1.0)

    events = wait_for(run, lambda e: count(e, "success") == 2, workers)
    assert count(events, "body") == 1, events
    assert count(events, "failure") == 0, events
    results = [e["result"] for e in events if e["event"] == "success"]
    payment = Payment.objects.get()
    assert results == [{"payment": payment.pk, "run": run}] * 2


def test_worker_killed_mid_task_is_redelivered_and_runs_once_after_the_lease(
    workers: Workers,
) -> None:
    (first,) = workers.start(1)
    run = new_run()
    celeryapp.charge.delay(run, 100, 60.0)  # the first execution would take a minute
    wait_for(run, lambda e: count(e, "body") == 1, workers)
    time.sleep(0.3)  # inside the body, after its payment row was written
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=TIMEOUT)
    killed_at = time.monotonic()

    workers.start(1)
    events = wait_for(run, lambda e: count(e, "success") == 1, workers)
    # The redelivery met the dead worker's claim, was retried (not failed) until the lease
    # ended, then ran once; the killed execution's row rolled back with its transaction.
    assert count(events, "retry") >= 1, events
    assert count(events, "failure") == 0, events
    assert count(events, "body") == 2, events
    assert events[-1]["event"] == "success"
    assert time.monotonic() - killed_at < celeryapp.LEASE + TIMEOUT / 2
    payment = Payment.objects.get()
    assert events[-1]["result"] == {"payment": payment.pk, "run": run}


def test_task_that_raises_is_run_again_by_celerys_retry(workers: Workers) -> None:
    workers.start(1)
    run = new_run()
    celeryapp.flaky.delay(run, 100)

    events = wait_for(run, lambda e: count(e, "success") == 1, workers)
    assert [e["event"] for e in events] == ["body", "retry", "body", "success"], events
    payment = Payment.objects.get()
    assert events[-1]["result"] == {"payment": payment.pk, "run": run}


def test_store_outage_at_claim_is_retried_and_the_task_runs_once(
    workers: Workers, tmp_path: Path
) -> None:
    """The body never ran, so the task must not be acknowledged as failed: it is retried."""
    outage = tmp_path / "outage"
    outage.touch()
    workers.start(1, IDEMPOTENCY_TEST_CELERY_OUTAGE_FILE=str(outage))
    run = new_run()
    celeryapp.charge.delay(run, 100)

    events = wait_for(run, lambda e: count(e, "success") + count(e, "failure") >= 1, workers)
    assert not outage.exists()  # the outage happened
    assert [e["event"] for e in events] == ["retry", "body", "success"], events
    assert Payment.objects.count() == 1


# --- in this process: eager calls and decoration errors ---------------------------------------


def test_eager_call_runs_once_and_a_key_in_flight_reaches_the_caller() -> None:
    run = new_run()
    first = celeryapp.charge.apply(args=(run, 100)).get()
    assert celeryapp.charge.apply(args=(run, 100)).get() == first
    assert count(celeryapp.events(run), "body") == 1

    # No worker to retry on: an eager call gets AlreadyInProgress itself.
    other = new_run()
    once = celeryapp.charge.__wrapped__.idempotency  # the function under @shared_task
    scope, _, fingerprint = once.identify((other, 100), {})
    key_hash = hash_key(scope, f"charge:{other}")
    get_storage().claim(
        scope,
        key_hash,
        fingerprint,
        now=timezone.now(),
        lease=timedelta(seconds=60),
        ttl=timedelta(hours=1),
    )
    result = celeryapp.charge.apply(args=(other, 100))
    assert isinstance(result.result, AlreadyInProgress)
    assert count(celeryapp.events(other), "body") == 0


def test_decorating_what_is_not_a_bound_sync_task_is_a_type_error() -> None:
    decorate = idempotent_task(key=lambda: "k")
    with pytest.raises(TypeError, match="bind=True"):
        decorate(lambda: None)

    async def body(self: Any) -> None: ...

    with pytest.raises(TypeError, match="synchronous"):
        decorate(body)
