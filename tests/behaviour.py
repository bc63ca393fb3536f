"""Helpers shared by the behaviour suite: entry points, clients and store-agnostic lookups."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.test import Client, RequestFactory

from django_idempotency.fingerprint import request_fingerprint
from django_idempotency.keys import hash_key
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import Record


@dataclass(frozen=True)
class Entry:
    name: str
    url: str
    #: Whether PATCH reaches the same handler at the same URL.
    patch: bool = True
    #: Whether GET is answered at the same URL.
    get: bool = True
    #: Whether the view is synchronous (async views cannot share the ORM transaction).
    sync: bool = True

    def __str__(self) -> str:
        return self.name


ENTRIES = [
    Entry("mixin-apiview", "/mixin/payments/"),
    Entry("mixin-viewset", "/viewset/payments/", patch=False),
    Entry("mixin-viewset-action", "/viewset/payments/refund/", patch=False, get=False),
    Entry("decorator-api-view", "/decorator/payments/"),
    Entry("decorator-action", "/actions/pay/", get=False),
    Entry("decorator-django", "/django/payments/"),
    Entry("decorator-async", "/async/payments/", sync=False),
    # Views without mixin or decorator, protected by IdempotencyMiddleware under /mw/.
    Entry("middleware-django", "/mw/django/payments/"),
    Entry("middleware-async", "/mw/async/payments/", sync=False),
    Entry("middleware-apiview", "/mw/apiview/payments/"),
    Entry("middleware-viewset-action", "/mw/viewset/payments/refund/", patch=False, get=False),
]


def send(
    client: Client,
    url: str,
    body: Any = None,
    *,
    key: str | None = None,
    method: str = "post",
    **extra: Any,
) -> Any:
    if key is not None:
        extra["HTTP_IDEMPOTENCY_KEY"] = key
    payload = json.dumps({"amount": 10} if body is None else body)
    return getattr(client, method)(url, payload, content_type="application/json", **extra)


def scope_of(user: Any) -> str:
    return f"user:{user.pk}" if user is not None else "anonymous"


def record_for(user: Any, key: str) -> Record | None:
    scope = scope_of(user)
    return get_storage().get(scope, hash_key(scope, key))


def fingerprint_for(url: str, body: Any = None, method: str = "post") -> str:
    payload = json.dumps({"amount": 10} if body is None else body)
    request = getattr(RequestFactory(), method)(url, payload, content_type="application/json")
    return request_fingerprint(request)


def problem(response: Any) -> dict[str, Any]:
    assert response["Content-Type"] == "application/problem+json"
    assert response["Cache-Control"] == "no-store"
    body: dict[str, Any] = json.loads(response.content)
    assert body["status"] == response.status_code
    assert body["type"].startswith("https://")
    return body
