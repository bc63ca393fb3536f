"""A payment provider's webhook behind each entry point, keyed on the server by the event id.

The provider signs the raw body with a shared secret (HMAC-SHA256, hex, as Stripe's ``v1`` and
GitHub's ``sha256=`` signatures are) and redelivers an event, with the same id, whenever it is
unsure it arrived. Each view checks the signature before anything else, then takes the event id
as the idempotency key, scoped by provider; handling an event writes one ``Payment``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from django_idempotency import IdempotencyMixin, idempotent
from tests.testapp.models import Payment

SECRET = b"whsec_tests_only"
SIGNATURE_HEADER = "X-Provider-Signature"
#: Seconds the handler takes, so that concurrent deliveries meet it in flight.
DELAY = 0.0


def sign(body: bytes) -> str:
    return hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def signature_is_valid(request: HttpRequest | Request) -> bool:
    given = request.headers.get(SIGNATURE_HEADER, "")
    return hmac.compare_digest(given, sign(request.body))


def event_id(request: HttpRequest | Request) -> str | None:
    """The key: the id of the (already verified) event; an event without one is not protected."""
    value = json.loads(request.body).get("id")
    return None if value is None else str(value)


def provider_scope(request: Any) -> str:
    return "stripe"


def handle(event: dict[str, Any]) -> dict[str, Any]:
    if DELAY:
        time.sleep(DELAY)
    payment = Payment.objects.create(amount=event["data"]["amount"])
    return {"event": event.get("id"), "payment": payment.pk}


# --- plain Django: the signature check is a decorator above @idempotent ----------------------


def verified(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not signature_is_valid(request):
            return HttpResponse("bad signature", status=403)
        return view(request, *args, **kwargs)

    return wrapper


@csrf_exempt
@verified
@idempotent(key=event_id, scope=provider_scope)
def django_webhook(request: HttpRequest) -> HttpResponseBase:
    return JsonResponse(handle(json.loads(request.body)))


# --- DRF: the signature check is a permission, which runs before the claim -------------------


class ProviderSignature(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return signature_is_valid(request)


@api_view(["POST"])
@authentication_classes([])
@permission_classes([ProviderSignature])
@idempotent(key=event_id, scope=provider_scope)
def api_webhook(request: Request) -> Response:
    return Response(handle(json.loads(request.body)))


class WebhookView(IdempotencyMixin, APIView):
    authentication_classes = []
    permission_classes = [ProviderSignature]

    def get_idempotency_key(self, request: Request) -> str | None:
        return event_id(request)

    def get_idempotency_scope(self, request: Request) -> str | None:
        return provider_scope(request)

    def post(self, request: Request) -> Response:
        return Response(handle(json.loads(request.body)))
