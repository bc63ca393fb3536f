"""The same payment endpoint behind every entry point, so one behaviour suite can cover them all.

Failures are injected through ``SCRIPT`` (consumed one step per execution) rather than through the
body, so that a retry is byte-for-byte the same request as the attempt that failed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from django.contrib.auth import get_user
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.template.response import TemplateResponse
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action, api_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from django_idempotency import IdempotencyMixin, idempotent
from django_idempotency.middleware import idempotency_exempt
from tests.testapp.models import Payment

SCRIPT: list[str] = []
DELAY = 0.0
HOOKS: list[Callable[[], None]] = []
#: Run after the payment row is written, before the view returns.
AFTER_WRITE: list[Callable[[], None]] = []
_lock = threading.Lock()


#: Returned by ``perform`` for the "unrenderable" step: each entry point then answers with a
#: response that fails when it is rendered, after the payment row was written.
UNRENDERABLE = HttpResponse(status=599)


def next_step() -> str:
    with _lock:
        return SCRIPT.pop(0) if SCRIPT else "ok"


class PaymentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Payment
        fields = ["id", "amount"]

    def validate_amount(self, value: int) -> int:
        if value <= 0:
            raise serializers.ValidationError("must be positive")
        return value


def perform(user: Any, data: Any) -> tuple[int, Any, dict[str, str]] | HttpResponseBase:
    """Create a payment; returns (status, payload, headers) or a finished special response."""
    step = next_step()
    if DELAY:
        time.sleep(DELAY)
    for hook in list(HOOKS):
        hook()
    # "early-*" steps fail before anything is written; the others after the payment row exists.
    if step == "early-raise":
        raise RuntimeError("payment provider unreachable")
    if step == "early-http404":
        raise Http404("no such account")
    if step == "worker-stopped":
        raise SystemExit(1)  # what gunicorn's worker timeout raises inside the view
    if step.startswith("early-"):
        code = int(step.removeprefix("early-"))
        return code, {"detail": f"failed with {code}"}, {}
    serializer = PaymentSerializer(data=data)
    serializer.is_valid(raise_exception=True)
    payment = serializer.save(user=user if user.is_authenticated else None)
    for hook in list(AFTER_WRITE):
        hook()
    if step == "raise":
        raise RuntimeError("payment provider exploded")
    if step.isdigit():
        return int(step), {"detail": f"failed with {step}"}, {}
    if step == "stream":
        return StreamingHttpResponse(iter([b"chunk-1,", b"chunk-2"]), status=201)
    if step == "big":
        return HttpResponse(b"x" * (2 * 1024 * 1024), status=201, content_type="text/plain")
    if step == "unrenderable":
        return UNRENDERABLE
    headers = {"Location": f"/payments/{payment.pk}/", "ETag": f'"payment-{payment.pk}"'}
    return status.HTTP_201_CREATED, serializer.data, headers


def drf_response(request: Request) -> HttpResponseBase:
    result = perform(request.user, request.data)
    if result is UNRENDERABLE:
        return Response({"payment": object()}, status=201)
    if isinstance(result, HttpResponseBase):
        return result
    code, payload, headers = result
    response = Response(payload, status=code, headers=headers)
    response.set_cookie("session-hint", "per-client")
    return response


class PaymentAPIView(IdempotencyMixin, APIView):
    def post(self, request: Request) -> Any:
        return drf_response(request)

    def patch(self, request: Request) -> Any:
        return drf_response(request)

    def get(self, request: Request) -> Response:
        return Response({"count": Payment.objects.count()})


class UnprotectedPaymentAPIView(APIView):
    """The same payment without the mixin: what ``assert_idempotent`` must catch."""

    def post(self, request: Request) -> Any:
        return drf_response(request)


class RequiredPaymentAPIView(PaymentAPIView):
    idempotency_required = True


class PaymentViewSet(IdempotencyMixin, viewsets.GenericViewSet):
    queryset = Payment.objects.all()
    serializer_class = PaymentSerializer

    def create(self, request: Request) -> Any:
        return drf_response(request)

    def partial_update(self, request: Request, pk: str | None = None) -> Any:
        return drf_response(request)

    def list(self, request: Request) -> Response:
        return Response({"count": Payment.objects.count()})

    @action(detail=False, methods=["post"])
    def refund(self, request: Request) -> Any:
        return drf_response(request)


class ActionViewSet(viewsets.GenericViewSet):
    """A viewset without the mixin whose action alone is protected by the decorator."""

    queryset = Payment.objects.all()

    @action(detail=False, methods=["post", "patch"])
    @idempotent
    def pay(self, request: Request) -> Any:
        return drf_response(request)


@api_view(["GET", "POST", "PATCH"])
@idempotent
def payment_api_view(request: Request) -> Any:
    if request.method == "GET":
        return Response({"count": Payment.objects.count()})
    return drf_response(request)


@api_view(["POST"])
@idempotent(required=True)
def required_api_view(request: Request) -> Any:
    return drf_response(request)


def _django_response(request: HttpRequest) -> HttpResponseBase:
    if request.content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        data: Any = request.POST.dict()
    else:
        try:
            data = json.loads(request.body or b"{}")
        except ValueError:
            return JsonResponse({"detail": "invalid JSON"}, status=400)
    try:
        result = perform(request.user, data)
    except serializers.ValidationError as exc:
        return JsonResponse(exc.detail, status=400, safe=False)
    if result is UNRENDERABLE:
        return TemplateResponse(request, "testapp/missing.html", status=201)
    if isinstance(result, HttpResponseBase):
        return result
    code, payload, headers = result
    response = JsonResponse(payload, status=code, headers=headers)
    response.set_cookie("session-hint", "per-client")
    return response


@idempotent
def payment_django_view(request: HttpRequest) -> HttpResponseBase:
    if request.method == "GET":
        return JsonResponse({"count": Payment.objects.count()})
    return _django_response(request)


@idempotent
async def payment_async_view(request: HttpRequest) -> HttpResponseBase:
    from asgiref.sync import sync_to_async

    if request.method == "GET":
        return JsonResponse({"count": await Payment.objects.acount()})
    # get_user, not request.auser(): that arrived in Django 5.0 and the suite runs on 4.2.
    user = await sync_to_async(get_user)(request)
    request.user = user
    return await sync_to_async(_django_response)(request)


# --- views that only IdempotencyMiddleware protects (under /mw/ in tests.testapp.urls) ---------


def mw_django_view(request: HttpRequest) -> HttpResponseBase:
    if request.method == "GET":
        return JsonResponse({"count": Payment.objects.count()})
    return _django_response(request)


async def mw_async_view(request: HttpRequest) -> HttpResponseBase:
    from asgiref.sync import sync_to_async

    if request.method == "GET":
        return JsonResponse({"count": await Payment.objects.acount()})
    user = await sync_to_async(get_user)(request)
    request.user = user
    return await sync_to_async(_django_response)(request)


class MwPaymentAPIView(APIView):
    def post(self, request: Request) -> Any:
        return drf_response(request)

    def patch(self, request: Request) -> Any:
        return drf_response(request)

    def get(self, request: Request) -> Response:
        return Response({"count": Payment.objects.count()})


class MwPaymentViewSet(viewsets.GenericViewSet):
    queryset = Payment.objects.all()
    serializer_class = PaymentSerializer

    def create(self, request: Request) -> Any:
        return drf_response(request)

    def list(self, request: Request) -> Response:
        return Response({"count": Payment.objects.count()})

    @action(detail=False, methods=["post"])
    def refund(self, request: Request) -> Any:
        return drf_response(request)

    @action(detail=False, methods=["post"])
    @idempotency_exempt
    def exempt(self, request: Request) -> Any:
        return drf_response(request)


@api_view(["POST"])
def mw_api_view(request: Request) -> Any:
    return drf_response(request)


# Exempt and self-protected views under /mw/: the middleware must leave each of them alone.


@idempotency_exempt
def mw_exempt_django_view(request: HttpRequest) -> HttpResponseBase:
    return _django_response(request)


@idempotency_exempt
class MwExemptAPIView(MwPaymentAPIView):
    pass


@idempotency_exempt
class MwExemptDjangoView(View):
    def post(self, request: HttpRequest) -> HttpResponseBase:
        return _django_response(request)


@api_view(["POST"])
@idempotency_exempt
def mw_exempt_api_view(request: Request) -> Any:
    return drf_response(request)


class MwOwnOptionsAPIView(IdempotencyMixin, APIView):
    """Uses the mixin with its own options, under a path the middleware also covers."""

    idempotency_required = True

    def post(self, request: Request) -> Any:
        return drf_response(request)


@api_view(["POST"])
@idempotent(required=True)
def mw_own_options_api_view(request: Request) -> Any:
    return drf_response(request)


@idempotent(required=True)
def mw_own_options_django_view(request: HttpRequest) -> HttpResponseBase:
    return _django_response(request)


#: as_view() under another decorator: the middleware cannot rebuild it and must say so.
mw_wrapped_drf_view = csrf_exempt(MwPaymentAPIView.as_view())
