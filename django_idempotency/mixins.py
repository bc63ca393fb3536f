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
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.http.request import RawPostDataException
from django.http.response import HttpResponseBase

from django_idempotency.conf import settings
from django_idempotency.core import Flight, Idempotency, Policy, _imported
from django_idempotency.keys import meta_name

if TYPE_CHECKING:
    from rest_framework.request import Request

    _Base = Any
else:
    _Base = object

WRONG_ORDER = (
    "IdempotencyMixin must come before the DRF view in the bases of {name}, so that its "
    "initial(), finalize_response() and dispatch() wrap DRF's:\n\n"
    "    class {name}(IdempotencyMixin, {view}):\n"
    "        ...\n\n"
    "In any other order DRF's methods run instead and the view is not protected at all."
)

#: Each hook method of the mixin, and the Policy field it fills when a view overrides it.
_HOOKS = {
    "get_idempotency_key": "key",
    "get_idempotency_scope": "scope",
    "get_idempotency_fingerprint": "fingerprint",
    "get_idempotency_replay_headers": "replay_headers",
}


class _Answer(Exception):
    """Carries the layer's own answer (a replay or a problem) out of ``initial``."""

    def __init__(self, response: HttpResponseBase) -> None:
        super().__init__()
        self.response = response


class _ViewHook:
    """A policy hook that calls a method of the view handling the request.

    The policy is built once per view class, but DRF makes a view instance per request; the
    DRF request knows its view (``parser_context["view"]``), so the hook finds the method there.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, request: Request, *args: Any) -> Any:
        return getattr(request.parser_context["view"], self.name)(request, *args)


class IdempotencyMixin(_Base):  # type: ignore[misc]
    """Put it first in the bases of a DRF view. ``None`` attributes follow the settings.

    The attributes are the fields of :class:`~django_idempotency.core.Policy` with an
    ``idempotency_`` prefix; the ``get_idempotency_*`` methods are its hooks.
    """

    idempotency_required: bool | None = None
    #: Protected methods, e.g. ``("POST", "PATCH", "PUT", "DELETE")``.
    idempotency_methods: Iterable[str] | None = None
    #: Seconds a result is replayed.
    idempotency_ttl: int | None = None
    #: Seconds a claim survives its worker before another request may reclaim it.
    idempotency_lease: int | None = None
    #: Store 5xx answers like Stripe instead of releasing the key.
    idempotency_store_server_errors: bool | None = None
    #: Commit the view's writes and the stored result together.
    idempotency_atomic: bool | None = None
    #: Seconds a duplicate waits for the original before answering 409.
    idempotency_wait: float | None = None

    _idempotency_engine: ClassVar[Idempotency | None] = None
    _idempotency_flight: Flight | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        from rest_framework.views import APIView

        mro = cls.__mro__
        if issubclass(cls, APIView) and mro.index(APIView) < mro.index(IdempotencyMixin):
            raise TypeError(WRONG_ORDER.format(name=cls.__name__, view=_drf_base(cls).__name__))
        cls._idempotency_engine = None  # each class builds its own, from its own attributes

    def get_idempotency_key(self, request: Request) -> str | None:
        """The key of this request: by default the ``Idempotency-Key`` header.

        Override it to derive the key on the server (a webhook's event id, after verifying
        its signature); ``None`` leaves the request unprotected.
        """
        return request.headers.get(settings.IDEMPOTENCY_HEADER)

    def get_idempotency_scope(self, request: Request) -> str | None:
        """Whose key this is. Runs after DRF authentication; ``None`` skips idempotency."""
        return _imported(settings.IDEMPOTENCY_SCOPE_RESOLVER)(request)  # type: ignore[no-any-return]

    def get_idempotency_fingerprint(self, request: Request) -> str:
        """What makes a retry the same request; see ``django_idempotency.fingerprint``."""
        return _imported(settings.IDEMPOTENCY_FINGERPRINT)(request)  # type: ignore[no-any-return]

    def get_idempotency_replay_headers(
        self, request: Request, response: HttpResponse
    ) -> Mapping[str, str] | None:
        """Extra headers for a replay (never its status or body)."""
        return None

    def get_idempotency_policy(self) -> Policy:
        """The view's policy, built once per class from its attributes and overridden hooks.

        Override it to decide per action or per request (``dataclasses.replace`` on the
        result); the returned policy is used for this request only.
        """
        return self._get_idempotency_engine().policy

    @classmethod
    def _get_idempotency_engine(cls) -> Idempotency:
        engine = cls._idempotency_engine
        if engine is None:
            options: dict[str, Any] = {
                name: getattr(cls, f"idempotency_{name}", None)
                for name in Policy.option_names()
                if name not in _HOOKS.values()
            }
            for method, name in _HOOKS.items():
                # Only a hook the class overrides goes through the view; the defaults do what
                # the policy does without one (read the header, call the configured resolver),
                # so every request skips their indirection.
                if getattr(cls, method) is not getattr(IdempotencyMixin, method):
                    options[name] = _ViewHook(method)
            engine = cls._idempotency_engine = Idempotency(Policy(**options))
        return engine

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self._idempotency_flight = None
        engine = self._get_idempotency_engine()
        policy = self.get_idempotency_policy()
        if policy is not engine.policy:
            engine = Idempotency(policy)
        protected = policy.protects(request.method)
        if protected and meta_name(settings.IDEMPOTENCY_HEADER) in request._request.META:
            _read_body_early(request._request)
        super().initial(request, *args, **kwargs)
        if not protected:
            return
        outcome = engine.begin(request)
        if isinstance(outcome, Flight):
            outcome.enter()
            self._idempotency_flight = outcome
        elif outcome is not None:
            raise _Answer(outcome)

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        # Whatever escapes DRF's own handling (an exception DRF re-raises, a response that fails
        # to render, or the worker being stopped) must still close the view's transaction and
        # settle the key; a flight settled already ignores this.
        try:
            return super().dispatch(request, *args, **kwargs)  # type: ignore[no-any-return]
        except BaseException:
            flight, self._idempotency_flight = self._idempotency_flight, None
            if flight is not None:
                flight.fail(*sys.exc_info())
            raise

    # DRF's stubs type these hooks with DRF's Response, while the layer may answer with a plain
    # problem+json HttpResponse; Any keeps `class V(IdempotencyMixin, APIView)` free of errors
    # under strict mypy in users' projects.
    def handle_exception(self, exc: Exception) -> Any:
        if isinstance(exc, _Answer):
            return exc.response
        return super().handle_exception(exc)

    def finalize_response(
        self, request: Request, response: HttpResponseBase, *args: Any, **kwargs: Any
    ) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)
        flight = self._idempotency_flight
        if flight is not None:
            response = flight.finish(response)
            self._idempotency_flight = None
        return response


def _drf_base(cls: type) -> type:
    from rest_framework.views import APIView

    for base in cls.__bases__:
        if issubclass(base, APIView):
            return base
    return APIView


def _read_body_early(request: HttpRequest) -> None:
    # DRF's CSRF check for session authentication reads request.POST, which consumes a multipart
    # stream; reading the body first keeps the exact bytes for the fingerprint.
    # A body that cannot be read is reported by the fingerprint step as a problem response.
    with contextlib.suppress(RequestDataTooBig, RawPostDataException):
        request.body  # noqa: B018
