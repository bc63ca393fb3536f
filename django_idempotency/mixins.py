"""``IdempotencyMixin`` for DRF ``APIView``, ``GenericAPIView`` and viewsets.

The key is claimed at the end of :meth:`initial`, after DRF has authenticated the request and
checked permissions and throttles, so the scope is the real principal and a request DRF refuses
never holds a key. The result is stored in :meth:`finalize_response`, once DRF has chosen the
renderer, and :meth:`handle_exception` releases the key when the view raised something DRF
does not turn into a response.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.http.request import RawPostDataException
from django.http.response import HttpResponseBase
from django.utils.module_loading import import_string

from django_idempotency.conf import settings
from django_idempotency.core import Flight, Idempotency, Policy
from django_idempotency.decorators import HANDLED_ATTR

if TYPE_CHECKING:
    from rest_framework.request import Request

    _Base = Any
else:
    _Base = object


class _Answer(Exception):
    """Carries the layer's own answer (a replay or a problem) out of ``initial``."""

    def __init__(self, response: HttpResponseBase) -> None:
        super().__init__()
        self.response = response


class IdempotencyMixin(_Base):  # type: ignore[misc]
    """Put it first in the bases of a DRF view. ``None`` attributes follow the settings."""

    idempotency_required: bool | None = None
    #: Protected methods, e.g. ``("POST", "PATCH", "PUT", "DELETE")``.
    idempotency_methods: Iterable[str] | None = None
    #: Seconds a result is replayed.
    idempotency_ttl: int | None = None
    #: Seconds an in-flight claim holds before another request may reclaim it.
    idempotency_lease: int | None = None
    #: Store 5xx answers like Stripe instead of releasing the key.
    idempotency_store_server_errors: bool | None = None
    #: Commit the view's writes and the stored result together (ORM store).
    idempotency_atomic: bool | None = None
    #: Seconds a duplicate waits for the original before answering 409.
    idempotency_wait: float | None = None
    #: The engine's clock; replace it in tests to move time.
    idempotency_clock: Callable[[], datetime] | None = None

    _idempotency_flight: Flight | None = None

    def get_idempotency_scope(self, request: Request) -> str | None:
        """Whose key this is. Runs after DRF authentication; ``None`` skips idempotency."""
        resolver = import_string(settings.IDEMPOTENCY_SCOPE_RESOLVER)
        return resolver(request)  # type: ignore[no-any-return]

    def get_idempotency_fingerprint(self, request: Request) -> str:
        """What makes a retry the same request; see ``django_idempotency.fingerprint``."""
        fingerprint = import_string(settings.IDEMPOTENCY_FINGERPRINT)
        return fingerprint(request)  # type: ignore[no-any-return]

    def get_idempotency_replay_headers(
        self, request: Request, response: HttpResponse
    ) -> Mapping[str, str] | None:
        """Extra headers for a replay (never its status or body)."""
        return None

    def get_idempotency_policy(self) -> Policy:
        methods = self.idempotency_methods
        return Policy(
            required=self.idempotency_required,
            methods=frozenset(m.upper() for m in methods) if methods is not None else None,
            ttl=self.idempotency_ttl,
            lease=self.idempotency_lease,
            store_server_errors=self.idempotency_store_server_errors,
            atomic=self.idempotency_atomic,
            wait=self.idempotency_wait,
            scope=self.get_idempotency_scope,
            fingerprint=self.get_idempotency_fingerprint,
            replay_headers=self.get_idempotency_replay_headers,
        )

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self._idempotency_flight = None
        policy = self.get_idempotency_policy()
        protected = policy.protects(request.method)
        if protected and settings.IDEMPOTENCY_HEADER in request._request.headers:
            _read_body_early(request._request)
        super().initial(request, *args, **kwargs)
        if not protected:
            return
        setattr(request._request, HANDLED_ATTR, True)
        outcome = Idempotency(policy, clock=self.idempotency_clock).begin(request)
        if isinstance(outcome, Flight):
            outcome.enter()
            self._idempotency_flight = outcome
        elif outcome is not None:
            raise _Answer(outcome)

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        # Whatever escapes DRF's own handling (an exception DRF re-raises, or the worker being
        # stopped) must still close the view's transaction and settle the key.
        try:
            return super().dispatch(request, *args, **kwargs)  # type: ignore[no-any-return]
        except BaseException:
            flight, self._idempotency_flight = self._idempotency_flight, None
            if flight is not None:
                flight.fail(*sys.exc_info())
            raise

    def handle_exception(self, exc: Exception) -> HttpResponseBase:
        if isinstance(exc, _Answer):
            return exc.response
        return super().handle_exception(exc)  # type: ignore[no-any-return]

    def finalize_response(
        self, request: Request, response: HttpResponseBase, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        response = super().finalize_response(request, response, *args, **kwargs)
        flight, self._idempotency_flight = self._idempotency_flight, None
        if flight is not None:
            response = flight.finish(response)
        return response


def _read_body_early(request: HttpRequest) -> None:
    # DRF's CSRF check for session authentication reads request.POST, which consumes a multipart
    # stream; reading the body first keeps the exact bytes for the fingerprint.
    # A body that cannot be read is reported by the fingerprint step as a problem response.
    with contextlib.suppress(RequestDataTooBig, RawPostDataException):
        request.body  # noqa: B018
