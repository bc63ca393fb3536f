from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from django_idempotency.checks import CHECK_IDS, check_settings


def ids(**settings: Any) -> list[str]:
    with override_settings(**settings):
        return [message.id for message in check_settings()]


def test_default_configuration_is_clean() -> None:
    assert ids() == []


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"IDEMPOTENCY_STORE": "no.such.Store"}, "django_idempotency.E001"),
        ({"IDEMPOTENCY_STORE": "django_idempotency.conf.Settings"}, "django_idempotency.E001"),
        ({"IDEMPOTENCY_TTL": 0}, "django_idempotency.E002"),
        ({"IDEMPOTENCY_LEASE": 0}, "django_idempotency.E002"),
        ({"IDEMPOTENCY_LEASE": 100, "IDEMPOTENCY_TTL": 50}, "django_idempotency.E002"),
        (
            {"IDEMPOTENCY_KEY_MIN_LENGTH": 10, "IDEMPOTENCY_KEY_MAX_LENGTH": 5},
            "django_idempotency.E002",
        ),
        ({"IDEMPOTENCY_WAIT": -1}, "django_idempotency.E002"),
        ({"IDEMPOTENCY_METHODS": ["POST", "GET"]}, "django_idempotency.E003"),
        ({"IDEMPOTENCY_DATABASE": "nope"}, "django_idempotency.E004"),
        ({"IDEMPOTENCY_SCOPE_RESOLVER": "no.such.func"}, "django_idempotency.E005"),
        ({"IDEMPOTENCY_FINGERPRINT": "no.such.func"}, "django_idempotency.E005"),
        ({"IDEMPOTENCY_FAIL_OPEN": True}, "django_idempotency.W002"),
    ],
)
def test_each_check(settings: dict[str, Any], expected: str) -> None:
    assert expected in ids(**{"IDEMPOTENCY_STORE": "db", **settings})


def test_atomic_requests_warns() -> None:
    from django.conf import settings

    # override_settings(DATABASES=...) is refused by Django; flip the flag in place instead.
    default = settings.DATABASES["default"]
    previous = default.get("ATOMIC_REQUESTS", False)
    default["ATOMIC_REQUESTS"] = True
    try:
        assert "django_idempotency.W001" in ids(IDEMPOTENCY_STORE="db")
    finally:
        default["ATOMIC_REQUESTS"] = previous


def test_every_emitted_id_is_registered() -> None:
    emitted = ids(IDEMPOTENCY_STORE="db", IDEMPOTENCY_TTL=0, IDEMPOTENCY_METHODS=["GET"])
    assert {i.removeprefix("django_idempotency.") for i in emitted} <= set(CHECK_IDS)


@pytest.mark.django_db  # model checks query the database's JSON support on newer Django
def test_manage_py_check_fails_on_an_error() -> None:
    with override_settings(IDEMPOTENCY_STORE="no.such.Store"), pytest.raises(SystemCheckError):
        call_command("check")
