"""The example shop's endpoints proved idempotent in one line each, as a user's suite would."""

from __future__ import annotations

import pytest
from django.core import mail
from django.test import Client
from rest_framework.test import APIClient

from django_idempotency.testing import assert_idempotent
from example_project.shop.demo_data import DemoUser
from example_project.shop.models import Order, Payment, Product

PAYMENT = {"amount": 1000, "currency": "EUR", "reference": "checkout-1"}
ORDER = {"sku": "mug", "quantity": 1}


def test_payments(alice_api: APIClient) -> None:
    assert_idempotent(alice_api, "post", "/api/payments/", PAYMENT, effects=Payment.objects.count)


def test_payments_with_the_django_test_client(alice: DemoUser) -> None:
    assert_idempotent(
        Client(),
        "POST",
        "/api/payments/",
        PAYMENT,
        effects=Payment.objects.count,
        headers={"Authorization": f"Token {alice.token}"},
    )


@pytest.mark.django_db(transaction=True)
def test_orders_take_stock_and_send_one_email_per_key(alice_api: APIClient, mug: Product) -> None:
    assert_idempotent(alice_api, "post", "/api/orders/", ORDER, effects=Order.objects.count)
    assert Product.objects.get(sku="mug").stock == mug.stock - 2
    assert len(mail.outbox) == 2
