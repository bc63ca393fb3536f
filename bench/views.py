"""The benchmark's view: token-authenticated DRF create, one INSERT, 201 + JSON + ``Location``.

All three variants run the same handler as the behaviour suite's views
(``tests.testapp.views.drf_response``); only what wraps it differs.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from rest_framework.request import Request
from rest_framework.views import APIView

from bench.floor import FloorMixin
from django_idempotency import IdempotencyMixin, idempotent
from tests.testapp.views import drf_response


class BarePaymentView(APIView):
    """The baseline: no idempotency at all; an ``Idempotency-Key`` header is ignored."""

    def post(self, request: Request) -> Any:
        return drf_response(request)


class FloorPaymentView(FloorMixin, BarePaymentView):
    """The same view behind the hand-written minimal implementation."""


class OursPaymentView(IdempotencyMixin, BarePaymentView):
    """The same view behind the package, configured only by the settings."""


# --- the async bench's views (bench/async_bench.py): no I/O, so only the layer is measured ---


async def async_bare_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"id": 1, "amount": 10}, status=201)


def _one_scope(request: HttpRequest) -> str:
    return "bench"


@idempotent(scope=_one_scope)
async def async_ours_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"id": 1, "amount": 10}, status=201)
