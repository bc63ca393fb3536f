"""OpenAPI for protected operations, through drf-spectacular (the ``openapi`` extra).

drf-spectacular builds each operation in its ``AutoSchema``; :class:`IdempotencySchemaMixin`
adds what a client of a protected operation needs to know: the ``Idempotency-Key`` header, the
``Idempotent-Replayed`` header of replays, and the problem responses the layer answers with. An
operation is protected when its view uses ``IdempotencyMixin`` for that method, or when its
handler is wrapped by ``@idempotent`` (an ``@api_view`` function or a viewset action); both are
read from the same :class:`~django_idempotency.core.Policy` the request would use, so the schema
cannot disagree with the runtime.

Enable it project-wide::

    REST_FRAMEWORK = {"DEFAULT_SCHEMA_CLASS": "django_idempotency.openapi.IdempotencyAutoSchema"}

or, with your own ``AutoSchema`` subclass, put :class:`IdempotencySchemaMixin` first in its bases.

This module imports drf-spectacular at import time; nothing else in the package imports this
module, so projects without drf-spectacular are unaffected.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ResolvedComponent, get_doc

from django_idempotency.conf import settings
from django_idempotency.core import Policy
from django_idempotency.decorators import POLICY_ATTR
from django_idempotency.exceptions import (
    IdempotencyError,
    KeyInvalid,
    KeyMissing,
    KeyReused,
    RequestInProgress,
    ResultUnavailable,
    StoreUnavailable,
)
from django_idempotency.mixins import IdempotencyMixin
from django_idempotency.responses import PROBLEM_CONTENT_TYPE, REPLAYED_HEADER

PROBLEM_COMPONENT = "IdempotencyProblem"

#: The problems a protected operation can answer with, by status. 413 is left out: Django itself
#: answers it for any oversized body, whether the view is protected or not; so is the 500 of a
#: body read before the layer, a fault of the server's code that no client can act on.
DOCUMENTED_PROBLEMS: dict[int, tuple[type[IdempotencyError], ...]] = {
    400: (KeyMissing, KeyInvalid),
    409: (RequestInProgress, ResultUnavailable),
    422: (KeyReused,),
    503: (StoreUnavailable,),
}

_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details answered by the idempotency layer.",
    "properties": {
        "type": {
            "type": "string",
            "format": "uri",
            "description": "IDEMPOTENCY_PROBLEM_BASE_URI followed by the problem code.",
        },
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
    "required": ["type", "title", "status"],
}

_RETRY_AFTER_HEADER: dict[str, Any] = {
    "schema": {"type": "integer", "minimum": 1},
    "description": "Seconds to wait before retrying with the same key and request.",
}


def operation_policy(view: Any, method: str) -> Policy | None:
    """The policy that protects ``method`` on ``view``, or ``None`` when it is not protected.

    The mixin takes precedence over a decorated handler, as it does at runtime: a request that
    the mixin claimed is never claimed again by ``@idempotent`` on the action.
    """
    policy: Policy | None
    if isinstance(view, IdempotencyMixin):
        policy = view.get_idempotency_policy()
    else:
        action = getattr(view, "action", None)
        policy = _decorated_policy(getattr(view, action or method.lower(), None))
    return policy if policy is not None and policy.protects(method) else None


def _decorated_policy(handler: Any) -> Policy | None:
    policy = getattr(handler, POLICY_ATTR, None)
    if isinstance(policy, Policy):
        return policy
    # @api_view installs a handler that calls the decorated function from its closure, and copies
    # none of its attributes, so the marker is found there.
    for cell in getattr(handler, "__closure__", None) or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        policy = getattr(contents, POLICY_ATTR, None)
        if isinstance(policy, Policy):
            return policy
    return None


def is_required(policy: Policy) -> bool:
    return policy.required if policy.required is not None else settings.IDEMPOTENCY_REQUIRED


def key_parameter(policy: Policy) -> dict[str, Any]:
    """The ``Idempotency-Key`` header parameter of a protected operation."""
    lengths = f"{settings.IDEMPOTENCY_KEY_MIN_LENGTH} to {settings.IDEMPOTENCY_KEY_MAX_LENGTH}"
    form = (
        'a quoted structured-field string ("key")'
        if settings.IDEMPOTENCY_STRICT_KEY_FORMAT
        else 'a bare token or a quoted structured-field string ("key")'
    )
    return {
        "in": "header",
        "name": settings.IDEMPOTENCY_HEADER,
        "required": is_required(policy),
        "schema": {"type": "string"},
        "description": (
            f"A unique key for this request, {lengths} printable ASCII characters, sent as "
            f"{form}; a UUID v4 is recommended. Send the same key with the same request to "
            "retry it safely: it runs at most once and a retry replays its stored response."
        ),
    }


def problem_example(error: type[IdempotencyError]) -> dict[str, Any]:
    return {
        "summary": error.title,
        "value": {
            "type": settings.IDEMPOTENCY_PROBLEM_BASE_URI + error.code,
            "title": error.title,
            "status": error.status,
            "detail": error.detail,
        },
    }


class IdempotencySchemaMixin:
    """Adds the idempotency header and responses to the operations of protected views.

    Put it before drf-spectacular's ``AutoSchema`` (or a subclass of it) in the bases.
    """

    view: Any
    method: str
    path: str
    registry: Any

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation: dict[str, Any] | None = super().get_operation(  # type: ignore[misc]
            *args, **kwargs
        )
        if operation is None:
            return None
        policy = operation_policy(self.view, self.method)
        if policy is None:
            from django_idempotency.middleware import schema_policy

            policy = schema_policy(self.view, self.path, self.method)
        if policy is not None:
            self.add_idempotency(operation, policy)
        return operation

    def get_description(self, *args: Any, **kwargs: Any) -> str:
        # drf-spectacular falls back to the first docstring in the view's MRO before DRF's own
        # classes, which is IdempotencyMixin's for a view without a docstring: our usage note
        # must not become the operation's description.
        description: str = super().get_description(*args, **kwargs)  # type: ignore[misc]
        if isinstance(self.view, IdempotencyMixin) and description == get_doc(IdempotencyMixin):
            return ""
        return description

    def add_idempotency(self, operation: dict[str, Any], policy: Policy) -> None:
        """Document ``policy`` on ``operation``; override to change what is added."""
        parameter = key_parameter(policy)
        parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
        if not any(
            p.get("in") == "header" and str(p.get("name", "")).lower() == parameter["name"].lower()
            for p in parameters
        ):
            parameters.append(parameter)
        responses: dict[str, Any] = operation.setdefault("responses", {})
        for code, response in responses.items():
            if str(code).isdigit() and policy.is_final(int(code)):
                response.setdefault("headers", {})[REPLAYED_HEADER] = {
                    "schema": {"type": "string", "enum": ["true"]},
                    "description": (
                        "Present on a replay: this response was stored when the request first "
                        "ran with this key, and is answered again without running it."
                    ),
                }
        ref = self._problem_schema_ref()
        for status, errors in DOCUMENTED_PROBLEMS.items():
            self._add_problem_response(responses, status, errors, ref)

    def _problem_schema_ref(self) -> dict[str, str]:
        component = ResolvedComponent(  # type: ignore[no-untyped-call]
            name=PROBLEM_COMPONENT,
            type=ResolvedComponent.SCHEMA,
            object=PROBLEM_COMPONENT,
            schema=_PROBLEM_SCHEMA,
        )
        self.registry.register_on_missing(component)
        ref: dict[str, str] = component.ref
        return ref

    def _add_problem_response(
        self,
        responses: dict[str, Any],
        status: int,
        errors: tuple[type[IdempotencyError], ...],
        ref: dict[str, str],
    ) -> None:
        # A view may already document this status (a 400 for its own validation errors): the
        # problem media type is added beside its content rather than replacing it.
        titles = " or ".join(f"{e.title} ({e.code})" for e in errors)
        response = responses.setdefault(str(status), {"description": ""})
        description = response.get("description", "")
        response["description"] = f"{description} {titles}".strip() if description else titles
        # A view that answers its own problem with this status (an out-of-stock 409, say) keeps
        # its examples beside the layer's, and its schema when that is not the layer's too.
        content = response.setdefault("content", {})
        documented = content.get(PROBLEM_CONTENT_TYPE) or {}
        schema = documented.get("schema")
        content[PROBLEM_CONTENT_TYPE] = {
            # anyOf, not oneOf: a document of the view's may well match the layer's schema too.
            "schema": ref if schema in (None, ref) else {"anyOf": [ref, schema]},
            "examples": {
                **(documented.get("examples") or {}),
                **{e.code: problem_example(e) for e in errors},
            },
        }
        headers = response.setdefault("headers", {})
        headers.setdefault("Cache-Control", {"schema": {"type": "string", "enum": ["no-store"]}})
        if any(e.retry_after is not None for e in errors):
            headers.setdefault("Retry-After", _RETRY_AFTER_HEADER)


class IdempotencyAutoSchema(IdempotencySchemaMixin, AutoSchema):
    """drf-spectacular's ``AutoSchema`` with :class:`IdempotencySchemaMixin`."""


__all__: list[str] = [
    "DOCUMENTED_PROBLEMS",
    "IdempotencyAutoSchema",
    "IdempotencySchemaMixin",
    "operation_policy",
]
