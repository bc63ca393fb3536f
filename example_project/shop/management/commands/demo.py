"""``manage.py demo``: the payment story in the terminal.

A client pays over a network that loses answers, so it retries. Without an ``Idempotency-Key``
every retry is a new payment; with one, the first attempt runs and the retries are replays. The
requests go through the real URLs, middleware, DRF token authentication and store, in-process via
Django's test client, so the demo needs no running server. The output names no ids, keys or
tokens, so it reads the same on every run and the tests can assert it line by line.
"""

from __future__ import annotations

import uuid
from http import HTTPStatus
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.test import Client

from example_project.shop.demo_data import (
    ATTEMPTS,
    DEMO_USERNAME,
    LOST,
    OTHER_USERNAME,
    DemoUser,
    ensure_user,
)
from example_project.shop.models import Payment

PAYMENTS_URL = "/api/payments/"


class Command(BaseCommand):
    help = "Show, in the terminal, what an Idempotency-Key changes when a client retries a payment."

    def handle(self, *args: Any, **options: Any) -> None:
        alice = ensure_user(DEMO_USERNAME)
        bob = ensure_user(OTHER_USERNAME)
        out = self.stdout.write
        out(f"A client pays 10.00 EUR as {DEMO_USERNAME} (token authentication) over a network")
        out(
            f"that loses the first {LOST} answers, so it sends POST {PAYMENTS_URL} {ATTEMPTS} times"
        )
        out("and counts the payments stored for that one checkout.")

        out("")
        out("Without an Idempotency-Key:")
        stored = self._checkout(alice, key=None)
        out(f"  payments stored: {stored}  ({DEMO_USERNAME} was charged {stored} times)")
        if stored != ATTEMPTS:
            raise CommandError(f"expected {ATTEMPTS} payments without a key, found {stored}")

        out("")
        out("With an Idempotency-Key (one UUID v4, the same in every attempt):")
        key = str(uuid.uuid4())
        stored = self._checkout(alice, key=key)
        out(f"  payments stored: {stored}  ({DEMO_USERNAME} was charged once)")
        if stored != 1:
            raise CommandError(f"expected 1 payment with a key, found {stored}")

        out("")
        out(f"{OTHER_USERNAME} sends the same key: keys are scoped to the authenticated user.")
        stored = self._checkout(bob, key=key, attempts=1)
        out(f"  payments stored: {stored}  (a payment of {OTHER_USERNAME}'s own, not a replay)")
        if stored != 1:
            raise CommandError(f"expected 1 payment for {OTHER_USERNAME}, found {stored}")

    def _checkout(self, who: DemoUser, key: str | None, attempts: int = ATTEMPTS) -> int:
        """Send one checkout ``attempts`` times and return how many payments it produced."""
        client = Client(HTTP_AUTHORIZATION=f"Token {who.token}")
        headers = {} if key is None else {"Idempotency-Key": key}
        # The reference tells this checkout's payments apart from earlier runs of the demo.
        reference = f"demo-{uuid.uuid4().hex[:16]}"
        body = {"amount": 1000, "currency": "EUR", "reference": reference}
        first_id = None
        for attempt in range(1, attempts + 1):
            response = client.post(
                PAYMENTS_URL, body, content_type="application/json", headers=headers
            )
            payment_id = response.json().get("id")
            first_id = first_id or payment_id
            code = response.status_code
            line = f"  attempt {attempt}: {code} {HTTPStatus(code).phrase}"
            if response.headers.get("Idempotent-Replayed") == "true":
                same = "the same payment" if payment_id == first_id else "another payment"
                line += f", Idempotent-Replayed: true, {same}"
            else:
                line += ", a new payment"
            if attempt <= LOST and attempt < attempts:
                line += "  -> answer lost, retry"
            self.stdout.write(line)
        return Payment.objects.filter(user=who.user, reference=reference).count()
