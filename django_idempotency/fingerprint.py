"""Request fingerprints: what makes two requests with the same key "the same request"."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import TYPE_CHECKING

from django.http.request import RawPostDataException

if TYPE_CHECKING:
    from django.http import HttpRequest


def _digest(*parts: bytes) -> str:
    # Length-prefixed so that moving bytes between the path and the body changes the digest.
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def media_type(request: HttpRequest) -> str:
    # Parameters are left out: a multipart boundary is random per request, and the body bytes
    # already carry the charset's effect.
    content_type: str = request.META.get("CONTENT_TYPE", "")
    return content_type.split(";", 1)[0].strip().lower()


def raw_body(request: HttpRequest) -> bytes:
    """The body bytes, even when form parsing already consumed the stream.

    With DRF, a session-authenticated request has its CSRF token looked up in ``request.POST``
    before the view runs, which reads a multipart stream for good. The parsed fields and files
    then stand in for the bytes.
    """
    raw: HttpRequest = getattr(request, "_request", request)
    try:
        return raw.body
    except RawPostDataException:
        digest = hashlib.sha256(raw.POST.urlencode().encode())
        for name, files in sorted(raw.FILES.lists()):
            for upload in files:
                digest.update(f"\0{name}\0{upload.name}\0{upload.size}\0".encode())
                for chunk in upload.chunks():
                    digest.update(chunk)
                upload.seek(0)
        return digest.digest()


def _fingerprint(request: HttpRequest, body: bytes) -> str:
    return _digest(
        (request.method or "").encode(),
        request.get_full_path().encode(),
        media_type(request).encode(),
        body,
    )


def request_fingerprint(request: HttpRequest) -> str:
    """SHA-256 over method, path with query string, media type and the raw body bytes."""
    return _fingerprint(request, raw_body(request))


def json_fingerprint(request: HttpRequest) -> str:
    """Like :func:`request_fingerprint`, but a JSON body is canonicalised first.

    Clients that re-serialise a payload on retry (other key order, other whitespace) then still
    match. A body that is not valid JSON falls back to its raw bytes.
    """
    body = raw_body(request)
    if media_type(request).endswith(("/json", "+json")) and body:
        with contextlib.suppress(ValueError):
            body = json.dumps(
                json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
    return _fingerprint(request, body)
