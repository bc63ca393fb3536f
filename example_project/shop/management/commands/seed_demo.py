"""``manage.py seed_demo``: create the demo users and stock, and say how to use them."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from example_project.shop.demo_data import (
    DEMO_PASSWORD,
    DEMO_USERNAME,
    OTHER_USERNAME,
    ensure_stock,
    ensure_user,
)


class Command(BaseCommand):
    help = "Create the demo users (alice, bob), their API tokens and the stock; safe to rerun."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--base-url", default="http://127.0.0.1:8000", help="Where the server will listen."
        )

    def handle(self, *args: Any, base_url: str, **options: Any) -> None:
        alice = ensure_user(DEMO_USERNAME)
        bob = ensure_user(OTHER_USERNAME)
        product = ensure_stock()
        base_url = base_url.rstrip("/")
        self.stdout.write(
            "\n".join(
                [
                    "Demo data ready.",
                    f"  Page:      {base_url}/  (sign in as {DEMO_USERNAME} / {DEMO_PASSWORD})",
                    f"  Token of {DEMO_USERNAME}: {alice.token}",
                    f"  Token of {OTHER_USERNAME}:   {bob.token}",
                    f"  Stock:     {product.stock} x {product.sku}",
                    "  Try a payment twice with the same key; the second answer is a replay:",
                    "    KEY=$(python3 -c 'import uuid; print(uuid.uuid4())')",
                    f"    curl -i {base_url}/api/payments/ -H 'Authorization: Token {alice.token}'"
                    " -H \"Idempotency-Key: $KEY\" -H 'Content-Type: application/json'"
                    ' -d \'{"amount": 1000, "currency": "EUR"}\'',
                ]
            )
        )
