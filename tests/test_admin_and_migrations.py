from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from django_idempotency.models import IdempotencyKey
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _row(scope: str, state: str, expires_in: timedelta) -> IdempotencyKey:
    now = timezone.now()
    row: IdempotencyKey = IdempotencyKey.objects.create(
        scope=scope,
        key_hash=f"{scope}-{state}".ljust(64, "0")[:64],
        fingerprint="f" * 64,
        state=state,
        owner_token="t" * 32,
        created_at=now,
        lease_expires_at=now + timedelta(seconds=60),
        expires_at=now + expires_in,
        response_status=201 if state == "completed" else None,
    )
    return row


@pytest.fixture
def admin_client() -> Client:
    client = Client()
    client.force_login(UserFactory.create(is_staff=True, is_superuser=True))
    return client


def test_admin_lists_searches_and_filters(admin_client: Client) -> None:
    _row("user:1", "completed", timedelta(hours=1))
    _row("user:2", "in_flight", timedelta(hours=-1))
    url = "/admin/django_idempotency/idempotencykey/"
    assert b"user:1" in admin_client.get(url).content
    searched = admin_client.get(url, {"q": "user:2"}).content
    assert b"user:2" in searched
    assert b"user:1" not in searched
    expired = admin_client.get(url, {"expired": "yes"}).content
    assert b"user:2" in expired
    assert b"user:1" not in expired
    live = admin_client.get(url, {"expired": "no"}).content
    assert b"user:1" in live
    assert b"user:2" not in live
    assert admin_client.get(url + "add/").status_code == 403


def test_admin_action_releases_only_in_flight_keys(admin_client: Client) -> None:
    done = _row("user:1", "completed", timedelta(hours=1))
    stuck = _row("user:2", "in_flight", timedelta(hours=1))
    response = admin_client.post(
        "/admin/django_idempotency/idempotencykey/",
        {"action": "release_in_flight", "_selected_action": [done.pk, stuck.pk]},
        follow=True,
    )
    assert b"Released 1 in-flight key(s)." in response.content
    assert list(IdempotencyKey.objects.values_list("scope", flat=True)) == ["user:1"]
    assert str(done).startswith("user:1 ")


def test_no_missing_migrations() -> None:
    out = StringIO()
    call_command("makemigrations", "django_idempotency", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
