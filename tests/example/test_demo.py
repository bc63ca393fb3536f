"""The terminal story (``manage.py demo``) and the seeding that ``run.py`` repeats each start."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token

from example_project.shop.models import Payment, Product

EXPECTED_DEMO = """\
A client pays 10.00 EUR as alice (token authentication) over a network
that loses the first 2 answers, so it sends POST /api/payments/ 3 times
and counts the payments stored for that one checkout.

Without an Idempotency-Key:
  attempt 1: 201 Created, a new payment  -> answer lost, retry
  attempt 2: 201 Created, a new payment  -> answer lost, retry
  attempt 3: 201 Created, a new payment
  payments stored: 3  (alice was charged 3 times)

With an Idempotency-Key (one UUID v4, the same in every attempt):
  attempt 1: 201 Created, a new payment  -> answer lost, retry
  attempt 2: 201 Created, Idempotent-Replayed: true, the same payment  -> answer lost, retry
  attempt 3: 201 Created, Idempotent-Replayed: true, the same payment
  payments stored: 1  (alice was charged once)

bob sends the same key: keys are scoped to the authenticated user.
  attempt 1: 201 Created, a new payment
  payments stored: 1  (a payment of bob's own, not a replay)
"""


def run(command: str, *args: str) -> str:
    out = io.StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_demo_tells_the_story_exactly() -> None:
    assert run("demo") == EXPECTED_DEMO
    # 3 without a key, 1 with it, 1 of bob's.
    assert Payment.objects.count() == 5


@pytest.mark.django_db
def test_demo_reads_the_same_on_every_run() -> None:
    run("demo")
    assert run("demo") == EXPECTED_DEMO
    assert Payment.objects.count() == 10


@pytest.mark.django_db
def test_seed_demo_prints_credentials_and_can_run_again() -> None:
    first = run("seed_demo", "--base-url", "http://127.0.0.1:8123")
    alice_token = Token.objects.get(user__username="alice").key
    assert "http://127.0.0.1:8123/  (sign in as alice / idempotency-demo)" in first
    assert f"Token of alice: {alice_token}" in first
    assert re.search(rf"curl -i http://127.0.0.1:8123/api/payments/ .*Token {alice_token}", first)

    Product.objects.filter(sku="mug").update(stock=3)
    second = run("seed_demo", "--base-url", "http://127.0.0.1:8123")
    assert second == first  # the low stock was topped up again, nothing else changed
    assert get_user_model().objects.count() == 2
    assert Token.objects.get(user__username="alice").key == alice_token
    assert Product.objects.get(sku="mug").stock == 100
