"""The shop's three idempotent endpoints and the page that tells the story.

Each endpoint shows one way to wire the package:

* payments: a DRF ``ModelViewSet`` with ``IdempotencyMixin`` first in its bases;
* orders: an ``@api_view`` function with ``@idempotent`` below it, so the key is scoped to the user
  DRF authenticated; the confirmation email leaves only after the order and its stored result
  have committed;
* registration: ``@idempotent(required=True)``: a client that lost the answer retries with the
  same key and gets the same user back instead of "username already taken".
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from django_idempotency import IdempotencyMixin, idempotent
from django_idempotency.openapi import PROBLEM_COMPONENT
from django_idempotency.responses import PROBLEM_CONTENT_TYPE
from example_project.shop.demo_data import page_context
from example_project.shop.models import Order, Payment, Product
from example_project.shop.notifications import send_order_confirmation
from example_project.shop.serializers import (
    OrderRequestSerializer,
    OrderSerializer,
    PaymentSerializer,
    RegistrationSerializer,
)


class PaymentViewSet(IdempotencyMixin, viewsets.ModelViewSet):
    """``POST /api/payments/`` runs once per ``Idempotency-Key``; retries replay the first 201.

    The key is optional here, so the page can show what happens without one. An API that moves
    money would set ``idempotency_required = True``.
    """

    serializer_class = PaymentSerializer

    def get_queryset(self) -> QuerySet[Payment]:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular builds the schema
            return Payment.objects.none()
        # Each user sees only their own payments, just as each user has their own keys.
        payments = Payment.objects.filter(user=self.request.user)
        reference = self.request.query_params.get("reference")
        if reference:
            payments = payments.filter(reference=reference)
        return payments

    def perform_create(self, serializer: Any) -> None:
        serializer.save(user=self.request.user)


#: The shop's own problem: answered as RFC 9457 problem details, like the idempotency layer's.
OUT_OF_STOCK = {
    "type": "https://example.com/shop/problems/out-of-stock",
    "title": "Out of stock",
    "status": status.HTTP_409_CONFLICT,
    "detail": "Not enough stock for this order; a retry checks the stock again.",
}


@extend_schema(
    request=OrderRequestSerializer,
    responses={
        201: OrderSerializer,
        404: OpenApiResponse(description="Unknown product."),
        (409, PROBLEM_CONTENT_TYPE): OpenApiResponse(
            # The same problem-details shape as the idempotency layer's own 409s.
            response={"$ref": f"#/components/schemas/{PROBLEM_COMPONENT}"},
            description="Out of stock (not stored: a retry with the key checks the stock again).",
            examples=[OpenApiExample("out-of-stock", value=OUT_OF_STOCK, status_codes=["409"])],
        ),
    },
)
@api_view(["POST"])
@idempotent
def create_order(request: Request) -> Response:
    """``POST /api/orders/``: take stock and confirm by email, once per key."""
    serializer = OrderRequestSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    sku = serializer.validated_data["sku"]
    quantity = serializer.validated_data["quantity"]
    if not Product.objects.filter(sku=sku).exists():
        return Response({"detail": f"Unknown product {sku!r}."}, status=status.HTTP_404_NOT_FOUND)
    # With the ORM store, @idempotent already runs this view inside the transaction that stores
    # the result; this block makes the order atomic on its own too (no key, or the cache store).
    with transaction.atomic():
        # A conditional UPDATE, not read-then-write, so two different orders cannot both take
        # the last mug.
        taken = Product.objects.filter(sku=sku, stock__gte=quantity).update(
            stock=F("stock") - quantity
        )
        if not taken:
            # 409 is not stored: a retry checks the stock again.
            return Response(
                OUT_OF_STOCK, status=OUT_OF_STOCK["status"], content_type=PROBLEM_CONTENT_TYPE
            )
        order = Order.objects.create(
            user=request.user, product=Product.objects.get(sku=sku), quantity=quantity
        )
        # on_commit runs after the outermost transaction commits. With the ORM store that is the
        # one that also stores the key's result, so the email leaves only once the order can no
        # longer run again, and never when the transaction rolls back. robust=True logs a failing
        # mail server instead of raising: with the cache store the order has committed when this
        # block ends, and an exception here would fail the view, release the key and let the
        # retry place a second order; with the ORM store it would turn the placed order's 201
        # into a 503. (A lambda, not functools.partial: Django logs a robust callback's
        # __qualname__.)
        order_id = order.pk
        transaction.on_commit(lambda: send_order_confirmation(order_id), robust=True)
        # Built inside the block, so that a failure here too rolls the order back unsent.
        data = OrderSerializer(order).data
    return Response(data, status=status.HTTP_201_CREATED)


@extend_schema(
    request=RegistrationSerializer,
    responses={
        201: inline_serializer(
            "RegisteredUser",
            {
                "id": serializers.IntegerField(),
                "username": serializers.CharField(),
                "email": serializers.EmailField(),
            },
        )
    },
)
@api_view(["POST"])
@authentication_classes([])
@permission_classes([AllowAny])
@idempotent(required=True)
def register(request: Request) -> Response:
    """``POST /api/register/``: the key is required, so a lost answer can always be retried.

    Registration is anonymous, so its keys live in the shared anonymous namespace. A replay goes
    only to a request with the same key and the same body (password included), and the response
    carries no credentials: the new user signs in through ``/api/token/``.
    """
    serializer = RegistrationSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    data = serializer.validated_data
    user = get_user_model().objects.create_user(
        username=data["username"], email=data["email"], password=data["password"]
    )
    return Response(
        {"id": user.pk, "username": user.get_username(), "email": user.email},
        status=status.HTTP_201_CREATED,
    )


@ensure_csrf_cookie
def index(request: HttpRequest) -> HttpResponse:
    """The payment story in the browser; anonymous visitors get the demo sign-in form."""
    return render(request, "shop/index.html", page_context())
