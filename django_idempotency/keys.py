"""Reading the ``Idempotency-Key`` header and deciding whose key it is."""

from __future__ import annotations

import functools
import hashlib
import re
from typing import TYPE_CHECKING

from django_idempotency.conf import settings
from django_idempotency.exceptions import KeyInvalid

if TYPE_CHECKING:
    from django.http import HttpRequest


ANONYMOUS_SCOPE = "anonymous"

# Printable ASCII (0x21-0x7E) but the comma, and for a bare header key the double quote too;
# one regular expression instead of a test per character, since every keyed request runs it.
_DERIVED_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]*")
_BARE_KEY = re.compile(r"[\x21\x23-\x2b\x2d-\x7e]*")


@functools.cache
def meta_name(header: str) -> str:
    """Where ``request.META`` holds ``header`` (``Idempotency-Key`` -> ``HTTP_IDEMPOTENCY_KEY``).

    Reading META directly spares every keyed request building ``request.headers``, a dict of all
    its headers, for the one it needs.
    """
    name = header.upper().replace("-", "_")
    return name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{name}"


def parse_key(raw: str, *, strict: bool = False, min_length: int = 1, max_length: int = 255) -> str:
    """Return the key named by one header value.

    The draft sends keys as RFC 8941 sf-strings (``"abc"``) while Stripe-style clients send a bare
    token (``abc``); both name the key ``abc``. Anything that could be two values (a comma, which
    is also how a server joins repeated header lines) or that is not printable ASCII is refused:
    guessing which key the client meant could replay the wrong result.
    """
    value = raw.strip(" \t")
    if value.startswith('"'):
        key = _parse_sf_string(value)
    elif strict:
        raise KeyInvalid("The Idempotency-Key header must be a quoted structured-field string.")
    else:
        if _BARE_KEY.fullmatch(value) is None:
            raise KeyInvalid(
                "The Idempotency-Key header must be one value of printable ASCII characters."
            )
        key = value
    if not min_length <= len(key) <= max_length:
        raise KeyInvalid(
            f"The idempotency key must be {min_length} to {max_length} characters long."
        )
    return key


def check_derived_key(key: str, *, min_length: int = 1, max_length: int = 255) -> str:
    """Validate a key that the server derived (a webhook's event id), not a header value.

    No header syntax applies: a quote is part of the key, never a structured-field string. It
    must still be one token of printable ASCII (no space, no comma, as a bare header key) within
    the configured bounds, so that it reads the same in logs and in every store.
    """
    if _DERIVED_KEY.fullmatch(key) is None:
        raise KeyInvalid(
            "The derived idempotency key must be one token of printable ASCII characters."
        )
    if not min_length <= len(key) <= max_length:
        raise KeyInvalid(
            f"The derived idempotency key must be {min_length} to {max_length} characters long."
        )
    return key


def _parse_sf_string(value: str) -> str:
    """The string of a structured-field item, without its parameters.

    RFC 9651 §4.2.5: a DQUOTE-delimited run of printable ASCII whose only escapes are a
    backslash before a DQUOTE or a backslash.
    An Item may carry parameters (``"abc";x=1``, §3.1.2). They are checked for syntax, then
    ignored: the key is the string alone, so a client or proxy that annotates the header still
    names the same key, while anything that is not one well-formed item is still refused.
    """
    out: list[str] = []
    i = 1
    while i < len(value):
        c = value[i]
        if c == "\\":
            if i + 1 >= len(value) or value[i + 1] not in '"\\':
                raise KeyInvalid("The quoted Idempotency-Key has an invalid escape.")
            out.append(value[i + 1])
            i += 2
            continue
        if c == '"':
            _skip_parameters(value, i + 1)
            return "".join(out)
        if not 0x20 <= ord(c) <= 0x7E:
            raise KeyInvalid("The idempotency key must be printable ASCII.")
        out.append(c)
        i += 1
    raise KeyInvalid("The quoted Idempotency-Key is not terminated.")


_ONE_STRING = "The Idempotency-Key header must hold exactly one string."
_KEY_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz*")
_KEY_REST = _KEY_FIRST | frozenset("0123456789_-.")
_TOKEN_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz*")
# tchar (RFC 9110 §5.6.2) plus ":" and "/" (RFC 9651 §3.3.4).
_TOKEN_REST = _TOKEN_FIRST | frozenset("0123456789!#$%&'+-.^_`|~:/")
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_DIGITS = frozenset("0123456789")


def _skip_parameters(value: str, i: int) -> None:
    # RFC 9651 §4.2.3.2: *( ";" *SP key [ "=" bare-item ] ), then nothing but the end of the field
    # (trailing whitespace was stripped with the leading one).
    while i < len(value):
        if value[i] != ";":
            raise KeyInvalid(_ONE_STRING)
        i += 1
        while i < len(value) and value[i] == " ":
            i += 1
        if i >= len(value) or value[i] not in _KEY_FIRST:
            raise KeyInvalid("A parameter of the Idempotency-Key has an invalid name.")
        while i < len(value) and value[i] in _KEY_REST:
            i += 1
        if i < len(value) and value[i] == "=":
            i = _skip_bare_item(value, i + 1)


def _skip_bare_item(value: str, i: int) -> int:
    """Index just past the bare item at ``value[i]`` (RFC 9651 §4.2.3.1)."""
    bad = KeyInvalid("A parameter of the Idempotency-Key has an invalid value.")
    rest = value[i:]
    if rest.startswith(('"', '%"')):  # string, display string
        j = i + (1 if rest[0] == '"' else 2)
        while j < len(value):
            if value[j] == "\\" and rest[0] == '"':
                if j + 1 >= len(value) or value[j + 1] not in '"\\':
                    raise bad
                j += 2
            elif value[j] == '"':
                return j + 1
            elif not 0x20 <= ord(value[j]) <= 0x7E:
                raise bad
            else:
                j += 1
        raise bad
    if rest.startswith("?"):  # boolean
        if rest[1:2] not in ("0", "1"):
            raise bad
        return i + 2
    if rest.startswith(":"):  # byte sequence
        end = value.find(":", i + 1)
        if end < 0 or any(c not in _BASE64 for c in value[i + 1 : end]):
            raise bad
        return end + 1
    if rest[:1] and rest[0] in _TOKEN_FIRST:  # token
        j = i + 1
        while j < len(value) and value[j] in _TOKEN_REST:
            j += 1
        return j
    j = i + 1 if rest.startswith("@") else i  # a date is an integer after "@"
    if value[j : j + 1] == "-":
        j += 1
    start = j
    while j < len(value) and (value[j] in _DIGITS or value[j] == "."):
        j += 1
    number = value[start:j]
    whole, _, fraction = number.partition(".")
    if (
        not whole
        or any(c not in _DIGITS for c in whole)
        or any(c not in _DIGITS for c in fraction)
        or ("." in number and (not fraction or len(whole) > 12 or len(fraction) > 3))
        or ("." not in number and len(whole) > 15)
        or (rest.startswith("@") and "." in number)
    ):
        raise bad
    return j


def hash_key(scope: str, key: str) -> str:
    """SHA-256 over scope and key.

    Hashing makes the stored column case-sensitive on every database (MySQL's default collations
    would otherwise treat ``abc`` and ``ABC`` as one key) and keeps raw keys out of the table. The
    scope is part of the digest so that even a case-insensitive comparison of two scopes can never
    merge two principals' records.
    """
    scope_bytes, key_bytes = scope.encode(), key.encode()
    return hashlib.sha256(
        len(scope_bytes).to_bytes(4, "big")
        + scope_bytes
        + len(key_bytes).to_bytes(4, "big")
        + key_bytes
    ).hexdigest()


def user_scope(request: HttpRequest) -> str | None:
    """The default scope: the authenticated principal, or the shared anonymous namespace.

    Returns ``None`` (idempotency skipped) for anonymous requests when
    ``IDEMPOTENCY_SKIP_ANONYMOUS`` is set. With DRF, ``request.user`` is the user that DRF's
    authentication classes resolved, which is why the integrations call this after them.
    """
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    if settings.IDEMPOTENCY_SKIP_ANONYMOUS:
        return None
    return ANONYMOUS_SCOPE
