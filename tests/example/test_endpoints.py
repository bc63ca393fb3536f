"""The example's three endpoints keep their promise when a client retries."""

from __future__ import annotations

import smtplib
import uuid
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client
from rest_framework.test import APIClient

from example_project.shop.demo_data import DemoUser
from example_project.shop.models import Order, Payment, Product
from example_project.shop.serializers import OrderSerializer


def new_key() -> str:
    return str(uuid.uuid4())


def post(client: Client, url: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post(url, body, content_type="application/json", headers=headers)


PAYMENT = {"amount": 1000, "currency": "EUR", "reference": "checkout-1"}


class TestPayments:
    def test_a_retry_with_the_key_replays_the_first_payment(self, alice_api: APIClient) -> None:
        key = new_key()
        first = post(alice_api, "/api/payments/", PAYMENT, key)
        retry = post(alice_api, "/api/payments/", PAYMENT, key)

        assert first.status_code == retry.status_code == 201
        assert "Idempotent-Replayed" not in first.headers
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.content == first.content
        assert Payment.objects.count() == 1

    def test_retries_without_a_key_pay_twice(self, alice_api: APIClient) -> None:
        post(alice_api, "/api/payments/", PAYMENT)
        post(alice_api, "/api/payments/", PAYMENT)
        assert Payment.objects.count() == 2

    def test_the_same_key_is_another_request_for_another_user(
        self, alice_api: APIClient, bob_api: APIClient, alice: DemoUser, bob: DemoUser
    ) -> None:
        key = new_key()
        post(alice_api, "/api/payments/", PAYMENT, key)
        other = post(bob_api, "/api/payments/", PAYMENT, key)

        assert other.status_code == 201
        assert "Idempotent-Replayed" not in other.headers
        assert Payment.objects.filter(user=alice.user).count() == 1
        assert Payment.objects.filter(user=bob.user).count() == 1
        # Each user lists only their own payments.
        assert [p["id"] for p in bob_api.get("/api/payments/").json()] == [other.json()["id"]]

    def test_the_same_key_with_another_amount_is_refused(self, alice_api: APIClient) -> None:
        key = new_key()
        post(alice_api, "/api/payments/", PAYMENT, key)
        reused = post(alice_api, "/api/payments/", {**PAYMENT, "amount": 99999}, key)

        assert reused.status_code == 422
        assert reused.headers["Content-Type"] == "application/problem+json"
        assert Payment.objects.get().amount == 1000

    def test_the_page_pays_with_session_authentication_and_csrf(self, alice: DemoUser) -> None:
        browser = Client(enforce_csrf_checks=True)
        browser.force_login(alice.user)
        page = browser.get("/")
        assert b'id="with-key-run"' in page.content
        csrf = {"X-CSRFToken": page.cookies["csrftoken"].value}
        key = new_key()
        for _ in range(2):
            response = browser.post(
                "/api/payments/",
                PAYMENT,
                content_type="application/json",
                headers={"Idempotency-Key": key, **csrf},
            )
            assert response.status_code == 201
        assert response.headers["Idempotent-Replayed"] == "true"
        assert Payment.objects.filter(user=alice.user).count() == 1

    def test_anonymous_requests_are_refused(self, db: None) -> None:
        assert post(APIClient(), "/api/payments/", PAYMENT, new_key()).status_code == 401


ORDER = {"sku": "mug", "quantity": 2}


@pytest.mark.django_db(transaction=True)
class TestOrders:
    """Real commits (transactional tests), so ``on_commit`` runs as it does in production."""

    def test_a_retry_takes_stock_and_sends_the_email_once(
        self, alice_api: APIClient, mug: Product
    ) -> None:
        key = new_key()
        first = post(alice_api, "/api/orders/", ORDER, key)
        retry = post(alice_api, "/api/orders/", ORDER, key)

        assert first.status_code == retry.status_code == 201
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.content == first.content
        assert Order.objects.count() == 1
        assert Product.objects.get(sku="mug").stock == mug.stock - 2
        assert [m.subject for m in mail.outbox] == [f"Order #{first.json()['id']} confirmed"]

    def test_a_failing_mail_server_cannot_cause_a_second_order(
        self, alice_api: APIClient, mug: Product, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def refuse(*args: Any, **kwargs: Any) -> int:
            raise smtplib.SMTPServerDisconnected("mail server went away")

        monkeypatch.setattr("example_project.shop.notifications.send_mail", refuse)
        key = new_key()
        first = post(alice_api, "/api/orders/", ORDER, key)
        retry = post(alice_api, "/api/orders/", ORDER, key)

        assert first.status_code == 201
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert Order.objects.count() == 1
        assert Product.objects.get(sku="mug").stock == mug.stock - 2

    def test_nothing_is_sent_when_the_transaction_rolls_back(
        self, alice_api: APIClient, mug: Product, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The view fails after the order was written and its email registered.
        def explode(self: OrderSerializer, instance: Order) -> Any:
            raise RuntimeError("response could not be built")

        key = new_key()
        with monkeypatch.context() as patch:
            patch.setattr(OrderSerializer, "to_representation", explode)
            with pytest.raises(RuntimeError):
                post(alice_api, "/api/orders/", ORDER, key)

        assert mail.outbox == []
        assert Order.objects.count() == 0
        assert Product.objects.get(sku="mug").stock == mug.stock

        # The key was released, so the retry runs, once.
        retry = post(alice_api, "/api/orders/", ORDER, key)
        assert retry.status_code == 201
        assert "Idempotent-Replayed" not in retry.headers
        assert Order.objects.count() == 1
        assert len(mail.outbox) == 1

    def test_out_of_stock_and_unknown_products(self, alice_api: APIClient, mug: Product) -> None:
        Product.objects.filter(pk=mug.pk).update(stock=1)
        assert post(alice_api, "/api/orders/", ORDER, new_key()).status_code == 409
        unknown = post(alice_api, "/api/orders/", {"sku": "teapot", "quantity": 1}, new_key())
        assert unknown.status_code == 404
        assert Order.objects.count() == 0
        assert mail.outbox == []


REGISTRATION = {"username": "carol", "email": "carol@example.com", "password": "a-long-secret"}


@pytest.mark.django_db
class TestRegistration:
    def test_a_retry_returns_the_same_user(self) -> None:
        key = new_key()
        first = post(APIClient(), "/api/register/", REGISTRATION, key)
        retry = post(APIClient(), "/api/register/", REGISTRATION, key)

        assert first.status_code == retry.status_code == 201
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert (
            retry.json()
            == first.json()
            == {
                "id": first.json()["id"],
                "username": "carol",
                "email": "carol@example.com",
            }
        )
        assert get_user_model().objects.filter(username="carol").count() == 1

    def test_the_key_is_required(self) -> None:
        response = post(APIClient(), "/api/register/", REGISTRATION)
        assert response.status_code == 400
        assert response.json()["type"].endswith("idempotency-key-missing")
        assert not get_user_model().objects.filter(username="carol").exists()

    def test_a_new_key_for_a_taken_username_is_a_new_request(self) -> None:
        post(APIClient(), "/api/register/", REGISTRATION, new_key())
        again = post(APIClient(), "/api/register/", REGISTRATION, new_key())
        assert again.status_code == 400
        assert "already exists" in again.json()["username"][0]

    def test_the_new_user_gets_a_token(self) -> None:
        post(APIClient(), "/api/register/", REGISTRATION, new_key())
        response = APIClient().post(
            "/api/token/", {"username": "carol", "password": "a-long-secret"}
        )
        assert response.status_code == 200
        assert response.json()["token"]
