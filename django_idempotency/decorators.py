"""``@idempotent`` for Django function views, DRF ``@api_view`` functions and viewset actions."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from asgiref.sync import sync_to_async
from django.core.exceptions import BadRequest, PermissionDenied
from django.core.handlers.exception import response_for_exception
from django.http import Http404, HttpRequest
from django.http.response import HttpResponseBase

from django_idempotency.core import Flight, Idempotency, Policy, PolicyOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

F = TypeVar("F", bound=Callable[..., Any])

# Set on every wrapper to the view's Policy, so that tools that only see the view function (the
# OpenAPI extension in django_idempotency.openapi) can tell that it is protected, and how.
POLICY_ATTR = "idempotency_policy"

WRONG_ORDER = (
    "@idempotent must come after (below) @api_view, so that it runs after DRF authentication:\n\n"
    "    @api_view(['POST'])\n"
    "    @idempotent\n"
    "    def my_view(request):\n"
    "        ...\n\n"
    "For class-based DRF views use IdempotencyMixin instead."
)


@overload
def idempotent(view: F, /) -> F: ...


@overload
def idempotent(**options: Unpack[PolicyOptions]) -> Callable[[F], F]: ...


def idempotent(view: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Make a view run once per ``Idempotency-Key``; options are :class:`~core.Policy` fields,
    and those left ``None`` follow the settings."""
    engine = Idempotency(Policy(**options))

    def decorate(func: F) -> F:
        view_class = getattr(func, "cls", None)
        if isinstance(view_class, type) and hasattr(view_class, "initialize_request"):
            raise TypeError(WRONG_ORDER)
        if inspect.iscoroutinefunction(func):
            wrapper = _async_wrapper(func, engine)
        else:
            wrapper = _sync_wrapper(func, engine)
        setattr(wrapper, POLICY_ATTR, engine.policy)
        return wrapper  # type: ignore[return-value]

    if view is not None:
        return decorate(view)
    return decorate


def _find_request(args: tuple[Any, ...]) -> Any:
    # Function views get the request first; methods (viewset actions) get it after ``self``.
    for candidate in args[:2]:
        if isinstance(candidate, HttpRequest) or isinstance(
            getattr(candidate, "_request", None), HttpRequest
        ):
            return candidate
    raise TypeError("@idempotent decorates views: the first argument must be the request.")


def _as_response(request: Any, exc: Exception) -> HttpResponseBase | None:
    """The answer the framework would give for ``exc``, so that every entry point stores alike.

    Under DRF the view's own ``handle_exception`` decides, exactly as for the mixin (it re-raises
    what DRF does not handle). A plain Django view's 404, 403 and 400 exceptions become the
    responses Django's handler would make; anything else is the view failing (``None``).
    """
    view = getattr(request, "parser_context", {}).get("view")
    if view is not None and hasattr(view, "handle_exception"):
        response: HttpResponseBase = view.handle_exception(exc)
        return response
    if isinstance(exc, Http404 | PermissionDenied | BadRequest):
        return response_for_exception(request, exc)
    return None


def _recover(flight: Flight, request: Any, exc: BaseException) -> HttpResponseBase:
    """Turn what the view raised into the framework's response, or fail the flight and re-raise."""
    converted = None
    if isinstance(exc, Exception):
        try:
            converted = _as_response(request, exc)
        except Exception:
            flight.fail(*sys.exc_info())
            raise
    if converted is None:
        flight.fail(type(exc), exc, exc.__traceback__)
        raise exc
    return converted


def _bind_renderer(request: Any, response: HttpResponseBase) -> None:
    """Give an unfinalised DRF ``Response`` the renderer DRF would, so its bytes can be stored.

    ``@api_view`` finalises responses only after the decorated function returns; our result must
    be stored before that, inside the view's transaction.
    """
    if not hasattr(response, "data") or getattr(response, "accepted_renderer", None) is not None:
        return
    view = getattr(request, "parser_context", {}).get("view")
    renderer = getattr(request, "accepted_renderer", None)
    if view is None or renderer is None:
        return
    response.accepted_renderer = renderer  # type: ignore[attr-defined]
    response.accepted_media_type = request.accepted_media_type  # type: ignore[attr-defined]
    response.renderer_context = view.get_renderer_context()  # type: ignore[attr-defined]


def _sync_wrapper(
    func: Callable[..., HttpResponseBase], engine: Idempotency
) -> Callable[..., HttpResponseBase]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> HttpResponseBase:
        request = _find_request(args)
        outcome = engine.begin(request)
        if outcome is None:
            return func(*args, **kwargs)
        if not isinstance(outcome, Flight):
            return outcome
        outcome.enter()
        try:
            response = func(*args, **kwargs)
        except BaseException as exc:
            response = _recover(outcome, request, exc)
        return _finish(outcome, request, response)

    return wrapper


def _async_wrapper(func: Callable[..., Any], engine: Idempotency) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> HttpResponseBase:
        request = _find_request(args)
        outcome = await engine.abegin(request)
        if outcome is None:
            return await func(*args, **kwargs)  # type: ignore[no-any-return]
        if not isinstance(outcome, Flight):
            return outcome
        # An async view cannot share the ORM store's synchronous transaction.
        outcome.enter(atomic=False)
        try:
            response = await func(*args, **kwargs)
        except BaseException as exc:
            response = await _arecover(outcome, request, exc)
        return await outcome.afinish(response)

    return wrapper


async def _arecover(flight: Flight, request: Any, exc: BaseException) -> HttpResponseBase:
    """:func:`_recover` for an async view: the framework's answer may render templates, so it is
    made in a thread, and the key is released on the loop."""
    converted = None
    if isinstance(exc, Exception):
        try:
            converted = await sync_to_async(_as_response)(request, exc)
        except Exception:
            await flight.afail(*sys.exc_info())
            raise
    if converted is None:
        await flight.afail(type(exc), exc, exc.__traceback__)
        raise exc
    return converted


def _finish(flight: Flight, request: Any, response: HttpResponseBase) -> HttpResponseBase:
    try:
        _bind_renderer(request, response)
    except BaseException:
        flight.fail(*sys.exc_info())
        raise
    return flight.finish(response)
