"""Once-only Celery tasks: ``idempotent_task`` under ``@shared_task(bind=True, acks_late=True)``.

Celery delivers a task at least once: with ``acks_late`` a worker lost mid-task, a visibility
timeout that ran out, or a publisher that retried all deliver it again. ``idempotent_task`` runs
the body through :mod:`django_idempotency.functions`, so each key's body runs once across every
delivery: a delivery after completion returns the stored result without running, and one that
meets the key in flight (the original still running, or a dead worker's lease not yet ended) is
retried with ``self.retry(countdown=retry_after)`` instead of failing, until the original
finishes (then it returns the stored result) or its lease ends (then it runs, once).

Install the extra (``django-idempotency[celery]``); the package root never imports this
module, nor Celery.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from django_idempotency.core import Policy
from django_idempotency.exceptions import AlreadyInProgress, StoreUnavailable
from django_idempotency.functions import (
    FingerprintFunction,
    KeyFunction,
    OnceFunction,
    ScopeFunction,
)

F = TypeVar("F", bound=Callable[..., Any])


def _retry_later(task: Any, exc: AlreadyInProgress) -> BaseException:
    """``task.retry(countdown=exc.retry_after)``, except that it does not count as a retry.

    A key in flight is not the task failing: it settles when the original finishes, or one lease
    after its worker died. Counting these retries would let a dead worker's lease (60 s by
    default, a retry a second) exhaust ``max_retries`` (3 by default), and the redelivery would
    fail with the work never done; ``max_retries`` stays for the body's own failures. The retry
    is published exactly as ``Task.retry`` publishes it, with the same request id and options.
    """
    from celery.exceptions import Retry

    request = task.request
    if request.called_directly or request.is_eager:
        return exc  # no worker to come back to: the caller decides
    countdown = exc.retry_after or 1
    signature = task.signature_from_request(countdown=countdown, retries=request.retries)
    signature.apply_async()
    retry: BaseException = Retry(exc=exc, when=countdown, sig=signature)
    return retry


def idempotent_task(
    *,
    key: KeyFunction,
    scope: str | ScopeFunction | None = None,
    ttl: int | None = None,
    lease: int | None = None,
    wait: float | None = None,
    fingerprint: FingerprintFunction | None = None,
    atomic: bool | None = None,
) -> Callable[[F], F]:
    """Run a bound task's body once per key; put it below ``@shared_task(bind=True, ...)``.

    ``key``, ``scope`` and ``fingerprint`` are called with the task's arguments without
    ``self``, exactly as for :func:`~django_idempotency.functions.idempotent_function`; the
    default scope is ``celery:`` and the body's dotted name. Retries while the key is in flight
    neither count in ``self.request.retries`` nor against ``max_retries``: they end when the
    original finishes or its lease does.
    """
    policy = Policy(ttl=ttl, lease=lease, wait=wait, atomic=atomic)

    def decorate(func: F) -> F:
        if inspect.iscoroutinefunction(func):
            raise TypeError(
                "idempotent_task decorates synchronous task bodies; Celery runs no others"
            )
        signature = inspect.signature(func)
        parameters = list(signature.parameters.values())
        if not parameters:
            raise TypeError(
                "idempotent_task needs a bound task: @shared_task(bind=True, acks_late=True) above "
                "it, and `self` as the body's first parameter"
            )
        name = f"{func.__module__}.{func.__qualname__}"
        once = OnceFunction(
            name,
            signature.replace(parameters=parameters[1:]),
            key=key,
            scope=f"celery:{name}" if scope is None else scope,
            fingerprint=fingerprint,
            policy=policy,
        )

        @functools.wraps(func)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return once.call(args, kwargs, lambda: func(self, *args, **kwargs))
            except AlreadyInProgress as exc:
                retry = _retry_later(self, exc)
                if retry is exc:
                    raise
                raise retry from exc
            except StoreUnavailable as exc:
                # The body did not run, and a failed acks_late task is acknowledged and gone: retry
                # it. Counted, so a store that stays down fails the task after max_retries.
                raise self.retry(exc=exc, countdown=exc.retry_after) from exc

        wrapper.idempotency = once  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
