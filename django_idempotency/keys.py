"""Reading the ``Idempotency-Key`` header and deciding whose key it is."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from django_idempotency.conf import settings
from django_idempotency.exceptions import KeyInvalid

if TYPE_CHECKING:
    from django.http import HttpRequest


ANONYMOUS_SCOPE = "anonymous"


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
        if any(not 0x21 <= ord(c) <= 0x7E or c in ',"' for c in value):
            raise KeyInvalid(
                "The Idempotency-Key header must be one value of printable ASCII characters."
            )
        key = value
    if not min_length <= len(key) <= max_length:
        raise KeyInvalid(
            f"The idempotency key must be {min_length} to {max_length} characters long."
        )
    return key


def _parse_sf_string(value: str) -> str:
    # RFC 8941 §4.2.5: a DQUOTE-delimited run of printable ASCII where only \" and \\ are escapes.
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
            if i != len(value) - 1:
                raise KeyInvalid("The Idempotency-Key header must hold exactly one string.")
            return "".join(out)
        if not 0x20 <= ord(c) <= 0x7E:
            raise KeyInvalid("The idempotency key must be printable ASCII.")
        out.append(c)
        i += 1
    raise KeyInvalid("The quoted Idempotency-Key is not terminated.")


def hash_key(scope: str, key: str) -> str:
    """SHA-256 over scope and key.

    Hashing makes the stored column case-sensitive on every database (MySQL's default collations
    would otherwise treat ``abc`` and ``ABC`` as one key) and keeps raw keys out of the table. The
    scope is part of the digest so that even a case-insensitive comparison of two scopes can never
    merge two principals' records.
    """
    digest = hashlib.sha256()
    for part in (scope, key):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return digest.hexdigest()


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
