"""``manage.py idempotency_stats``: exact output on a seeded store."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from django_idempotency.management.commands import idempotency_stats
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import State, StoredResponse

pytestmark = pytest.mark.django_db(transaction=True)

# The real time, frozen: the Redis store also expires records by the server's clock.
NOW = datetime.now(dt_timezone.utc).replace(microsecond=0)
MINUTE, HOUR, DAY = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)


def at(offset: timedelta) -> str:
    return (NOW + offset).isoformat()


ON_DB = pytest.mark.skipif(settings.STORE_BACKEND != "db", reason="the ORM store's output")
ON_REDIS = pytest.mark.skipif(settings.STORE_BACKEND != "redis", reason="the Redis store's output")


@pytest.fixture(autouse=True)
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idempotency_stats, "now", lambda: NOW)


def stats(*args: str) -> str:
    out = StringIO()
    call_command("idempotency_stats", *args, stdout=out)
    return out.getvalue()


def seed_rows() -> None:
    from django_idempotency.models import IdempotencyKey

    def row(letter: str, state: State, created: timedelta, lease: timedelta, expires: timedelta,
            status: int | None = None, body: bytes | None = None) -> IdempotencyKey:  # fmt: skip
        return IdempotencyKey(
            scope="user:1",
            key_hash=letter * 64,
            fingerprint="f" * 64,
            state=state.value,
            owner_token="t" * 32,
            created_at=NOW - created,
            lease_expires_at=NOW + lease,
            expires_at=NOW + expires,
            response_status=status,
            response_body=body,
        )

    minute, hour, day = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
    IdempotencyKey.objects.bulk_create(
        [
            row("a", State.COMPLETED, 10 * minute, -9 * minute, day - 10 * minute, 201, b"x" * 100),
            row("b", State.COMPLETED, 2 * hour, -hour, 22 * hour, 200, b"y" * 5000),
            row("c", State.IN_FLIGHT, 5 * minute, minute, day - 5 * minute),
            # A worker died three days ago: stuck in flight, and past its retention too.
            row("d", State.IN_FLIGHT, 3 * day, -3 * day + minute, -2 * day),
            row("e", State.UNAVAILABLE, 8 * day, -8 * day, -7 * day, 201),
        ]
    )


@ON_DB
def test_database_output_is_exact() -> None:
    seed_rows()
    assert stats() == (
        f'Idempotency records at {at(timedelta())} (ORM store, database "default")\n'
        "Total: 5\n"
        "By state:\n"
        "  in_flight            2\n"
        "  completed            2\n"
        "  unavailable          1\n"
        "By age (since created):\n"
        "  < 1h                 2\n"
        "  < 24h                1\n"
        "  < 7d                 1\n"
        "  >= 7d                1\n"
        "By expiry (time left):\n"
        "  expired              2\n"
        "  < 1h                 0\n"
        "  < 24h                3\n"
        "  < 7d                 0\n"
        "  >= 7d                0\n"
        f"In flight past their lease: 1 (oldest lease ended {at(-3 * DAY + MINUTE)})\n"
        "Largest stored responses:\n"
        f"        5000 bytes  status 200  key bbbbbbbbbbbb  created {at(-2 * HOUR)}\n"
        f"         100 bytes  status 201  key aaaaaaaaaaaa  created {at(-10 * MINUTE)}\n"
        "Replays per view: not recorded by the store; count them with the Prometheus exporter "
        '(django_idempotency_requests_total{outcome="replayed"})\n'
    )


@ON_DB
def test_database_json() -> None:
    seed_rows()
    data = json.loads(stats("--json", "--largest", "1"))
    assert data["sampled"] is False
    assert data["total"] == 5
    assert data["by_state"] == {"in_flight": 2, "completed": 2, "unavailable": 1}
    assert data["by_expiry"] == {"expired": 2, "lt_1h": 0, "lt_24h": 3, "lt_7d": 0, "ge_7d": 0}
    assert data["in_flight_past_lease"] == {
        "count": 1,
        "oldest_lease_end": at(-3 * DAY + MINUTE),
    }
    assert data["largest_responses"] == [
        {
            "key_hash": "bbbbbbbbbbbb",
            "status": 200,
            "bytes": 5000,
            "created_at": at(-2 * HOUR),
        }
    ]


@ON_DB
def test_an_empty_table() -> None:
    output = stats()
    assert "Total: 0\n" in output
    assert "In flight past their lease: 0\n" in output
    assert "Largest stored responses:\n  (none)\n" in output


def seed_redis() -> None:
    storage = get_storage()
    minute, hour = timedelta(minutes=1), timedelta(hours=1)
    specs: list[tuple[str, timedelta, timedelta, Any]] = [
        # key, created before NOW, lease, completion body (None: left in flight)
        ("a", 10 * minute, minute, b"x" * 100),
        ("b", 2 * hour, minute, b"y" * 5000),
        ("c", 5 * minute, 10 * minute, None),  # in flight, lease still running
        ("d", 3 * minute, minute, None),  # in flight, lease ended two minutes ago
    ]
    for letter, age, lease, body in specs:
        claim = storage.claim(
            "user:1",
            letter * 64,
            "f" * 64,
            now=NOW - age,
            lease=lease,
            ttl=timedelta(hours=24),
        )
        assert claim.token is not None
        if body is not None:
            response = StoredResponse(status=201, headers=(), body=body)
            storage.complete(
                "user:1", letter * 64, claim.token, response, now=NOW - age, min_retention=lease
            )


@ON_REDIS
def test_redis_output_is_a_bounded_sample() -> None:
    seed_redis()
    data = json.loads(stats("--json"))
    assert data["sampled"] is True
    assert data["total"] == 4
    assert data["by_state"] == {"in_flight": 2, "completed": 2, "unavailable": 0}
    assert data["by_age"] == {"lt_1h": 3, "lt_24h": 1, "lt_7d": 0, "ge_7d": 0}
    assert data["in_flight_past_lease"] == {
        "count": 1,
        "oldest_lease_end": at(-2 * MINUTE),
    }
    assert [(r["bytes"], r["status"]) for r in data["largest_responses"]] == [
        (5000, 201),
        (100, 201),
    ]
    assert json.loads(stats("--json", "--sample", "2"))["total"] == 2
    text = stats()
    assert "a SCAN sample of at most 10000 records: counts are of the sample" in text


def test_other_stores_are_refused() -> None:
    caches = {**settings.CACHES} if hasattr(settings, "CACHES") else {}
    caches["stats-locmem"] = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    with (
        override_settings(
            CACHES=caches, IDEMPOTENCY_STORE="cache", IDEMPOTENCY_CACHE_ALIAS="stats-locmem"
        ),
        pytest.raises(CommandError, match="cannot be inspected"),
    ):
        stats()
