from __future__ import annotations

from typing import Any

import pytest
from django.test import RequestFactory, override_settings

from django_idempotency.exceptions import KeyInvalid
from django_idempotency.fingerprint import json_fingerprint, request_fingerprint
from django_idempotency.keys import ANONYMOUS_SCOPE, hash_key, parse_key, user_scope


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc", "abc"),
        ('"abc"', "abc"),
        ('  "abc"\t', "abc"),
        ('"with space"', "with space"),
        ('"quote\\"inside"', 'quote"inside'),
        ('"back\\\\slash"', "back\\slash"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ],
)
def test_parse_key_accepts_tokens_and_sf_strings(raw: str, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize("raw", ["", "a,b", 'a"b', "\x7f", "é", '"abc', '"a\\x"', '"a"b', '"\x01"'])
def test_parse_key_refuses(raw: str) -> None:
    with pytest.raises(KeyInvalid):
        parse_key(raw)


def test_parse_key_bounds_are_configurable() -> None:
    assert parse_key("abcd", min_length=4, max_length=4) == "abcd"
    with pytest.raises(KeyInvalid, match="4 to 4"):
        parse_key("abc", min_length=4, max_length=4)


def test_strict_mode_refuses_bare_tokens() -> None:
    assert parse_key('"abc"', strict=True) == "abc"
    with pytest.raises(KeyInvalid, match="quoted"):
        parse_key("abc", strict=True)


def test_hash_key_separates_scopes_and_keeps_case() -> None:
    assert hash_key("user:1", "abc") != hash_key("user:2", "abc")
    assert hash_key("user:1", "abc") != hash_key("user:1", "ABC")
    # Length prefixes: moving characters between scope and key changes the digest.
    assert hash_key("user:1a", "bc") != hash_key("user:1", "abc")
    assert len(hash_key("s", "k")) == 64


class _User:
    def __init__(self, pk: Any, authenticated: bool) -> None:
        self.pk = pk
        self.is_authenticated = authenticated


def test_user_scope() -> None:
    request = RequestFactory().post("/")
    request.user = _User(7, True)  # type: ignore[assignment]
    assert user_scope(request) == "user:7"
    request.user = _User(None, False)  # type: ignore[assignment]
    assert user_scope(request) == ANONYMOUS_SCOPE
    with override_settings(IDEMPOTENCY_SKIP_ANONYMOUS=True):
        assert user_scope(request) is None


def _post(path: str, body: bytes, content_type: str = "application/json") -> Any:
    return RequestFactory().generic("POST", path, body, content_type=content_type)


def test_fingerprint_covers_method_path_query_media_type_and_body() -> None:
    base = request_fingerprint(_post("/p/?a=1", b'{"x": 1}'))
    assert base == request_fingerprint(_post("/p/?a=1", b'{"x": 1}'))
    assert base == request_fingerprint(
        _post("/p/?a=1", b'{"x": 1}', "application/json; charset=utf-8")
    )
    assert base != request_fingerprint(_post("/p/?a=2", b'{"x": 1}'))
    assert base != request_fingerprint(_post("/q/?a=1", b'{"x": 1}'))
    assert base != request_fingerprint(_post("/p/?a=1", b'{"x": 2}'))
    assert base != request_fingerprint(_post("/p/?a=1", b'{"x": 1}', "text/plain"))
    patch = RequestFactory().generic(
        "PATCH", "/p/?a=1", b'{"x": 1}', content_type="application/json"
    )
    assert base != request_fingerprint(patch)


def test_json_fingerprint_ignores_key_order_and_whitespace() -> None:
    a = json_fingerprint(_post("/p/", b'{"a": 1, "b": [1, 2]}'))
    b = json_fingerprint(_post("/p/", b'{"b":[1,2],"a":1}'))
    assert a == b
    assert a != json_fingerprint(_post("/p/", b'{"b":[2,1],"a":1}'))
    # Not JSON: falls back to the raw bytes.
    assert json_fingerprint(_post("/p/", b"{nope")) != json_fingerprint(_post("/p/", b"{nope "))


def test_fingerprint_of_a_consumed_multipart_stream() -> None:
    request = RequestFactory().post("/p/", {"field": "v", "file": _upload(b"data")})
    request.POST  # noqa: B018 - consumes the stream, as a CSRF check does
    first = request_fingerprint(request)
    other = RequestFactory().post("/p/", {"field": "v", "file": _upload(b"DATA")})
    other.POST  # noqa: B018
    assert first != request_fingerprint(other)
    same = RequestFactory().post("/p/", {"field": "v", "file": _upload(b"data")})
    same.POST  # noqa: B018
    assert first == request_fingerprint(same)


def _upload(content: bytes) -> Any:
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("a.txt", content)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize(
    "raw",
    [
        '"abc";x=1',
        '"abc";x',
        '"abc";x=?0;y=tok/en:1;z="s\\"q"',
        '"abc"; a=-1.5;b=:YWJj:;c=@1700000000;d=%"caf%c3%a9"',
        '"abc";*k.1_-=*tok',
    ],
)
def test_sf_string_parameters_are_accepted_and_ignored(raw: str, strict: bool) -> None:
    # RFC 9651 §3.1.2 allows parameters on any Item: they do not change which key is named.
    assert parse_key(raw, strict=strict) == "abc"
    assert hash_key("s", parse_key(raw, strict=strict)) == hash_key("s", parse_key('"abc"'))


@pytest.mark.parametrize(
    "raw",
    [
        '"abc";',  # a parameter without a name
        '"abc";X=1',  # names are lowercase
        '"abc";1x=1',
        '"abc" ;x=1',  # no space before ";"
        '"abc";x=',  # "=" without a value
        '"abc";x=1, "def"',  # a list, not one item
        '"abc";x="open',
        '"abc";x=?2',
        '"abc";x=:not base64!:',
        '"abc";x=1.2345',
        '"abc";x=1 y',
        '"abc";x=\x01',
    ],
)
def test_malformed_sf_string_parameters_are_refused(raw: str) -> None:
    for strict in (False, True):
        with pytest.raises(KeyInvalid):
            parse_key(raw, strict=strict)


@pytest.mark.django_db
def test_keys_differing_only_in_parameters_replay_one_result(client: Any) -> None:
    from tests.behaviour import ENTRIES, send

    for entry in ENTRIES:
        first = send(client, entry.url, key=f'"pk-{entry}";v=1')
        again = send(client, entry.url, key=f'"pk-{entry}";v=2;trace="x"')
        assert first.status_code == 201, entry
        assert again.status_code == 201, entry
        assert again["Idempotent-Replayed"] == "true", entry
        assert again.content == first.content, entry
