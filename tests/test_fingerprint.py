"""Fingerprints of form and multipart bodies, and of a subset of fields (issue 8, item 2).

A browser's ``FormData`` and ``requests`` with ``files=`` make a new multipart boundary on every
attempt, so these tests send the same content under different boundaries: through the engine
directly, through every entry point, and from a real client against a real server.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client, RequestFactory
from django.test.client import encode_multipart

from django_idempotency.fingerprint import (
    fields_fingerprint,
    json_fingerprint,
    request_fingerprint,
)
from django_idempotency.keys import hash_key
from tests.behaviour import ENTRIES, Entry, problem
from tests.testapp.models import Payment

ROOT = Path(__file__).resolve().parent.parent
FINGERPRINTS = [request_fingerprint, json_fingerprint, fields_fingerprint(exclude=["sent_at"])]
FP_IDS = ["request", "json", "fields"]


def _multipart(data: dict[str, Any], boundary: str | None = None, path: str = "/p/") -> Any:
    boundary = boundary or uuid.uuid4().hex
    return RequestFactory().generic(
        "POST",
        path,
        encode_multipart(boundary, data),
        content_type=f"multipart/form-data; boundary={boundary}",
    )


def _form(body: str, path: str = "/p/") -> Any:
    return RequestFactory().generic(
        "POST", path, body.encode(), content_type="application/x-www-form-urlencoded"
    )


def _file(content: bytes, name: str = "a.txt", content_type: str = "text/plain") -> Any:
    return SimpleUploadedFile(name, content, content_type=content_type)


def _doc(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"note": "10", "doc": _file(b"hello")}
    data.update(changes)
    return data


@pytest.mark.parametrize("fingerprint", FINGERPRINTS, ids=FP_IDS)
def test_multipart_boundary_does_not_count(fingerprint: Any) -> None:
    assert fingerprint(_multipart(_doc(), "b-one")) == fingerprint(_multipart(_doc(), "b-two"))


@pytest.mark.parametrize("fingerprint", FINGERPRINTS, ids=FP_IDS)
@pytest.mark.parametrize(
    "change",
    [
        {"note": "11"},
        {"doc": _file(b"HELLO")},
        {"doc": _file(b"hello", name="b.txt")},
        {"doc": _file(b"hello", content_type="application/pdf")},
        {"doc": [_file(b"hello"), _file(b"hello")]},
        {"extra": "1"},
    ],
    ids=["value", "bytes", "file-name", "content-type", "two-files", "new-field"],
)
def test_multipart_content_counts(fingerprint: Any, change: dict[str, Any]) -> None:
    assert fingerprint(_multipart(_doc())) != fingerprint(_multipart(_doc(**change)))


@pytest.mark.parametrize("fingerprint", FINGERPRINTS, ids=FP_IDS)
def test_a_field_and_a_file_of_one_name_are_not_confused(fingerprint: Any) -> None:
    as_field = _multipart({"doc": "hello"})
    as_file = _multipart({"doc": _file(b"hello", name="doc")})
    assert fingerprint(as_field) != fingerprint(as_file)


@pytest.mark.parametrize("fingerprint", FINGERPRINTS, ids=FP_IDS)
def test_names_are_sorted_and_values_of_one_name_keep_their_order(fingerprint: Any) -> None:
    assert fingerprint(_form("a=1&b=2")) == fingerprint(_form("b=2&a=1"))
    assert fingerprint(_form("a=1&a=2")) != fingerprint(_form("a=2&a=1"))
    # Percent-encoding is not content either.
    assert fingerprint(_form("a=x+y&b=%41")) == fingerprint(_form("b=A&a=x%20y"))
    assert fingerprint(_form("a=1")) != fingerprint(_form("a=2"))
    # The same in multipart: encode_multipart writes a list's values in order.
    first = _multipart({"a": ["1", "2"], "b": "x"})
    assert fingerprint(first) == fingerprint(_multipart({"b": "x", "a": ["1", "2"]}))
    assert fingerprint(first) != fingerprint(_multipart({"a": ["2", "1"], "b": "x"}))


@pytest.mark.parametrize("fingerprint", FINGERPRINTS, ids=FP_IDS)
def test_parsed_stream_and_raw_bytes_give_one_fingerprint(fingerprint: Any) -> None:
    """Whatever happened first (the body read, or the form parsed), a retry matches it."""
    data = {"note": "10", "tags": ["a", "b"], "doc": _file(b"x" * 70_000, name="dir/b.bin")}
    from_bytes = _multipart(dict(data))
    from_bytes.body  # noqa: B018 - what the mixin does before DRF's CSRF check
    data["doc"] = _file(b"x" * 70_000, name="dir/b.bin")
    parsed = _multipart(data)
    parsed.POST  # noqa: B018 - consumes the stream, as a CSRF check does
    assert fingerprint(from_bytes) == fingerprint(parsed)
    # Hashing a parsed file leaves it readable for the view.
    assert parsed.FILES["doc"].read() == b"x" * 70_000
    # The raw-bytes path parses a copy: the request's own form is untouched for the view.
    assert not hasattr(from_bytes, "_post")


@pytest.mark.parametrize("fingerprint", FINGERPRINTS, ids=FP_IDS)
@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data",  # no boundary at all
        "multipart/form-data; boundary=nope",  # a boundary that is not in the body
        "multipart/form-data; boundary=" + "b" * 300,  # longer than RFC 2046 allows
    ],
)
def test_malformed_multipart_counts_by_its_bytes(fingerprint: Any, content_type: str) -> None:
    def post(body: bytes) -> Any:
        return RequestFactory().generic("POST", "/p/", body, content_type=content_type)

    assert fingerprint(post(b"--x\r\nnot a part")) == fingerprint(post(b"--x\r\nnot a part"))
    assert fingerprint(post(b"--x\r\nnot a part")) != fingerprint(post(b"--x\r\nnot a parT"))


def test_fields_fingerprint_include_and_exclude() -> None:
    def json_post(payload: Any) -> Any:
        return RequestFactory().post("/p/", json.dumps(payload), content_type="application/json")

    no_time = fields_fingerprint(exclude=["sent_at"])
    assert no_time(json_post({"amount": 1, "sent_at": 1})) == no_time(
        json_post({"sent_at": 2, "amount": 1})
    )
    assert no_time(json_post({"amount": 1, "sent_at": 1})) != no_time(json_post({"amount": 2}))
    only_amount = fields_fingerprint(include=["amount", "doc"])
    assert only_amount(json_post({"amount": 1, "memo": "a"})) == only_amount(
        json_post({"amount": 1, "memo": "b"})
    )
    assert only_amount(_multipart(_doc(note="1"))) == only_amount(_multipart(_doc(note="2")))
    assert only_amount(_multipart(_doc())) != only_amount(_multipart(_doc(doc=_file(b"other"))))
    assert no_time(_form("a=1&sent_at=1")) == no_time(_form("sent_at=2&a=1"))
    both = fields_fingerprint(include=["a", "sent_at"], exclude=["sent_at"])
    assert both(_form("a=1&sent_at=1&z=1")) == both(_form("a=1&sent_at=2&z=2"))
    # Bodies without top-level fields count whole, canonicalised like json_fingerprint.
    assert no_time(json_post([1, {"sent_at": 1}])) != no_time(json_post([1, {"sent_at": 2}]))
    assert no_time(json_post([{"b": 1, "a": 2}])) == json_fingerprint(json_post([{"a": 2, "b": 1}]))
    # The query string always counts.
    assert no_time(_form("a=1", "/p/?x=1")) != no_time(_form("a=1", "/p/?x=2"))
    with pytest.raises(TypeError, match="list of field names"):
        fields_fingerprint(exclude="sent_at")


# --- through every entry point ----------------------------------------------------------------


def _post_multipart(
    client: Client, entry: Entry, key: str, boundary: str, headers: dict[str, Any], **data: Any
) -> Any:
    payload = {"amount": "10", "doc": _file(b"receipt bytes"), **data}
    return client.post(
        entry.url,
        encode_multipart(boundary, payload),
        content_type=f"multipart/form-data; boundary={boundary}",
        HTTP_IDEMPOTENCY_KEY=key,
        **headers,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
@pytest.mark.parametrize("csrf", [False, True], ids=["token-auth", "session-csrf"])
def test_multipart_retry_with_a_new_boundary_replays(
    entry: Entry, csrf: bool, django_user_model: Any
) -> None:
    client = Client(enforce_csrf_checks=csrf)
    headers: dict[str, str] = {}
    if csrf:
        # A session user: DRF's CSRF check reads request.POST (the multipart stream) before
        # the decorator's fingerprint, while the mixin reads the body first.
        user = django_user_model.objects.create_user(username=f"u-{uuid.uuid4().hex[:6]}")
        client.force_login(user)
        from django.middleware.csrf import _get_new_csrf_string

        token = _get_new_csrf_string()
        client.cookies["csrftoken"] = token
        headers["HTTP_X_CSRFTOKEN"] = token
    key = f"mp-{entry}-{csrf}"
    first = _post_multipart(client, entry, key, "first-boundary", headers)
    assert first.status_code == 201, first.content
    again = _post_multipart(client, entry, key, "second-boundary", headers)
    assert again.status_code == 201, again.content
    assert again["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    other = _post_multipart(client, entry, key, "third-boundary", headers, amount="11")
    assert other.status_code == 422
    assert problem(other)["type"].endswith("idempotency-key-reused")
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_malformed_multipart_is_no_server_error(entry: Entry) -> None:
    client = Client()
    for body in (b"--x\r\nbroken", b"\xff\x00" * 50):
        response = client.post(
            entry.url,
            body,
            content_type="multipart/form-data; boundary=nope",
            HTTP_IDEMPOTENCY_KEY=f"bad-mp-{entry}-{body[:2]!r}",
        )
        assert response.status_code < 500, (entry, response.status_code, response.content)


# --- a real client against a real server ------------------------------------------------------


@pytest.fixture
def live_server_url(tmp_path: Path) -> Iterator[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "IDEMPOTENCY_SERVE_DB_NAME": str(connection.settings_dict["NAME"]),
    }
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(  # noqa: S603 - our own module, no shell
            [sys.executable, "-m", "tests.serve"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        assert line.startswith("PORT "), f"server did not start:\n{log.read_text()}"
        yield f"http://127.0.0.1:{line.split()[1]}"
    finally:
        process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.django_db(transaction=True)
def test_requests_files_retry_replays_on_a_live_server(live_server_url: str) -> None:
    import requests

    session = requests.Session()
    session.trust_env = False  # never a proxy from the environment: 127.0.0.1 only
    started = time.monotonic()
    for entry in ENTRIES:
        url = live_server_url + entry.url
        key = f"mp-live-{entry}"
        sent = []
        for _ in range(2):
            response = session.post(
                url,
                files={"doc": ("a.txt", b"hello")},
                data={"amount": "10"},
                headers={"Idempotency-Key": key},
                timeout=30,
            )
            sent.append(response)
        first, again = sent
        boundaries = {r.request.headers["Content-Type"] for r in sent}
        assert len(boundaries) == 2, "requests reused a boundary: the test proves nothing"
        assert first.status_code == 201, (entry, first.text)
        assert again.status_code == 201, (entry, again.text)
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.content == first.content
    assert Payment.objects.count() == len(ENTRIES)
    assert time.monotonic() - started < 60


def test_a_consumed_stream_that_held_no_form_never_matches_another() -> None:
    def consumed(body: bytes, boundary: str) -> Any:
        request = RequestFactory().generic(
            "POST", "/p/", body, content_type=f"multipart/form-data; boundary={boundary}"
        )
        request.POST  # noqa: B018 - parses to nothing: the boundary never occurs
        return request

    assert request_fingerprint(consumed(b"garbage", "b1")) != request_fingerprint(
        consumed(b"other garbage", "b2")
    )


@pytest.mark.django_db
def test_a_body_stream_read_before_the_layer_is_a_problem_and_the_view_does_not_run() -> None:
    """Code ahead of the layer read the JSON stream itself (not ``request.body``): the bytes are
    gone, so no fingerprint can tell a retry from another request. Answer a problem, run
    nothing, and leave no record."""
    from django_idempotency.storage import get_storage
    from tests.testapp.views import payment_django_view

    request = RequestFactory().post(
        "/p/", b'{"amount": 1}', content_type="application/json", HTTP_IDEMPOTENCY_KEY="read-1"
    )
    request.read()
    before = Payment.objects.count()
    response: Any = payment_django_view(request)
    assert response.status_code == 500, response.content
    assert problem(response)["type"].endswith("#idempotency-body-unavailable")
    assert Payment.objects.count() == before
    assert get_storage().get("anonymous", hash_key("anonymous", "read-1")) is None
