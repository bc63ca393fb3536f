"""The demo's users and stock, created once and left alone afterwards.

``run.py`` seeds them on every start, so this must be idempotent itself: existing users keep their
password and token, and the stock is topped up only when it ran low.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from rest_framework.authtoken.models import Token

from example_project.shop.models import Product

# A published password for a demo that listens on 127.0.0.1 only.
DEMO_PASSWORD = "idempotency-demo"
DEMO_USERNAME = "alice"
# A second user, to show that the same key sent by someone else is someone else's request.
OTHER_USERNAME = "bob"
PRODUCT_SKU = "mug"
RESTOCK_BELOW = 10
RESTOCK_TO = 100
# The story the page and the demo command tell: a checkout sent ATTEMPTS times whose first LOST
# answers never reach the client.
ATTEMPTS = 3
LOST = 2


@dataclass(frozen=True)
class DemoUser:
    user: AbstractBaseUser
    token: str


def page_context() -> dict[str, object]:
    """What the page and the sign-in form need to tell the story."""
    return {
        "attempts": ATTEMPTS,
        "lost": LOST,
        "demo_username": DEMO_USERNAME,
        "demo_password": DEMO_PASSWORD,
    }


def ensure_user(username: str) -> DemoUser:
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(
        username=username, defaults={"email": f"{username}@example.com"}
    )
    if created:
        user.set_password(DEMO_PASSWORD)
        user.save(update_fields=["password"])
    token, _ = Token.objects.get_or_create(user=user)
    return DemoUser(user=user, token=token.key)


def ensure_stock() -> Product:
    product, _ = Product.objects.get_or_create(
        sku=PRODUCT_SKU, defaults={"name": "Idempotent mug", "stock": RESTOCK_TO}
    )
    if product.stock < RESTOCK_BELOW:
        product.stock = RESTOCK_TO
        product.save(update_fields=["stock"])
    return product
