"""What only the middleware can show: path matching, exemptions, views that protect themselves,
and the scope of DRF views it protects. The contract itself runs over the middleware in the
behaviour suite (the ``middleware-*`` entries of ``tests/behaviour.py``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client, modify_settings, override_settings
from rest_framework.authtoken.models import Token

from django_idempotency import signals
from django_idempotency.checks import check_settings
from django_idempotency.middleware import path_is_protected
from tests.behaviour import record_for, send
from tests.factories import UserFactory
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db(transaction=True)

MIDDLEWARE = "django_idempotency.middleware.IdempotencyMiddleware"


@pytest.fixture
def claims() -> Iterator[list[str]]:
    seen: list[str] = []

    def receiver(sender: Any, key_hash: str, **kwargs: Any) -> None:
        seen.append(key_hash)

    signals.key_claimed.connect(receiver)
    yield seen
    signals.key_claimed.disconnect(receiver)


@pytest.fixture
def client() -> Client:
    client = Client()
    client.force_login(UserFactory.create())
    return client


@pytest.mark.parametrize(
    "url", ["/mw/apiview/payments/", "/mw/viewset/payments/refund/", "/mw/api-view/payments/"]
)
def test_token_users_with_the_same_key_and_body_each_get_their_own_result(url: str) -> None:
    # DRF authenticates the token inside the view; a claim made in process_view would see two
    # anonymous requests and replay the first user's payment to the second.
    users = [UserFactory.create(), UserFactory.create()]
    tokens = [Token.objects.create(user=user).key for user in users]
    client = Client()
    first, second = (
        send(client, url, key="same", HTTP_AUTHORIZATION=f"Token {token}") for token in tokens
    )
    assert first.status_code == second.status_code == 201
    assert "Idempotent-Replayed" not in second
    ids = [json.loads(r.content)["id"] for r in (first, second)]
    assert ids[0] != ids[1]
    owners = [Payment.objects.get(pk=pk).user_id for pk in ids]
    assert owners == [users[0].pk, users[1].pk]
    again = send(client, url, key="same", HTTP_AUTHORIZATION=f"Token {tokens[1]}")
    assert again["Idempotent-Replayed"] == "true"
    assert again.content == second.content
    assert all(record_for(user, "same") is not None for user in users)
    assert record_for(None, "same") is None


@pytest.mark.parametrize(
    "url",
    [
        "/mw/exempt/django/",
        "/mw/exempt/cbv/",
        "/mw/exempt/apiview/",
        "/mw/exempt/api-view/",
        "/mw/viewset/payments/exempt/",
    ],
)
def test_exempt_views_are_left_alone(client: Client, url: str, claims: list[str]) -> None:
    first = send(client, url, key="k")
    second = send(client, url, key="k")
    assert first.status_code == second.status_code == 201
    assert "Idempotent-Replayed" not in second
    assert Payment.objects.count() == 2
    assert claims == []


@pytest.mark.parametrize("url", ["/mw/own/mixin/", "/mw/own/api-view/", "/mw/own/django/"])
def test_a_view_that_protects_itself_keeps_its_options(
    client: Client, url: str, claims: list[str]
) -> None:
    # Each of these requires a key; the middleware's policy (the settings) does not.
    missing = send(client, url)
    assert missing.status_code == 400
    assert json.loads(missing.content)["type"].endswith("#idempotency-key-missing")
    first = send(client, url, key="k")
    second = send(client, url, key="k")
    assert first.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1
    assert len(claims) == 1  # claimed once, by the view's own entry point


def test_unlisted_paths_and_safe_methods_pass_through(client: Client, claims: list[str]) -> None:
    with override_settings(IDEMPOTENCY_PATHS=["/elsewhere/"]):
        send(client, "/mw/django/payments/", key="k")
        assert "Idempotent-Replayed" not in send(client, "/mw/django/payments/", key="k")
    assert client.get("/mw/apiview/payments/", HTTP_IDEMPOTENCY_KEY="k").status_code == 200
    assert claims == []
    assert Payment.objects.count() == 2


def test_paths_are_prefixes_or_patterns() -> None:
    with override_settings(IDEMPOTENCY_PATHS=["/api/", re.compile(r"^/v\d+/pay")]):
        assert path_is_protected("/api/payments/")
        assert path_is_protected("/v2/payments/")
        assert not path_is_protected("/apix/")
        assert not path_is_protected("/x/v2/payments/")
    with override_settings(IDEMPOTENCY_PATHS=[]):
        assert not path_is_protected("/api/")


def test_a_pattern_protects_matching_paths(client: Client) -> None:
    with override_settings(IDEMPOTENCY_PATHS=[re.compile(r"/apiview/")]):
        send(client, "/mw/apiview/payments/", key="k")
        assert send(client, "/mw/apiview/payments/", key="k")["Idempotent-Replayed"] == "true"
        send(client, "/mw/django/payments/", key="k")
        assert "Idempotent-Replayed" not in send(client, "/mw/django/payments/", key="k")


def test_a_drf_view_it_cannot_rebuild_is_refused_before_it_runs(client: Client) -> None:
    with pytest.raises(ImproperlyConfigured, match="IdempotencyMixin"):
        send(client, "/mw/wrapped/", key="k")
    assert Payment.objects.count() == 0


def test_the_decorator_needs_no_middleware(client: Client) -> None:
    with modify_settings(MIDDLEWARE={"remove": MIDDLEWARE}):
        send(client, "/django/payments/", key="k")
        assert send(client, "/django/payments/", key="k")["Idempotent-Replayed"] == "true"
        send(client, "/mixin/payments/", key="k2")
        assert send(client, "/mixin/payments/", key="k2")["Idempotent-Replayed"] == "true"


def _ids(**settings: Any) -> list[str]:
    with override_settings(**settings):
        return [message.id for message in check_settings()]


def test_installed_middleware_without_paths_warns() -> None:
    assert "django_idempotency.W004" in _ids(IDEMPOTENCY_PATHS=[])
    assert "django_idempotency.W004" not in _ids(IDEMPOTENCY_PATHS=["/api/"])
    with modify_settings(MIDDLEWARE={"remove": MIDDLEWARE}):
        assert "django_idempotency.W004" not in _ids(IDEMPOTENCY_PATHS=[])


def test_middleware_with_process_view_after_it_warns() -> None:
    csrf = "django.middleware.csrf.CsrfViewMiddleware"
    assert "django_idempotency.W005" not in _ids()
    with modify_settings(MIDDLEWARE={"append": csrf}):
        assert "django_idempotency.W005" in _ids()
    with modify_settings(MIDDLEWARE={"prepend": csrf}):
        assert "django_idempotency.W005" not in _ids()


@pytest.mark.parametrize("url", ["/mw/django/payments/", "/mw/async/payments/"])
def test_plain_views_are_protected_under_asgi(url: str) -> None:
    # Under ASGI Django runs process_view() in a worker thread; an async view is then awaited
    # on the event loop from there.
    client = AsyncClient()
    client.force_login(UserFactory.create())

    async def twice() -> list[Any]:
        return [
            await client.post(
                url,
                json.dumps({"amount": 10}),
                content_type="application/json",
                headers={"Idempotency-Key": "asgi"},
            )
            for _ in range(2)
        ]

    first, second = async_to_sync(twice)()
    assert first.status_code == second.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    assert Payment.objects.count() == 1


def test_a_view_that_cannot_be_weakly_referenced_is_still_protected(rf: Any) -> None:
    from django_idempotency.middleware import IdempotencyMiddleware
    from tests.testapp.views import mw_django_view

    class Slotted:
        __slots__ = ()

        def __call__(self, request: Any) -> Any:
            return mw_django_view(request)

    middleware = IdempotencyMiddleware(lambda request: None)
    user = UserFactory.create()
    responses = []
    for _ in range(2):
        request = rf.post(
            "/mw/slotted/", b'{"amount": 10}', content_type="application/json",
            headers={"Idempotency-Key": "k"},
        )  # fmt: skip
        request.user = user
        response = middleware.process_view(request, Slotted(), (), {})
        assert response is not None
        responses.append(response)
    assert [r.status_code for r in responses] == [201, 201]
    assert responses[1]["Idempotent-Replayed"] == "true"
