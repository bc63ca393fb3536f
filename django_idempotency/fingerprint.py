"""Request fingerprints: what makes two requests with the same key "the same request".

A fingerprint is a SHA-256 over the method, the path with its query string, the media type and a
canonical form of the body:

- ``application/x-www-form-urlencoded`` and ``multipart/form-data`` bodies are reduced to their
  fields and files (names, values, file names, content types, file bytes). The multipart boundary
  is random per attempt in browsers (``FormData``) and HTTP libraries (``requests`` with
  ``files=``), so hashing the raw bytes would turn every retry into a ``422``.
- Every other body is its raw bytes (:func:`request_fingerprint`) or, for JSON,
  its canonical JSON (:func:`json_fingerprint`, :func:`fields_fingerprint`).

Field order: names are sorted, and the values of one name keep their order. Django's ``QueryDict``
and DRF's parsers expose no order across names, and clients do not keep one (``requests`` puts
``data=`` fields before ``files=``, a browser follows the form's markup), whereas ``getlist()``
returns one name's values in order and a view may rely on it (``items=2&items=1``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from django.http import QueryDict
from django.http.multipartparser import MultiPartParser, MultiPartParserError
from django.http.request import RawPostDataException

if TYPE_CHECKING:
    from django.http import HttpRequest

FORM_MEDIA_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})

# Tags keep the body forms apart, so raw bytes can never collide with a canonical form.
_RAW = b"raw\0"
_FORM = b"form\0"
_JSON = b"json\0"
_UNREADABLE = b"unreadable\0"


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


def _django_request(request: HttpRequest) -> HttpRequest:
    # A DRF Request wraps Django's; the body and the parsed form live on the latter.
    return getattr(request, "_request", request)


@dataclass(frozen=True)
class _Form:
    """A form body as the fingerprint sees it: each name with its values, in order."""

    fields: dict[str, list[str]]
    #: name -> [(file name, content type, charset, size, SHA-256 of the bytes)]
    files: dict[str, list[tuple[str, str, str, int, str]]]

    def subset(self, keep: Callable[[str], bool]) -> _Form:
        return _Form(
            {k: v for k, v in self.fields.items() if keep(k)},
            {k: v for k, v in self.files.items() if keep(k)},
        )

    def encode(self) -> bytes:
        canonical = {
            "fields": sorted(self.fields.items()),
            "files": sorted(self.files.items()),
        }
        text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
        return _FORM + text.encode("utf-8", "surrogatepass")


def _file_entry(upload: Any, size: int, digest: str) -> tuple[str, str, str, int, str]:
    return (upload.name or "", upload.content_type or "", upload.charset or "", size, digest)


class _HashingHandler(FileUploadHandler):
    """Hashes each uploaded file as the parser streams it, and keeps none of its bytes."""

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        self._sha = hashlib.sha256()
        self._size = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self._sha.update(raw_data)
        self._size += len(raw_data)

    def file_complete(self, file_size: int) -> UploadedFile[Any]:
        return _HashedUpload(self, self._size, self._sha.hexdigest())


class _HashedUpload(UploadedFile):  # type: ignore[type-arg]
    """A file known by its hash only. As an ``UploadedFile``, its name goes through the same
    clean-up (basename, 255 characters) as the files a view receives, so both paths agree."""

    def __init__(self, handler: _HashingHandler, size: int, digest: str) -> None:
        super().__init__(None, handler.file_name, handler.content_type, size, handler.charset, None)
        self.digest = digest


def _form_from(post: QueryDict, files: Any) -> _Form:
    fields = {name: list(values) for name, values in post.lists()}
    hashed: dict[str, list[tuple[str, str, str, int, str]]] = {}
    for name, uploads in files.lists():
        for upload in uploads:
            if isinstance(upload, _HashedUpload):
                entry = _file_entry(upload, upload.size or 0, upload.digest)
            else:
                sha = hashlib.sha256()
                size = 0
                for chunk in upload.chunks():
                    sha.update(chunk)
                    size += len(chunk)
                upload.seek(0)  # the view reads it next
                entry = _file_entry(upload, size, sha.hexdigest())
            hashed.setdefault(name, []).append(entry)
    return _Form(fields, hashed)


def _form_of_bytes(request: HttpRequest, body: bytes) -> _Form | None:
    """Parse ``body`` apart from the request, leaving ``request.POST`` to the view as it was.

    ``None`` when the body is not a well-formed form: the caller then hashes the raw bytes, so
    the same malformed body still matches itself and two different ones never match.
    """
    encoding = request.encoding or "utf-8"
    if media_type(request) == "application/x-www-form-urlencoded":
        try:
            return _Form({k: list(v) for k, v in QueryDict(body, encoding=encoding).lists()}, {})
        except RequestDataTooBig:
            raise
        except (SuspiciousOperation, ValueError):
            return None
    meta = {**request.META, "CONTENT_LENGTH": str(len(body))}
    handler = _HashingHandler(request)
    try:
        post, files = MultiPartParser(meta, BytesIO(body), [handler], encoding).parse()
    except RequestDataTooBig:
        raise
    except (MultiPartParserError, SuspiciousOperation, ValueError, UnicodeError):
        return None
    return _form_from(post, files)


@dataclass(frozen=True)
class _Bytes:
    """A body that counts by its bytes, tagged with how they were obtained."""

    data: bytes
    tag: bytes = _RAW

    def encode(self) -> bytes:
        return self.tag + self.data


def _body(request: HttpRequest) -> _Form | _Bytes:
    """What of the body counts. Reads it once, and leaves ``request.POST`` as it was."""
    raw = _django_request(request)
    form_type = media_type(raw) in FORM_MEDIA_TYPES
    try:
        body = raw.body
    except RawPostDataException:
        # Something parsed the form first, which consumed the stream (DRF's CSRF check for a
        # session user reads request.POST): the parsed fields and files stand in for the bytes.
        # They give the same form as parsing the bytes would, so a retry matches either way.
        if not form_type:
            raise
        return _consumed_form(raw)
    if form_type and body:
        form = _form_of_bytes(raw, body)
        # A body in which Django finds no field and no file (its boundary never occurs, say) is
        # not a form, whatever its Content-Type says: two such bodies must not match.
        if form is not None and (form.fields or form.files):
            return form
    return _Bytes(body)


def _consumed_form(raw: HttpRequest) -> _Form | _Bytes:
    try:
        form = _form_from(raw.POST, raw.FILES)
    except (MultiPartParserError, SuspiciousOperation):
        form = _Form({}, {})
    if form.fields or form.files or raw.META.get("CONTENT_LENGTH") in (None, "", "0"):
        return form
    # The parse failed or found nothing, and nothing of the body is left to hash. The full
    # Content-Type, boundary included, makes the fingerprint differ between attempts: a retry
    # gets 422, never the result of another request.
    content_type = raw.META.get("CONTENT_TYPE", "")
    return _Bytes(content_type.encode("utf-8", "surrogateescape"), _UNREADABLE)


def _fingerprint(request: HttpRequest, body: bytes) -> str:
    return _digest(
        (request.method or "").encode(),
        request.get_full_path().encode(),
        media_type(request).encode(),
        body,
    )


def request_fingerprint(request: HttpRequest) -> str:
    """SHA-256 over method, path with query string, media type and the body.

    The body is its raw bytes, except a form or multipart body, which counts by its fields and
    files (see the module docstring), never by its boundary. A malformed one counts by its bytes.
    """
    raw = _django_request(request)
    media = media_type(raw)
    if media in FORM_MEDIA_TYPES:
        return _fingerprint(request, _body(request).encode())
    # The common case (JSON, bytes) without the detour through _body: the same parts, digested
    # once; an unreadable stream raises as it does there.
    return _digest(
        (raw.method or "").encode(), raw.get_full_path().encode(), media.encode(), _RAW + raw.body
    )


def _is_json(request: HttpRequest) -> bool:
    return media_type(request).endswith(("/json", "+json"))


def _canonical_json(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _JSON + text.encode("utf-8", "surrogatepass")


def _subset_fingerprint(request: HttpRequest, keep: Callable[[str], bool] | None) -> str:
    body = _body(request)
    if isinstance(body, _Form):
        return _fingerprint(request, (body.subset(keep) if keep else body).encode())
    if body.tag == _RAW and body.data and _is_json(request):
        try:
            value = json.loads(body.data)
        except ValueError:
            return _fingerprint(request, body.encode())
        if keep is not None and isinstance(value, dict):
            value = {k: v for k, v in value.items() if keep(k)}
        return _fingerprint(request, _canonical_json(value))
    return _fingerprint(request, body.encode())


def json_fingerprint(request: HttpRequest) -> str:
    """Like :func:`request_fingerprint`, but a JSON body is canonicalised first.

    Clients that re-serialise a payload on retry (other key order, other whitespace) then still
    match. A body that is not valid JSON falls back to its raw bytes; form and multipart bodies
    count by their fields and files, as with :func:`request_fingerprint`.
    """
    return _subset_fingerprint(request, None)


def fields_fingerprint(
    *, include: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> Callable[[HttpRequest], str]:
    """A fingerprint over some top-level fields of the body only.

    ``include`` keeps only the named fields; ``exclude`` drops the named ones (after
    ``include``). Fields are the top-level keys of a JSON object body, or the fields and files of
    a form or multipart body; other bodies (a JSON array, invalid JSON, bytes) count whole, as
    with :func:`json_fingerprint`. Method, path, query string and media type always count.

    Use it for a field a client changes on every attempt, such as a timestamp it sends::

        payment_fingerprint = fields_fingerprint(exclude=["sent_at"])

        @idempotent(fingerprint=payment_fingerprint)
        def pay(request): ...

    or name a module-level fingerprint like ``payment_fingerprint`` in
    ``IDEMPOTENCY_FINGERPRINT``. A field left out is one that a retry may change freely: the
    replay still answers with the first request's result.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include and exclude take a list of field names, not one string")
    included = frozenset(include) if include is not None else None
    excluded = frozenset(exclude)

    def keep(name: str) -> bool:
        return (included is None or name in included) and name not in excluded

    def fingerprint(request: HttpRequest) -> str:
        return _subset_fingerprint(request, keep)

    fingerprint.__doc__ = (
        f"Fingerprint over the fields {sorted(included) if included is not None else 'all'}"
        f" except {sorted(excluded)}."
    )
    return fingerprint
