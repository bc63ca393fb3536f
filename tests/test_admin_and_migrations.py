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


CHANGELIST = "/admin/django_idempotency/idempotencykey/"


def test_changelist_offers_no_bulk_delete(admin_client: Client) -> None:
    done = _row("user:1", "completed", timedelta(hours=1))
    page = admin_client.get(CHANGELIST)
    assert page.status_code == 200
    assert b'value="release_in_flight"' in page.content
    assert b"delete_selected" not in page.content
    # Posting the action anyway must not run it.
    admin_client.post(
        CHANGELIST,
        {"action": "delete_selected", "_selected_action": [done.pk], "post": "yes"},
        follow=True,
    )
    assert IdempotencyKey.objects.filter(pk=done.pk).exists()


@pytest.mark.parametrize("state", ["completed", "unavailable"])
def test_live_completed_record_cannot_be_deleted(admin_client: Client, state: str) -> None:
    done = _row("user:1", state, timedelta(hours=1))
    detail = admin_client.get(f"{CHANGELIST}{done.pk}/change/")
    assert detail.status_code == 200
    assert f"{done.pk}/delete/".encode() not in detail.content
    assert admin_client.get(f"{CHANGELIST}{done.pk}/delete/").status_code == 403
    assert admin_client.post(f"{CHANGELIST}{done.pk}/delete/", {"post": "yes"}).status_code == 403
    assert IdempotencyKey.objects.filter(pk=done.pk).exists()


@pytest.mark.parametrize(
    ("state", "expires_in"),
    [("completed", timedelta(hours=-1)), ("in_flight", timedelta(hours=1))],
)
def test_expired_or_in_flight_record_can_be_deleted(
    admin_client: Client, state: str, expires_in: timedelta
) -> None:
    # An expired record already counts as absent, and deleting an in-flight one releases its key:
    # neither lets a retry run a completed request again.
    row = _row("user:1", state, expires_in)
    detail = admin_client.get(f"{CHANGELIST}{row.pk}/change/")
    assert f"{row.pk}/delete/".encode() in detail.content
    assert admin_client.get(f"{CHANGELIST}{row.pk}/delete/").status_code == 200
    response = admin_client.post(f"{CHANGELIST}{row.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not IdempotencyKey.objects.filter(pk=row.pk).exists()


def test_delete_rechecks_the_record_when_it_deletes(admin_client: Client) -> None:
    # The record completed between the confirmation page and the deletion: it stays.
    from django.contrib import admin as django_admin

    row = _row("user:1", "in_flight", timedelta(hours=1))
    model_admin = django_admin.site._registry[IdempotencyKey]
    request = admin_client.get(CHANGELIST).wsgi_request
    IdempotencyKey.objects.filter(pk=row.pk).update(state="completed", response_status=201)
    pk = row.pk
    model_admin.delete_model(request, row)
    assert IdempotencyKey.objects.filter(pk=pk).exists()


def test_no_missing_migrations() -> None:
    out = StringIO()
    call_command("makemigrations", "django_idempotency", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
