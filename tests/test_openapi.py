"""The drf-spectacular extension documents exactly the operations the runtime protects."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from django.urls import URLPattern, path
from rest_framework import serializers, viewsets
from rest_framework.decorators import action, api_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

pytest.importorskip(
    "drf_spectacular", reason="drf-spectacular is not installed (pip install '.[openapi]')"
)

from drf_spectacular.generators import SchemaGenerator  # noqa: E402
from drf_spectacular.openapi import AutoSchema  # noqa: E402
from drf_spectacular.utils import OpenApiParameter, extend_schema  # noqa: E402
from drf_spectacular.validation import validate_schema  # noqa: E402

from django_idempotency import IdempotencyMixin, idempotent  # noqa: E402
from django_idempotency.openapi import (  # noqa: E402
    PROBLEM_COMPONENT,
    IdempotencySchemaMixin,
    _decorated_policy,
)
from tests.testapp import views as testapp_views  # noqa: E402
from tests.testapp import webhooks as testapp_webhooks  # noqa: E402

PROTECTED = [
    ("/mixin/payments/", "post", False),
    ("/mixin/payments/", "patch", False),
    ("/mixin/required/", "post", True),
    ("/decorator/payments/", "post", False),
    ("/decorator/payments/", "patch", False),
    ("/decorator/required/", "post", True),
    ("/viewset/payments/", "post", False),
    ("/viewset/payments/{id}/", "patch", False),
    ("/viewset/payments/refund/", "post", False),
    ("/actions/pay/", "post", False),
    ("/actions/pay/", "patch", False),
    # No mixin, no decorator: IdempotencyMiddleware covers /mw/ in the test settings.
    ("/mw/apiview/payments/", "post", False),
    ("/mw/apiview/payments/", "patch", False),
    ("/mw/api-view/payments/", "post", False),
    ("/mw/viewset/payments/refund/", "post", False),
    # The view's own options win over the middleware's.
    ("/mw/own/mixin/", "post", True),
    ("/mw/own/api-view/", "post", True),
]
UNPROTECTED = [
    ("/mixin/payments/", "get"),
    ("/decorator/payments/", "get"),
    ("/viewset/payments/", "get"),
    ("/mw/apiview/payments/", "get"),
    # Exempt from the middleware.
    ("/mw/exempt/apiview/", "post"),
    ("/mw/exempt/api-view/", "post"),
    ("/mw/viewset/payments/exempt/", "post"),
]
BASE_URI = "https://django-idempotency.readthedocs.io/en/latest/problems/#"


@pytest.fixture
def spectacular() -> Iterator[None]:
    rest_framework = dict(
        settings.REST_FRAMEWORK,
        DEFAULT_SCHEMA_CLASS="django_idempotency.openapi.IdempotencyAutoSchema",
    )
    with override_settings(REST_FRAMEWORK=rest_framework):
        yield


def generate(patterns: list[URLPattern] | None = None) -> dict[str, Any]:
    if patterns is None:
        generator = SchemaGenerator(urlconf="tests.testapp.urls")
    else:
        generator = SchemaGenerator(patterns=patterns)
    schema: dict[str, Any] = generator.get_schema(request=None, public=True)
    validate_schema(schema)
    return schema


def key_header(operation: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        p
        for p in operation.get("parameters", [])
        if p["in"] == "header" and p["name"] == "Idempotency-Key"
    ]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """The schema of the behaviour suite's views, generated once for the module."""
    rest_framework = dict(
        settings.REST_FRAMEWORK,
        DEFAULT_SCHEMA_CLASS="django_idempotency.openapi.IdempotencyAutoSchema",
    )
    with override_settings(REST_FRAMEWORK=rest_framework), pytest.MonkeyPatch.context() as mp:
        # @api_view resolves DEFAULT_SCHEMA_CLASS when it builds its class, which for the testapp
        # happened at import, before this override (a project sets it in settings.py instead).
        # Putting DRF's lazy descriptor back makes those classes read the setting again.
        for view in (
            testapp_views.payment_api_view,
            testapp_views.required_api_view,
            testapp_views.mw_api_view,
            testapp_views.mw_exempt_api_view,
            testapp_views.mw_own_options_api_view,
            testapp_webhooks.api_webhook,
        ):
            mp.setattr(view.cls, "schema", APIView.__dict__["schema"])
        return generate()


class TestTestappSchema:
    @pytest.mark.parametrize(("url", "method", "required"), PROTECTED)
    def test_protected_operations_document_the_key(
        self, schema: dict[str, Any], url: str, method: str, required: bool
    ) -> None:
        (parameter,) = key_header(schema["paths"][url][method])
        assert parameter["required"] is required
        assert parameter["schema"] == {"type": "string"}
        assert "UUID v4" in parameter["description"]

    @pytest.mark.parametrize(("url", "method", "required"), PROTECTED)
    def test_protected_operations_document_the_problems(
        self, schema: dict[str, Any], url: str, method: str, required: bool
    ) -> None:
        responses = schema["paths"][url][method]["responses"]
        ref = {"$ref": f"#/components/schemas/{PROBLEM_COMPONENT}"}
        for status in ("400", "409", "422", "503"):
            content = responses[status]["content"]["application/problem+json"]
            assert content["schema"] == ref
            for code, example in content["examples"].items():
                assert example["value"]["type"] == BASE_URI + code
                assert example["value"]["status"] == int(status)
            assert responses[status]["headers"]["Cache-Control"]["schema"]["enum"] == ["no-store"]
        assert "Retry-After" in responses["409"]["headers"]
        assert "Retry-After" in responses["503"]["headers"]
        assert "Retry-After" not in responses["400"]["headers"]
        assert "Retry-After" not in responses["422"]["headers"]
        assert set(responses["400"]["content"]["application/problem+json"]["examples"]) == {
            "idempotency-key-missing",
            "idempotency-key-invalid",
        }

    @pytest.mark.parametrize(("url", "method", "required"), PROTECTED)
    def test_success_responses_carry_the_replay_header(
        self, schema: dict[str, Any], url: str, method: str, required: bool
    ) -> None:
        responses = schema["paths"][url][method]["responses"]
        successes = [code for code in responses if code.startswith("2")]
        assert successes
        for code in successes:
            header = responses[code]["headers"]["Idempotent-Replayed"]
            assert header["schema"] == {"type": "string", "enum": ["true"]}

    def test_the_viewset_create_keeps_its_201(self, schema: dict[str, Any]) -> None:
        responses = schema["paths"]["/viewset/payments/"]["post"]["responses"]
        assert "Idempotent-Replayed" in responses["201"]["headers"]

    @pytest.mark.parametrize(("url", "method"), UNPROTECTED)
    def test_safe_methods_are_left_alone(
        self, schema: dict[str, Any], url: str, method: str
    ) -> None:
        operation = schema["paths"][url][method]
        assert key_header(operation) == []
        assert set(operation["responses"]) == {"200"}
        assert "headers" not in operation["responses"]["200"]

    def test_the_problem_component(self, schema: dict[str, Any]) -> None:
        component = schema["components"]["schemas"][PROBLEM_COMPONENT]
        assert component["required"] == ["type", "title", "status"]
        assert set(component["properties"]) == {"type", "title", "status", "detail"}

    def test_the_mixin_docstring_is_not_the_operation_description(
        self, schema: dict[str, Any]
    ) -> None:
        assert "description" not in schema["paths"]["/mixin/payments/"]["post"]


def build_views() -> types.SimpleNamespace:
    """Views for single policies, built under the ``spectacular`` fixture.

    ``extend_schema`` and ``@api_view`` pick DEFAULT_SCHEMA_CLASS when they decorate, so these
    must be defined once the setting is in place.
    """

    class AmountSerializer(serializers.Serializer):
        amount = serializers.IntegerField()

    class ErrorSerializer(serializers.Serializer):
        amount = serializers.ListField(child=serializers.CharField())

    class PutOnlyView(IdempotencyMixin, APIView):
        """Replaces a payment."""

        idempotency_methods = ("PUT",)

        @extend_schema(request=AmountSerializer, responses={200: AmountSerializer})
        def put(self, request: Request) -> Response:
            return Response({})

        @extend_schema(request=AmountSerializer, responses={201: AmountSerializer})
        def post(self, request: Request) -> Response:
            return Response({})

    class DocumentedView(IdempotencyMixin, APIView):
        idempotency_store_server_errors = True

        @extend_schema(
            request=AmountSerializer,
            parameters=[
                OpenApiParameter(
                    "idempotency-key", location=OpenApiParameter.HEADER, description="Ours."
                )
            ],
            responses={201: AmountSerializer, 400: ErrorSerializer, 500: None, 429: None},
        )
        def post(self, request: Request) -> Response:
            return Response({})

    class HiddenView(IdempotencyMixin, APIView):
        @extend_schema(exclude=True)
        def post(self, request: Request) -> Response:
            return Response({})

    class CustomSchema(IdempotencySchemaMixin, AutoSchema):
        pass

    class SelfDescribedViewSet(viewsets.ViewSet):
        schema = CustomSchema()

        @action(detail=False, methods=["post"])
        @idempotent(methods=["POST"], required=True)
        def pay(self, request: Request) -> Response:
            return Response({})

    @extend_schema(request=AmountSerializer, responses={201: AmountSerializer})
    @api_view(["POST", "DELETE"])
    @idempotent(methods=["DELETE"])
    def delete_only(request: Request) -> Response:
        return Response({})

    return types.SimpleNamespace(**locals())


@pytest.mark.usefixtures("spectacular")
class TestPolicies:
    def test_the_views_methods_decide(self) -> None:
        views = build_views()
        paths = generate([path("put/", views.PutOnlyView.as_view())])["paths"]
        assert key_header(paths["/put/"]["put"])
        assert key_header(paths["/put/"]["post"]) == []
        assert "409" not in paths["/put/"]["post"]["responses"]
        assert paths["/put/"]["put"]["description"] == "Replaces a payment."

    def test_the_decorators_methods_decide(self) -> None:
        views = build_views()
        paths = generate([path("delete/", views.delete_only)])["paths"]
        assert key_header(paths["/delete/"]["delete"])
        assert key_header(paths["/delete/"]["post"]) == []

    def test_a_custom_auto_schema_with_the_mixin(self) -> None:
        plain = dict(
            settings.REST_FRAMEWORK, DEFAULT_SCHEMA_CLASS="drf_spectacular.openapi.AutoSchema"
        )
        with override_settings(REST_FRAMEWORK=plain):
            views = build_views()
            view = views.SelfDescribedViewSet.as_view({"post": "pay"})
            paths = generate([path("self/pay/", view), path("put/", views.PutOnlyView.as_view())])[
                "paths"
            ]
        (parameter,) = key_header(paths["/self/pay/"]["post"])
        assert parameter["required"] is True
        # Views on the plain AutoSchema are not documented by this package.
        assert key_header(paths["/put/"]["put"]) == []

    def test_excluded_operations_stay_excluded(self) -> None:
        views = build_views()
        paths = generate([path("hidden/", views.HiddenView.as_view())])["paths"]
        assert paths == {}

    @override_settings(IDEMPOTENCY_REQUIRED=True)
    def test_the_required_setting(self) -> None:
        views = build_views()
        paths = generate([path("put/", views.PutOnlyView.as_view())])["paths"]
        (parameter,) = key_header(paths["/put/"]["put"])
        assert parameter["required"] is True

    def test_a_documented_header_is_not_duplicated(self) -> None:
        views = build_views()
        paths = generate([path("documented/", views.DocumentedView.as_view())])["paths"]
        operation = paths["/documented/"]["post"]
        (parameter,) = [
            p for p in operation["parameters"] if p["name"].lower() == "idempotency-key"
        ]
        assert parameter["description"] == "Ours."

    @override_settings(IDEMPOTENCY_HEADER="X-Request-Key", IDEMPOTENCY_STRICT_KEY_FORMAT=True)
    def test_the_header_setting(self) -> None:
        views = build_views()
        paths = generate([path("put/", views.PutOnlyView.as_view())])["paths"]
        (parameter,) = [p for p in paths["/put/"]["put"]["parameters"] if p["in"] == "header"]
        assert parameter["name"] == "X-Request-Key"
        assert parameter["required"] is False
        assert "bare token" not in parameter["description"]

    def test_documented_responses_are_extended_not_replaced(self) -> None:
        views = build_views()
        paths = generate([path("documented/", views.DocumentedView.as_view())])["paths"]
        responses = paths["/documented/"]["post"]["responses"]
        assert set(responses["400"]["content"]) == {"application/json", "application/problem+json"}
        assert "idempotency-key-missing" in responses["400"]["description"]
        # Stored: 201, the final 400 and, with store_server_errors, the 500. Never a 429.
        for code in ("201", "400", "500"):
            assert "Idempotent-Replayed" in responses[code]["headers"]
        assert "Idempotent-Replayed" not in responses["429"].get("headers", {})


def test_a_closure_with_an_empty_cell_is_not_a_policy() -> None:
    handler = types.SimpleNamespace(__closure__=(types.CellType(), types.CellType("a value")))
    assert _decorated_policy(handler) is None


def test_the_package_does_not_import_drf_spectacular() -> None:
    code = (
        "import sys, django; django.setup(); "
        "import django_idempotency.mixins, django_idempotency.decorators; "
        "from django_idempotency import idempotent, IdempotencyMixin; "
        "assert 'drf_spectacular' not in sys.modules, 'drf_spectacular was imported'"
    )
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
