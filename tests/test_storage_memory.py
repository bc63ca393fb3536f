"""The in-memory store: the store contract within one process, and its refusal outside tests.

The ORM store's contract tests that do not look at its table run here unchanged against the
memory store (the module's ``store`` fixture replaces theirs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import Client, override_settings
from django.utils import timezone

from django_idempotency import checks
from django_idempotency.checks import CHECK_IDS, check_settings
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import Claim, PurgeBatch, State, StoredResponse
from django_idempotency.storage.memory import MEMORY_STORE, MemoryStorage

ROOT = Path(__file__).resolve().parent.parent
LEASE = timedelta(seconds=60)
TTL = timedelta(hours=24)
RESPONSE = StoredResponse(status=201, headers=(("Content-Type", "text/plain"),), body=b"\x00ok")


@pytest.fixture
def store() -> MemoryStorage:
    return MemoryStorage()


# The store contract (claim, completion, fencing, renewal) runs on this store in
# tests/test_storage.py; these are the memory store's own guarantees.


def test_expired_record_counts_as_absent(store: MemoryStorage) -> None:
    start = timezone.now()
    first = store.claim("s", "h", "fp", now=start, lease=LEASE, ttl=TTL)
    assert first.token is not None
    assert store.complete("s", "h", first.token, RESPONSE, now=start)
    again = store.claim("s", "h", "another body", now=start + TTL, lease=LEASE, ttl=TTL)
    assert again.won
    assert not again.reclaimed
    record = store.get("s", "h")
    assert record is not None
    assert record.state is State.IN_FLIGHT
    assert record.fingerprint == "another body"
    assert len(store) == 1


def test_completed_and_mismatched_claims_return_the_record(store: MemoryStorage) -> None:
    now = timezone.now()
    claim = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
    assert claim.token is not None
    mismatch = store.claim("s", "h", "other", now=now, lease=LEASE, ttl=TTL)
    assert mismatch.record is not None
    assert mismatch.record.state is State.IN_FLIGHT
    assert store.complete("s", "h", claim.token, RESPONSE, now=now)
    # A completed record is final: neither its owner nor a late duplicate can change it.
    assert not store.complete("s", "h", claim.token, None, now=now)
    assert not store.release("s", "h", claim.token)
    late = store.claim("s", "h", "fp", now=now + 2 * LEASE, lease=LEASE, ttl=TTL)
    assert late.record is not None
    assert late.record.response == RESPONSE
    # Scopes are separate records.
    assert store.claim("other-scope", "h", "fp", now=now, lease=LEASE, ttl=TTL).won


def test_one_of_many_threads_wins_the_claim(store: MemoryStorage) -> None:
    now = timezone.now()
    barrier = threading.Barrier(32, timeout=10)
    claims: list[Claim] = []
    lock = threading.Lock()

    def claim() -> None:
        barrier.wait()
        result = store.claim("s", "h", "fp", now=now, lease=LEASE, ttl=TTL)
        with lock:
            claims.append(result)

    threads = [threading.Thread(target=claim, daemon=True) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(claims) == 32
    assert sum(c.won for c in claims) == 1


def test_purge_deletes_only_what_is_expired_or_stale(store: MemoryStorage) -> None:
    start = timezone.now()
    for index in range(5):
        done = store.claim("s", f"done-{index}", "fp", now=start, lease=LEASE, ttl=TTL)
        assert done.token is not None
        store.complete("s", f"done-{index}", done.token, RESPONSE, now=start)
    store.claim("s", "live", "fp", now=start + TTL, lease=LEASE, ttl=TTL)
    store.claim("s", "stuck", "fp", now=start + TTL - timedelta(hours=2), lease=LEASE, ttl=TTL)
    later = start + TTL
    batches: list[PurgeBatch] = []

    dry = store.purge_expired(now=later, dry_run=True, batch_size=2)
    assert (dry.deleted, dry.batches, dry.dry_run) == (5, 3, True)
    assert len(store) == 7

    limited = store.purge_expired(now=later, batch_size=2, max_batches=1)
    assert (limited.deleted, limited.stopped_by) == (2, "max_batches")

    result = store.purge_expired(
        now=later, batch_size=2, stale_in_flight=timedelta(hours=1), progress=batches.append
    )
    assert (result.deleted, result.stale_in_flight) == (4, 1)
    assert [b.kind for b in batches] == ["expired", "expired", "stale_in_flight"]
    assert store.get("s", "live") is not None
    assert store.get("s", "stuck") is None
    assert len(store) == 1


# --- through the engine -------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_retry_replays_from_the_memory_store(memory_idempotency_store: MemoryStorage) -> None:
    """The whole request path runs on the memory store: its records, not the table's."""
    from django_idempotency.models import IdempotencyKey

    client = Client(headers={"Idempotency-Key": str(uuid.uuid4())})
    first = client.post("/mixin/payments/", {"amount": 5}, content_type="application/json")
    retry = client.post("/mixin/payments/", {"amount": 5}, content_type="application/json")
    assert first.status_code == retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(memory_idempotency_store) == 1
    assert not IdempotencyKey.objects.exists()


def test_the_plugin_empties_a_configured_memory_store_between_tests() -> None:
    from django_idempotency.testing import _clear_memory_store

    with override_settings(IDEMPOTENCY_STORE=MEMORY_STORE):
        store = get_storage()
        assert isinstance(store, MemoryStorage)
        store.claim("s", "h", "fp", now=timezone.now(), lease=LEASE, ttl=TTL)
        _clear_memory_store()
        assert len(store) == 0


# --- the system check ---------------------------------------------------------------------------


def test_e008_is_registered() -> None:
    assert "E008" in CHECK_IDS


def test_each_test_run_signal_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.test import utils

    monkeypatch.delenv("PYTEST_VERSION", raising=False)
    monkeypatch.setattr(sys, "argv", ["gunicorn", "shop.wsgi"])
    # pytest-django has set up Django's test environment for this session.
    assert checks.running_tests()
    monkeypatch.delattr(utils._TestState, "saved_data")
    assert not checks.running_tests()
    monkeypatch.setattr(sys, "argv", ["manage.py", "test"])
    assert checks.running_tests()
    monkeypatch.setattr(sys, "argv", ["manage.py", "check"])
    assert not checks.running_tests()
    monkeypatch.setenv("PYTEST_VERSION", "9.0")
    assert checks.running_tests()


def test_the_memory_store_passes_the_checks_in_a_test_run() -> None:
    with override_settings(IDEMPOTENCY_STORE=MEMORY_STORE):
        assert [m.id for m in check_settings()] == []


def test_the_memory_store_is_refused_outside_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "running_tests", lambda: False)
    with override_settings(IDEMPOTENCY_STORE=MEMORY_STORE):
        messages = check_settings()
    assert [m.id for m in messages] == ["django_idempotency.E008"]
    assert "another worker" in messages[0].msg
    assert "test runs only" in messages[0].hint


def test_a_subclass_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "running_tests", lambda: False)
    with override_settings(IDEMPOTENCY_STORE=f"{__name__}.CountingMemoryStorage"):
        assert [m.id for m in check_settings()] == ["django_idempotency.E008"]


class CountingMemoryStorage(MemoryStorage):
    pass


def _django(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``django-admin`` in a fresh process that is not a test run, on the memory store."""
    (tmp_path / "memory_settings.py").write_text(
        f"from tests.settings import *  # noqa: F403\nIDEMPOTENCY_STORE = {MEMORY_STORE!r}\n"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTEST_VERSION", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="memory_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
    )
    return subprocess.run(  # noqa: S603 - our interpreter, no shell
        [sys.executable, "-m", "django", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_manage_py_check_refuses_the_memory_store(tmp_path: Path) -> None:
    result = _django(tmp_path, "check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "django_idempotency.E008" in result.stderr


def test_manage_py_test_accepts_the_memory_store(tmp_path: Path) -> None:
    """Django's runner sets up the test environment before it runs the checks."""
    tests = tmp_path / "memory_suite"
    tests.mkdir()
    (tests / "__init__.py").write_text("")
    (tests / "test_nothing.py").write_text(
        "from unittest import TestCase\n\n\n"
        "class Nothing(TestCase):\n"
        "    def test_nothing(self):\n"
        "        pass\n"
    )
    result = _django(tmp_path, "test", "memory_suite", "--noinput")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "E008" not in result.stderr
    assert "Ran 1 test" in result.stderr
