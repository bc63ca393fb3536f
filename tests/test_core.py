"""The engine's pieces below the entry points: a flight's lease renewal and its settling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from django.http import HttpResponse
from django.test import Client

from django_idempotency import core, signals
from django_idempotency.core import Flight, Policy
from django_idempotency.heartbeat import heartbeat
from django_idempotency.storage import get_storage
from django_idempotency.storage.db import DatabaseStorage
from tests.faults import unreachable_database
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db(transaction=True)

LEASE = timedelta(seconds=3)


def _flight(storage: Any, key_hash: str = "h") -> Flight:
    claim = storage.claim("s", key_hash, "fp", now=core.now(), lease=LEASE, ttl=timedelta(hours=1))
    assert claim.token is not None
    return Flight(Policy(lease=3), storage, claim.token, request=None, scope="s", key_hash=key_hash)


def test_a_renewal_moves_the_lease_of_an_owned_claim() -> None:
    storage = get_storage()
    flight = _flight(storage)
    before = storage.get("s", "h")
    assert before is not None
    later = before.lease_expires_at + timedelta(seconds=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "now", lambda: later)
        assert flight.renew()
    after = storage.get("s", "h")
    assert after is not None
    assert after.lease_expires_at == later + LEASE
    flight.release()


def test_a_lost_or_settled_claim_stops_the_renewals(caplog: pytest.LogCaptureFixture) -> None:
    storage = get_storage()
    lost = _flight(storage, "lost")
    assert storage.release("s", "lost", lost.token)  # as if another request had taken it
    assert not lost.renew()
    assert "was lost while its view ran" in caplog.text
    settled = _flight(storage, "settled")
    settled.release()
    assert not settled.renew()


def test_a_failing_renewal_is_reported_and_retried() -> None:
    stages: list[str] = []

    def on_error(sender: Any, stage: str, **kwargs: Any) -> None:
        stages.append(stage)

    storage = DatabaseStorage()
    flight = _flight(storage)
    signals.store_error.connect(on_error)
    try:
        with unreachable_database() as alias:
            flight.storage = DatabaseStorage(using=alias)
            assert flight.renew()  # keep beating: two thirds of the lease are left
    finally:
        signals.store_error.disconnect(on_error)
    assert stages == ["renew"]
    flight.storage = storage
    flight.release()
    assert storage.get("s", "h") is None


def test_a_settled_flight_ignores_later_calls_and_stops_beating() -> None:
    storage = get_storage()
    flight = _flight(storage)
    tracked = heartbeat.tracked()
    flight.release()
    assert heartbeat.tracked() == tracked - 1
    retry = _flight(storage)  # the retry claims the key again
    flight.fail(RuntimeError, RuntimeError("late"), None)
    assert flight.finish(HttpResponse(status=201)).status_code == 201
    record = storage.get("s", "h")
    assert record is not None  # the retry's claim is untouched
    retry.release()


@pytest.fixture
def reconnecting() -> Iterator[None]:
    """Database connections opened afresh after the test: a connection reads USE_TZ when it
    opens (PostgreSQL's and SQLite's datetime converters), and the settings fixture restores
    the setting before this fixture's teardown runs."""
    yield
    connections.close_all()


@pytest.mark.parametrize("use_tz", [False, True])
def test_the_clock_and_the_records_follow_use_tz(
    reconnecting: None, settings: Any, use_tz: bool
) -> None:
    # USE_TZ is kept by the package's settings; a change must reach the clock and the records'
    # times at once, or the engine would compare naive and aware datetimes.
    settings.USE_TZ = not use_tz
    assert (core.now().tzinfo is not None) is (not use_tz)
    settings.USE_TZ = use_tz
    assert (core.now().tzinfo is not None) is use_tz
    connections.close_all()  # the next query opens a connection that reads the new USE_TZ
    client = Client()
    answers = [
        client.post(
            "/mixin/payments/",
            json.dumps({"amount": 10}),
            content_type="application/json",
            HTTP_IDEMPOTENCY_KEY=f"tz-{use_tz}",
        )
        for _ in range(2)
    ]
    assert [answer.status_code for answer in answers] == [201, 201]
    assert answers[1]["Idempotent-Replayed"] == "true"
    assert answers[1].content == answers[0].content
    assert Payment.objects.count() == 1
