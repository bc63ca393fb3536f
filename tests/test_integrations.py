"""What only one integration can show: decorator order, hooks, signals, the package root."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from rest_framework import viewsets
from rest_framework.decorators import api_view
from rest_framework.response import Response
from rest_framework.views import APIView

from django_idempotency import IdempotencyMixin, idempotent, signals
from tests.testapp.views import PaymentAPIView

pytestmark = pytest.mark.django_db(transaction=True)


def test_wrong_decorator_order_raises_a_helpful_type_error() -> None:
    with pytest.raises(TypeError, match=r"@idempotent must come after \(below\) @api_view"):

        @idempotent
        @api_view(["POST"])
        def view(request: Any) -> Response:
            return Response()


def test_decorating_a_class_based_drf_view_points_to_the_mixin() -> None:
    class View(APIView):
        pass

    with pytest.raises(TypeError, match="IdempotencyMixin"):
        idempotent(required=True)(View.as_view())


def test_decorator_needs_a_request() -> None:
    @idempotent
    def not_a_view(value: int) -> HttpResponse:
        return HttpResponse()

    with pytest.raises(TypeError, match="first argument must be the request"):
        not_a_view(1)


def test_decorator_keeps_the_view_name_and_docstring() -> None:
    @idempotent
    def create_payment(request: HttpRequest) -> HttpResponse:
        """Docstring."""
        return HttpResponse()

    assert create_payment.__name__ == "create_payment"
    assert create_payment.__doc__ == "Docstring."


def test_replay_hook_adds_headers_to_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        PaymentAPIView,
        "get_idempotency_replay_headers",
        lambda self, request, response: {"X-Original-Status": str(response.status_code)},
        raising=True,
    )
    # The policy is built once per class from the hooks it overrides: build it anew.
    monkeypatch.setattr(PaymentAPIView, "_idempotency_engine", None)
    client = Client()
    body = json.dumps({"amount": 1})
    first = client.post("/mixin/payments/", body, "application/json", HTTP_IDEMPOTENCY_KEY="k")
    replay = client.post("/mixin/payments/", body, "application/json", HTTP_IDEMPOTENCY_KEY="k")
    assert "X-Original-Status" not in first
    assert replay["X-Original-Status"] == "201"
    assert replay.status_code == 201
    assert replay.content == first.content


@pytest.fixture
def received() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    names = [
        "key_claimed",
        "response_replayed",
        "request_conflict",
        "fingerprint_mismatch",
        "claim_released",
        "lease_reclaimed",
        "store_error",
    ]
    receivers = {}
    for name in names:

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            events.append((_name, kwargs))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield events
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def test_signals_fire_without_the_raw_key(received: list[tuple[str, dict[str, Any]]]) -> None:
    from tests.testapp import views

    client = Client()

    def post(amount: int) -> Any:
        return client.post(
            "/decorator/payments/",
            json.dumps({"amount": amount}),
            "application/json",
            HTTP_IDEMPOTENCY_KEY="secret-key-value",
        )

    views.SCRIPT.append("early-503")
    post(1)  # claimed, released
    post(1)  # claimed (completed)
    post(1)  # replayed
    post(2)  # mismatch
    assert [name for name, _ in received] == [
        "key_claimed",
        "claim_released",
        "key_claimed",
        "response_replayed",
        "fingerprint_mismatch",
    ]
    for _, kwargs in received:
        assert set(kwargs) >= {"request", "scope", "key_hash", "signal"}
        assert "secret-key-value" not in repr({k: v for k, v in kwargs.items() if k != "request"})


def test_mixin_and_decorator_do_not_claim_twice() -> None:
    """An @idempotent action inside a viewset that also uses the mixin is claimed once."""
    from rest_framework import viewsets
    from rest_framework.decorators import action

    calls = []

    class Both(IdempotencyMixin, viewsets.ViewSet):
        @action(detail=False, methods=["post"])
        @idempotent
        def go(self, request: Any) -> Response:
            calls.append(1)
            return Response({"ok": True}, status=201)

    view = Both.as_view({"post": "go"})
    factory = RequestFactory()
    responses = [
        view(factory.post("/", "{}", "application/json", HTTP_IDEMPOTENCY_KEY="k"))
        for _ in range(2)
    ]
    responses[0].render()
    assert [r.status_code for r in responses] == [201, 201]
    assert responses[1]["Idempotent-Replayed"] == "true"
    assert calls == [1]


def test_package_root_is_light() -> None:
    code = (
        "import sys, django_idempotency; "
        "assert 'rest_framework' not in sys.modules; "
        "assert 'django_idempotency.models' not in sys.modules; "
        "print(django_idempotency.__version__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # noqa: S603
    assert result.returncode == 0, result.stderr
    import django_idempotency

    with pytest.raises(AttributeError):
        django_idempotency.nothing_here  # noqa: B018


@pytest.mark.parametrize("drf_view", [APIView, viewsets.GenericViewSet], ids=lambda c: c.__name__)
def test_mixin_after_the_drf_view_fails_at_class_creation(drf_view: type) -> None:
    with pytest.raises(TypeError, match=r"(?s)must come before.*class Wrong\(IdempotencyMixin, "):
        type("Wrong", (drf_view, IdempotencyMixin), {})


def test_mixin_first_and_subclasses_are_accepted() -> None:
    class Right(IdempotencyMixin, APIView):
        pass

    class Child(Right):
        idempotency_ttl = 5

    assert Child().get_idempotency_policy().ttl == 5
    assert Right().get_idempotency_policy().ttl is None


def test_the_options_are_one_list() -> None:
    """``Policy`` is the list; the decorator's typed keywords and the mixin's attributes and
    hooks follow it, name for name."""
    from django_idempotency.core import Policy, PolicyOptions
    from django_idempotency.mixins import _HOOKS

    names = set(Policy.option_names())
    assert set(PolicyOptions.__annotations__) == names
    attributes = {
        name.removeprefix("idempotency_")
        for name in vars(IdempotencyMixin)
        if name.startswith("idempotency_")
    }
    assert attributes | set(_HOOKS.values()) == names
    assert not attributes & set(_HOOKS.values())
