from __future__ import annotations

import json

from django.http import HttpResponse, StreamingHttpResponse
from django.test import override_settings

from django_idempotency.exceptions import KeyMissing, RequestInProgress, ResultUnavailable
from django_idempotency.responses import add_headers, capture, problem, replay


def test_binary_bodies_and_safe_headers_round_trip() -> None:
    body = bytes(range(256)) * 4
    original = HttpResponse(body, status=201, content_type="application/octet-stream")
    original["ETag"] = '"v1"'
    original["Location"] = "/things/1/"
    original["X-Internal"] = "not replayed"
    original.set_cookie("sessionid", "secret")
    stored = capture(original, max_size=10_000)
    assert stored is not None
    again = replay(stored)
    assert again.status_code == 201
    assert again.content == body
    assert again["Content-Type"] == "application/octet-stream"
    assert again["ETag"] == '"v1"'
    assert again["Location"] == "/things/1/"
    assert "X-Internal" not in again
    assert "Set-Cookie" not in again
    assert again["Idempotent-Replayed"] == "true"


def test_set_cookie_is_never_stored_even_when_listed() -> None:
    response = HttpResponse("x")
    response["Set-Cookie"] = "a=b"
    with override_settings(IDEMPOTENCY_REPLAY_HEADERS=["Set-Cookie", "Content-Type"]):
        stored = capture(response, max_size=100)
    assert stored is not None
    assert [name.lower() for name, _ in stored.headers] == ["content-type"]


def test_streaming_and_oversize_are_not_captured() -> None:
    assert capture(StreamingHttpResponse(iter([b"a"])), max_size=100) is None
    assert capture(HttpResponse(b"x" * 101), max_size=100) is None
    assert capture(HttpResponse(b"x" * 100), max_size=100) is not None


def test_replay_hook_headers_cannot_touch_cookies_or_the_marker() -> None:
    stored = capture(HttpResponse("x"), max_size=100)
    assert stored is not None
    response = replay(stored)
    add_headers(response, {"X-Trace": "1", "Set-Cookie": "a=b", "Idempotent-Replayed": "false"})
    assert response["X-Trace"] == "1"
    assert "Set-Cookie" not in response
    assert response["Idempotent-Replayed"] == "true"


def test_problem_details() -> None:
    response = problem(RequestInProgress(retry_after=3))
    assert response.status_code == 409
    assert response["Content-Type"] == "application/problem+json"
    assert response["Cache-Control"] == "no-store"
    assert response["Retry-After"] == "3"
    assert json.loads(response.content) == {
        "type": "https://django-idempotency.readthedocs.io/en/latest/problems/#"
        "idempotency-request-in-progress",
        "title": "Request in progress",
        "status": 409,
        "detail": RequestInProgress.detail,
    }
    assert "Retry-After" not in problem(ResultUnavailable())


@override_settings(IDEMPOTENCY_PROBLEM_BASE_URI="https://api.example.com/problems/")
def test_problem_base_uri_is_configurable() -> None:
    body = json.loads(problem(KeyMissing()).content)
    assert body["type"] == "https://api.example.com/problems/idempotency-key-missing"
