"""Errors the idempotency layer answers with, each carrying its HTTP meaning.

``code`` is the stable problem type: it is appended to ``IDEMPOTENCY_PROBLEM_BASE_URI`` to form
the RFC 9457 ``type`` URI and names an anchor of ``docs/problems.md``. Codes are public API and
are never renamed or reused.
"""

from __future__ import annotations


class IdempotencyError(Exception):
    status: int = 500
    code: str = "idempotency-error"
    title: str = "Idempotency error"
    detail: str = ""
    #: Seconds for ``Retry-After``, or ``None`` when a retry cannot help.
    retry_after: int | None = None

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None) -> None:
        if detail is not None:
            self.detail = detail
        if retry_after is not None:
            self.retry_after = retry_after
        super().__init__(self.detail or self.title)


class KeyMissing(IdempotencyError):
    status = 400
    code = "idempotency-key-missing"
    title = "Idempotency key missing"
    detail = "This endpoint requires an Idempotency-Key header."


class KeyInvalid(IdempotencyError):
    status = 400
    code = "idempotency-key-invalid"
    title = "Idempotency key invalid"
    detail = "The Idempotency-Key header is malformed."


class RequestTooLarge(IdempotencyError):
    status = 413
    code = "idempotency-request-too-large"
    title = "Request too large to fingerprint"
    detail = "The request body exceeds DATA_UPLOAD_MAX_MEMORY_SIZE and cannot be fingerprinted."


class BodyUnavailable(IdempotencyError):
    status = 500
    code = "idempotency-body-unavailable"
    title = "Request body unavailable"
    detail = (
        "The server read the request body before it could be fingerprinted; the request was "
        "not processed."
    )


class KeyReused(IdempotencyError):
    status = 422
    code = "idempotency-key-reused"
    title = "Idempotency key reused"
    detail = "This key was already used for a different request."


class RequestInProgress(IdempotencyError):
    status = 409
    code = "idempotency-request-in-progress"
    title = "Request in progress"
    detail = "A request with this key is still being processed; retry later."
    retry_after = 1


class AlreadyInProgress(RequestInProgress):
    """Raised by ``idempotent_function`` (and retried by ``contrib.celery``) while another
    call holds the key; ``retry_after`` says how many seconds to wait before calling again."""

    detail = "A call with this key is still running; call again later."


class ResultUnavailable(IdempotencyError):
    status = 409
    code = "idempotency-result-unavailable"
    title = "Result unavailable"
    detail = (
        "A request with this key completed, but its response was streamed or too large to be "
        "stored, so it cannot be replayed."
    )


class StoreUnavailable(IdempotencyError):
    status = 503
    code = "idempotency-store-unavailable"
    title = "Idempotency store unavailable"
    detail = "The idempotency store could not be reached; the request was not processed."
    retry_after = 1


#: Every problem the layer can answer, for the docs and the OpenAPI extension.
PROBLEMS: tuple[type[IdempotencyError], ...] = (
    KeyMissing,
    KeyInvalid,
    RequestTooLarge,
    BodyUnavailable,
    KeyReused,
    RequestInProgress,
    ResultUnavailable,
    StoreUnavailable,
)


class StoreError(Exception):
    """Raised by a store when its backend fails or answers ambiguously."""
