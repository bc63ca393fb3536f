"""``IdempotencyMiddleware``: protect every unsafe endpoint under ``IDEMPOTENCY_PATHS`` at once.

The middleware decides in ``process_view``, once Django has resolved the view, and protects a
matching request exactly as the per-view entry points would, with the same engine:

- A view that protects itself (``IdempotencyMixin``, or ``@idempotent`` on the function, the
  handler method or the action) is left alone, so its own options win and nothing is claimed
  twice. ``@idempotency_exempt`` views are left alone too.
- A plain Django view (function or class-based, sync or async) is run through the wrapper of
  ``@idempotent``, called from ``process_view``: the scope comes from ``request.user`` as
  ``AuthenticationMiddleware`` set it.
- A DRF view authenticates inside the view, after every middleware ran, so no middleware can
  see its principal. The middleware runs it through a subclass of its class with
  ``IdempotencyMixin`` first, built once per view class: the claim then happens in DRF's
  ``initial()``, after authentication, permissions and throttles, exactly as for a view written
  with the mixin. The view's own class is not modified.

Because the protected view is called from ``process_view``, middleware listed after this one
would not see the request's ``process_view``: put it last in ``MIDDLEWARE``
(``django_idempotency.W005`` says so when it is not).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import async_to_sync, iscoroutinefunction
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils.deprecation import MiddlewareMixin

from django_idempotency.conf import settings
from django_idempotency.core import Idempotency, Policy
from django_idempotency.decorators import POLICY_ATTR, _async_wrapper, _sync_wrapper

T = TypeVar("T")

#: Set by ``@idempotency_exempt`` on a view function, handler method, action or view class.
EXEMPT_ATTR = "idempotency_exempt"

View = Callable[..., Any]

#: The plan for a view and method: ``None`` leaves the view to Django, else the callable to run.
_Plan = View | None


def idempotency_exempt(view: T) -> T:
    """Keep ``IdempotencyMiddleware`` away from a view: a function view, a class-based view
    (decorate the class; subclasses inherit it), a DRF view, or a viewset action."""
    setattr(view, EXEMPT_ATTR, True)
    return view


def path_is_protected(path: str) -> bool:
    """Whether ``IDEMPOTENCY_PATHS`` covers ``path``: a string is a prefix, a pattern is
    searched (anchor it with ``^`` to match from the start)."""
    for entry in settings.IDEMPOTENCY_PATHS:
        if isinstance(entry, re.Pattern):
            if entry.search(path):
                return True
        elif path.startswith(entry):
            return True
    return False


class IdempotencyMiddleware(MiddlewareMixin):
    """Protect the views under ``IDEMPOTENCY_PATHS`` as if each were decorated."""

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        # Plain views share one engine whose options all follow the settings.
        self._engine = Idempotency(Policy())
        self._plans: weakref.WeakKeyDictionary[View, dict[str, _Plan]] = weakref.WeakKeyDictionary()

    def process_view(
        self,
        request: HttpRequest,
        view_func: View,
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        method = request.method or ""
        if method not in settings.IDEMPOTENCY_METHODS or not path_is_protected(request.path_info):
            return None
        try:
            plans = self._plans.setdefault(view_func, {})
        except TypeError:  # a view object that cannot be weakly referenced: plan every time
            plans = {}
        if method not in plans:
            plans[method] = self._plan(view_func, method)
        run = plans[method]
        if run is None:
            return None
        if iscoroutinefunction(run):
            response: HttpResponseBase = async_to_sync(run)(request, *view_args, **view_kwargs)
        else:
            response = run(request, *view_args, **view_kwargs)
        return response

    def _plan(self, view_func: View, method: str) -> _Plan:
        view_class = _view_class(view_func)
        handler = _handler(view_func, view_class, method)
        if any(_marked(c, EXEMPT_ATTR) for c in (view_func, view_class, handler)):
            return None
        if _protects_itself(view_func, view_class, handler):
            return None
        if view_class is not None and hasattr(view_class, "initialize_request"):
            return _drf_view_with_mixin(view_func, view_class)
        if iscoroutinefunction(view_func):
            return _async_wrapper(view_func, self._engine)
        return _sync_wrapper(view_func, self._engine)


def is_installed() -> bool:
    """Whether ``MIDDLEWARE`` lists this middleware (or a subclass)."""
    from django.conf import settings as django_settings
    from django.utils.module_loading import import_string

    for path in getattr(django_settings, "MIDDLEWARE", None) or ():
        try:
            loaded = import_string(path)
        except ImportError:
            continue
        if isinstance(loaded, type) and issubclass(loaded, IdempotencyMiddleware):
            return True
    return False


def schema_policy(view: Any, path: str, method: str) -> Policy | None:
    """The policy the middleware gives ``method`` on the DRF view instance ``view`` routed at
    ``path``, for the OpenAPI schema; ``None`` when the middleware leaves it alone."""
    method = method.upper()
    if method not in settings.IDEMPOTENCY_METHODS or not path_is_protected(path):
        return None
    view_class = type(view)
    handler = getattr(view_class, getattr(view, "action", None) or method.lower(), None)
    if _marked(view_class, EXEMPT_ATTR) or _marked(handler, EXEMPT_ATTR):
        return None
    if _protects_itself(None, view_class, handler) or not is_installed():
        return None
    return Policy()


def _view_class(view_func: View) -> type | None:
    # DRF's as_view() sets ``cls``, Django's ``view_class``; functools.wraps copies both.
    for name in ("cls", "view_class"):
        value = getattr(view_func, name, None)
        if isinstance(value, type):
            return value
    return None


def _handler(view_func: View, view_class: type | None, method: str) -> Any:
    """The method of the view class that answers ``method``: a viewset's action, an APIView's
    (or ``@api_view`` function's) handler, a Django view's ``get``/``post``."""
    if view_class is None:
        return None
    actions = getattr(view_func, "actions", None)
    name = actions.get(method.lower()) if isinstance(actions, dict) else method.lower()
    return getattr(view_class, name, None) if name else None


def _marked(obj: Any, attr: str) -> bool:
    """Whether ``obj`` carries ``attr``, or, for an ``@api_view`` handler, the function it
    calls: DRF installs a handler that calls the decorated function from its closure and copies
    none of its attributes."""
    if obj is None:
        return False
    if getattr(obj, attr, None) not in (None, False):
        return True
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(contents) and getattr(contents, attr, None) not in (None, False):
            return True
    return False


def _protects_itself(view_func: View | None, view_class: type | None, handler: Any) -> bool:
    if _marked(view_func, POLICY_ATTR) or _marked(handler, POLICY_ATTR):
        return True
    if view_class is None:
        return False
    if _marked(getattr(view_class, "dispatch", None), POLICY_ATTR):
        return True  # @method_decorator(idempotent, name="dispatch")
    if hasattr(view_class, "initialize_request"):
        from django_idempotency.mixins import IdempotencyMixin

        return issubclass(view_class, IdempotencyMixin)
    return False


# One subclass per DRF view class, so that its engine (built once per class) is shared by every
# URL that routes to it.
_with_mixin: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _drf_view_with_mixin(view_func: View, view_class: type) -> View:
    from django_idempotency.mixins import IdempotencyMixin

    subclass = _with_mixin.get(view_class)
    if subclass is None:
        # Same name and module, so DRF's view name, the browsable API and logs are unchanged.
        namespace = {"__module__": view_class.__module__, "__qualname__": view_class.__qualname__}
        subclass = type(view_class.__name__, (IdempotencyMixin, view_class), namespace)
        _with_mixin[view_class] = subclass
    if _wrapper_codes(view_func) != _wrapper_codes(_as_view(view_class, view_func)):
        # The URL routes to the result of as_view() wrapped in another decorator: rebuilding the
        # view from its class would drop that decorator, and claiming outside DRF would scope
        # every token-authenticated client as anonymous. Refuse before anything runs.
        raise ImproperlyConfigured(
            f"IdempotencyMiddleware cannot protect {view_class.__qualname__}: its URL routes to "
            "as_view() wrapped in another decorator, and a DRF view must be claimed after DRF "
            "authentication. Add IdempotencyMixin first in its bases, or mark it "
            "@idempotency_exempt."
        )
    return _as_view(subclass, view_func)


def _as_view(view_class: type, like: View) -> View:
    """``view_class.as_view()`` with the arguments that made ``like``."""
    initkwargs = getattr(like, "initkwargs", {})
    actions = getattr(like, "actions", None)
    if actions is not None:
        return view_class.as_view(actions, **initkwargs)  # type: ignore[attr-defined,no-any-return]
    return view_class.as_view(**initkwargs)  # type: ignore[attr-defined,no-any-return]


def _wrapper_codes(view: Any) -> list[Any]:
    # The code of each function down the __wrapped__ chain: as_view() gives a fixed chain
    # (DRF's csrf_exempt over the view), and any decorator on top of it adds a link.
    codes: list[Any] = []
    while view is not None and len(codes) < 20:
        codes.append(getattr(view, "__code__", None))
        view = getattr(view, "__wrapped__", None)
    return codes
