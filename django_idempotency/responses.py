"""Turning responses into stored data and back, and rendering problem details.

Responses are stored as data (status, a whitelist of headers, body bytes), never pickled, so
whoever can write to the store cannot make the application run code, and a replay can never
carry another client's cookie.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

from django.http import HttpResponse
from django.http.response import HttpResponseBase

from django_idempotency.conf import NEVER_STORED_HEADERS, settings
from django_idempotency.exceptions import IdempotencyError
from django_idempotency.storage.base import StoredResponse

REPLAYED_HEADER = "Idempotent-Replayed"
PROBLEM_CONTENT_TYPE = "application/problem+json"


def ensure_rendered(response: HttpResponseBase) -> None:
    """Render a lazy (template or DRF) response so that its bytes can be stored."""
    render = getattr(response, "render", None)
    if callable(render) and not getattr(response, "is_rendered", True):
        render()


def capture(response: HttpResponseBase, *, max_size: int) -> StoredResponse | None:
    """The storable form of ``response``, or ``None`` when it is streamed or too large."""
    if response.streaming or not isinstance(response, HttpResponse):
        return None
    body = response.content
    if len(body) > max_size:
        return None
    wanted = _stored_headers(settings.IDEMPOTENCY_REPLAY_HEADERS)
    headers = tuple((k, v) for k, v in response.items() if k.lower() in wanted)
    return StoredResponse(status=response.status_code, headers=headers, body=body)


@functools.cache
def _stored_headers(names: tuple[str, ...]) -> frozenset[str]:
    # Keyed by the setting's value, so a changed setting is a new entry, never a stale one.
    return frozenset(name.lower() for name in names) - NEVER_STORED_HEADERS


def replay(stored: StoredResponse) -> HttpResponse:
    response = HttpResponse(stored.body, status=stored.status)
    # HttpResponse sets a default Content-Type; the stored one (or none) wins.
    del response["Content-Type"]
    for name, value in stored.headers:
        response[name] = value
    response[REPLAYED_HEADER] = "true"
    return response


def add_headers(response: HttpResponse, extra: Mapping[str, str]) -> None:
    """Apply a replay hook's headers; per-client and replay-marker headers stay as they are."""
    for name, value in extra.items():
        if name.lower() not in NEVER_STORED_HEADERS and name.lower() != REPLAYED_HEADER.lower():
            response[name] = value


def problem(error: IdempotencyError) -> HttpResponse:
    """RFC 9457 problem details for an error the layer generates."""
    body = {
        "type": settings.IDEMPOTENCY_PROBLEM_BASE_URI + error.code,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
    }
    response = HttpResponse(
        json.dumps(body), status=error.status, content_type=PROBLEM_CONTENT_TYPE
    )
    response["Cache-Control"] = "no-store"
    if error.retry_after is not None:
        response["Retry-After"] = str(error.retry_after)
    return response
